"""PEP 517 build backend: setuptools', compiling eeruntime._C against the torch that is already
installed where pip installs eeruntime.

pip builds in an isolated environment that holds only the build requirements. With ``torch``
among them, pip put the newest torch there (here 2.14.1 and 3 GB of CUDA libraries, 9 minutes)
and compiled the extension against it, while the environment it installed into kept its 2.13:
a library that cannot load. So ``torch`` is not a static build requirement. Each hook first asks
the interpreter pip runs (the target environment's, with pip's isolation variables removed)
where its torch is; when there is one, that folder goes at the end of ``sys.path`` for the build
(setuptools and the other build requirements still come from the isolated environment first), so
setup.py compiles against exactly the torch that will run it. Without an installed torch, or
with a frontend whose build interpreter is not the target's, ``torch`` becomes a build
requirement as before. ``pip install --no-build-isolation`` skips all this (the build then uses
whatever torch the current environment has).
"""

from __future__ import annotations

import os
import subprocess
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook this module does not wrap)

_PROBE = "import os, torch; print(torch.__version__); print(os.path.dirname(os.path.dirname(torch.__file__)))"
_ISOLATION_VARS = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME", "PYTHONSAFEPATH")


def _importable_here() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def installed_torch():
    """(version, folder holding the ``torch`` package) of the target environment, or None."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARS}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=os.path.expanduser("~"),
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or len(lines) < 2 or not os.path.isdir(os.path.join(lines[-1], "torch")):
        return None
    return lines[-2], lines[-1]


def _use_installed_torch() -> bool:
    """Make the target environment's torch importable for this build; False when there is none."""
    if _importable_here():
        return True
    found = installed_torch()
    if found is None:
        return False
    version, folder = found
    if folder not in sys.path:
        sys.path.append(folder)
    print(f"eeruntime: building against the installed torch {version} ({folder})", file=sys.stderr)
    return True


def _requires(hook, config_settings):
    have_torch = _use_installed_torch()  # before the hook: it runs setup.py, which imports torch
    base = list(hook(config_settings))
    return base if have_torch else base + ["torch"]


def get_requires_for_build_wheel(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_wheel, config_settings)


def get_requires_for_build_editable(config_settings=None):
    return _requires(_setuptools.get_requires_for_build_editable, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    # An sdist compiles nothing, but setup.py's metadata (the torch pin) reads the torch version.
    _use_installed_torch()
    return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _use_installed_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _use_installed_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
