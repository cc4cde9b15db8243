"""What TensorBoard records of a run's config (tmd_lightning/runtime/hparams.py): the config as hyperparameters with
the evaluations' metric names (HParams tab)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import TensorBoardLogger
from tb_events import hparams_of
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tmd_lightning.callbacks import ToyEvalCallback, VideoEvalCallback
from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.runtime.hparams import flat_config, log_hparams

register_resolvers()


def test_config_is_logged_as_hparams_with_the_eval_metrics(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=["experiment=teacher", f"paths.root_dir={tmp_path}", "trainer.max_steps=7",
                                        f"paths.output_dir={tmp_path}/run"])
    flat = flat_config(cfg)
    assert flat["trainer/max_steps"] == 7 and flat["stage/_target_"].endswith("TeacherStage")
    assert flat["paths/log_dir"] == f"{tmp_path}/logs"  # interpolations resolved
    assert isinstance(flat["callbacks/toy_eval/seeds"], str)  # lists as text
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    callbacks = [ToyEvalCallback(seeds=(0, 1)), VideoEvalCallback(), object()]
    log_hparams(SimpleNamespace(loggers=[logger]), cfg, callbacks)
    params, metrics = hparams_of(Path(logger.log_dir))
    assert params["trainer/max_steps"] == 7 and params["task_name"] == "teacher"
    assert params["data/batch_size"] == cfg.data.batch_size
    for name in ("toy/acc_joint", "toy/fd", "toy/acc_sign", "toy/effective_nfe", "diagnostics/diversity",
                 "eval/seconds_per_video"):
        assert name in metrics, name
    assert "eval/fvd" not in metrics  # no detector configured: the callback does not log it
    assert logger.hparams["trainer/max_steps"] == 7  # hparams.yaml
    events = EventAccumulator(str(logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    assert not events.Tags()["scalars"]  # no placeholder metric values
