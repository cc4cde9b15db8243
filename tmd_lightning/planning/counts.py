"""Parameter counts of the meta-device networks: what the weight, gradient and AdamW rows multiply by bytes.

Numbers of parameters, not bytes: the whole network, its Linear / Conv part (what autocast copies to bf16), the LoRA
adapters peft would add, the LoRA host (frozen under LoRA) and the largest Wan block (FSDP's unit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from diffusers import WanTransformer3DModel
from omegaconf import DictConfig
from torch import nn


@dataclass(frozen=True)
class Counts:
    """One network's parameter counts (numbers of parameters, not bytes)."""

    params: int
    tensors: int  # parameter tensors: AdamW keeps a 4-byte `step` per tensor
    linear: int  # weights + biases of Linear / Conv layers: what autocast copies to bf16
    lora: int  # LoRA adapter parameters: rank x (in + out) per adapted Linear
    lora_tensors: int  # 2 per adapted Linear (A and B)
    host: int  # parameters of the module the adapters go on (network.wan for the TMD student): frozen under LoRA
    host_tensors: int
    host_linear: int
    block: int  # parameters of the largest Wan block (FSDP's unit); 0 outside Wan
    block_linear: int = 0  # Linear parameters of the largest Wan block (autocast copies of one block)
    blocks: int = 0  # Wan blocks of the network (L)


def numel(params: Iterable[nn.Parameter]) -> int:
    """Number of elements of the given parameters (meta tensors have shapes, so this works without memory)."""
    return sum(p.numel() for p in params)


def lora_linears(host: nn.Module, targets: Iterable[str]) -> list[nn.Linear]:
    """The Linear layers peft's LoRA adapts: qualified name equal to a target or ending in "." + a target."""
    targets = list(targets)
    return [m for name, m in host.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)]


def linear_params(module: nn.Module) -> int:
    """Parameters of the Linear and Conv layers in `module` (the ones autocast runs in bf16)."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(numel(m.parameters(recurse=False)) for m in module.modules() if isinstance(m, kinds))


def count(network: nn.Module, rank: int, targets: Iterable[str]) -> Counts:
    """Counts of `network`; the LoRA host is `network.wan` for the TMD student, else the network (as
    `models.lora.lora_host`), and only Wan transformers get adapters."""
    host = getattr(network, "wan", network)
    adapted = lora_linears(host, targets) if isinstance(host, WanTransformer3DModel) else []
    blocks = getattr(host, "blocks", None) if isinstance(host, WanTransformer3DModel) else None
    return Counts(params=numel(network.parameters()), tensors=len(list(network.parameters())),
                  linear=linear_params(network), lora=sum(rank * (m.in_features + m.out_features) for m in adapted),
                  lora_tensors=2 * len(adapted), host=numel(host.parameters()),
                  host_tensors=len(list(host.parameters())), host_linear=linear_params(host),
                  block=max((numel(b.parameters()) for b in blocks), default=0) if blocks is not None else 0,
                  block_linear=max((linear_params(b) for b in blocks), default=0) if blocks is not None else 0,
                  blocks=len(blocks) if blocks is not None else 0)


def count_all(networks: dict[str, nn.Module], lora_cfg: DictConfig) -> dict[str, Counts]:
    """`count` of every network, with the LoRA rank and target modules of the `lora` config."""
    rank, targets = int(lora_cfg.rank), list(lora_cfg.target_modules)
    return {name: count(net, rank, targets) for name, net in networks.items()}
