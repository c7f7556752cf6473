"""Registers the fast backends (Triton kernel, C++/CUDA extension) ahead of the torch references.

Each registration is guarded: a missing Triton or an unbuilt extension leaves the backend
registered but able to say why it cannot run, so forcing it gives an error with the fix.
"""

from importlib import import_module

for _name in ("_triton_backend", "_ext_backend"):
    try:
        import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as e:  # the module itself not written yet / not shipped
        if e.name != f"{__package__}.{_name}":
            raise
