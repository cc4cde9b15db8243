"""`benchmarks/scale.py --smoke`: the real-scale GPU benchmark's every code path at CPU size, in-process."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
ROWS = [("Stage 1 adapt_head", "TM-MF step"), ("Stage 2 TMD", "student iteration"), ("Stage 2 TMD", "critic iteration"),
        ("Stage 2 TMD", "mean over a TTUR cycle"), ("Stage 2 DMD2-v", "student iteration"),
        ("Stage 2 DMD2-v", "critic iteration"), ("Stage 2 DMD2-v", "mean over a TTUR cycle"),
        ("sampling, per video", "teacher Euler"), ("sampling, per video", "TMD M=2 N=2"),
        ("sampling, per video", "TMD M=1 N=2")]


@pytest.fixture
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # --smoke runs on one thread


def test_smoke_run_prints_every_row_with_finite_numbers(scale, tmp_path: Path, capsys) -> None:
    output = tmp_path / "gpu_benchmark.md"
    output.write_text("# GPU benchmark\n")
    rows = scale.main(["--smoke", "--device", "cpu", "--output", str(output)])
    printed = capsys.readouterr().out
    assert len(rows) == len(ROWS)
    for r, (benchmark, setting) in zip(rows, ROWS, strict=True):
        assert r["benchmark"] == benchmark and r["setting"].startswith(setting)
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0 and math.isfinite(r["peak"]) and r["peak"] > 0
        assert r["plan"] is None if r["benchmark"].startswith("sampling") else r["plan"] > 0
    # the TTUR mean is the 1 : 4 mix of the two iterations
    assert rows[3]["seconds"] == pytest.approx((rows[1]["seconds"] + 4 * rows[2]["seconds"]) / 5)
    written = output.read_text()
    assert written.startswith("# GPU benchmark\n") and "CPU (" in written and "--smoke" in written
    for benchmark, setting in ROWS:
        assert f"| {benchmark} | {setting}" in printed and f"| {benchmark} | {setting}" in written
    assert "NFE 100" not in printed and "NFE 8.00" in printed  # --smoke: 4 teacher steps x CFG
