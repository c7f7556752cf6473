"""Device guard for work launched on a tensor's device rather than the current one."""

from __future__ import annotations

import contextlib

import torch


def device_guard(device):
    """A context that makes ``device`` the current CUDA device (so launches go to that device and
    to its current stream) when it is a CUDA device, and does nothing otherwise.

    Triton kernels, ``torch.cuda.current_stream()`` and CUDA graphs all act on the *current* device,
    not on the device of the tensors they are given: logits on cuda:1 while cuda:0 is current would
    be read through device-1 pointers from device 0 without it."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
