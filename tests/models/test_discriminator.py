"""Discriminator heads (TMD paper Table 7): three Conv3D heads whose sizes match the paper's at both real scales."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.models import Discriminator
from tmd_lightning.models.discriminator import head_parameters

PAPER_TOTALS = {"wan2.1_t2v_1.3b": 68e6, "wan2.1_t2v_14b": 172e6}  # TMD paper: the discriminator's parameters


@pytest.mark.parametrize("model", sorted(PAPER_TOTALS))
def test_heads_total_the_papers_parameter_count_within_10_percent(model):
    cfg = OmegaConf.load(CONFIG_DIR / "model" / f"{model}.yaml")
    dim = cfg.architecture.num_attention_heads * cfg.architecture.attention_head_dim
    with torch.device("meta"):
        disc = Discriminator(dim, tuple(cfg.disc_blocks), int(cfg.disc_width))
    count = sum(p.numel() for p in disc.parameters())
    assert len(disc.heads) == 3
    assert abs(count / PAPER_TOTALS[model] - 1) <= 0.10, (model, count)
    assert count == len(disc.heads) * head_parameters(dim, int(cfg.disc_width))


def test_head_layout_and_patch_logits():
    """GroupNorm -> k3 conv stride (1, 2, 2) -> SiLU -> k3 conv stride 2 -> SiLU -> k1 conv to one logit."""
    disc = Discriminator(64, (0, 1), hidden_dim=16)
    kinds = [type(m).__name__ for m in disc.heads[0]]
    assert kinds == ["GroupNorm", "Conv3d", "SiLU", "Conv3d", "SiLU", "Conv3d"]
    assert disc.heads[0][1].stride == (1, 2, 2) and disc.heads[0][3].stride == (2, 2, 2)
    features = torch.randn(2, 9, 8, 8, 64).permute(0, 4, 1, 2, 3)  # channels-last, as block_features returns
    logits = disc([features, features])
    assert [lg.shape for lg in logits] == [(2, 1, 5, 2, 2)] * 2
    sum(lg.sum() for lg in logits).backward()  # crashed on a channels-last view before the contiguous copy
    assert all(p.grad is not None for p in disc.parameters())
