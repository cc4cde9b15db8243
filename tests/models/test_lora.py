"""LoRA mode's building blocks (models/lora.py) on a tiny random Wan: the adapter view, merging, dtypes, config."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel
from omegaconf import OmegaConf

from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.models import TMDTransformer
from tmd_lightning.models.lora import (
    FAKE_SCORE,
    STUDENT,
    AdapterView,
    LoraSettings,
    add_lora,
    cast_keeping_adapters,
    load_merged_state,
    merge_lora,
)

SETTINGS = LoraSettings(fake_score=True, student=True, rank=4, alpha=8.0)


def _wan(tiny_wan_config: dict, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**tiny_wan_config).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 48, 3, 4, 4, generator=g), "timestep": torch.tensor([300.0, 700.0]),
            "encoder_hidden_states": torch.randn(2, 5, 64, generator=g)}


def _velocity(net, **inputs) -> torch.Tensor:
    return net(**inputs, return_dict=False)[0].float()


def _randomise_adapter(params: dict[str, torch.nn.Parameter], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_adapter_targets_every_block_and_freezes_the_base(tiny_wan_config):
    wan = _wan(tiny_wan_config)
    params = add_lora(wan, SETTINGS, FAKE_SCORE)
    # 2 blocks x (self-attn q,k,v,out + cross-attn q,k,v,out + 2 FFN linears) x (A, B)
    assert len(params) == 2 * 10 * 2
    assert {n for n, p in wan.named_parameters() if p.requires_grad} == set(params)
    a = params["blocks.0.attn1.to_q.lora_A.fake_score.weight"]
    b = params["blocks.0.attn1.to_q.lora_B.fake_score.weight"]
    assert a.shape == (4, 32) and b.shape == (32, 4) and b.abs().max() == 0  # B = 0: the base at init
    net = wan.blocks[0].ffn.net
    assert params["blocks.0.ffn.net.2.lora_A.fake_score.weight"].shape == (4, net[2].in_features)


def test_adapter_view_enables_the_adapter_only_during_its_calls(tiny_wan_config):
    """The host is the teacher outside the view's calls (bitwise); the view is the host plus the adapter."""
    wan = _wan(tiny_wan_config)
    pristine = copy.deepcopy(wan)
    params = add_lora(wan, SETTINGS, FAKE_SCORE)
    view = AdapterView(wan, FAKE_SCORE)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(_velocity(view, **x), _velocity(pristine, **x))  # B = 0: exactly the teacher
        _randomise_adapter(params)
        fake, teacher = _velocity(view, **x), _velocity(wan, **x)
        assert torch.equal(teacher, _velocity(pristine, **x))  # the disabled path is the untouched teacher
        assert (fake - teacher).abs().max() > 1e-3
        with view.active():
            torch.testing.assert_close(_velocity(wan, **x), fake, rtol=0, atol=0)
    assert [id(p) for p in view.parameters()] == [id(p) for p in params.values()]
    assert all(p.requires_grad for p in view.parameters())  # peft's toggling of requires_grad is undone
    assert view.state_dict() == {} and list(view.modules()) == [view]  # no second copy of the host


def test_merge_equals_w_plus_scaled_ba_by_hand(tiny_wan_config):
    """peft's merge (diffusers fuse_lora + unload_lora) against W + (alpha / r) B A computed here."""
    wan = _wan(tiny_wan_config)
    params = add_lora(wan, SETTINGS, STUDENT)
    _randomise_adapter(params)
    x = _inputs()
    with torch.no_grad():
        with_adapter = _velocity(wan, **x)
        expected = {}
        for name in [n for n in params if ".lora_A." in n]:
            layer = name.split(".lora_A.")[0]
            w = wan.get_submodule(layer).base_layer.weight
            a, b = params[name], params[name.replace("lora_A", "lora_B")]
            expected[f"{layer}.weight"] = w + (SETTINGS.alpha / SETTINGS.rank) * b @ a
    merge_lora(wan)
    state = wan.state_dict()
    assert not any("lora" in k or "base_layer" in k for k in state)
    assert set(state) == set(_wan(tiny_wan_config).state_dict())  # a plain Wan model again
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(_velocity(wan, **x), with_adapter, rtol=1e-5, atol=1e-5)


