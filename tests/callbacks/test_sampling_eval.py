"""The periodic sampling evaluations: real-data FVD / diagnostics (`VideoEvalCallback`) against direct metrics."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from torch import nn

from tmd_lightning.callbacks import ToyEvalCallback, VideoEvalCallback
from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.metrics.diagnostics import colour_saturation, motion_magnitude, seed_diversity
from tmd_lightning.metrics.fvd import FrechetVideoDistance, I3DFeatures
from tmd_lightning.models import TOY_MODEL_DIR, PixelCodec, TextEncoder
from tmd_lightning.stages import TeacherStage

TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2)


class _Detector(nn.Module):
    """Same call signature as StyleGAN-V's I3D TorchScript file; a fixed random projection of pooled clips."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 2 * 4 * 4, 400)  # the real detector's 400 features

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return self.proj(F.adaptive_avg_pool3d(x, (2, 4, 4)).flatten(1))


def _setup(tmp_path):
    torch.manual_seed(0)
    detector = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(_Detector().eval()).save(str(detector))
    text_encoder = TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")
    stage = TeacherStage(WanTransformer3DModel(**TINY), PixelCodec(4), text_encoder,
                         optimizer=partial(torch.optim.AdamW, lr=1e-3)).eval()
    g = torch.Generator().manual_seed(1)
    caps = all_captions()[:3]
    val = [{"video": torch.randint(0, 256, (16, 16, 16, 3), generator=g, dtype=torch.uint8), "caption": caps[i % 3]}
           for i in range(6)]
    trainer = SimpleNamespace(datamodule=SimpleNamespace(val_set=val), loggers=[], callbacks=[], global_step=0,
                              default_root_dir=str(tmp_path))
    return detector, stage, trainer, val


def test_video_eval_fvd_and_diagnostics_match_direct_computation(tmp_path):
    detector, stage, trainer, val = _setup(tmp_path)
    callback = VideoEvalCallback(seeds=(0, 1), sampler={"steps": 1, "cfg": 1.0}, num_frames=16, height=16, width=16,
                                 num_prompts=6, fvd_detector=str(detector))
    first = callback.evaluate(trainer, stage)
    prompts = list(dict.fromkeys(v["caption"] for v in val))
    captions = [c for c in prompts for _ in (0, 1)]
    videos = stage.generate(captions, [s for _ in prompts for s in (0, 1)], 16, 16, 16, steps=1, cfg=1.0)
    fvd = FrechetVideoDistance(I3DFeatures(detector))
    fvd.update(torch.stack([v["video"] for v in val]), real=True)
    fvd.update(videos, real=False)
    torch.testing.assert_close(first["eval/fvd"], float(fvd.compute()), rtol=1e-6, atol=1e-9)
    assert first["eval/fvd_num_real"] == 6 and first["eval/fvd_num_fake"] == 6
    assert first["diagnostics/motion"] == float(motion_magnitude(videos))
    assert first["diagnostics/saturation"] == float(colour_saturation(videos))
    assert first["diagnostics/diversity"] == float(seed_diversity(videos, captions))
    real = torch.stack([v["video"] for v in val])
    assert first["diagnostics/motion_real"] == float(motion_magnitude(real))
    assert first["diagnostics/diversity_real"] == float(seed_diversity(real, [v["caption"] for v in val]))
    again = callback.evaluate(trainer, stage)  # the real side is kept between rounds, the fake side is new
    assert again["eval/fvd"] == first["eval/fvd"] and again["eval/fvd_num_fake"] == 6
    assert (tmp_path / "eval_eval.csv").read_text().count("\n") == 3


def test_toy_eval_logs_accuracy_fd_and_diagnostics(tmp_path):
    _, stage, trainer, _ = _setup(tmp_path)
    toy_val = [{"video": torch.zeros(9, 16, 16, 3, dtype=torch.uint8) + i, "caption": c}
               for i, c in enumerate(all_captions()[:4])]
    trainer.datamodule = SimpleNamespace(val_set=toy_val)
    metrics = ToyEvalCallback(seeds=(0, 1), sampler={"steps": 1, "cfg": 1.0}).evaluate(trainer, stage)
    for key in ("toy/acc_joint", "toy/fd", "toy/effective_nfe", "diagnostics/motion", "diagnostics/diversity",
                "diagnostics/motion_real", "diagnostics/saturation_real"):
        assert key in metrics, key
    assert metrics["diagnostics/motion_real"] == 0  # static real videos
    assert (tmp_path / "toy_eval.csv").is_file()
