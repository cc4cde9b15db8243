"""The KD warm-up of the one-step DMD2-v (`KDWarmupStage`) and the DMD2-v student's initialisation (`dmd2_student`),
on tiny random Wan models, the pixel codec and the toy text encoder."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import WanTransformer3DModel
from tiny_wan_folder import write_tiny_toy_teacher
from torch.utils.data import DataLoader

from tmd_lightning.checkpoints import load_checkpoint_stage, load_pretrained_stage
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder
from tmd_lightning.sampling import FewStepSampler
from tmd_lightning.stages import KDWarmupStage, SamplingStage
from tmd_lightning.stages.kd_warmup import dmd2_student


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def _student(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48,
                                out_channels=48, text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2)
    with torch.no_grad():
        wan.proj_out.weight.normal_(std=0.1)
    return wan


def _stage(text_encoder: TextEncoder, seed: int = 0, lr: float = 1e-3) -> KDWarmupStage:
    return KDWarmupStage(_student(seed), PixelCodec(4), text_encoder, optimizer=partial(torch.optim.AdamW, lr=lr))


def _pairs(n: int, seed: int = 0) -> dict:
    """A batch as the pair cache serves it: teacher samples ("latents"), their noise, padded text, captions."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, 8, 64, generator=g)
    text[:, 6:] = 0  # zero past the caption's tokens, as collated from the cache
    return {"latents": torch.randn(n, 48, 3, 4, 4, generator=g).clamp(-1, 1), "noise": torch.randn(n, 48, 3, 4, 4,
            generator=g), "text": text, "caption": ["a red square moving up"] * n}


def test_loss_is_the_mse_of_the_one_step_sample_against_the_teacher_sample(text_encoder):
    stage, batch = _stage(text_encoder), _pairs(3)
    wan = stage.student
    v = wan(batch["noise"], timestep=torch.full((3,), 999.0), encoder_hidden_states=batch["text"], return_dict=False)[0]
    expected = ((batch["noise"] - 0.999 * v - batch["latents"]) ** 2).mean()  # x̂ = ε - t_max v(ε, t_max), t_max .999
    torch.testing.assert_close(stage.kd_loss(batch), expected, rtol=1e-4, atol=1e-6)


def test_the_warmup_trains_the_map_the_one_step_dmd2_sampler_applies(text_encoder):
    stage, batch = _stage(text_encoder), _pairs(2)
    sampler = SamplingStage(stage.student, PixelCodec(4), text_encoder, FewStepSampler(M=1, gamma=5.0, t_max=0.999))
    with torch.no_grad():
        torch.testing.assert_close(stage.one_step(batch["noise"], batch["text"]),
                                   sampler.sample_latents(batch["noise"], batch["text"]))
        torch.testing.assert_close(stage.sample_latents(batch["noise"], batch["text"]),
                                   sampler.sample_latents(batch["noise"], batch["text"]))
    assert stage.sampler_nfe() == 1 and stage.sampler_options() == {"M": 1, "gamma": 10.0, "t_max": 0.999}


def _fit(stage: KDWarmupStage, batch: dict, steps: int, root: Path) -> L.Trainer:
    loader = DataLoader([batch], batch_size=None)  # the same batch every step
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(stage, train_dataloaders=loader)
    return trainer


def test_a_few_steps_reduce_the_loss_and_the_checkpoint_samples_in_one_step(text_encoder, tmp_path):
    stage, batch = _stage(text_encoder, lr=5e-3), _pairs(4)
    with torch.no_grad():
        before = float(stage.kd_loss(batch))
    trainer = _fit(stage, batch, 30, tmp_path)
    with torch.no_grad():
        after = float(stage.kd_loss(batch))
    assert after < 0.5 * before, (before, after)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    loaded = load_checkpoint_stage(tmp_path / "last.ckpt", PixelCodec(4), text_encoder)
    assert isinstance(loaded.sampler, FewStepSampler) and loaded.sampler_options()["M"] == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.sample_latents(batch["noise"], batch["text"]),
                                   stage.one_step(batch["noise"], batch["text"]))


def test_a_batch_without_noise_is_a_clear_error(text_encoder):
    batch = _pairs(1)
    del batch["noise"]
    with pytest.raises(KeyError, match="tmd_lightning.kd_pairs"):
        _stage(text_encoder).kd_loss(batch)


@pytest.fixture(scope="module")
def kd_export(tmp_path_factory: pytest.TempPathFactory, text_encoder) -> tuple[Path, Path]:
    """A teacher folder and a KD export whose weights differ from it (another seed)."""
    root = tmp_path_factory.mktemp("dmd2_init")
    teacher = write_tiny_toy_teacher(root / "teacher", seed=0, channels=48)  # as _stage's student
    assert _stage(text_encoder, seed=1).export_pretrained(str(root / "export"))
    return teacher, root / "export"


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_export_samples_in_one_step(kd_export, text_encoder):
    _, export = kd_export
    assert json.loads((export / "sampling.json").read_text())["sampler"] == {"kind": "few_step", "M": 1, "gamma": 10.0,
                                                                            "t_max": 0.999}
    stage = load_pretrained_stage(export, PixelCodec(4), text_encoder)
    assert isinstance(stage.sampler, FewStepSampler) and stage.sampler_nfe() == 1


def test_dmd2_student_starts_from_the_kd_export_for_one_step_only(kd_export):
    teacher, export = kd_export
    kd = WanTransformer3DModel.from_pretrained(str(export))
    base = WanTransformer3DModel.from_pretrained(str(teacher / "transformer"))
    assert not _equal(kd, base)
    assert _equal(dmd2_student(str(teacher), M=1, kd_export=str(export)), kd)  # auto: M = 1 -> KD warm-up
    assert _equal(dmd2_student(str(teacher), M=2, kd_export=str(export)), base)  # auto: M = 2 -> teacher
    assert _equal(dmd2_student(str(teacher), M=1, kd_export=str(export), kd_warmup=False), base)
    assert _equal(dmd2_student(str(teacher), M=2, kd_export=str(export), kd_warmup=True), kd)


def test_dmd2_student_without_a_kd_export_says_what_to_run(kd_export, tmp_path):
    teacher, _ = kd_export
    with pytest.raises(FileNotFoundError, match=r"no KD warm-up export at .*python -m tmd_lightning.kd_pairs.*"
                                                r"python -m tmd_lightning.fit experiment=kd_warmup.*kd_warmup=false"):
        dmd2_student(str(teacher), M=1, kd_export=str(tmp_path / "missing"))
    assert dmd2_student(str(teacher), M=2, kd_export=str(tmp_path / "missing")) is not None  # not needed: no error
    with pytest.raises(ValueError, match="kd_warmup must be auto, true or false"):
        dmd2_student(str(teacher), M=1, kd_export=str(tmp_path), kd_warmup="yes")
