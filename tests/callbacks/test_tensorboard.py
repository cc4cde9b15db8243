"""What TensorBoard records of a run's samples: the videos as one padded grid with a legend (the config as
hyperparameters: tests/runtime/test_hparams.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tmd_lightning.callbacks import log_videos
from tmd_lightning.callbacks.videos import video_grid


def test_video_grid_is_padded_upscaled_and_in_rows() -> None:
    videos = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1, 1).expand(5, 3, 16, 16, 3).clone() * 40
    grid = video_grid(videos, columns=4, pad=2, min_side=64)
    assert grid.shape == (3, 2 + 2 * 66, 2 + 4 * 66, 3)
    assert (grid[:, :2] == 224).all() and (grid[:, :, 66:68] == 224).all()  # borders around and between
    assert (grid[:, 2:66, 2:66] == 0).all() and (grid[:, 2:66, 68:132] == 40).all()
    assert (grid[:, 68:132, 2:66] == 160).all() and (grid[:, 68:132, 68:] == 224).all()  # 5th video, then blank


def test_real_scale_videos_are_area_downscaled_before_the_grid() -> None:
    """Wan's 480 x 832 clips go in at 74 x 128 (long side MAX_SIDE, aspect kept), each pixel the mean of its area;
    the toy's 16 px clips keep being upscaled (above)."""
    from tmd_lightning.callbacks.videos import MAX_SIDE, fit_size

    g = torch.Generator().manual_seed(0)
    videos = torch.randint(0, 256, (3, 2, 480, 832, 3), generator=g, dtype=torch.uint8)
    small = fit_size(videos)
    assert MAX_SIDE == 128 and small.shape == (3, 2, 74, 128, 3) and small.dtype == torch.uint8
    flat = torch.zeros(1, 1, 480, 832, 3, dtype=torch.uint8)
    flat[..., :240, :, 0] = 200  # top half red: the downscaled frame keeps it there, blended only on the border row
    out = fit_size(flat)[0, 0]
    assert (out[:36, :, 0] == 200).all() and (out[38:, :, 0] == 0).all()
    exact = torch.arange(4 * 8, dtype=torch.float32).view(1, 1, 4, 8, 1).expand(1, 1, 4, 8, 3)
    halved = fit_size(exact.to(torch.uint8), max_side=4)[0, 0, ..., 0]  # 2 x 2 blocks averaged (and rounded)
    torch.testing.assert_close(halved.float(), torch.nn.functional.avg_pool2d(exact[0, 0, ..., 0][None], 2)[0]
                               .round(), atol=0, rtol=0)
    grid = video_grid(videos, columns=4, pad=2)
    assert grid.shape == (2, 2 + 74 + 2, 2 + 3 * (128 + 2), 3)
    assert torch.equal(grid[:, 2:76, 2:130], small[0])
    toy = torch.zeros(1, 2, 16, 16, 3, dtype=torch.uint8)
    assert fit_size(toy).shape == (1, 2, 64, 64, 3) and fit_size(toy, max_side=8).shape == (1, 2, 8, 8, 3)


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
