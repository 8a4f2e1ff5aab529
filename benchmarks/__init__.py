"""The pytest-driven benchmark runner (conftest.py) and the helpers its test modules share.

A package so that pytest puts the checkout's root on sys.path: `pytest benchmarks` then imports
`cxr` from this checkout without an install, and module names cannot clash with tests/.
"""

from __future__ import annotations

import platform

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock stopped after this call measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
