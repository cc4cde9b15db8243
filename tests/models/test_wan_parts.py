"""`models/wan_parts.py`: Wan's forward with blocks skipped (skip-layer guidance) against diffusers' own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.models.wan_parts import forward_skipping_blocks


class _Identity(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def test_skipping_blocks_equals_the_forward_of_a_copy_without_them(tiny_wan_config):
    tiny_wan_config["num_layers"] = 3
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**tiny_wan_config).eval()
    wan.proj_out.weight.normal_(std=0.1)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 48, 3, 4, 4, generator=g), torch.tensor([0.3, 0.9]), torch.randn(2, 5, 64, generator=g)
    full = wan(x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(forward_skipping_blocks(wan, x, t, text, []), full)
    reduced = copy.deepcopy(wan)
    reduced.blocks[0], reduced.blocks[2] = _Identity(), _Identity()
    skipped = forward_skipping_blocks(wan, x, t, text, [0, 2])
    torch.testing.assert_close(skipped, reduced(x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0])
    assert (skipped - full).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"skipped blocks \[3\] must lie in \[0, 2\]"):
        forward_skipping_blocks(wan, x, t, text, [3])
