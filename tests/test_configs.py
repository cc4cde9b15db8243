"""Every experiment and debug mode composes; `debug=fdr` runs a stage through Lightning in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.fit import run

register_resolvers()
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
DEBUGS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))


def _compose(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("fit", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                         *overrides])


def test_config_dir_is_found_and_complete() -> None:
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    assert {"data", "model", "trainer", "callbacks", "logger", "paths", "hydra", "debug", "experiment"} <= groups
    assert "teacher" in EXPERIMENTS and {"fdr", "overfit"} <= set(DEBUGS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("debug", [None, *DEBUGS])
def test_compose_every_experiment_and_debug(tmp_path: Path, experiment: str, debug: str | None) -> None:
    cfg = _compose(tmp_path, f"experiment={experiment}", *([f"debug={debug}"] if debug else []))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.task_name == experiment
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    if debug == "fdr":
        assert cfg.trainer.fast_dev_run is True


def test_any_trainer_option_can_be_overridden(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=teacher", "trainer.max_steps=7", "+trainer.accumulate_grad_batches=2")
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == 7 and trainer.accumulate_grad_batches == 2


def test_debug_fdr_runs_teacher_in_process(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=teacher", "debug=fdr", "data.toy.videos_per_caption=1",
                   "data.toy.val_videos_per_caption=1", "data.batch_size=4", "callbacks.toy_eval.sampler.steps=1",
                   "model.transformer_config.num_layers=1", "model.transformer_config.ffn_dim=32")
    result = run(cfg)
    assert result["train/loss"] > 0
    assert (tmp_path / "out" / "config.yaml").is_file()
    # a smoke test writes no checkpoint or export, so it does not become the run that `latest` (and the next
    # stage) finds
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "export").exists()
    assert not (tmp_path / "logs" / "teacher" / "latest").exists()


@pytest.mark.parametrize("model,head", [("wan2.1_t2v_1.3b", 5), ("wan2.1_t2v_14b", 5), ("toy", 1)])
def test_adapt_head_composes_for_every_model(tmp_path: Path, model: str, head: int) -> None:
    cfg = _compose(tmp_path, "experiment=adapt_head", f"model={model}", "model.pretrained=/somewhere/wan")
    OmegaConf.resolve(cfg)
    assert cfg.tmd.H == cfg.stage.student.head_blocks == head
    assert cfg.stage.student.teacher == "/somewhere/wan" and cfg.stage.M == cfg.tmd.M == 2
    assert cfg.stage.fd_delta == 5e-3 and cfg.stage.p_r_equals_s == 0.75 and cfg.stage.cfg_scale == 3.0
    if model != "toy":
        assert cfg.model.text_encoder.model_class == "UMT5EncoderModel" and "overexposed" in cfg.model.negative_prompt


def test_debug_fdr_runs_adapt_head_in_process(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=adapt_head", "debug=fdr", "data.toy.videos_per_caption=1",
                   "data.toy.val_videos_per_caption=1", "data.batch_size=4")
    result = run(cfg)
    assert result["train/loss"] > 0
    assert not (tmp_path / "out" / "export").exists()
    assert not (tmp_path / "logs" / "adapt_head" / "latest").exists()  # no checkpoint: `latest` is not moved


@pytest.mark.parametrize("model", ["toy", "wan2.1_t2v_1.3b"])
def test_guidance_has_one_home(tmp_path: Path, model: str) -> None:
    """The teacher's guidance scale is the model's (`model.guidance_scale`): the teacher's sampler and toy eval,
    Stage 2's VSD target (TMD and DMD2-v), the KD pairs, `generate` and `evaluate`'s guided teacher rows."""
    w = 3.5  # neither default, so nothing passes by coincidence
    fit = {e: _compose(tmp_path, f"experiment={e}", f"model={model}", f"model.guidance_scale={w}")
           for e in ("teacher", "distill", "distill_dmd2")}
    assert fit["teacher"].stage.sampler.cfg == fit["teacher"].callbacks.toy_eval.sampler.cfg == w
    assert fit["distill"].stage.cfg_scale == fit["distill_dmd2"].stage.cfg_scale == w
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        other = {name: compose(name, overrides=[f"model={model}", f"model.guidance_scale={w}"])
                 for name in ("kd_pairs", "generate", "evaluate")}
    assert other["kd_pairs"].sampler.cfg == other["generate"].sampler.cfg == w
    teacher_rows = other["evaluate"].models[0].samplers
    assert [r.cfg for r in teacher_rows] == [w, w, 1.0, w]


@pytest.mark.parametrize("model,gamma", [("toy", 1.0), ("wan2.1_t2v_1.3b", 10.0)])
def test_student_grid_shift_is_the_models(tmp_path: Path, model: str, gamma: float) -> None:
    """The toy experiments sample every student (TMD in both stages, DMD2-v at any M, the KD warm-up's export) on
    the toy's grid shift (`model.student_grid_gamma`); a model without one keeps the paper's 10."""
    fit = {e: _compose(tmp_path, f"experiment={e}", f"model={model}", "model.pretrained=/somewhere/wan")
           for e in ("adapt_head", "distill", "distill_dmd2", "kd_warmup")}
    assert [float(fit[e].stage.grid_gamma) for e in fit] == [gamma] * 4
    toy = _compose(tmp_path, "experiment=distill", "model.student_grid_gamma=4.5")
    assert toy.stage.grid_gamma == toy.tmd.gamma == 4.5
