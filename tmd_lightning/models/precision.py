"""Weight dtypes: casting a network to bf16 the way diffusers loads one, and choosing the dtype for a device.

diffusers' `from_pretrained(torch_dtype=torch.bfloat16)` keeps the modules a model lists in `_keep_in_fp32_modules`
(Wan: rope, the time embedder, the norms and modulation tables) in float32, because their inputs are times and
statistics that bf16 cannot resolve; a plain `model.to(torch.bfloat16)` casts them too. `cast_model` applies the
same rule to a network already in memory (a checkpoint's student, the distillation teacher).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU, float32 elsewhere; "float32" / "bfloat16" (or a torch dtype) as given."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def fp32_module_names(model: nn.Module) -> set[str]:
    """Every name listed in the `_keep_in_fp32_modules` of `model` and of the diffusers models nested in it."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_keep_in_fp32_modules", None) or ())
    return names


def _float_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(qualified name, owning module, attribute, tensor) of every floating-point parameter and buffer."""
    for module_name, module in model.named_modules():
        for attr, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and tensor.is_floating_point():
                yield (f"{module_name}.{attr}" if module_name else attr), module, attr, tensor


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts `model`'s floating-point parameters and buffers to `dtype` in place, keeping float32 those under a
    module named in a `_keep_in_fp32_modules` list (diffusers' rule: a component of the parameter's dotted name
    equals a listed name). Parameters stay the same objects, so optimizers and wrappers holding them still work."""
    keep = fp32_module_names(model)
    narrow = torch.finfo(dtype).bits < 32  # bf16 / fp16: the listed modules stay float32
    for name, module, attr, tensor in _float_tensors(model):
        target = torch.float32 if narrow and keep.intersection(name.split(".")) else dtype
        if tensor.dtype == target:
            continue
        if isinstance(tensor, nn.Parameter):
            tensor.data = tensor.data.to(target)
            if tensor.grad is not None:
                tensor.grad = tensor.grad.to(target)
        else:
            module._buffers[attr] = tensor.to(target)
    return model
