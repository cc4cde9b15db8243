"""Local model folders: a missing folder or missing safetensors weights is a one-line error naming what is missing;
nothing is looked up on the hub and pickled `.bin` weights are never loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.checkpoints import load_pretrained_stage
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder, WanVAECodec, load_transformer

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2)


def _one_line(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


@pytest.mark.parametrize("pretrained", ["/models/does-not-exist", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"])
def test_missing_pretrained_folder_is_not_looked_up_on_the_hub(pretrained: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        load_transformer(pretrained=pretrained)
    assert "huggingface.co" not in _one_line(info, pretrained, "no such folder")


def test_missing_vae_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        WanVAECodec.from_pretrained(tmp_path / "wan")
    _one_line(info, str(tmp_path / "wan"), "no such folder")


def test_bin_weights_are_never_loaded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY).save_pretrained(str(tmp_path / "transformer"), safe_serialization=False)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(FileNotFoundError) as info:
        load_transformer(pretrained=tmp_path)
    _one_line(info, str(tmp_path / "transformer"), "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError) as info:  # the sampling loader, too
        load_pretrained_stage(tmp_path, torch.nn.Identity(), torch.nn.Identity())
    _one_line(info, "diffusion_pytorch_model.safetensors")


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    WanTransformer3DModel(**TINY).save_pretrained(str(tmp_path), max_shard_size="100KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_transformer(pretrained=tmp_path)
    _one_line(info, shard)


def test_text_encoder_without_safetensors_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    shutil.copytree(TOY_MODEL_DIR, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
    weights.unlink()
    with pytest.raises(FileNotFoundError) as info:
        TextEncoder.from_pretrained(tmp_path, max_length=8, model_class="T5EncoderModel")
    _one_line(info, str(tmp_path / "text_encoder"), "model.safetensors")


def test_shipped_toy_folder_still_loads() -> None:
    assert load_transformer(pretrained=TOY_MODEL_DIR).config.num_layers == 6
    assert TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel").dim == 64
