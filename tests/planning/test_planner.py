"""`planning.planner` and `planning.tables`: the verdict per GPU size and its table."""

from __future__ import annotations

from pathlib import Path

from plan_configs import fsdp14_plan, plan_cfg

from tmd_lightning import planning as P


def test_verdicts_per_gpu_size(tmp_path: Path) -> None:
    result = fsdp14_plan(tmp_path)
    rows = {(r["stage"], r["mode"]): r for r in result["verdicts"]}
    need = result["memory"][("distill", "full")]["total, checkpointing"]
    assert rows[("distill", "full")]["need"] == need and 79.6 * P.GIB < need <= 140.4 * P.GIB
    assert rows[("distill", "full")]["fits"] == {"80 GB": False, "141 GB": True}
    assert not rows[("distill", "LoRA fake")]["supported"] and rows[("adapt_head", "full")]["supported"]
    table = P.verdict_table(result["verdicts"], plan_cfg(tmp_path), result["setup"], True)
    assert "| 80 GB (79.6 GiB) | 141 GB (140.4 GiB) |" in table and "LoRA is refused under FSDP2" in table
    assert "- 141 GB: fits adapt_head full, distill full, distill_dmd2 full" in table
