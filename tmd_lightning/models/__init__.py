"""Models: the Wan teacher, the TMD student, codecs and text encoders."""

from tmd_lightning.models.codecs import Codec, PixelCodec, WanVAECodec
from tmd_lightning.models.discriminator import Discriminator
from tmd_lightning.models.teacher import TOY_MODEL_DIR, load_transformer
from tmd_lightning.models.text_encoders import TextEncoder, build_toy_text_encoder
from tmd_lightning.models.tmd import BackboneOutput, TMDTransformer, build_student

__all__ = ["TOY_MODEL_DIR", "BackboneOutput", "Codec", "Discriminator", "PixelCodec", "TMDTransformer", "TextEncoder",
           "WanVAECodec", "build_student", "build_toy_text_encoder", "load_transformer"]
