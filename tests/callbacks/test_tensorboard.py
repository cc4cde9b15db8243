"""What TensorBoard records of a run: the config as hyperparameters with the evaluations' metric names (HParams tab),
and the sample videos as one padded grid with a legend."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import TensorBoardLogger
from tb_events import hparams_of
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tmd_lightning.callbacks import ToyEvalCallback, VideoEvalCallback, log_videos
from tmd_lightning.callbacks.videos import video_grid
from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.fit import flat_config, log_hparams

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


def test_video_grid_is_padded_upscaled_and_in_rows() -> None:
    videos = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1, 1).expand(5, 3, 16, 16, 3).clone() * 40
    grid = video_grid(videos, columns=4, pad=2, min_side=64)
    assert grid.shape == (3, 2 + 2 * 66, 2 + 4 * 66, 3)
    assert (grid[:, :2] == 224).all() and (grid[:, :, 66:68] == 224).all()  # borders around and between
    assert (grid[:, 2:66, 2:66] == 0).all() and (grid[:, 2:66, 68:132] == 40).all()
    assert (grid[:, 68:132, 2:66] == 160).all() and (grid[:, 68:132, 68:] == 224).all()  # 5th video, then blank


def test_log_videos_writes_one_grid_and_a_legend(tmp_path: Path) -> None:
    pytest.importorskip("moviepy.editor")
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    videos = torch.randint(0, 255, (6, 9, 16, 16, 3), dtype=torch.uint8)
    labels = [f"prompt {i} (seed {i % 2})" for i in range(6)]
    assert log_videos(SimpleNamespace(loggers=[logger]), "toy/samples", videos, 3, labels=labels)
    events = EventAccumulator(str(logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    image = events.Images("toy/samples")[-1]
    assert image.step == 3 and image.encoded_image_string[:3] == b"GIF"
    assert (image.width, image.height) == (2 + 4 * 66, 2 + 2 * 66)
    text = events.Tensors("toy/samples/legend/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "| 2 | 2 | prompt 5 (seed 1) |" in text and "| 1 | 1 | prompt 0 (seed 0) |" in text
    with pytest.raises(ValueError, match="labels"):
        log_videos(SimpleNamespace(loggers=[logger]), "toy/samples", videos, 4, labels=labels[:2])
