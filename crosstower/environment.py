"""Where a run was measured: the CPU, PyTorch's kernel level and the library versions."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import torch


def describe_environment() -> dict:
    """Where a run was measured. Training is deterministic on one machine, but the same code and
    seed gave different Recall@50 on machines whose CPUs differ (docs/results.md), most likely
    because PyTorch picks its float kernels by CPU capability; recording that capability and the
    library versions lets a reader tell a machine-to-machine spread from a regression."""
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": _cpu_model_name(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bfloat16": cpu_has_bfloat16(),
        "numpy": np.__version__,
    }


# CPU flags (as /proc/cpuinfo names them) of native bfloat16 arithmetic, which bfloat16 autocast
# needs to be fast: without them each bfloat16 operation is emulated and runs several times slower.
BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU has bfloat16 instructions (None where /proc/cpuinfo cannot tell)."""
    text = cpuinfo if cpuinfo is not None else _cpuinfo()
    flags = [line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")]
    if not flags:
        return None
    return bool(BFLOAT16_FLAGS & set(flags[0]))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one (Linux), else platform's guess."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def source_revision(root: Path | None = None) -> dict:
    """The git commit a benchmark ran from, and whether the working tree had uncommitted changes,
    so that a figure can be traced to its code; empty where ``root`` (default: the checkout this
    crosstower is imported from) is not a git checkout."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "", "git_dirty": False}
    return {"git_commit": commit, "git_dirty": dirty}


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()
