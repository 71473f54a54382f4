"""What this installation runs on: library versions, the CPU, the devices PyTorch sees, the git
commit. ``vapt-check`` prints it (:mod:`vapt_kernels.check`) and ``vapt-bench`` records it with
every result row (:mod:`vapt_kernels.bench`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import cpuinfo
import torch

from ._version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def library_versions() -> dict[str, str]:
    """Versions of torch, Triton (or ``absent``), timm and this package."""
    import timm

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"torch": torch.__version__, "triton": triton_version, "timm": timm.__version__, "vapt_kernels": __version__}


def versions() -> list[tuple[str, str]]:
    """``(name, description)`` of Python, torch (with its CUDA or ROCm toolkit), Triton, timm and
    this package (with the folder it is imported from)."""
    v = library_versions()
    toolkit = (
        f"CUDA {torch.version.cuda}" if torch.version.cuda
        else f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None)
        else "CPU only"
    )
    return [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{v['torch']} ({toolkit})"),
        ("triton", v["triton"]),
        ("timm", v["timm"]),
        ("vapt_kernels", f"{v['vapt_kernels']} ({PACKAGE_DIR})"),
    ]


def cpu_name() -> str:
    """The CPU's model name (py-cpuinfo)."""
    info = cpuinfo.get_cpu_info()
    return info.get("brand_raw") or info.get("arch") or platform.machine()


def devices() -> list[torch.device]:
    """The CPU and every CUDA (or ROCm) device PyTorch sees."""
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def describe(device: torch.device) -> str:
    """One device in full: the CPU's name, cores, torch's threads and SIMD capability, or the GPU's
    name, compute capability, memory and multiprocessor count."""
    if device.type == "cpu":
        return (
            f"{cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads, "
            f"capability {torch.backends.cpu.get_cpu_capability()} (the native kernels' SIMD variant)"
        )
    p = torch.cuda.get_device_properties(device)
    return f"{p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs"


def device_name(device: str) -> str:
    """One device in a few words: the GPU's name, or the CPU's (py-cpuinfo) with its logical core
    count and torch's threads."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def git_commit(directory: Path = PACKAGE_DIR) -> str:
    """The short commit of the checkout ``directory`` (the package) runs from, with ``-dirty``
    when a tracked file of the package or of the checkout's ``csrc/`` differs from that commit
    (a result row then says that the code it timed is not the commit's); ``unknown`` outside a
    checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=5, cwd=directory, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(top)csrc")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit
