"""`planning.counts`: parameter counts against the real toy networks, a hand-written Wan formula at real scale and
peft's own LoRA injection."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from peft import LoraConfig
from plan_configs import plan_cfg

from tmd_lightning import planning as P
from tmd_lightning.models import TOY_MODEL_DIR, Discriminator, TextEncoder


def test_counts_equal_the_real_toy_networks(toy, toy_nets) -> None:
    cfg, _, counts = toy
    teacher, student = toy_nets
    assert (student.head_blocks, student.config.fusion) == (cfg.tmd.H, cfg.tmd.fusion)
    disc = Discriminator(teacher.config.num_attention_heads * teacher.config.attention_head_dim,
                         tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim))
    text = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    for name, real in [("teacher", teacher), ("student", student), ("discriminator", disc),
                       ("text_encoder", text.encoder)]:
        assert counts[name].params == sum(p.numel() for p in real.parameters()), name
        assert counts[name].tensors == len(list(real.parameters())), name
    assert counts["codec"].params == 0  # the toy's pixel codec has no weights


def _wan_params(heads: int, ffn: int, layers: int, head_dim: int = 128, text_dim: int = 4096, freq: int = 256,
                channels: int = 16, patch: int = 4) -> int:
    """WanTransformer3DModel's parameters written out by hand from its layer list (biases included)."""
    d = heads * head_dim
    attention = 4 * (d * d + d) + 2 * d  # q, k, v, out + RMS norms of q and k
    block = 2 * attention + (d * ffn + ffn + ffn * d + d) + 2 * d + 6 * d  # + affine norm2 + scale_shift_table
    embeddings = (channels * patch * d + d) + (text_dim * d + d + d * d + d) + (freq * d + d + d * d + d) \
        + (d * 6 * d + 6 * d)
    return embeddings + layers * block + 2 * d + (d * channels * patch + channels * patch)


@pytest.mark.parametrize("model,heads,ffn,layers,billions", [("wan2.1_t2v_1.3b", 12, 8960, 30, 1.42),
                                                              ("wan2.1_t2v_14b", 40, 13824, 40, 14.29)])
def test_real_scale_counts_match_hand_formula(tmp_path: Path, model: str, heads: int, ffn: int, layers: int,
                                              billions: float) -> None:
    cfg = plan_cfg(tmp_path, f"model={model}")
    counts = P.count_all(P.build_networks(cfg), cfg.lora)
    assert counts["teacher"].params == _wan_params(heads, ffn, layers)
    assert round(counts["teacher"].params / 1e9, 2) == billions
    assert 5.6e9 < counts["text_encoder"].params < 5.8e9  # UMT5-XXL encoder: 5.7 B
    assert 1.25e8 < counts["codec"].params < 1.30e8  # the Wan VAE: 127 M
    d = heads * 128  # the student adds the Δ-embedder (a time-MLP copy) and the gated fusion (D -> D -> D)
    delta, fusion = 256 * d + d + d * d + d, 2 * (d * d + d) + 2 * d + 1  # fusion: 2 Linear, offsets, gate
    assert counts["student"].params - counts["teacher"].params == delta + fusion
    per_block = 64 * (8 * (d + d) + 2 * (d + ffn))  # r (in + out) for 8 attention + 2 FFN Linear layers
    assert counts["teacher"].lora == layers * per_block


def test_lora_counts_match_peft(toy, toy_nets) -> None:
    cfg, _, counts = toy
    wan = copy.deepcopy(toy_nets[0])
    wan.add_adapter(LoraConfig(r=int(cfg.lora.rank), lora_alpha=int(cfg.lora.alpha),
                               target_modules=list(cfg.lora.target_modules)), adapter_name="fake_score")
    adapter = [p for n, p in wan.named_parameters() if "fake_score" in n]
    assert counts["teacher"].lora == sum(p.numel() for p in adapter) > 0
    assert counts["teacher"].lora_tensors == len(adapter)
