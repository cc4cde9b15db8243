"""LoRA mode (docs/method.md §9): trainable low-rank adapters on frozen weights instead of full trainable copies.

DMD-style distillation holds three full models (student, frozen teacher, fake score); the fake score is a second
copy of the teacher that is trained. In LoRA mode the fake score is a peft LoRA adapter named "fake_score" on the
frozen teacher's own weights (diffusers' `PeftAdapterMixin.add_adapter`), so teacher and fake score share one copy:
teacher calls run with the adapter disabled, fake-score calls with it enabled. The student can be LoRA-trained too
(adapter "student" on the student's own frozen base; for the TMD student that base is the Stage-1 student, not the
teacher, so it cannot share the teacher's weights).

The adapter's resting state on the teacher is *disabled*: a call that forgets to switch gets the teacher, never the
fake score by accident. `AdapterView` is the fake score: a parameter-less module that enables the adapter for the
length of a call and whose `parameters()` are the adapter's (for the critic optimizer, clipping, hooks).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from tmd_lightning.models.precision import cast_model, fp32_module_names

FAKE_SCORE = "fake_score"
STUDENT = "student"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass(frozen=True)
class LoraSettings:
    """The `stage.lora` config block: which networks are adapters, with which rank / alpha / target modules.

    `alpha / rank` scales the adapter's update (`W + alpha/rank · B A`), so rank and alpha together set its size.
    """

    fake_score: bool = False
    student: bool = False
    rank: int = 64
    alpha: float = 64.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> LoraSettings:
        """From the config mapping (None: LoRA off); unknown keys are an error, not silently ignored."""
        values = dict(config or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown stage.lora key(s) {unknown}; expected {[f.name for f in fields(cls)]}")
        if "target_modules" in values:
            values["target_modules"] = tuple(str(m) for m in values["target_modules"])
        settings = cls(**values)
        if settings.rank < 1:
            raise ValueError(f"stage.lora.rank must be >= 1, got {settings.rank}")
        return settings

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> LoraConfig:
        """B starts at zero (peft's default init), so an adapter leaves its base model unchanged at init."""
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules),
                          lora_dropout=0.0, init_lora_weights=True)

    def record(self) -> dict[str, Any]:
        """Plain types for a checkpoint, enough to rebuild the adapter (`load_merged_state`)."""
        return asdict(self) | {"target_modules": list(self.target_modules)}


def lora_host(network: nn.Module) -> nn.Module:
    """The diffusers Wan model an adapter goes on: `network.wan` for a `TMDTransformer`, else the network itself.

    The TMD student's own new parts (delta embedder, inner fusion) stay outside the host, fully trainable.
    """
    return getattr(network, "wan", network)


