"""The toy study: every run composes into a valid `fit` config, verdicts follow the numbers, and a small quick
study runs end to end (training, scoring, report) and resumes without redoing anything."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.reproduce import main
from tmd_lightning.study.report import Cell, Comparison, verdict
from tmd_lightning.study.runs import FULL, QUICK, fit_command, study_runs

register_resolvers()


def test_study_covers_every_claim_with_two_seeds():
    runs = study_runs([0, 1], FULL)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    families = {r.family for r in runs}
    assert {"TMD", "TMD, no rollout", "TMD, no t_dmd shift", "TMD, Stage 1 plain TM", "TMD, LoRA fake score",
            "Stage 1, TM-MF", "Stage 1, plain TM", "DMD2-v 1 step", "DMD2-v 2 steps", "DMD2-v 3 steps"} == families
    for family in families:
        assert sorted(r.seed for r in runs if r.family == family) == [0, 1]
    for i, run in enumerate(runs):  # a run's Stage-1 init is listed (and so trained) before it
        assert run.init is None or run.init in names[:i]


@pytest.mark.parametrize("run", study_runs([3], QUICK), ids=lambda r: r.name)
def test_every_run_composes_into_the_intended_config(tmp_path: Path, run):
    args = fit_command(run, tmp_path)
    overrides = [a for a in args[3:] if not a.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/o", *overrides])
    assert cfg.seed == 3 and cfg.data.cache_decoded is False and cfg.data.toy.videos_per_caption == 4
    assert cfg.data.toy.root == f"{tmp_path}/data/toy_quick_9x16x16"  # never the full study's toy world
    if run.experiment == "adapt_head":
        assert cfg.trainer.max_steps == QUICK.stage1_steps
        assert cfg.stage.plain_tm is ("plain TM" in run.family)
        return
    assert cfg.stage.max_iterations == QUICK.distill_iterations
    if run.experiment == "distill":
        assert cfg.stage.student.checkpoint == str(tmp_path / "runs" / run.init / "checkpoints" / "last.ckpt")
        assert cfg.stage.rollout is ("no rollout" not in run.family)
        assert cfg.stage.dmd_shift == (1.0 if "t_dmd" in run.family else 5.0)
        assert cfg.stage.lora.fake_score is ("LoRA" in run.family)
    else:
        steps = run.samplers[0]["M"]  # the run trains the student for the step count it is scored with
        assert cfg.stage._target_.endswith("DMD2Stage") and steps == cfg.tmd.M


def _cell(values: list[float], key: str = "toy_fd") -> Cell:
    return Cell("f", "s", {key: values})


@pytest.mark.parametrize(("a", "b", "outcome"), [
    ([0.1, 0.2], [0.3, 0.4], "clear"),  # every seed of a below every seed of b (lower toy-FD is better)
    ([0.1, 0.35], [0.3, 0.4], "means"),  # ranges overlap, mean lower
    ([0.3, 0.4], [0.1, 0.2], "no"),
    ([0.1], [0.2], "means"),  # one seed: never "beyond the spread"
])
def test_comparison_outcomes(a, b, outcome):
    assert Comparison("x", _cell(a), _cell(b), "toy_fd").outcome == outcome
    # the same numbers as accuracies (higher is better) flip the outcome unless they are tied
    flipped = Comparison("x", _cell(b, "acc_joint"), _cell(a, "acc_joint"), "acc_joint").outcome
    assert flipped == outcome


def test_verdicts():
    clear = Comparison("x", _cell([0.1, 0.2]), _cell([0.3, 0.4]), "toy_fd")
    means = Comparison("x", _cell([0.1, 0.35]), _cell([0.3, 0.4]), "toy_fd")
    worse = Comparison("x", _cell([0.3, 0.4]), _cell([0.1, 0.2]), "toy_fd")
    assert verdict([clear, clear]) == "**holds**"
    assert verdict([clear, means]).startswith("**holds on the means**")
    assert verdict([clear, worse]) == "**mixed**"
    assert verdict([worse]) == "**does not hold**"


def test_quick_study_end_to_end_and_resume(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("TMD_ROOT", str(tmp_path))  # the toy worlds go to tmp_path/data, as `fit` puts them
    out = tmp_path / "study"
    argv = ["--quick", "--seeds", "0", "--only", "s1_tmmf_s0,tmd_s0", "--out", str(out), "--jobs", "1"]
    main(argv)
    report = (out / "REPORT.md").read_text()
    assert "Quality rises with N" in report and "quick smoke run" in report
    assert (out / "quality_vs_nfe.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["run"] for r in rows} == {"teacher", "s1_tmmf_s0", "tmd_s0"}
    assert len(rows) == 5 + 4 + 4  # teacher samplers, two TMD students x four samplers
    for r in rows:
        for key in ("acc_joint", "toy_fd", "coverage", "effective_nfe", "seconds_per_video"):
            assert math.isfinite(float(r[key])), (r["run"], key)
    tmd = {r["sampler"]: r for r in rows if r["run"] == "tmd_s0"}
    assert float(tmd["TMD M=2 N=2"]["effective_nfe"]) == pytest.approx(2 * (1 + 1 / 6))
    # the distilled run started from the Stage-1 run's final student
    assert (tmp_path / "data" / "toy_quick_9x16x16" / "train" / "manifest.csv").is_file()
    log_text = (out / "runs" / "tmd_s0" / "config.yaml").read_text()
    assert str(out / "runs" / "s1_tmmf_s0" / "checkpoints" / "last.ckpt") in log_text
    scores = json.loads((out / "scores" / "tmd_s0.json").read_text())
    capsys.readouterr()
    main(argv)  # everything done: no run restarts, no model is scored again
    printed = capsys.readouterr().out
    assert "start" not in printed and "score" not in printed.replace("scores", "")
    assert json.loads((out / "scores" / "tmd_s0.json").read_text()) == scores
