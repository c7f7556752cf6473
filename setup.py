"""Build eeruntime and, when there are sources, its extension ``eeruntime._C``.

The C++ CPU ops are built whenever a compiler is available; the CUDA ops when torch has CUDA and
``nvcc`` is found. ``EERUNTIME_BUILD_CUDA=auto|0|1`` overrides the CUDA choice (1 fails loudly
when it cannot). Without a compiler the package still installs and runs on the torch references.
"""

import glob
import json
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_C_build.json"  # read by eeruntime/_ext.py


def _build_mode():
    mode = os.environ.get("EERUNTIME_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"EERUNTIME_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    return mode


def parse_nvcc_version(text: str):
    """``(major, minor)`` from the output of ``nvcc --version`` ("... release 12.4, V12.4.131"), or None."""
    m = re.search(r"release (\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def nvcc_version(cuda_home: str):
    """The ``(major, minor)`` of ``CUDA_HOME/bin/nvcc``, or None when it cannot be run or read."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_version(out)


def why_no_cuda(torch_cuda, cuda_home, nvcc):
    """Why the CUDA ops cannot be built, or None. ``torch_cuda``: torch.version.cuda ("12.8" or
    None); ``cuda_home``: the toolkit torch found (None without nvcc); ``nvcc``: its
    ``(major, minor)``. Extensions built by an nvcc of another major version than torch's CUDA do
    not load against it (torch's own build refuses them), so that is a reason too."""
    if torch_cuda is None:
        return "this torch was built without CUDA (install a CUDA build of torch)"
    if cuda_home is None:
        return "nvcc was not found (put it on PATH or set CUDA_HOME to the CUDA toolkit)"
    if nvcc is None:
        return f"could not read the version of {os.path.join(cuda_home, 'bin', 'nvcc')} (nvcc --version failed)"
    torch_major = int(str(torch_cuda).split(".")[0])
    if nvcc[0] != torch_major:
        return (
            f"nvcc {nvcc[0]}.{nvcc[1]} (in {cuda_home}) and torch's CUDA {torch_cuda} have different major "
            f"versions; put a CUDA {torch_major}.x toolkit first on PATH or set CUDA_HOME to one"
        )
    return None


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
    if mode != "0":
        has_nvcc = torch.version.cuda is not None and CUDA_HOME is not None
        no_cuda = why_no_cuda(torch.version.cuda, CUDA_HOME, nvcc_version(CUDA_HOME) if has_nvcc else None)
    if mode == "1" and no_cuda:
        sys.exit(f"EERUNTIME_BUILD_CUDA=1 but the CUDA ops cannot be built: {no_cuda}")
    use_cuda = bool(cu) and mode != "0" and no_cuda is None
    if mode == "auto" and no_cuda:
        # One line that stands out in pip's output: a CUDA machine would otherwise end up with the
        # CPU ops only and no sign of it until the GPU paths run slowly.
        warn = "WARNING: " if torch.version.cuda is not None else ""
        print(f"eeruntime: {warn}building the C++ CPU ops only, no CUDA ops: {no_cuda}", file=sys.stderr)
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

    build_info = {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda if use_cuda else None,
    }

    class OptionalBuild(BuildExtension):
        """A failed optional build warns and installs the pure-Python package. A successful one
        records the torch it was built against beside the library (eeruntime/_ext.py compares
        it with the running torch at import)."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if mode == "1":
                    raise
                # An editable install keeps the last build next to the sources; left there, it
                # would load in place of the sources that just failed to compile.
                for stale in (
                    glob.glob(os.path.join(ROOT, "eeruntime", "_C*.so"))
                    + glob.glob(os.path.join(ROOT, "eeruntime", "_C*.pyd"))
                    + glob.glob(os.path.join(ROOT, "eeruntime", BUILD_INFO))
                ):
                    os.remove(stale)
                print(
                    f"eeruntime: extension build failed ({e}); the torch reference backends will be used",
                    file=sys.stderr,
                )
                return
            # The wheel's copy (build_lib) and, for in-place and editable builds, the source tree's.
            folders = {os.path.join(self.build_lib, "eeruntime")}
            if self.inplace or getattr(self, "editable_mode", False):
                folders.add(os.path.join(ROOT, "eeruntime"))
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_INFO), "w") as f:
                    json.dump(build_info, f, indent=1)

    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


def _build_torch_version():
    """The torch this build compiles against (None when torch is not importable here)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__.split("+")[0]  # the public version: 2.13.0 for 2.13.0+cpu


def _requirements(path):
    with open(os.path.join(ROOT, path)) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def dependencies(torch_version):
    """install_requires and extras for a build against ``torch_version`` (its public version, or
    None without the extension). A wheel with the compiled extension only works with the torch it
    was compiled against (no stable C++ ABI across torch releases), so it requires that torch
    release: installing it into an environment keeps the torch there (the build compiles against
    it, see tools/build_backend.py), and pip refuses to pair it with another torch instead of
    leaving a library that cannot load. Without the extension any torch >= 2.3 works."""
    torch_req = f"torch=={torch_version}" if torch_version else "torch>=2.3"
    # torchvision's minor release is torch's minor + 15 (torch 2.13 <-> torchvision 0.28), and
    # each torchvision pins its torch exactly, so an unpinned torchvision (or timm, which pulls
    # the newest one) would replace the user's torch. Note that PyPI's torchvision wheels are
    # built against PyPI's CUDA torch; with a CPU-only torch (download.pytorch.org/whl/cpu),
    # install torchvision from that same index, or its C++ ops fail to register ("operator
    # torchvision::nms does not exist"; tests/torchvision_compat.py works around it for the tests).
    torchvision = "torchvision"
    if torch_version and torch_version.startswith("2."):
        torchvision = f"torchvision==0.{int(torch_version.split('.')[1]) + 15}.*"
    extras = {
        # timm and torchvision backbones (make test installs them in a venv of their own: see
        # requirements-vision.txt)
        "vision": [torchvision, "timm>=1.0"],
        # HF encoders cut at their layers (eeruntime.encoders); tested with 5.x
        "transformers": ["transformers>=5,<6"],
        # the HTTP server, its test client and the LitServe adapter (eeruntime.serve)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "litserve>=0.2.10"],
        # the TorchServe handler (eeruntime.serve.torchserve_handler; TorchServe also needs java 17+);
        # torchserve does not depend on torch (checked with pip --dry-run), PyYAML reads model-config.yaml
        "torchserve": ["torchserve>=0.12", "pyyaml"],
        # Ray Serve deployments and stage tiers (eeruntime.serve.ray)
        "ray": ["ray[serve]>=2.60"],
        "triton": ["triton>=3.2"],
        "data": ["scikit-learn"],
        "dev": _requirements("requirements-dev.txt"),
    }
    return [torch_req, "numpy", "tqdm", "matplotlib", "safetensors"], extras


def _version():
    with open(os.path.join(ROOT, "eeruntime", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _setup(ext_modules, cmdclass):
    # An sdist is built again wherever it is installed: its metadata must not carry this machine's torch.
    torch_version = _build_torch_version() if ext_modules and "sdist" not in sys.argv else None
    install_requires, extras_require = dependencies(torch_version)
    setup(
        name="eeruntime",
        version=_version(),
        description="Batched early-exit inference for PyTorch classifiers: exits, compaction, CUDA graphs",
        long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
        long_description_content_type="text/markdown",
        packages=find_packages(include=["eeruntime", "eeruntime.*"]) + ["eeruntime.kernels"],
        package_dir={"eeruntime.kernels": "kernels"},
        python_requires=">=3.9",
        install_requires=install_requires,
        extras_require=extras_require,
        entry_points={"console_scripts": ["eeruntime = eeruntime.cli:main"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import its helpers
    ext_modules, cmdclass = _extensions()
    _setup(ext_modules, cmdclass)
