"""Codecs map uint8 videos to the latents the transformer sees, and back (DESIGN.md §6, §7).

`PixelCodec` is the toy world's codec (space-to-depth, lossless); `WanVAECodec` wraps diffusers'
`AutoencoderKLWan` and applies the latent normalisation the VAE itself does not: `(z - latents_mean) / latents_std`.
Both share one interface so every stage works with either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _to_unit(videos: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 -> (B, 3, F, H, W) float in [-1, 1]."""
    return videos.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) float in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous()


class Codec(nn.Module):
    """Interface: `encode(uint8 videos) -> latents (B, C, T, h, w)`, `decode(latents) -> uint8 videos`."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latents of a (num_frames, height, width) video."""
        if (num_frames - 1) % self.temporal_factor or height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"video {num_frames}x{height}x{width} does not fit the codec's factors "
                             f"(frames {self.temporal_factor}k+1, size multiple of {self.spatial_factor})")
        t = (num_frames - 1) // self.temporal_factor + 1
        return self.latent_channels, t, height // self.spatial_factor, width // self.spatial_factor


class PixelCodec(Codec):
    """Toy codec: pixels in [-1, 1], p x p space-to-depth -> (3 p^2) channels; exact inverse; no parameters."""

    temporal_factor = 1

    def __init__(self, patch: int = 4) -> None:
        super().__init__()
        self.spatial_factor = patch
        self.latent_channels = 3 * patch * patch

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = _to_unit(videos)
        b, c, f, h, w = x.shape
        p = self.spatial_factor
        x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * p * p, f, h // p, w // p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, cpp, f, hp, wp = latents.shape
        p = self.spatial_factor
        x = latents.reshape(b, cpp // (p * p), p, p, f, hp, wp).permute(0, 1, 4, 5, 2, 6, 3)
        return _to_uint8(x.reshape(b, cpp // (p * p), f, hp * p, wp * p))

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        if height % self.spatial_factor or width % self.spatial_factor:
            raise ValueError(f"video {height}x{width} is not divisible by the pixel patch {self.spatial_factor}")
        return self.latent_channels, num_frames, height // self.spatial_factor, width // self.spatial_factor


class WanVAECodec(Codec):
    """diffusers' `AutoencoderKLWan` (frozen) with Wan's per-channel latent normalisation.

    Encodes with the posterior mean (deterministic, as caches need); decodes to uint8.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.temporal_factor = 2 ** sum(cfg.temperal_downsample)
        self.spatial_factor = 2 ** len(cfg.temperal_downsample)
        self.register_buffer("mean", torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = "vae",
                        dtype: torch.dtype = torch.float32) -> WanVAECodec:
        from diffusers import AutoencoderKLWan

        return cls(AutoencoderKLWan.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype))

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = _to_unit(videos).to(self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.std + self.mean
        return _to_uint8(self.vae.decode(z.to(self.vae.dtype)).sample)
