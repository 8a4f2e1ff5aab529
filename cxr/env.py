"""Where a run happens: the device, waiting for it, its name, and the environment and provenance
block every run record carries."""

from __future__ import annotations

import datetime as dt
import functools
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from cxr.errors import CxrError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(CxrError):
    """A device that was asked for and is not there."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is the GPU when there is one; `cuda` without one is an error, not a silent CPU run."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() is False)")
    if device not in DEVICES:
        raise DeviceError(f"--device {device!r}: allowed values are {', '.join(DEVICES)}")
    return torch.device(device)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock stopped after this call measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count ("Intel(R) Xeon(R) Processor, 2 cores"): what
    `cxr-bench compare` requires to be equal before it compares throughput."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def cpu_model() -> str:
    """/proc/cpuinfo's model name where there is one (Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.partition(":")[2].split()) or platform.machine()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_text() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def provenance() -> dict:
    """Which code ran: `git describe --always --dirty` of the checkout (e.g. "0f5c6d1-dirty") and
    whether the tree had uncommitted changes; outside a checkout, the package version.
    CXR_GIT_COMMIT (set by the container build, which has no .git) wins."""
    from cxr import __version__

    given = os.environ.get("CXR_GIT_COMMIT")
    if given:
        return {"git_commit": given, "git_dirty": given.endswith("-dirty"), "version": __version__}
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=5)
        described = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        described = ""
    if not described:
        return {"git_commit": None, "git_dirty": None, "version": __version__}
    return {"git_commit": described, "git_dirty": described.endswith("-dirty"), "version": __version__}


def environment(device: torch.device) -> dict:
    """The environment block of a run record (see cxr.record.Environment)."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": device.type, "device_name": device_name(device), "cpu": cpu_text(),
        "hostname": socket.gethostname(), **provenance(),
    }


@functools.cache
def bf16_native(device_type: str) -> bool:
    """Whether the device computes bf16 natively: a CUDA GPU that supports it, or a CPU with avx512_bf16
    or AMX (read from /proc/cpuinfo's flags: detected, not guessed; elsewhere False)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """A spec's precision on `device`: "auto" is "bf16" where the device computes bf16 natively, else "fp32"."""
    if precision == "auto":
        return "bf16" if bf16_native(device.type) else "fp32"
    return precision


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
