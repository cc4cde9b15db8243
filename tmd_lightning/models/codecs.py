"""Codecs map uint8 videos to the latents the transformer sees, and back (docs/method.md §6, §7).

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
    """Toy codec, shaped like Wan's causal VAE but lossless and without parameters.

    Space: p x p space-to-depth. Time: the first frame alone, then K = `frames_per_latent` consecutive frames per
    latent frame, stacked in channels (Wan's VAE: K = 4), so a video of K k + 1 frames has k + 1 latent frames of
    3 p^2 K channels. The first latent frame holds frame 0 repeated K times (it differs in kind from the others,
    as Wan's VAE encodes frame 0 alone); decoding averages the copies.

    Why stack frames: with K = 1 a token is one frame, and since Wan's RoPE is relative a token cannot tell which
    end of the clip it is at, so a clip and its time reversal look alike; a stack of K >= 2 frames carries the
    arrow of time in its channel order (docs/method.md, "The toy world").
    """

    def __init__(self, patch: int = 4, frames_per_latent: int = 1) -> None:
        super().__init__()
        if patch < 1 or frames_per_latent < 1:
            raise ValueError(f"patch ({patch}) and frames_per_latent ({frames_per_latent}) must be >= 1")
        self.spatial_factor = patch
        self.temporal_factor = frames_per_latent
        self.latent_channels = 3 * patch * patch * frames_per_latent

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = _to_unit(videos)
        b, c, f, h, w = x.shape
        self.latent_shape(f, h, w)
        k, p = self.temporal_factor, self.spatial_factor
        x = torch.cat([x[:, :, :1].expand(-1, -1, k, -1, -1), x[:, :, 1:]], dim=2)  # frame 0 repeated K times
        t = x.shape[2] // k
        x = x.reshape(b, c, t, k, h // p, p, w // p, p).permute(0, 3, 1, 5, 7, 2, 4, 6)  # (b, k, c, p, p, t, h, w)
        return x.reshape(b, k * c * p * p, t, h // p, w // p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, ch, t, hp, wp = latents.shape
        k, p = self.temporal_factor, self.spatial_factor
        c = ch // (k * p * p)
        x = latents.reshape(b, k, c, p, p, t, hp, wp).permute(0, 2, 5, 1, 6, 3, 7, 4)  # (b, c, t, k, h, p, w, p)
        x = x.reshape(b, c, t, k, hp * p, wp * p)
        first = x[:, :, 0].mean(dim=2, keepdim=True)  # the K copies of frame 0
        rest = x[:, :, 1:].reshape(b, c, (t - 1) * k, hp * p, wp * p)
        return _to_uint8(torch.cat([first, rest], dim=2))


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

        from tmd_lightning.models.folders import local_folder, require_safetensors

        folder = local_folder(path)
        folder = require_safetensors(folder / subfolder if subfolder else folder)
        return cls(AutoencoderKLWan.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                                    use_safetensors=True))

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        x = _to_unit(videos).to(self.vae.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() * self.std + self.mean
        return _to_uint8(self.vae.decode(z.to(self.vae.dtype)).sample)
