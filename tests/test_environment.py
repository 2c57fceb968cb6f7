"""The environment record that runs and benchmarks write beside their figures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import torch

from crosstower.environment import cpu_has_bfloat16, describe_environment, source_revision

ROOT = Path(__file__).resolve().parents[1]


def test_describe_environment_names_the_cpu_and_the_kernel_level():
    env = describe_environment()
    assert env["torch"] == torch.__version__
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_bfloat16"] in (True, False, None)
    if Path("/proc/cpuinfo").exists():  # Linux: the model name, not platform's "x86_64"
        assert env["cpu"] not in ("", "unknown", env["machine"])


def test_source_revision_in_and_outside_a_checkout(tmp_path):
    inside = source_revision(ROOT)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert inside["git_commit"] == head.stdout.strip()
        assert re.fullmatch(r"[0-9a-f]{40}", inside["git_commit"])
        assert isinstance(inside["git_dirty"], bool)
    assert source_revision(tmp_path) == {"git_commit": "", "git_dirty": False}


def test_bfloat16_support_is_read_from_the_cpu_flags():
    avx2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
    amx = "model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert cpu_has_bfloat16(avx2) is False
    assert cpu_has_bfloat16(amx) is True
    assert cpu_has_bfloat16("") is None  # no /proc/cpuinfo (not Linux): unknown, no warning
