"""Where a run was measured: the CPU, PyTorch's kernel level and the library versions."""

from __future__ import annotations

import platform
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