def add_lora(network: nn.Module, settings: LoraSettings, adapter_name: str) -> dict[str, nn.Parameter]:
    """Adds adapter `adapter_name` to `network`'s Wan host, freezes the host's base weights and returns the adapter's
    parameters (trainable). Parts of `network` outside the host keep their `requires_grad`."""
    host = lora_host(network)
    host.add_adapter(settings.peft_config(), adapter_name=adapter_name)
    host.requires_grad_(False)
    params = adapter_parameters(host, adapter_name)
    for p in params.values():
        p.requires_grad_(True)
    return params


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """peft's adapter-carrying layers in `model` (the wrapped Linear layers)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """The parameters of adapter `adapter_name` in `model`, by their names in `model.named_parameters()`."""
    out: dict[str, nn.Parameter] = {}
    for module_name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
            continue
        for layer_name in layer.adapter_layer_names:
            container = getattr(layer, layer_name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            prefix = f"{module_name}.{layer_name}.{adapter_name}"
            if isinstance(item, nn.Parameter):
                out[prefix] = item
            else:
                out |= {f"{prefix}.{n}": p for n, p in item.named_parameters()}
    return out


def switch_adapters(layers: list[BaseTunerLayer], enabled: bool | list[bool]) -> None:
    """Turns the adapters of `layers` on or off (one flag for all, or one per layer), keeping `requires_grad`.

    peft's `enable_adapters` also flips the adapters' `requires_grad` (off when disabled); those flags are put back
    at once, so optimizers, DDP and clipping always see the same trainable set.
    """
    states = enabled if isinstance(enabled, list) else [enabled] * len(layers)
    flags = [(p, p.requires_grad) for layer in layers for p in _layer_adapter_params(layer)]
    for layer, on in zip(layers, states, strict=True):
        layer.enable_adapters(on)
    for p, flag in flags:
        p.requires_grad_(flag)


@contextmanager
def adapters_enabled(layers: list[BaseTunerLayer], enabled: bool) -> Iterator[None]:
    """`switch_adapters(layers, enabled)` for the block, then back to how each layer was."""
    before = [not layer.disable_adapters for layer in layers]
    switch_adapters(layers, enabled)
    try:
        yield
    finally:
        switch_adapters(layers, before)


def _layer_adapter_params(layer: BaseTunerLayer) -> Iterator[nn.Parameter]:
    for layer_name in layer.adapter_layer_names:
        yield from getattr(layer, layer_name).parameters()


def cast_keeping_adapters(model: nn.Module, dtype: torch.dtype, adapter_dtype: torch.dtype = torch.float32) -> None:
    """`model` cast to `dtype` (a bf16 frozen teacher) as diffusers loads one, its `_keep_in_fp32_modules` (time
    embedder, norms, modulation tables) kept float32, and every adapter parameter kept in `adapter_dtype`.

    peft's LoRA layers cast their input to the adapter's dtype and the result back to the base output's dtype, so a
    bf16 base with float32 adapters runs as is (and trains the adapters in float32).
    """
    cast_model(model, dtype)
    for layer in tuner_layers(model):
        for p in _layer_adapter_params(layer):
            p.data = p.data.to(adapter_dtype)
            if p.grad is not None:
                p.grad = p.grad.to(adapter_dtype)


class AdapterView(nn.Module):
    """A network that is `host` with adapter `adapter_name` enabled: the LoRA fake score on the teacher's weights.

    The host is not a submodule (its weights belong to the stage's `teacher` and appear once in the state dict,
    adapter included). `parameters()` yields the adapter's parameters only. Calls cast floating-point inputs to the
    host's base dtype (its adapters may be float32 on a bf16 base). Use `active()` around a backward pass when the
    host uses gradient checkpointing: the recomputed forward must see the adapter enabled as the first one did.
    """

    def __init__(self, host: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.__dict__["host"] = host  # deliberately unregistered: no second copy in state_dict / .to() / modules()
        self.adapter_name = adapter_name
        self._layers = tuner_layers(host)
        if not adapter_parameters(host, adapter_name):
            raise ValueError(f"{type(host).__name__} has no adapter named {adapter_name!r}")
        switch_adapters(self._layers, False)  # the resting state: the host is the teacher

    @property
    def config(self) -> Any:
        return self.host.config

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, p in adapter_parameters(self.host, self.adapter_name).items():
            yield (f"{prefix}.{name}" if prefix else name), p

    def base_dtype(self) -> torch.dtype:
        """The dtype of the host's (non-adapter) weights outside its float32-kept modules: what its inputs must be
        cast to."""
        adapter, keep = {id(p) for p in self.parameters()}, fp32_module_names(self.host)
        return next(p.dtype for name, p in self.host.named_parameters()
                    if id(p) not in adapter and not keep.intersection(name.split(".")))

    @contextmanager
    def active(self) -> Iterator[None]:
        """The adapter enabled for the block (the host is the fake score), disabled again after."""
        with adapters_enabled(self._layers, True):
            yield

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = self.base_dtype()
        args = tuple(_cast(a, dtype) for a in args)
        kwargs = {k: _cast(v, dtype) if k != "timestep" else v for k, v in kwargs.items()}
        with self.active():
            return self.host(*args, **kwargs)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def merge_lora(network: nn.Module) -> nn.Module:
    """Folds every adapter into its base weights (`W + alpha/rank · B A`, peft's merge through diffusers'
    `fuse_lora`) and removes the LoRA layers (`unload_lora`): a plain network again, in place."""
    host = lora_host(network)
    if tuner_layers(host):
        host.fuse_lora(safe_fusing=True)
        host.unload_lora()
    return network


def merged_copy(network: nn.Module) -> nn.Module:
    """A plain copy of `network` with its adapters merged; `network` keeps training (costs one copy of it)."""
    return merge_lora(copy.deepcopy(network))


def load_merged_state(network: nn.Module, state_dict: Mapping[str, torch.Tensor],
                      record: Mapping[str, Any] | None) -> nn.Module:
    """Loads a checkpoint's network state into a freshly built plain `network`; when the checkpoint `record`
    says the network was LoRA-trained (`{"adapter": name, **LoraSettings.record()}`), the adapter is rebuilt
    first and merged after, so samplers get a plain network either way."""
    if record:
        settings = LoraSettings.from_config({k: v for k, v in record.items() if k != "adapter"})
        add_lora(network, settings, record["adapter"])
    network.load_state_dict(dict(state_dict))
    return merge_lora(network) if record else network
