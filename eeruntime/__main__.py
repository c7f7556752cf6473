"""Command line: ``python -m eeruntime demo [--out DIR] [--device cpu|cuda]``, ``python -m eeruntime serve BUNDLE --model module:factory``."""
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "train, calibrate and time a 3-exit CNN on the bundled digits",
                "serve": "serve a saved runtime bundle over HTTP (stage scheduler)"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: python -m eeruntime COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<8}{what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    if argv[0] == "serve":
        from .serve.cli import main as serve_main

        return serve_main(argv[1:])
    from .demo import main as demo_main

    return demo_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
