"""Loading what a run left behind runs no code named by the files: class records resolve only to the package's own
stages and networks, and checkpoints unpickle with torch's `weights_only` loader and a fixed allow-list."""

from __future__ import annotations

import fractions
import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.checkpoints import (
    CheckpointError,
    check_checkpoint,
    load_checkpoint_stage,
    load_pretrained_stage,
    read_checkpoint,
)
from tmd_lightning.models import PixelCodec, TMDTransformer

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2)


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module whose import leaves a marker file: a loader that imports what a file names trips it."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_tmd_module.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n\n\nclass Evil:\n"
        "    def __init__(self, *args, **kwargs):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


def test_sampling_record_names_only_the_packages_samplers(tmp_path: Path, evil_module: Path) -> None:
    torch.manual_seed(0)
    folder = tmp_path / "student"
    TMDTransformer.from_teacher(WanTransformer3DModel(**TINY), head_blocks=1).save_pretrained(str(folder))
    (folder / "sampling.json").write_text(json.dumps({"sampler": {"kind": "evil_tmd_module.Evil", "M": 1}}))
    with pytest.raises(ValueError, match="evil_tmd_module.Evil.*not one of"):
        load_pretrained_stage(folder, PixelCodec(4), torch.nn.Identity())
    assert not evil_module.exists()


@pytest.mark.parametrize("field", ["sampler", "network_class"])
def test_checkpoint_record_names_only_the_packages_samplers_and_networks(tmp_path: Path, evil_module: Path,
                                                                        field: str) -> None:
    ckpt = tmp_path / "x.ckpt"
    record = {"network_attr": "transformer", "network_class": "WanTransformer3DModel", "network_config": TINY,
              "sampler": {"kind": "teacher", "steps": 2}}
    record[field] = {"kind": "evil_tmd_module.Evil"} if field == "sampler" else "evil_tmd_module.Evil"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "tmd_lightning": record}, ckpt)
    with pytest.raises(ValueError, match="evil_tmd_module.Evil.*not one of"):
        load_checkpoint_stage(ckpt, PixelCodec(4), torch.nn.Identity())
    assert not evil_module.exists()


def test_a_checkpoint_without_the_record_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    with pytest.raises(ValueError, match="not a tmd_lightning stage checkpoint"):
        load_checkpoint_stage(ckpt, PixelCodec(4), torch.nn.Identity())


class _RunsCodeWhenUnpickled:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return os.mkdir, (str(self.folder),)


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path: Path) -> None:
    ckpt, side_effect = tmp_path / "evil.ckpt", tmp_path / "code_ran"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _RunsCodeWhenUnpickled(side_effect)}}, ckpt)
    for load in (read_checkpoint, check_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(ckpt)
        message = str(info.value)
        assert "posix.mkdir" in message and "TMD_SAFE_GLOBALS" in message and "\n" not in message
    assert not side_effect.exists()


def test_trusted_globals_can_be_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "fraction.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"ratio": fractions.Fraction(1, 3)}}, ckpt)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        read_checkpoint(ckpt)
    monkeypatch.setenv("TMD_SAFE_GLOBALS", "fractions.Fraction")
    assert read_checkpoint(ckpt)["hyper_parameters"]["ratio"] == fractions.Fraction(1, 3)
