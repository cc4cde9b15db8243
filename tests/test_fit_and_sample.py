"""End to end through the real entry points: fit (teacher) -> TensorBoard events -> export -> sample -> read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tmd_lightning.data import get_backend, read_manifest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.transformer_config.num_layers=2", "model.transformer_config.attention_head_dim=16",
    "model.transformer_config.ffn_dim=64", "model.transformer_config.freq_dim=32",
]


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("fit")
    _run("tmd_lightning.fit", "experiment=teacher", "trainer.max_steps=20", "trainer.val_check_interval=10",
         "callbacks.toy_eval.every_n_steps=10", "callbacks.toy_eval.sampler.steps=2",
         "callbacks.model_checkpoint.every_n_train_steps=10", "data.toy.videos_per_caption=1",
         "data.toy.val_videos_per_caption=1", "data.batch_size=8", f"paths.root_dir={work}", *TINY, cwd=work)
    return work


@pytest.mark.slow
def test_teacher_fit_leaves_loss_curve_videos_checkpoint_and_export(teacher_run: Path) -> None:
    latest = teacher_run / "logs" / "teacher" / "latest"
    assert latest.is_symlink() and (latest / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(latest / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    assert len(losses) >= 2 and losses[-1].step >= 19
    assert all(torch.isfinite(torch.tensor(e.value)) for e in losses)
    assert "toy/acc_joint" in events.Tags()["scalars"]
    videos = events.Images("toy/samples")  # add_video writes an animated-GIF image summary
    # 8 clips of 16x16 tiled 4 x 2 by add_video
    assert videos and videos[-1].encoded_image_string[:3] == b"GIF"
    assert (videos[-1].width, videos[-1].height) == (64, 32)
    curve = (latest / "toy_eval.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) >= 3
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(str(latest / "export" / "transformer"))
    assert exported.config.num_layers == 2


@pytest.mark.slow
def test_sample_writes_videos_the_reader_reads_back(teacher_run: Path) -> None:
    export = teacher_run / "logs" / "teacher" / "latest" / "export" / "transformer"
    out = teacher_run / "samples"
    proc = _run("tmd_lightning.sample", f"checkpoint={export}", "prompts=[a red circle moving left,a blue square "
                "moving up]", "seeds=[0,1]", "sampler.steps=3", f"output_dir={out}", f"paths.root_dir={teacher_run}",
                cwd=teacher_run)
    assert "effective NFE: 6" in proc.stdout and "seconds per video" in proc.stdout
    entries = read_manifest(out / "manifest.csv")
    assert len(entries) == 4 and {e.caption for e in entries} == {"a red circle moving left", "a blue square moving up"}
    backend = get_backend("auto")
    for e in entries:
        assert backend.read(e.path, 9).shape == (9, 16, 16, 3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["effective_nfe"] == 6 and "toy" in summary and 0 <= summary["toy"]["acc_joint"] <= 1
    assert summary["toy"]["toy_fd"] > 0 and summary["toy"]["toy_fd_real_count"] == 192  # reference written on use


@pytest.mark.slow
def test_sample_from_lightning_checkpoint_matches_export(teacher_run: Path) -> None:
    """The raw checkpoint (no EMA) and the EMA export are different weights; both must load and sample."""
    ckpt = teacher_run / "logs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"
    out = teacher_run / "samples_ckpt"
    _run("tmd_lightning.sample", f"checkpoint={ckpt}", "prompts=[a red circle moving left]", "seeds=[0]",
         "sampler.steps=2", f"output_dir={out}", f"paths.root_dir={teacher_run}", *TINY, cwd=teacher_run)
    assert len(read_manifest(out / "manifest.csv")) == 1


@pytest.mark.slow
def test_export_checkpoint_writes_the_ema_weights(teacher_run: Path, tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    from tmd_lightning.export import export_checkpoint

    ckpt = teacher_run / "logs" / "teacher" / "latest" / "checkpoints" / "last.ckpt"
    out = export_checkpoint(ckpt, tmp_path / "exported")
    loaded = WanTransformer3DModel.from_pretrained(str(out))
    shadow = next(s for k, s in torch.load(ckpt, weights_only=False)["callbacks"].items() if k.startswith("EMA"))
    for name, param in loaded.named_parameters():
        torch.testing.assert_close(param.detach(), shadow["shadow"][name])
    # the run's own end-of-training export is the same EMA state (last.ckpt is written at the final step)
    final = WanTransformer3DModel.from_pretrained(str(ckpt.parent.parent / "export" / "transformer"))
    for (name, a), (_, b) in zip(loaded.named_parameters(), final.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