def test_load_merged_state_rebuilds_a_lora_student_as_a_plain_one(tiny_wan_config):
    teacher = _wan(tiny_wan_config)
    student = TMDTransformer.from_teacher(teacher, head_blocks=1)
    params = add_lora(student, SETTINGS, STUDENT)
    assert student.delta_embedder.linear_2.weight.requires_grad  # the TMD parts outside the host stay trainable
    _randomise_adapter(params)
    plain = load_merged_state(TMDTransformer.from_teacher(teacher, head_blocks=1), student.state_dict(),
                              {"adapter": STUDENT, **SETTINGS.record()})
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(**x), student(**x), rtol=1e-5, atol=1e-5)
    assert not any("lora" in k for k in plain.state_dict())
    untouched = TMDTransformer.from_teacher(teacher, head_blocks=1)
    assert load_merged_state(untouched, untouched.state_dict(), None) is untouched  # no record: a plain load


def test_bf16_base_with_float32_adapters(tiny_wan_config):
    """A bf16 teacher (GPU's teacher_dtype) keeps float32 adapters: peft casts the LoRA input to the adapter's dtype
    and the sum back to the base's, so the fake score runs on bf16 weights and trains float32 adapters."""
    wan = _wan(tiny_wan_config)
    add_lora(wan, SETTINGS, FAKE_SCORE)
    view = AdapterView(wan, FAKE_SCORE)
    cast_keeping_adapters(wan, torch.bfloat16)
    assert {p.dtype for p in view.parameters()} == {torch.float32}
    assert view.base_dtype() == torch.bfloat16 and wan.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
    assert wan.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32  # diffusers' float32 modules
    x = _inputs()  # float32 inputs, cast by the view
    out = view(**x, return_dict=False)[0]
    assert out.dtype == torch.bfloat16
    with torch.no_grad():  # B = 0: still exactly the bf16 teacher (the VSD sanity check holds on GPU too)
        teacher = wan(**{k: v.to(torch.bfloat16) if k != "timestep" else v for k, v in x.items()},
                      return_dict=False)[0]
    assert torch.equal(out.detach(), teacher)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in view.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    assert all(p.grad is None for n, p in wan.named_parameters() if ".lora_" not in n)


def test_gradient_checkpointing_needs_the_adapter_active_in_backward(tiny_wan_config):
    """Checkpointed blocks recompute their forward in backward; with the adapter switched off by then the recompute
    differs (torch refuses). Inside `view.active()` the gradients equal those without checkpointing."""
    wan = _wan(tiny_wan_config)
    _randomise_adapter(add_lora(wan, SETTINGS, FAKE_SCORE))
    view = AdapterView(wan, FAKE_SCORE)
    x = _inputs()

    def grads(checkpointing: bool, backward_active: bool) -> list[torch.Tensor]:
        wan.enable_gradient_checkpointing() if checkpointing else wan.disable_gradient_checkpointing()
        view.zero_grad(set_to_none=True)
        loss = _velocity(view, **x).pow(2).mean()
        if backward_active:
            with view.active():
                loss.backward()
        else:
            loss.backward()
        return [p.grad.clone() for p in view.parameters()]

    reference = grads(False, False)
    for got, want in zip(grads(True, True), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        grads(True, False)


def test_settings_from_the_stage_configs(tiny_wan_config):
    for name in ("distill", "distill_dmd2"):
        block = OmegaConf.load(CONFIG_DIR / "stage" / f"{name}.yaml").lora
        assert set(block) == {"fake_score", "student", "rank", "alpha", "target_modules"}  # read by `plan` too
        settings = LoraSettings.from_config(block)
        assert settings == LoraSettings()  # off by default, rank = alpha = 64, the six Wan projections
        assert settings.scaling == 1.0 and settings.peft_config().r == 64
    with pytest.raises(ValueError, match="unknown stage.lora key"):
        LoraSettings.from_config({"fake_scor": True})
    with pytest.raises(ValueError, match="has no adapter"):
        AdapterView(_wan(tiny_wan_config), FAKE_SCORE)
