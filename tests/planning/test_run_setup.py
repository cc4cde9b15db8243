"""`planning.run_setup`: the strategy and world size read from the plan's own key or the trainer config."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from plan_configs import plan_cfg

from tmd_lightning import planning as P
from tmd_lightning.config import CONFIG_DIR


def test_strategy_is_read_from_the_trainer_config(tmp_path: Path) -> None:
    cfg = plan_cfg(tmp_path)
    assert P.strategy_name(cfg) == "single"
    cfg.trainer.devices = 8
    assert P.strategy_name(cfg) == "ddp"
    OmegaConf.update(cfg, "trainer.strategy", {"_target_": "lightning.pytorch.strategies.ModelParallelStrategy"},
                     force_add=True)
    assert P.strategy_name(cfg) == "fsdp" and P.make_setup(cfg).world == 8
    OmegaConf.update(cfg, "trainer.num_nodes", 2, force_add=True)
    assert P.make_setup(cfg).world == 16
    cfg.strategy = "ddp"  # the plan's own key wins
    assert P.strategy_name(cfg) == "ddp"


@pytest.mark.skipif(not (CONFIG_DIR / "trainer" / "fsdp.yaml").is_file(), reason="no configs/trainer/fsdp.yaml")
def test_trainer_group_spelling(tmp_path: Path) -> None:
    """`trainer=fsdp` / `trainer=ddp` (the fit configs) are read for the strategy and DDP's bucket view."""
    fsdp = P.make_setup(plan_cfg(tmp_path, "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2"))
    assert (fsdp.strategy, fsdp.world) == ("fsdp", 16)
    cfg = plan_cfg(tmp_path, "trainer=ddp", "trainer.devices=8")
    ddp = P.make_setup(cfg)
    assert (ddp.strategy, ddp.world) == ("ddp", 8)
    assert ddp.bucket_view == bool(cfg.trainer.strategy.get("gradient_as_bucket_view", False))
    with pytest.raises(ValueError, match="trainer.devices=N"):
        P.make_setup(plan_cfg(tmp_path, "trainer=ddp", "trainer.devices=auto"))
