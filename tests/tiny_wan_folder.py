"""Test helpers: a tiny random Wan2.1 T2V model folder in the diffusers layout, and toy videos to feed it.

`write_tiny_wan_folder` writes the `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` layout: `transformer/` (WanTransformer3DModel,
patch (1, 2, 2) on 16 latent channels, as the 1.3B), `vae/` (AutoencoderKLWan: 8x spatial, 4x temporal, z_dim 16 with
its own latents_mean / latents_std), `text_encoder/` (UMT5EncoderModel), `tokenizer/` (a T5 Unigram tokenizer built
in memory: nothing downloads) and `model_index.json`. Every loader of the real folder reads it unchanged; only the
sizes are tiny. `write_toy_videos` writes toy-world MP4s plus a manifest (sizes divisible by 16 suit VAE + patch).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tmd_lightning.models.text_encoders import TOY_VOCAB

WORDS = [w for w in TOY_VOCAB if not w.startswith("<")] + ["cat", "dog", "runs", "on", "beach", "at", "night"]
TEXT_DIM = 32
Z_DIM = 16
NUM_LAYERS = 3


def write_tokenizer(path: Path) -> None:
    """A T5 (Unigram, Metaspace) tokenizer: whole words, letters as fallback; loads with AutoTokenizer offline."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    pieces += [(chr(c), -5.0) for c in range(ord("a"), ord("z") + 1)]
    pieces += [(",", -5.0), (".", -5.0)]
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(str(path))


def write_tiny_wan_folder(root: str | Path, seed: int = 0) -> Path:
    """Writes the folder at `root` and returns it; the same seed gives the same weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    root = Path(root)
    write_tokenizer(root / "tokenizer")
    vocab_size = len(AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True))
    torch.manual_seed(seed)
    WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=Z_DIM, out_channels=Z_DIM,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=NUM_LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
    ).save_pretrained(str(root / "transformer"))
    g = torch.Generator().manual_seed(seed)
    AutoencoderKLWan(
        base_dim=8, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=(torch.randn(Z_DIM, generator=g) * 0.5).tolist(),
        latents_std=(torch.rand(Z_DIM, generator=g) * 1.5 + 0.5).tolist(),
    ).save_pretrained(str(root / "vae"))
    UMT5EncoderModel(UMT5Config(
        vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).save_pretrained(str(root / "text_encoder"))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
    }, indent=1))
    return root


def write_toy_videos(root: str | Path, captions: list[str], size: int, num_frames: int = 9, seed: int = 0,
                     name: str = "manifest.csv") -> Path:
    """One toy-world MP4 per caption in `root` plus a manifest (`path, caption`) naming them; returns the manifest."""
    import numpy as np

    from tmd_lightning.data.manifest import write_manifest
    from tmd_lightning.data.toy_world import parse_caption, random_spec, render, write_mp4

    root, rng, rows = Path(root), np.random.default_rng(seed), []
    for i, caption in enumerate(captions):
        write_mp4(root / f"{seed}_{i:03d}.mp4", render(random_spec(rng, **parse_caption(caption)), num_frames, size))
        rows.append({"path": f"{seed}_{i:03d}.mp4", "caption": caption})
    return write_manifest(root / name, rows)


def write_tiny_toy_teacher(root: str | Path, seed: int = 0, num_layers: int = 2, channels: int | None = None) -> Path:
    """A tiny random Wan teacher for the toy codec of `model=toy` (its latent channels unless `channels` is given)
    and toy text encoder (width 64), saved as `root/transformer`; its output projection is drawn at std 0.1 so its
    velocities are not near zero."""
    from diffusers import WanTransformer3DModel
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tmd_lightning.config import CONFIG_DIR

    if channels is None:
        channels = instantiate(OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml").codec).latent_channels
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=channels,
        out_channels=channels,
        text_dim=64, freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    with torch.no_grad():
        wan.proj_out.weight.normal_(std=0.1)
    wan.save_pretrained(str(Path(root) / "transformer"))
    return Path(root)
