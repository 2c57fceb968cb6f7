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
        "numpy": np.__version__,
    }


def _cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one (Linux), else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
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
