"""`python -m tmd_lightning.plan`: the printed and written tables, the plan config's model values, and
`experiment=wan_*` planning the run an experiment composes. The memory model itself is tested in tests/planning/.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from plan_configs import plan_cfg

from tmd_lightning import plan as P
from tmd_lightning import planning
from tmd_lightning.config import CONFIG_DIR


@pytest.mark.parametrize("model,strategy,devices", [("wan2.1_t2v_1.3b", "ddp", 8), ("wan2.1_t2v_14b", "fsdp", 8)])
def test_run_prints_and_writes_the_tables(tmp_path: Path, capsys, model: str, strategy: str, devices: int) -> None:
    cfg = plan_cfg(tmp_path, f"model={model}", f"strategy={strategy}", f"trainer.devices={devices}")
    result = P.run(cfg)
    out = capsys.readouterr().out
    written = (tmp_path / "out" / "plan.md").read_text()
    for text in (out, written):
        assert "| teacher | frozen |" in text and "| text encoder | frozen | 5,680,910,336 |" in text
        for stage, mode in planning.COLUMNS:
            assert f"{stage} {mode}" in text
        for row in ("trainable weights", "gradients", "AdamW states", "activations, checkpointing", "fits 80 GiB"):
            assert f"| {row}" in text
    assert "tokens 21 x 30 x 52 = 32,760" in out and "effective NFE" in out
    single = planning.plan(plan_cfg(tmp_path, f"model={model}", "strategy=single"))["memory"]
    for col, rows in result["memory"].items():
        factor = devices if strategy == "fsdp" else 1  # fsdp divides by the world size, ddp replicates
        assert rows["gradients"] == pytest.approx(single[col]["gradients"] / factor)
        assert rows["text encoder + VAE"] == single[col]["text encoder + VAE"]
        assert rows["activations, checkpointing"] == single[col]["activations, checkpointing"]
        assert rows["activations, checkpointing"] < rows["activations, no checkpointing"]
        assert all(math.isfinite(v) and v >= 0 for v in rows.values())
    if strategy == "ddp":  # DDP's buckets are a second float32 gradient copy
        assert all(r["DDP buckets / FSDP gathers"] == r["gradients"] for r in result["memory"].values())


def test_model_configs_hold_the_paper_values(tmp_path: Path) -> None:
    small, large = (plan_cfg(tmp_path, f"model={m}").model for m in ("wan2.1_t2v_1.3b", "wan2.1_t2v_14b"))
    stage1 = OmegaConf.load(CONFIG_DIR / "stage" / "adapt_head.yaml")
    distill = OmegaConf.load(CONFIG_DIR / "stage" / "distill.yaml")
    for m in (small, large):
        assert m.transformer_config is None  # training still reads the architecture from the weights' folder
        assert (m.num_frames, m.height, m.width, m.head_blocks) == (81, 480, 832, 5)
        assert m.recipe.distill.lr == distill.optimizer.lr == 1e-5
    assert (small.recipe.adapt_head.lr, small.recipe.adapt_head.loss_c) == (stage1.optimizer.lr, stage1.loss_c)
    assert (large.recipe.adapt_head.lr, large.recipe.adapt_head.loss_c) == (1e-5, 1e-5)
    assert (small.recipe.distill.iterations, large.recipe.distill.iterations) == (4000, 1000)
    assert list(small.disc_blocks) == [15, 22, 29] and list(large.disc_blocks) == [19, 29, 39]
    if "lora" in distill:  # the plan's LoRA column is stage.lora
        plan_lora = plan_cfg(tmp_path).lora
        assert {k: distill.lora[k] for k in plan_lora} == dict(plan_lora)


@pytest.mark.parametrize("experiment,stage", [("wan_adapt_head", "adapt_head"), ("wan_distill", "distill"),
                                              ("wan_distill_dmd2", "distill_dmd2")])
def test_experiment_plans_its_own_stage_from_the_fit_config(tmp_path: Path, capsys, experiment: str,
                                                            stage: str) -> None:
    cfg = P.experiment_config([f"experiment={experiment}", "model=wan2.1_t2v_14b", "trainer=fsdp",
                               "trainer.devices=8", f"output_dir={tmp_path}/out"])
    assert (cfg.plan_stage, cfg.activation_checkpointing, cfg.encoders_on_gpu) == (stage, True, False)
    assert cfg.fsdp_param_dtype == "bfloat16" and cfg.micro_batch == 1 and cfg.video.num_frames == 81
    result = P.run(cfg)
    assert {col[0] for col in result["memory"]} == {stage}
    out = capsys.readouterr().out
    assert f"experiment={experiment}" in out and "## Verdict per GPU size" in out
    assert (tmp_path / "out" / "plan.md").is_file()
