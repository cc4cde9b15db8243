"""The widths and lengths activations scale with: the latent and token grid of the configured video, the text
length and the Wan transformer's widths."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from tmd_lightning.models.codecs import Codec


@dataclass(frozen=True)
class Sizes:
    """The widths and lengths activations scale with."""

    latent: tuple[int, ...]  # (C, T, h, w) of one video's latents
    grid: tuple[int, int, int]  # tokens per axis after Wan's patching
    text_len: int  # text tokens per caption (the text encoder's max_length)
    dim: int  # D
    ffn: int  # F
    heads: int
    head_dim: int
    patch_in: int  # latent values per token: in_channels x patch volume
    text_dim: int
    num_layers: int  # L

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)


def sizes(cfg: DictConfig, codec: Codec, arch: dict[str, Any]) -> Sizes:
    """Latent and token grid of `cfg.video` through the codec and Wan's patch size (81 x 480 x 832 with the Wan VAE:
    latents 16 x 21 x 60 x 104, patches (1, 2, 2): 21 x 30 x 52 = 32,760 tokens)."""
    latent = codec.latent_shape(int(cfg.video.num_frames), int(cfg.video.height), int(cfg.video.width))
    patch = tuple(arch["patch_size"])
    grid = tuple(n // p for n, p in zip(latent[1:], patch, strict=True))
    heads, head_dim = arch["num_attention_heads"], arch["attention_head_dim"]
    return Sizes(tuple(latent), grid, int(cfg.model.text_encoder.max_length), heads * head_dim, arch["ffn_dim"],
                 heads, head_dim, arch["in_channels"] * math.prod(patch), arch["text_dim"], arch["num_layers"])
