"""Build eeruntime and, when there are sources, its extension ``eeruntime._C``.

The C++ CPU ops are built whenever a compiler is available; the CUDA ops when torch has CUDA and
``nvcc`` is found. ``EERUNTIME_BUILD_CUDA=auto|0|1`` overrides the CUDA choice (1 fails loudly
when it cannot). Without a compiler the package still installs and runs on the torch references.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_mode():
    mode = os.environ.get("EERUNTIME_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"EERUNTIME_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def _extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("eeruntime: torch not importable at build time; skipping the extension", file=sys.stderr)
        return [], {}
    mode = _build_mode()
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    no_cuda = None
    if torch.version.cuda is None:
        no_cuda = f"torch {torch.__version__} was built without CUDA (install a CUDA build of torch)"
    elif CUDA_HOME is None:
        no_cuda = "nvcc was not found (put it on PATH or set CUDA_HOME to the CUDA toolkit)"
    if mode == "1" and no_cuda:
        sys.exit(f"EERUNTIME_BUILD_CUDA=1 but the CUDA ops cannot be built: {no_cuda}")
    use_cuda = bool(cu) and mode != "0" and no_cuda is None
    if mode == "auto" and no_cuda:
        print(f"eeruntime: building the C++ CPU ops only: {no_cuda}", file=sys.stderr)
    # No -std flag: torch's build adds the standard its headers need (C++20 for recent torch, C++17 for older).
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # ATen's at::parallel_for runs on one thread unless the extension itself is built with
        # OpenMP; it then shares torch's own OpenMP runtime and thread pool.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if use_cuda:
        ext = CUDAExtension(
            "eeruntime._C",
            cpp + cu,
            define_macros=[("EERUNTIME_WITH_CUDA", "1")],
            # -lineinfo: compute-sanitizer and profilers report source lines at no runtime cost
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("eeruntime._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuild(BuildExtension):
        """A failed optional build warns and installs the pure-Python package."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if mode == "1":
                    raise
                # An editable install keeps the last build next to the sources; left there, it
                # would load in place of the sources that just failed to compile.
                for stale in glob.glob(os.path.join(ROOT, "eeruntime", "_C*.so")) + glob.glob(
                    os.path.join(ROOT, "eeruntime", "_C*.pyd")
                ):
                    os.remove(stale)
                print(f"eeruntime: extension build failed ({e}); the torch reference backends will be used",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="eeruntime",
    version="0.1.0",
    description="Batched early-exit inference for PyTorch classifiers: exits, compaction, CUDA graphs",
    packages=find_packages(include=["eeruntime", "eeruntime.*"]) + ["eeruntime.kernels"],
    package_dir={"eeruntime.kernels": "kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "numpy", "tqdm", "matplotlib", "safetensors"],
    extras_require={"triton": ["triton"], "data": ["scikit-learn"], "ray": ["ray[serve]>=2.60"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
