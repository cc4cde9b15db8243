"""The fit entry point in-process: resuming through `logs/<task>/latest`, which moves only once a run has written a
checkpoint, and input checks that fail before any work (or any `latest`) is touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.data import ManifestError
from tmd_lightning.fit import run

register_resolvers()
TINY = ["model.transformer_config.num_layers=1", "model.transformer_config.attention_head_dim=16",
        "model.transformer_config.ffn_dim=32", "model.transformer_config.freq_dim=32"]
QUICK = ["trainer.accelerator=cpu", "data.toy.videos_per_caption=1", "data.toy.val_videos_per_caption=1",
         "data.batch_size=4", "+trainer.limit_val_batches=0", "~callbacks.toy_eval", "~callbacks.rich_progress_bar",
         "logger=none", "~callbacks.lr_monitor"]


def _compose(root: Path, run_name: str, *overrides: str) -> DictConfig:
    experiment = next(o.split("=", 1)[1] for o in overrides if o.startswith("experiment="))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("fit", overrides=[f"paths.root_dir={root}",
                                         f"paths.output_dir={root}/logs/{experiment}/runs/{run_name}", *overrides])


def _fake_run(root: Path, task: str, name: str = "old") -> Path:
    """A finished earlier run of `task` that `latest` points at (its checkpoint's content does not matter here)."""
    run_dir = root / "logs" / task / "runs" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run_dir / "checkpoints" / "last.ckpt")
    os.symlink(os.path.relpath(run_dir, run_dir.parents[1]), run_dir.parents[1] / "latest")
    return run_dir


def test_readme_resume_command_resumes_the_latest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fit experiment=teacher ckpt_path=logs/teacher/latest/checkpoints/last.ckpt`, run from the project folder."""
    monkeypatch.chdir(tmp_path)
    latest = tmp_path / "logs" / "teacher" / "latest"
    first = run(_compose(tmp_path, "first", "experiment=teacher", "trainer.max_steps=2", *TINY, *QUICK))
    assert latest.resolve() == (tmp_path / "logs" / "teacher" / "runs" / "first").resolve()
    second = run(_compose(tmp_path, "second", "experiment=teacher", "trainer.max_steps=3",
                          "ckpt_path=logs/teacher/latest/checkpoints/last.ckpt", *TINY, *QUICK))
    assert Path(first["checkpoint"]).is_file() and "runs/second/" in second["checkpoint"]
    assert torch.load(second["checkpoint"], weights_only=False)["global_step"] == 3  # resumed at 2, one more step
    assert latest.resolve() == (tmp_path / "logs" / "teacher" / "runs" / "second").resolve()


def test_a_failed_start_leaves_latest_where_it_was(tmp_path: Path) -> None:
    """Stage 1 failing at setup (here: its manifest is missing) must not hide the previous Stage 1 from
    `experiment=distill`, which finds it through logs/adapt_head/latest."""
    old = _fake_run(tmp_path, "adapt_head")
    cfg = _compose(tmp_path, "failed", "experiment=adapt_head", "data=manifest",
                   f"data.train_manifest={tmp_path}/nowhere.csv", "trainer.accelerator=cpu")
    with pytest.raises(ManifestError, match="not found"):
        run(cfg)
    assert (tmp_path / "logs" / "adapt_head" / "latest").resolve() == old.resolve()
    distill = _compose(tmp_path, "next", "experiment=distill")
    assert Path(distill.stage.student.checkpoint).resolve() == (old / "checkpoints" / "last.ckpt").resolve()


def test_a_run_that_writes_no_checkpoint_does_not_move_latest(tmp_path: Path) -> None:
    old = _fake_run(tmp_path, "teacher")
    run(_compose(tmp_path, "smoke", "experiment=teacher", "debug=fdr", *TINY, *QUICK))
    assert (tmp_path / "logs" / "teacher" / "latest").resolve() == old.resolve()


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_a_bad_ckpt_path_fails_at_once_in_one_line(tmp_path: Path, problem: str) -> None:
    old = _fake_run(tmp_path, "teacher")
    ckpt = old / "checkpoints" / "last.ckpt"
    if problem == "missing":
        ckpt = ckpt.with_name("step000100.ckpt")
    else:
        ckpt.write_bytes(ckpt.read_bytes()[:-40])
    cfg = _compose(tmp_path, "resume", "experiment=teacher", f"ckpt_path={ckpt}", *QUICK)
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        run(cfg)
    message = str(info.value)
    assert "\n" not in message and str(ckpt) in message and "ckpt_path" in message
    assert ("truncated" in message) == (problem == "truncated")
    assert not (tmp_path / "data").exists()  # checked before the toy world is written
    assert not (tmp_path / "logs" / "teacher" / "runs" / "resume").exists()
    assert (tmp_path / "logs" / "teacher" / "latest").resolve() == old.resolve()


@pytest.mark.parametrize("experiment", ["teacher", "adapt_head"])
def test_a_diverging_run_fails_writes_no_bad_weights_and_leaves_latest(tmp_path: Path, experiment: str) -> None:
    """`stage.optimizer.lr=1e30`: the weights blow up after the first step; the run must stop with an error instead
    of going on and exporting them, and `experiment=distill` keeps finding the previous Stage 1."""
    old = _fake_run(tmp_path, experiment)
    cfg = _compose(tmp_path, "diverged", f"experiment={experiment}", "stage.optimizer.lr=1e30",
                   "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=1", *TINY, *QUICK)
    with pytest.raises(FloatingPointError, match="non-finite"):
        run(cfg)
    folder = tmp_path / "logs" / experiment / "runs" / "diverged"
    assert not list(folder.rglob("*.ckpt")) and not (folder / "export").exists()
    assert (tmp_path / "logs" / experiment / "latest").resolve() == old.resolve()


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_run_saves_a_resumable_checkpoint_and_exits_143(tmp_path: Path, signum: str) -> None:
    """A cluster pre-emption: SIGTERM (or SIGUSR1, outside SLURM) mid-run writes `last.ckpt` at the step reached,
    and the exit status says the run did not finish."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, "-m", "tmd_lightning.fit", "experiment=teacher", "trainer.max_steps=100000",
            "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_last=false",
            "callbacks.model_checkpoint.save_top_k=-1",  # step000003.ckpt stays: the sign that training is under way
            f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run", *TINY, *QUICK]
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.monotonic() + 600
    try:
        while not (checkpoints / "step000003.ckpt").is_file():  # training is under way
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint at step 3 in time"
            time.sleep(0.2)
        proc.send_signal(getattr(signal, signum))
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave a 100,000-step run behind
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    last = checkpoints / "last.ckpt"  # save_last=false: only the pre-emption writes it
    step = torch.load(last, weights_only=False)["global_step"]
    assert step >= 3 and "pre-empted at step" in out
    assert (tmp_path / "logs" / "teacher" / "latest").resolve() == (tmp_path / "run").resolve()
    if signum != "SIGTERM":
        return
    resumed = run(_compose(tmp_path, "resumed", "experiment=teacher", f"trainer.max_steps={step + 1}",
                           f"ckpt_path={last}", *TINY, *QUICK))
    assert torch.load(resumed["checkpoint"], weights_only=False)["global_step"] == step + 1
