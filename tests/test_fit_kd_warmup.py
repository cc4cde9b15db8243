"""End to end through the entry points: `kd_pairs` -> `fit experiment=kd_warmup` -> `fit experiment=distill_dmd2
stage.M=1`, on a tiny random toy teacher, with every folder found by the defaults (TMD_ROOT = the test's folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from tiny_wan_folder import write_tiny_toy_teacher

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TMD_ROOT=str(cwd))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return WanTransformer3DModel.from_pretrained(str(folder)).state_dict()


@pytest.mark.slow
def test_kd_pairs_then_kd_warmup_then_one_step_dmd2_from_its_export(tmp_path: Path) -> None:
    teacher = write_tiny_toy_teacher(tmp_path / "teacher")
    # 48 pairs: every toy caption once, so the warm-up's toy evaluation finds all 48 prompts in the pair cache
    _run("tmd_lightning.kd_pairs", f"teacher={teacher}", "num_pairs=48", "sampler.steps=2", "batch_size=48",
         "shard_size=24", cwd=tmp_path)
    assert (tmp_path / "data" / "kd_pairs" / "toy_9x16x16" / "index.json").is_file()  # where kd_warmup looks
    _run("tmd_lightning.fit", "experiment=kd_warmup", f"stage.student.pretrained={teacher}", "trainer.max_steps=3",
         "callbacks.toy_eval.every_n_steps=3", "trainer.log_every_n_steps=1", "data.batch_size=16",
         "callbacks.rich_progress_bar=null", cwd=tmp_path)
    kd = tmp_path / "logs" / "kd_warmup" / "latest"
    assert (kd / "toy_eval.csv").is_file()  # the one-step student scored on the toy captions at the end
    kd_export = kd / "export" / "student"
    assert any(not torch.equal(a, b) for a, b in zip(_weights(kd_export).values(),
                                                     _weights(teacher / "transformer").values(), strict=True))
    # lr 0: the one-step DMD2-v student ends where it started, so its export shows its initial weights
    _run("tmd_lightning.fit", "experiment=distill_dmd2", "stage.M=1", f"stage.teacher.pretrained={teacher}",
         f"stage.student.pretrained={teacher}", "model.disc_blocks=[0,1]", "stage.max_iterations=2",
         "stage.optimizer.lr=0.0", "data.toy.videos_per_caption=1", "data.toy.val_videos_per_caption=1",
         "data.batch_size=4", "~callbacks.toy_eval", "callbacks.rich_progress_bar=null", cwd=tmp_path)
    dmd2 = _weights(tmp_path / "logs" / "distill_dmd2" / "latest" / "export" / "student")
    for (name, a), b in zip(_weights(kd_export).items(), dmd2.values(), strict=True):
        assert torch.equal(a, b), name
