"""`python -m tmd_lightning.sample` in-process: inputs that cannot work are one-line errors before any model loads, and
prompts the text encoder cannot read are warned about."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import tmd_lightning.evaluation.generate as loading
import tmd_lightning.sample as sample
from tmd_lightning.config import CONFIG_DIR, register_resolvers

register_resolvers()


def _compose(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("sample", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out",
                                            "device=cpu", *overrides])


def _no_model(cfg: DictConfig):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.mark.parametrize(("prompts", "seeds", "expected"), [
    ("file", "[0]", "holds no prompts"),
    ("[a red circle moving left]", "[]", "seeds=[]"),
])
def test_nothing_to_sample_is_a_one_line_error_before_loading(tmp_path, monkeypatch, prompts, seeds, expected):
    if prompts == "file":
        (tmp_path / "prompts.txt").write_text("\n  \n")
        prompts = str(tmp_path / "prompts.txt")
    monkeypatch.setattr(sample, "load_stage", _no_model)
    with pytest.raises(ValueError) as info:
        sample.run(_compose(tmp_path, f"prompts={prompts}", f"seeds={seeds}"))
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_words_the_toy_tokenizer_does_not_know_are_warned_about(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        summary = sample.run(_compose(tmp_path, "prompts=[a purple hexagon moving left]", "seeds=[0]",
                                      "sampler.steps=1", "toy_reference=null"))
    assert summary["videos"] == 1
    warning = next(r.getMessage() for r in caplog.records if "purple" in r.getMessage())
    assert "hexagon" in warning and "moving" not in warning.split("know")[1].split("(")[0]


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_a_bad_checkpoint_fails_before_the_encoders_load(tmp_path, monkeypatch, problem):
    ckpt = tmp_path / "last.ckpt"
    if problem == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(100)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:-30])

    def no_encoders(*args, **kwargs):
        raise AssertionError("the codec or text encoder loaded before the checkpoint was checked")

    monkeypatch.setattr(loading, "instantiate", no_encoders)  # where `sample` loads its model
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        sample.run(_compose(tmp_path, f"checkpoint={ckpt}"))
    message = str(info.value)
    assert f"checkpoint={ckpt}" in message and "\n" not in message
    assert ("truncated" in message) == (problem == "truncated")


def test_sample_writes_viewable_named_videos_contact_sheet_and_grid(tmp_path):
    import av
    from PIL import Image

    from tmd_lightning.data import read_manifest
    from tmd_lightning.media import contact_sheet_size

    summary = sample.run(_compose(tmp_path, "prompts=[a red circle moving left,a blue square moving up]",
                                  "seeds=[0,3]", "sampler.steps=1", "toy_reference=null", "video.min_side=128"))
    videos = tmp_path / "out" / "videos"
    names = ["a-red-circle-moving-left_seed0.mp4", "a-red-circle-moving-left_seed3.mp4",
             "a-blue-square-moving-up_seed0.mp4", "a-blue-square-moving-up_seed3.mp4"]
    entries = read_manifest(tmp_path / "out" / "manifest.csv")
    assert [e.path.name for e in entries] == names
    assert {(e.height, e.width, e.num_frames) for e in entries} == {(128, 128, 9)}
    for name in names:
        with av.open(str(videos / name)) as container:
            stream = container.streams.video[0]
            count = sum(1 for _ in container.decode(stream))
            assert (stream.codec_context.pix_fmt, stream.codec_context.width, stream.codec_context.height,
                    count) == ("yuv420p", 128, 128, 9)
    assert Image.open(summary["contact_sheet"]).size == contact_sheet_size(4, 9, 16, 16, 64)
    grid = Image.open(summary["grid"])
    assert grid.n_frames == 9 and summary["grid"] == str(videos / "grid.gif")
