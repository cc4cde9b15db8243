"""`debug=fdr` is a smoke test: one batch per stage, and nothing a later stage or a resume would pick up (no
checkpoint, export or evaluation, `latest` untouched); a run shorter than one evaluation period skips the
end-of-run evaluation; the console shows the run, not third-party notices."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.fit import run

register_resolvers()
ROOT = Path(__file__).resolve().parents[1]
# what `make smoke` passes (its own small toy set), and `stage/student=from_teacher` for Stage 2
SMOKE = ["debug=fdr", "data.toy.root=${paths.data_dir}/toy_smoke", "data.toy.videos_per_caption=1",
         "data.toy.val_videos_per_caption=1"]
STAGES = {"teacher": [], "adapt_head": [], "distill": ["stage/student=from_teacher"]}


def _compose(root: Path, experiment: str, name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("fit", overrides=[f"experiment={experiment}", f"paths.root_dir={root}", "logger=none",
                                         "~callbacks.lr_monitor", "callbacks.rich_progress_bar=null",
                                         f"paths.output_dir={root}/logs/{experiment}/runs/{name}", *overrides])


def test_make_smoke_runs_these_stages_with_these_overrides() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nsmoke:"):].split("\n\n")[0]
    assert all(f"experiment={e}" in recipe for e in STAGES) and "stage/student=from_teacher" in recipe
    assert all(o.replace("${", "$${") in makefile for o in SMOKE)


@pytest.mark.parametrize("experiment", list(STAGES))
def test_fdr_runs_one_batch_and_leaves_nothing_behind(tmp_path: Path, experiment: str) -> None:
    previous = tmp_path / "logs" / experiment / "runs" / "previous"
    (previous / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, previous / "checkpoints" / "last.ckpt")
    latest = tmp_path / "logs" / experiment / "latest"
    os.symlink(os.path.relpath(previous, latest.parent), latest)
    cfg = _compose(tmp_path, experiment, "smoke", *SMOKE, *STAGES[experiment])
    assert "toy_eval" in cfg.callbacks and "export" in cfg.callbacks  # the real callbacks, not removed for the test
    run(cfg)
    folder = tmp_path / "logs" / experiment / "runs" / "smoke"
    assert not list(folder.rglob("*.ckpt")) and not (folder / "export").exists()
    assert not (folder / "toy_eval.csv").exists()
    assert latest.resolve() == previous.resolve()


def test_a_run_shorter_than_one_evaluation_period_skips_the_end_of_run_evaluation(tmp_path: Path) -> None:
    overrides = [o for o in SMOKE if o != "debug=fdr"]
    result = run(_compose(tmp_path, "teacher", "short", *overrides, "trainer.max_steps=2", "data.batch_size=4",
                          "+trainer.limit_val_batches=0", "model.transformer_config.num_layers=1"))
    folder = tmp_path / "logs" / "teacher" / "runs" / "short"
    assert Path(result["checkpoint"]).is_file() and (folder / "export" / "transformer").is_dir()
    assert not (folder / "toy_eval.csv").exists()  # every_n_steps = 500 > 2 steps


NOISE = ["Tip:", "LeafSpec", "module(s) in eval mode", "FLOPs", "Epoch 0/-", "decord failed",
         "validation_step", "Trainer already configured"]


def test_the_console_shows_the_run_not_third_party_notices(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "tmd_lightning.fit", "experiment=distill", *STAGES["distill"], *SMOKE,
            f"paths.root_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert [n for n in NOISE if n in out] == [], out[-3000:]
    assert "networks:" in out and "student" in out and "run folder:" in out


def test_quiet_filters_lightnings_notices_and_nothing_else() -> None:
    import warnings

    from tmd_lightning.quiet import quiet_third_party

    with warnings.catch_warnings():  # an earlier caller whose filter list was restored (pytest does this per test)
        quiet_third_party()
    quiet_third_party()
    quiet_third_party()  # calls do not pile up duplicate filters
    assert sum("eval mode" in str(f[1] and f[1].pattern) for f in warnings.filters) == 1
    with warnings.catch_warnings(record=True) as caught:  # RuntimeWarning: pytest's config ignores UserWarning
        warnings.warn("Found 3 module(s) in eval mode at the start of training. This may lead to ...",
                      RuntimeWarning, stacklevel=1)
        warnings.warn("Using ModelCheckpoint with manual optimization and every_n_train_steps, but no "
                      "pre-optimization state was saved. ...", RuntimeWarning, stacklevel=1)
        warnings.warn("a warning about the run itself", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning about the run itself"]
