"""Registers the fast backends (Triton kernel, C++/CUDA extension) ahead of the torch references.

Each registration is guarded: a missing Triton or an unbuilt extension leaves the backend
registered but able to say why it cannot run, so forcing it gives an error with the fix.
"""
