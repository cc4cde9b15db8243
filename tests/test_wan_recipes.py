"""The real-scale experiments (`experiment=wan_*`) compose the TMD paper's Table 7 recipe for each Wan model, read from
the model config's `recipe:` block; the global batch becomes gradient accumulation from the world size. Composition
only: nothing is instantiated, no weights are needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.guards import accumulation, apply_accumulation

register_resolvers()
MODELS = ("wan2.1_t2v_1.3b", "wan2.1_t2v_14b")
EXPERIMENTS = ("wan_adapt_head", "wan_distill", "wan_distill_dmd2", "wan_kd_warmup")

# The paper's values (TMD, Table 7; docs/method.md §4-5), written out here on purpose: not read from the configs.
PAPER = {
    "wan2.1_t2v_1.3b": {"adapt_lr": 3e-5, "loss_c": 1.0, "distill_iterations": 4000, "distill_iterations_m1": 12000,
                        "disc_blocks": [15, 22, 29], "disc_width": 432},
    "wan2.1_t2v_14b": {"adapt_lr": 1e-5, "loss_c": 1e-5, "distill_iterations": 1000, "distill_iterations_m1": 5000,
                       "disc_blocks": [19, 29, 39], "disc_width": 384},
}
COMMON = {
    "H": 5, "N": 2, "M": 2, "grid_gamma": 10.0,  # N2H5, M = 2; student grids shift(k/K, 10)
    "betas": [0.9, 0.99], "weight_decay": 0.01, "global_batch": 64, "micro_batch": 1,
    # Stage 1 (TM-MF)
    "adapt_iterations": 3000, "adapt_cfg": 3.0, "s_shift": 3.0, "cond_dropout": 0.1, "p_r_equals_s": 0.75,
    # Stage 2 (TMD / DMD2-v)
    "distill_lr": 1e-5, "distill_cfg": 5.0, "dmd_shift": 5.0, "gan_weight": 0.03, "student_every": 5,
    "dmd2_grid_gamma": 10.0,  # DMD2-v student grid shift for 2 steps
    # KD warm-up of the one-step DMD2-v
    "kd_lr": 7e-5,
}


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                        *overrides])
    return cfg


def _resolved(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = _compose(tmp_path, *overrides)
    OmegaConf.resolve(cfg)
    return cfg


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_wan_experiments_compose_the_paper_recipe(tmp_path: Path, experiment: str, model: str) -> None:
    cfg = _resolved(tmp_path, f"experiment={experiment}", f"model={model}")
    paper, stage = PAPER[model] | COMMON, cfg.stage
    assert cfg.model.name == model and cfg.task_name == experiment
    # everywhere: data from the cache at the paper's clip size, one video per GPU, checkpointing, real evaluation
    assert cfg.data._target_ == "tmd_lightning.data.CachedDataModule"
    assert (cfg.data.num_frames, cfg.data.height, cfg.data.width) == (81, 480, 832)
    assert cfg.data.batch_size == paper["micro_batch"] and stage.global_batch == paper["global_batch"]
    assert stage.activation_checkpointing is True
    assert "video_eval" in cfg.callbacks and "toy_eval" not in cfg.callbacks
    assert cfg.trainer.precision == "bf16-mixed"
    assert list(stage.optimizer.betas) == paper["betas"] and stage.optimizer.weight_decay == paper["weight_decay"]
    if experiment == "wan_adapt_head":
        assert stage.optimizer.lr == paper["adapt_lr"] and stage.loss_c == paper["loss_c"]
        assert cfg.trainer.max_steps == paper["adapt_iterations"] and stage.scheduler is None
        assert (stage.cfg_scale, stage.s_shift) == (paper["adapt_cfg"], paper["s_shift"])
        assert (stage.cond_dropout, stage.p_r_equals_s) == (paper["cond_dropout"], paper["p_r_equals_s"])
        assert (stage.M, stage.N, stage.student.head_blocks, stage.grid_gamma) == \
            (paper["M"], paper["N"], paper["H"], paper["grid_gamma"])
    elif experiment in ("wan_distill", "wan_distill_dmd2"):
        assert stage.optimizer.lr == paper["distill_lr"] and stage.max_iterations == paper["distill_iterations"]
        assert (stage.cfg_scale, stage.dmd_shift) == (paper["distill_cfg"], paper["dmd_shift"])
        assert (stage.gan_weight, stage.student_every) == (paper["gan_weight"], paper["student_every"])
        assert stage.use_gan is True and stage.grad_clip is None and cfg.trainer.gradient_clip_val is None
        assert list(stage.discriminator.feature_blocks) == paper["disc_blocks"]
        assert stage.discriminator.hidden_dim == paper["disc_width"]
        assert (stage.M, cfg.trainer.max_steps) == (paper["M"], -1)
        if experiment == "wan_distill":
            assert (stage.N, stage.grid_gamma, cfg.tmd.H) == (paper["N"], paper["grid_gamma"], paper["H"])
            assert stage.student.checkpoint == f"{tmp_path}/logs/wan_adapt_head/latest/checkpoints/last.ckpt"
        else:
            assert stage.grid_gamma == paper["dmd2_grid_gamma"]
            assert stage.student.kd_export == f"{tmp_path}/logs/wan_kd_warmup/latest/export/student"
    else:
        assert stage.optimizer.lr == paper["kd_lr"]
        assert cfg.data.cache_dir == f"{tmp_path}/data/kd_pairs/{model}_81x480x832"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment,override", [("wan_distill", "tmd.M=1"), ("wan_distill_dmd2", "stage.M=1")])
def test_one_step_students_get_the_m1_iterations(tmp_path: Path, experiment: str, override: str, model: str) -> None:
    cfg = _resolved(tmp_path, f"experiment={experiment}", f"model={model}", override)
    assert cfg.stage.M == 1 and cfg.stage.max_iterations == PAPER[model]["distill_iterations_m1"]


def test_every_recipe_value_lives_in_the_model_config(tmp_path: Path) -> None:
    """Changing the recipe in the model config changes what the experiments compose: one place, not two."""
    cfg = _resolved(tmp_path, "experiment=wan_distill", "model.recipe.distill.lr=2e-5",
                    "model.recipe.distill.gan_weight=0.1", "model.recipe.distill.iterations=7")
    assert (cfg.stage.optimizer.lr, cfg.stage.gan_weight, cfg.stage.max_iterations) == (2e-5, 0.1, 7)
    cfg = _resolved(tmp_path, "experiment=wan_adapt_head", "model.recipe.adapt_head.global_batch=32",
                    "model.recipe.adapt_head.iterations=5")
    assert (cfg.stage.global_batch, cfg.trainer.max_steps) == (32, 5)


def test_toy_experiments_keep_their_own_values(tmp_path: Path) -> None:
    adapt = _resolved(tmp_path, "experiment=adapt_head")
    distill = _resolved(tmp_path, "experiment=distill")
    assert adapt.stage.optimizer.lr == 2e-4 and adapt.stage.global_batch is None and adapt.data.batch_size == 32
    assert distill.stage.optimizer.lr == 1e-4 and distill.stage.max_iterations == 1500
    assert distill.stage.student.checkpoint == f"{tmp_path}/logs/adapt_head/latest/checkpoints/last.ckpt"
    assert "toy_eval" in adapt.callbacks and adapt.stage.activation_checkpointing is False


@pytest.mark.parametrize("devices,nodes,expected", [(8, 1, 8), (8, 2, 4), (4, 1, 16), (1, 1, 64), ("[0,1]", 1, 32)])
def test_global_batch_becomes_accumulation(tmp_path: Path, devices, nodes: int, expected: int) -> None:
    for experiment in ("wan_adapt_head", "wan_kd_warmup"):
        cfg = _compose(tmp_path, f"experiment={experiment}", "trainer=ddp", f"trainer.devices={devices}",
                       f"trainer.num_nodes={nodes}")
        assert apply_accumulation(cfg) == expected and cfg.trainer.accumulate_grad_batches == expected


def test_distill_stages_get_the_global_batch_not_lightning_accumulation(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_distill", "trainer=ddp", "trainer.devices=8")
    assert apply_accumulation(cfg) == 8  # checked, but the stage accumulates itself (manual optimisation)
    assert "accumulate_grad_batches" not in cfg.trainer and cfg.stage.global_batch == 64


def test_world_size_from_the_launcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "16")
    cfg = _compose(tmp_path, "experiment=wan_adapt_head", "trainer=fsdp")  # devices: auto
    assert accumulation(cfg) == 4


def test_a_global_batch_that_does_not_divide_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = _compose(tmp_path, "experiment=wan_adapt_head", "trainer=ddp", "trainer.devices=3")
    with pytest.raises(ValueError, match=r"stage.global_batch=64 is not a multiple of 3 GPU") as err:
        apply_accumulation(cfg)
    assert "\n" not in str(err.value)
    cfg = _compose(tmp_path, "experiment=wan_adapt_head", "trainer=ddp", "trainer.devices=8",
                   "+trainer.accumulate_grad_batches=2")
    with pytest.raises(ValueError, match="set only one of them"):
        apply_accumulation(cfg)
