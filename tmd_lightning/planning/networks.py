"""The networks of a run, built on the meta device: shapes without memory or weights, so a plan of Wan2.1 14B runs
on a laptop before anything is downloaded.

The Wan teacher comes from `model.architecture`, the TMD student is `TMDTransformer`, the fake score and the DMD2-v
student are teacher copies (the teacher's module stands for them), the discriminator is `Discriminator`, the text
encoder is the transformers class of `model.text_encoder` (UMT5-XXL for Wan) and the codec the Wan VAE
(`AutoencoderKLWan`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tmd_lightning.models import Discriminator, TMDTransformer, WanVAECodec
from tmd_lightning.models.codecs import Codec


def wan_architecture(model_cfg: DictConfig) -> dict[str, Any]:
    """The teacher's `WanTransformer3DModel` config: `model.architecture` (the Wan2.1 releases), else
    `model.transformer_config` (the toy), else the `transformer/config.json` of `model.pretrained`."""
    for key in ("architecture", "transformer_config"):
        if model_cfg.get(key) is not None:
            return OmegaConf.to_container(model_cfg[key], resolve=True)
    folder = Path(model_cfg.pretrained) / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model {model_cfg.name}: no model.architecture and no {folder}/config.json")
    return {k: v for k, v in WanTransformer3DModel.load_config(str(folder)).items() if not k.startswith("_")}


def build_text_encoder(model_cfg: DictConfig) -> nn.Module:
    """The text encoder network (`model.text_encoder.model_class`) from `model.text_encoder_architecture`, else
    from the config in `<model.pretrained>/text_encoder`; no tokenizer, no weights."""
    import transformers

    spec = model_cfg.text_encoder
    cls = getattr(transformers, spec.get("model_class", "UMT5EncoderModel"))
    arch = model_cfg.get("text_encoder_architecture")
    if arch is not None:
        return cls(cls.config_class(**OmegaConf.to_container(arch, resolve=True)))
    return cls(cls.config_class.from_pretrained(str(Path(spec.path) / "text_encoder")))


def build_codec(model_cfg: DictConfig) -> Codec:
    """The codec: the Wan VAE (`WanVAECodec` around `AutoencoderKLWan(**model.vae_architecture)`, or the VAE config
    of `model.pretrained`), else `model.codec` itself (the toy's weightless `PixelCodec`)."""
    if model_cfg.get("vae_architecture") is not None:
        return WanVAECodec(AutoencoderKLWan(**OmegaConf.to_container(model_cfg.vae_architecture, resolve=True)))
    if str(model_cfg.codec.get("_target_", "")).endswith("WanVAECodec.from_pretrained"):
        config = AutoencoderKLWan.load_config(str(Path(model_cfg.codec.path) / "vae"))
        return WanVAECodec(AutoencoderKLWan.from_config(config))
    return instantiate(model_cfg.codec)


def build_networks(cfg: DictConfig) -> dict[str, nn.Module]:
    """Every network the three stages hold, on the meta device. The fake score and the DMD2-v student are teacher
    copies, so the teacher's module stands for them."""
    arch = wan_architecture(cfg.model)
    dim = arch["num_attention_heads"] * arch["attention_head_dim"]
    with torch.device("meta"):
        return {
            "teacher": WanTransformer3DModel(**arch),
            "student": TMDTransformer(wan_config=arch, head_blocks=int(cfg.tmd.H), fusion=str(cfg.tmd.fusion)),
            "discriminator": Discriminator(dim, tuple(cfg.model.disc_blocks), int(cfg.discriminator_hidden_dim)),
            "text_encoder": build_text_encoder(cfg.model),
            "codec": build_codec(cfg.model),
        }
