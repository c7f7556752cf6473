"""Compile-check the CUDA binding (csrc/*cuda*.cpp and csrc/ops.cpp with EERUNTIME_WITH_CUDA) against
torch's headers and the CUDA toolkit's, on a machine without a CUDA build of torch.

The .cu kernels are compiled by nvcc on their own (make check-cuda); the binding includes torch's
c10/cuda headers, which a CPU wheel ships except for one header its CMake generates
(c10/cuda/impl/cuda_cmake_macros.h). That one is supplied here with the single macro it holds, so
the binding is checked with -fsyntax-only: CUDA binding code that does not compile cannot land.

    python tools/check_cuda_binding.py NVCC
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile


def cuda_includes(nvcc: str):
    """The toolkit's include flags, as nvcc itself passes them (nvcc may be a wrapper script, so
    its path says nothing about where the toolkit lives)."""
    out = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True
    ).stderr
    flags = []
    for line in out.splitlines():
        m = re.match(r"#\$ (?:INCLUDES|SYSTEM_INCLUDES)=(.*)", line)
        if m:
            flags += shlex.split(m.group(1))
    if not flags:
        raise SystemExit(f"could not find the CUDA include directories from `{nvcc} --dryrun`")
    return flags


def main(argv) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    cuda_flags = cuda_includes(argv[0])
    import torch
    from torch.utils.cpp_extension import include_paths

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "*cuda*.cpp"))) + [os.path.join(root, "csrc", "ops.cpp")]
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as stub:
        generated = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
        if not any(os.path.exists(os.path.join(p, generated)) for p in include_paths()):
            os.makedirs(os.path.join(stub, os.path.dirname(generated)))
            with open(os.path.join(stub, generated), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        # The standard torch's own extension build would pick: its headers need C++20 from 2.10 on.
        std = "-std=c++20" if torch.torch_version.TorchVersion(torch.__version__) >= (2, 10) else "-std=c++17"
        flags = [
            std,
            "-fsyntax-only",
            "-DEERUNTIME_WITH_CUDA=1",
            "-DTORCH_API_INCLUDE_EXTENSION_H",
            "-DTORCH_EXTENSION_NAME=_C",
            f"-I{stub}",
            *(f"-I{p}" for p in include_paths()),
            *cuda_flags,
            f"-I{sysconfig.get_paths()['include']}",
        ]
        for src in sources:
            print(f"{cxx} -fsyntax-only -DEERUNTIME_WITH_CUDA {os.path.relpath(src, root)}")
            if subprocess.call([cxx, *flags, src]) != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
