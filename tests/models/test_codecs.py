"""Codecs (docs/method.md §6, §7): the toy pixel codec and the Wan VAE wrapper with latent normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tmd_lightning.models import PixelCodec, WanVAECodec


def _random_videos(b: int, f: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, f, h, w, 3), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------------- PixelCodec


@pytest.mark.parametrize("patch,shape", [(4, (2, 9, 16, 16)), (4, (1, 5, 32, 16)), (2, (3, 1, 6, 10))])
def test_pixel_codec_round_trip_is_exact(patch, shape):
    codec = PixelCodec(patch)
    videos = _random_videos(*shape, seed=patch)
    latents = codec.encode(videos)
    b, f, h, w = shape
    assert latents.shape == (b, 3 * patch * patch, f, h // patch, w // patch)
    assert latents.dtype == torch.float32
    assert latents.min() >= -1.0 and latents.max() <= 1.0
    decoded = codec.decode(latents)
    assert decoded.dtype == torch.uint8
    assert decoded.shape == videos.shape
    assert torch.equal(decoded, videos)


def test_pixel_codec_toy_latent_shape_is_48_channels_on_quarter_grid():
    codec = PixelCodec()  # the toy default: 4x4 space-to-depth
    assert codec.latent_shape(9, 16, 16) == (48, 9, 4, 4)
    assert codec.latent_shape(9, 32, 32) == (48, 9, 8, 8)
    assert codec.encode(_random_videos(1, 9, 16, 16)).shape[1:] == codec.latent_shape(9, 16, 16)
    assert codec.temporal_factor == 1 and codec.spatial_factor == 4 and codec.latent_channels == 48


def test_pixel_codec_encode_matches_pixel_unshuffle_reference():
    """Independent reference: per-frame torch pixel_unshuffle on the [-1, 1] image."""
    p = 4
    codec = PixelCodec(p)
    videos = _random_videos(2, 3, 16, 24, seed=7)
    ref_frames = []
    for f in range(videos.shape[1]):
        img = videos[:, f].permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0  # (B, 3, H, W)
        ref_frames.append(F.pixel_unshuffle(img, p))  # channel index = c * p^2 + i * p + j
    ref = torch.stack(ref_frames, dim=2)  # (B, 3 p^2, F, H/p, W/p)
    out = codec.encode(videos)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=0)
    # and decode inverts it the same way pixel_shuffle does
    ref_img = F.pixel_shuffle(out[:, :, 1].double(), p)  # frame 1
    expect = ((ref_img + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(codec.decode(out)[:, 1], expect)


def test_pixel_codec_decode_clamps_out_of_range_latents():
    codec = PixelCodec(4)
    latents = torch.full((1, 48, 1, 2, 2), 3.0)
    latents[:, :, :, 0] = -5.0
    out = codec.decode(latents)
    assert (out[:, :, :4] == 0).all() and (out[:, :, 4:] == 255).all()


def test_pixel_codec_has_no_parameters():
    assert list(PixelCodec().parameters()) == []


@pytest.mark.parametrize("size", [(9, 18, 16), (9, 16, 15), (1, 3, 3)])
def test_pixel_codec_latent_shape_rejects_indivisible_sizes(size):
    with pytest.raises(ValueError, match="size multiple of 4"):
        PixelCodec(4).latent_shape(*size)


def test_pixel_codec_any_frame_count_is_fine():
    assert PixelCodec(4).latent_shape(6, 16, 16) == (48, 6, 4, 4)  # temporal factor 1: no 4k+1 requirement


@pytest.mark.parametrize("k", [2, 4])
def test_pixel_codec_stacks_k_frames_after_the_first_like_wans_causal_vae(k):
    """K frames per latent frame after frame 0 alone (repeated K times); exact round trip; Kk+1 frames required."""
    codec = PixelCodec(4, frames_per_latent=k)
    videos = _random_videos(2, 2 * k + 1, 16, 16)
    latents = codec.encode(videos)
    assert latents.shape[1:] == codec.latent_shape(2 * k + 1, 16, 16) == (48 * k, 3, 4, 4)
    per_frame = PixelCodec(4).encode(videos)  # (B, 48, F, 4, 4): the K = 1 latents, one per frame
    for j in range(k):  # channel block j of latent frame i holds video frame (i - 1) K + 1 + j; frame 0 in every block
        block = latents[:, 48 * j : 48 * (j + 1)]
        assert torch.equal(block[:, :, 0], per_frame[:, :, 0])
        assert torch.equal(block[:, :, 1], per_frame[:, :, 1 + j])
        assert torch.equal(block[:, :, 2], per_frame[:, :, 1 + k + j])
    assert torch.equal(codec.decode(latents), videos)
    with pytest.raises(ValueError, match=f"frames {k}k\\+1"):
        codec.latent_shape(2 * k, 16, 16)


# -------------------------------------------------------------------------------------------------- WanVAECodec

Z_MEAN = [0.3, -0.7, 1.1, -0.2]
Z_STD = [0.5, 2.0, 1.5, 0.8]


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKLWan saved as a diffusers folder (`<root>/vae`): 8x spatial, 4x temporal."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=Z_MEAN, latents_std=Z_STD)
    root = tmp_path_factory.mktemp("wan_vae")
    vae.save_pretrained(str(root / "vae"))
    return root


@pytest.fixture(scope="module")
def vae_codec(tiny_vae_dir):
    return WanVAECodec.from_pretrained(tiny_vae_dir)


@pytest.fixture(scope="module")
def raw_vae(tiny_vae_dir):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(str(tiny_vae_dir / "vae")).eval()


def test_wan_vae_codec_factors_and_latent_shape(vae_codec):
    assert vae_codec.latent_channels == 4
    assert vae_codec.temporal_factor == 4
    assert vae_codec.spatial_factor == 8
    assert vae_codec.latent_shape(5, 16, 16) == (4, 2, 2, 2)
    assert vae_codec.latent_shape(9, 32, 48) == (4, 3, 4, 6)
    assert vae_codec.latent_shape(1, 8, 8) == (4, 1, 1, 1)


@pytest.mark.parametrize("size", [(6, 16, 16), (4, 16, 16), (5, 12, 16), (5, 16, 20)])
def test_wan_vae_codec_latent_shape_rejects_bad_sizes(vae_codec, size):
    with pytest.raises(ValueError, match="does not fit"):
        vae_codec.latent_shape(*size)


def test_wan_vae_codec_encode_is_normalised_posterior_mean(vae_codec, raw_vae):
    videos = _random_videos(2, 5, 16, 16, seed=3)
    latents = vae_codec.encode(videos)
    assert latents.shape == (2, *vae_codec.latent_shape(5, 16, 16))
    assert latents.dtype == torch.float32
    # independent reference: [-1, 1] channels-first video -> posterior mean -> per-channel normalisation
    x = videos.to(torch.float32).permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    with torch.no_grad():
        z = raw_vae.encode(x).latent_dist.mean
    mean = torch.tensor(Z_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(Z_STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (z - mean) / std, atol=1e-5, rtol=1e-5)
    # the normalisation is not a no-op (guards against comparing an identity with itself)
    assert not torch.allclose(latents, z, atol=1e-2)


def test_wan_vae_codec_decode_unnormalises_and_returns_uint8(vae_codec, raw_vae):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn((2, 4, 2, 2, 2), generator=g)
    videos = vae_codec.decode(latents)
    assert videos.dtype == torch.uint8
    assert videos.shape == (2, 5, 16, 16, 3)
    mean = torch.tensor(Z_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(Z_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        pixels = raw_vae.decode(latents * std + mean).sample  # (B, 3, F, H, W) in about [-1, 1]
    ref = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (videos.int() - ref.int()).abs().max() <= 1


def test_wan_vae_codec_is_frozen(vae_codec):
    params = list(vae_codec.parameters())
    assert params, "the VAE should be a submodule"
    assert not any(p.requires_grad for p in params)
    assert not vae_codec.vae.training
    # normalisation buffers are not persisted (they come from the VAE config)
    assert not any(k in ("mean", "std") for k in vae_codec.state_dict())
