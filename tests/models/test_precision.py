"""Weight dtypes: `cast_model` against diffusers' own `from_pretrained(torch_dtype=...)`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from tmd_lightning.models import TMDTransformer
from tmd_lightning.models.precision import cast_model, resolve_dtype


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters()) | dict(model.named_buffers())


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_cast_model_is_what_diffusers_loads_in_bf16(kind, tiny_wan_config, tmp_path: Path):
    """Casting a float32 model in memory gives, tensor for tensor, what diffusers' loader gives: bf16 weights with
    the `_keep_in_fp32_modules` (time embedder, norms, modulation tables, rope; the student's new parts) float32."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(**tiny_wan_config)
    if kind == "student":
        model = TMDTransformer.from_teacher(model, head_blocks=1)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(str(tmp_path), torch_dtype=torch.bfloat16)
    cast = cast_model(type(model).from_pretrained(str(tmp_path)), torch.bfloat16)
    expected, got = _tensors(loaded), _tensors(cast)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    dtypes = {name: t.dtype for name, t in got.items()}
    assert {torch.bfloat16, torch.float32} == set(dtypes.values())  # both kinds present, as diffusers decides
    prefix = "wan." if kind == "student" else ""
    assert dtypes[f"{prefix}condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert dtypes[f"{prefix}condition_embedder.time_proj.weight"] == torch.bfloat16
    assert dtypes[f"{prefix}blocks.0.attn1.to_q.weight"] == torch.bfloat16


def test_cast_model_back_to_float32_and_keeps_parameter_objects(tiny_wan_config):
    model = WanTransformer3DModel(**tiny_wan_config)
    before = {name: p for name, p in model.named_parameters()}
    cast_model(model, torch.bfloat16)
    cast_model(model, torch.float32)
    assert all(p is before[name] and p.dtype == torch.float32 for name, p in model.named_parameters())


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        resolve_dtype("fp8", "cpu")
