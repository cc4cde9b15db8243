"""The `plan` config (configs/plan.yaml) as the planning tests and the entry point's tests compose it: its paths under
a test's tmp folder. Imported by tests/test_plan.py and tests/planning/."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tmd_lightning import planning
from tmd_lightning.config import CONFIG_DIR, register_resolvers

register_resolvers()


def plan_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    """configs/plan.yaml with `overrides`, writing under `tmp_path`."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("plan", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                          *overrides])


def fsdp14_plan(tmp_path: Path, *overrides: str) -> dict:
    """The plan of Wan2.1 14B under trainer=fsdp on 8 GPUs from a cache (no encoders on the GPU)."""
    return planning.plan(plan_cfg(tmp_path, "model=wan2.1_t2v_14b", "trainer=fsdp", "trainer.devices=8",
                                  "encoders_on_gpu=false", *overrides))
