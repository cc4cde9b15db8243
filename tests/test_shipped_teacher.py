"""The toy teacher shipped in the package loads offline, matches the toy config, and follows prompted colours."""

from __future__ import annotations

from omegaconf import OmegaConf

from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.metrics.toy import classify
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder, load_transformer
from tmd_lightning.stages import TeacherStage


def test_shipped_teacher_loads_matches_config_and_follows_colour() -> None:
    transformer = load_transformer(pretrained=TOY_MODEL_DIR)
    expected = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml").transformer_config)
    for key, value in expected.items():  # `experiment=teacher` rebuilds exactly this architecture
        got = transformer.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stage = TeacherStage(transformer, PixelCodec(4), text_encoder, optimizer=None).eval()
    captions = [f"a {c} square moving {d}" for c in ("red", "green", "blue", "yellow") for d in ("left", "up")]
    videos = stage.generate(captions, [0] * len(captions), 9, 16, 16, steps=20, cfg=5.0)
    colours = [p["colour"] for p in classify(videos)]
    hits = sum(c == cap.split()[1] for c, cap in zip(colours, captions, strict=True))
    assert hits >= 7, colours  # colour was 1.00 from step 500 of training on
