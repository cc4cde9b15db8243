"""`bash benchmarks/gpu_check.sh --tiny`: the first-GPU check's every section at CPU size, as CI runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_passes_on_cpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    for title in ("(a) 2-process FSDP2 tests on NCCL", "(b) sampling speed", "(c) one Stage-1 step",
                  "(d) Stage-1 du/ds"):
        assert f"## {title}" in out
    assert "skipped: 0 GPU(s) visible (--tiny)" in out
    assert "| teacher Euler | 50 x 2 (CFG 5) | 100.00 |" in out and "| TMD | M=1 N=4 |" in out
    for row in ("| Stage 1 adapt_head |", "| Stage 2 TMD | student iteration |", "| Stage 2 TMD | critic iteration |"):
        assert row in out
    assert "| bf16 autocast FD passes (fd_full_precision=false) |" in out
    assert "all sections passed" in out and "total wall time" in out


def test_gpu_check_reports_a_failing_section_and_goes_on(monkeypatch, capsys) -> None:
    """A section that raises is printed and counted (the exit status); the others still run."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def broken(*args: object) -> str:
        raise RuntimeError("section b is broken")

    monkeypatch.setattr(module, "section_b", broken)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--tiny", "--device", "cpu", "--only", "abd"]) == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "RuntimeError: section b is broken" in out and "FAILED sections: b" in out
    assert "| bf16 autocast FD passes" in out and "skipped: " in out  # (a) and (d) still ran
