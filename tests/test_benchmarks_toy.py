"""The toy benchmarks (`benchmarks/foundation.py`, `adapt_head.py`, `distill.py`, `lora.py`) build their stages by
hand, outside `fit`: each must still run one step on today's toy config (they once kept a codec with one frame per
latent frame after the config moved to two, and every one of them failed at its first forward)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MODEL_CFG = BENCHMARKS.parent / "configs" / "model" / "toy.yaml"


def _load(name: str):
    """A benchmark script as a module (each puts the repo root and `benchmarks/` on sys.path itself)."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cfg_in_channels() -> int:
    return int(OmegaConf.load(MODEL_CFG).transformer_config.in_channels)


@pytest.fixture(scope="module")
def foundation():
    return _load("foundation")


def test_the_benchmarks_codec_and_guidance_are_the_configs(foundation):
    cfg = OmegaConf.load(MODEL_CFG)
    codec = foundation.toy_codec()
    assert codec.temporal_factor == cfg.codec.frames_per_latent and codec.spatial_factor == cfg.codec.patch
    assert codec.latent_shape(9, 16, 16)[0] == cfg.transformer_config.in_channels
    assert foundation.toy_guidance() == cfg.guidance_scale


def test_teacher_and_stage1_benchmarks_take_a_step(foundation):
    batch = foundation.toy_batch(2)
    stage = foundation.toy_stage()
    assert foundation.seconds_per_step(stage, batch, warmup=0, steps=1) > 0
    teacher, stage1 = _load("adapt_head").stages()
    for s in (teacher, stage1):
        assert s.codec.latent_shape(9, 16, 16)[0] == cfg_in_channels()
        assert foundation.seconds_per_step(s, batch, warmup=0, steps=1) > 0


@pytest.mark.parametrize("kind", ["TMD", "DMD2-v"])
def test_distill_benchmark_times_both_iterations(foundation, kind):
    distill = _load("distill")
    from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder

    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stage, opts = distill.build(kind, text_encoder)
    torch.manual_seed(0)
    out = distill.time_iterations(stage, opts, foundation.toy_batch(2), kind, warmup=0, repeats=1)
    for phase in ("student", "critic"):
        assert math.isfinite(out[phase]["seconds"]) and out[phase]["seconds"] > 0
        assert out[phase]["teacher"] > 0  # the forward timer saw the frozen teacher run


def test_lora_benchmark_builds_on_the_configs_codec():
    lora = _load("lora")
    from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder

    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stage, _ = lora.build(text_encoder, {"fake_score": True})
    assert stage.codec.latent_shape(9, 16, 16)[0] == cfg_in_channels()
