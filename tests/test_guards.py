"""Setup guards of `fit` (tmd_lightning/guards.py): one-line errors naming the override to set, raised from the
composed config before any weight is loaded; the toy experiments pass them. And `logger=none` runs (no
LearningRateMonitor without a logger)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.fit import run
from tmd_lightning.guards import check_config, check_memory

register_resolvers()
TOY_EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml") if not p.stem.startswith("wan_"))


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    """A fit config; `model.pretrained=/nowhere/wan` (no weights) where an override names a Wan model."""
    wan = ["model.pretrained=/nowhere/wan"] if any(o.startswith(("model=wan", "experiment=wan_")) for o in overrides) \
        else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("fit", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                         *overrides, *wan])


def _refused(cfg: DictConfig, match: str) -> str:
    """The guard's message, checked to be one line containing `match`; `fit.run` raises it before loading anything
    (the data and, for Wan, the model folders do not exist, so any later failure would be another error)."""
    with pytest.raises(ValueError, match=match) as err:
        check_config(cfg)
    with pytest.raises(ValueError, match=match):
        run(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("experiment", TOY_EXPERIMENTS)
def test_toy_experiments_pass_the_guards(tmp_path: Path, experiment: str) -> None:
    # the memory check runs too (gpu_memory_gib is set): the toy fits
    check_config(_compose(tmp_path, f"experiment={experiment}", "gpu_memory_gib=80"))


@pytest.mark.parametrize("model", ["wan2.1_t2v_1.3b", "wan2.1_t2v_14b"])
@pytest.mark.parametrize("experiment", ["wan_adapt_head", "wan_distill", "wan_distill_dmd2", "wan_kd_warmup"])
def test_wan_experiments_pass_the_guards_without_a_gpu_size(tmp_path: Path, experiment: str, model: str) -> None:
    check_config(_compose(tmp_path, f"experiment={experiment}", f"model={model}", "trainer.devices=8"))


def test_toy_callback_with_real_data(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=adapt_head", "model=wan2.1_t2v_1.3b", "data=cache",
                   "data.cache_dir=/nowhere/cache")
    assert "set callbacks=real" in _refused(cfg, "ToyEvalCallback")
    cfg = _compose(tmp_path, "experiment=distill", "model=wan2.1_t2v_1.3b", "data=manifest",
                   "data.train_manifest=/nowhere/train.csv")
    _refused(cfg, "set callbacks=real")


def test_toy_prompts_with_real_data(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_adapt_head", "callbacks.video_eval.prompts=toy")
    assert "set callbacks.video_eval.prompts=FILE" in _refused(cfg, "prompts=toy")


def test_lora_under_fsdp(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_distill", "model=wan2.1_t2v_14b", "trainer=fsdp", "trainer.devices=8",
                   "stage.lora.fake_score=true")
    message = _refused(cfg, r"LoRA \(stage.lora.fake_score\) is not supported under FSDP2")
    assert "set trainer=ddp, or stage.lora.fake_score=false" in message
    cfg = _compose(tmp_path, "experiment=distill_dmd2", "trainer=fsdp", "trainer.accelerator=cpu",
                   "trainer.devices=2", "stage.lora.student=true")  # the toy too
    _refused(cfg, "stage.lora.student=false")


def test_checkpointing_off_where_the_plan_needs_it(tmp_path: Path) -> None:
    """The plan: Wan 1.3B Stage 1 needs far more than 80 GiB per GPU without checkpointing, about 41 GiB with."""
    cfg = _compose(tmp_path, "experiment=wan_adapt_head", "trainer=ddp", "trainer.devices=8", "gpu_memory_gib=80",
                   "stage.activation_checkpointing=false")
    assert _refused(cfg, "without activation checkpointing").endswith("set stage.activation_checkpointing=true")
    cfg.stage.activation_checkpointing = True
    check_config(cfg)


def test_micro_batch_the_plan_says_cannot_fit(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_distill", "trainer=ddp", "trainer.devices=8", "gpu_memory_gib=80",
                   "data.batch_size=4", "stage.global_batch=64")
    assert "set data.batch_size=1" in _refused(cfg, "distill of wan2.1_t2v_1.3b at data.batch_size=4 needs")


def test_a_run_that_fits_nowhere_says_what_would_help(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_distill", "model=wan2.1_t2v_14b", "trainer=fsdp", "trainer.devices=8",
                   "gpu_memory_gib=80")
    message = _refused(cfg, "GiB at best")
    assert "trainer.num_nodes=N" in message and "memory_guard=false" in message
    cfg.memory_guard = False
    check_memory(cfg)
    cfg.memory_guard, cfg.gpu_memory_gib = True, 1000  # a larger GPU
    check_memory(cfg)


def test_no_memory_check_on_cpu(tmp_path: Path) -> None:
    check_memory(_compose(tmp_path, "experiment=wan_distill", "model=wan2.1_t2v_14b", "trainer.accelerator=cpu",
                          "data.batch_size=8"))


def test_logger_none_runs(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=teacher", "logger=none", "trainer.max_steps=1", "trainer.accelerator=cpu",
                   "model.transformer_config.num_layers=1", "model.transformer_config.attention_head_dim=16",
                   "model.transformer_config.ffn_dim=32", "model.transformer_config.freq_dim=32",
                   "data.toy.videos_per_caption=1", "data.toy.val_videos_per_caption=1", "data.batch_size=4",
                   "+trainer.limit_val_batches=0", "~callbacks.toy_eval", "~callbacks.rich_progress_bar")
    assert "lr_monitor" in cfg.callbacks
    assert run(cfg)["train/loss"] > 0
