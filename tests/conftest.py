"""Shared fixtures: a tiny Wan configuration and paths. Tests never download anything."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_WAN = {
    "patch_size": [1, 1, 1], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 48,
    "out_channels": 48, "text_dim": 64, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64,
}


@pytest.fixture
def tiny_wan_config() -> dict:
    return dict(TINY_WAN)
