"""Models: the Wan teacher, codecs and text encoders (and, later, the TMD student)."""

from tmd_lightning.models.codecs import Codec, PixelCodec, WanVAECodec
from tmd_lightning.models.text_encoders import TextEncoder, build_toy_text_encoder
from tmd_lightning.models.transformer import TOY_MODEL_DIR, load_transformer

__all__ = ["TOY_MODEL_DIR", "Codec", "PixelCodec", "TextEncoder", "WanVAECodec", "build_toy_text_encoder",
           "load_transformer"]
