"""Triton kernels of eeruntime, packaged as ``eeruntime.kernels`` (one file per kernel)."""
