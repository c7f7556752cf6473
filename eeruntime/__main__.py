"""Command line: ``python -m eeruntime demo [--out DIR] [--device cpu|cuda]``, ``python -m eeruntime serve BUNDLE --model module:factory``."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "train, calibrate and time a 3-exit CNN on the bundled digits",
        "demo-vit": "the same for a tiny 6-exit ViT, with PABEE per row vs whole batch",
        "serve": "serve a saved runtime bundle over HTTP (stage scheduler)",
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m eeruntime COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<10}{what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "serve":
        from .serve.cli import main as command
    elif argv[0] == "demo-vit":
        from .demo_vit import main as command
    else:
        from .demo import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
