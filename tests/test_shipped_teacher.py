"""The toy teacher shipped in the package loads offline, matches the toy config, and follows prompted colours and
directions (the sign of the motion too: the K = 2 codec gives each token the direction of time)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import OmegaConf

from tmd_lightning.checkpoints import folder_sampler
from tmd_lightning.config import CONFIG_DIR
from tmd_lightning.metrics.toy import classify
from tmd_lightning.models import TOY_MODEL_DIR, TextEncoder, load_transformer
from tmd_lightning.stages import TeacherStage


def test_shipped_teacher_loads_matches_config_and_follows_colour_and_direction() -> None:
    transformer = load_transformer(pretrained=TOY_MODEL_DIR)
    toy = OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml")
    expected = OmegaConf.to_container(toy.transformer_config)
    for key, value in expected.items():  # `experiment=teacher` rebuilds exactly this architecture
        got = transformer.config[key]
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stage = TeacherStage(transformer, instantiate(toy.codec), text_encoder, optimizer=None).eval()
    captions = [f"a {c} square moving {d}" for c in ("red", "green", "blue", "yellow")
                for d in ("left", "right", "up", "down")]
    videos = stage.generate(captions, [0] * len(captions), 9, 16, 16, steps=20, cfg=toy.guidance_scale)
    predicted = classify(videos)
    colours = sum(p["colour"] == cap.split()[1] for p, cap in zip(predicted, captions, strict=True))
    directions = sum(p["direction"] == cap.split()[-1] for p, cap in zip(predicted, captions, strict=True))
    # colour was 1.00 from step 500 of training on; direction (axis and sign) 1.00 from step 5,000 (48 x 4 videos)
    assert colours >= 15 and directions >= 15, predicted


def test_shipped_teacher_records_the_toy_guidance() -> None:
    """`sample` runs the shipped teacher with its recorded sampler: the toy model's guidance scale, not Wan's 5."""
    sampler = folder_sampler(TOY_MODEL_DIR / "transformer", "WanTransformer3DModel")
    toy = OmegaConf.load(CONFIG_DIR / "model" / "toy.yaml")
    assert (sampler.kind, sampler.steps, sampler.cfg) == ("teacher", 50, toy.guidance_scale)
