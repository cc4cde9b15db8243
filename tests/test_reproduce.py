"""The toy study: every run composes into a valid `fit` (or `kd_pairs`) config, runs start only after the runs they
depend on, verdicts follow the numbers, the training curves are the seeds' means, and a small quick study runs end
to end (training, scoring, report) and resumes without redoing anything."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from tmd_lightning.config import CONFIG_DIR, register_resolvers
from tmd_lightning.reproduce import main
from tmd_lightning.study import runs as study
from tmd_lightning.study.recipes import differences, retire_stale, run_recipe
from tmd_lightning.study.report import (
    Cell,
    Comparison,
    Curve,
    aggregate,
    curve_flat,
    curve_line,
    curves_section,
    curves_verdict,
    joint_step,
    plot_series,
    training_curves,
    verdict,
    write_report,
)
from tmd_lightning.study.runs import FULL, KD_FAMILY, QUICK, Run, run_command, study_runs, train
from tmd_lightning.study.scores import cached_rows, grid_prompts, read_samples, weights_record

register_resolvers()


def test_study_covers_every_claim_with_two_seeds():
    runs = study_runs([0, 1], FULL)
    names = [r.name for r in runs]
    assert len(names) == len(set(names))
    scored = [r for r in runs if r.samplers]
    families = {r.family for r in scored}
    assert {"TMD", "TMD, no rollout", "TMD, no t_dmd shift", "TMD, Stage 1 plain TM", "TMD, LoRA fake score",
            "Stage 1, TM-MF", "Stage 1, plain TM", "DMD2-v 1 step", "DMD2-v 2 steps", "DMD2-v 3 steps",
            KD_FAMILY} == families
    for family in families:
        assert sorted(r.seed for r in scored if r.family == family) == [0, 1]
    assert [r.name for r in runs if not r.samplers] == ["kd_pairs"]  # one pair cache for every seed, not scored


def test_every_run_is_listed_after_its_dependencies():
    runs = study_runs([0, 1], FULL)
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # train() starts runs in list order once their dependencies are done
        assert all(d in names[:i] for d in run.depends), run.name
    by_name = {r.name: r for r in runs}
    for k in (0, 1):
        assert by_name[f"dmd2_m1_s{k}"].depends == (f"kd_warmup_s{k}",)  # its own seed's warm-up
        assert by_name[f"kd_warmup_s{k}"].depends == ("kd_pairs",)
        assert by_name[f"tmd_s{k}"].depends == (f"s1_tmmf_s{k}",)
        assert by_name[f"dmd2_m2_s{k}"].depends == by_name[f"dmd2_m3_s{k}"].depends == ()


def _compose(config: str, tmp_path: Path, args: list[str]) -> object:
    """The config an entry point's command line composes (its Hydra `hydra.*` overrides left out)."""
    overrides = [a for a in args[3:] if not a.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/o", *overrides])


@pytest.mark.parametrize("run", study_runs([3], QUICK), ids=lambda r: r.name)
def test_every_run_composes_into_the_intended_config(tmp_path: Path, run):
    args = run_command(run, tmp_path)
    assert f"hydra.run.dir={tmp_path / 'runs' / run.name}" in args and not any("{runs}" in a for a in args)
    pairs = str(tmp_path / "runs" / "kd_pairs" / "pairs")
    if run.entry == "kd_pairs":
        assert args[1:3] == ["-m", "tmd_lightning.kd_pairs"]
        cfg = _compose("kd_pairs", tmp_path, args)
        assert cfg.output == pairs and cfg.num_pairs == 16 and cfg.sampler.steps == 4  # QUICK: a small cache
        assert cfg.sampler.cfg == cfg.model.guidance_scale == 2.0  # otherwise the teacher's sampler (the toy's CFG)
        return
    cfg = _compose("fit", tmp_path, args)
    assert cfg.seed == 3
    if run.experiment == "kd_warmup":  # data=cache: the toy-world overrides do not apply
        assert cfg.data.cache_dir == pairs and "toy" not in cfg.data
        assert cfg.trainer.max_steps == QUICK.kd_steps
        assert cfg.stage._target_.endswith("KDWarmupStage") and run.samplers == ({"M": 1},)
        return
    assert cfg.data.cache_decoded is False and cfg.data.toy.videos_per_caption == 4
    assert cfg.data.toy.root == f"{tmp_path}/data/toy_quick_9x16x16"  # never the full study's toy world
    if run.experiment == "adapt_head":
        assert cfg.trainer.max_steps == QUICK.stage1_steps
        assert cfg.stage.plain_tm is ("plain TM" in run.family)
        assert cfg.callbacks.toy_eval.every_n_steps == 5  # a quarter of the budget, at least 5
        return
    assert cfg.stage.max_iterations == QUICK.distill_iterations
    assert cfg.callbacks.toy_eval.every_n_steps == 5
    if run.experiment == "distill":
        assert cfg.stage.student.checkpoint == str(tmp_path / "runs" / run.init / "checkpoints" / "last.ckpt")
        assert cfg.stage.rollout is ("no rollout" not in run.family)
        assert cfg.stage.dmd_shift == (1.0 if "t_dmd" in run.family else 5.0)
        assert cfg.stage.lora.fake_score is ("LoRA" in run.family)
    else:
        steps = run.samplers[0]["M"]  # the run trains the student for the step count it is scored with
        assert cfg.stage._target_.endswith("DMD2Stage") and steps == cfg.tmd.M
        assert cfg.stage.grid_gamma == cfg.model.student_grid_gamma == 1.0  # the grid TMD samples on, at every M
        # the one-step DMD2-v starts from its seed's KD warm-up (the paper's Table 7), more steps from the teacher
        assert cfg.stage.student.kd_warmup is (steps == 1)
        if steps == 1:
            assert cfg.stage.student.kd_export == str(tmp_path / "runs" / "kd_warmup_s3" / "export" / "student")


def test_toy_eval_period_is_a_quarter_of_the_budget():
    assert study.eval_every(FULL.distill_iterations) == 375 and study.eval_every(FULL.stage1_steps) == 125
    assert study.eval_every(QUICK.distill_iterations) == 5  # at least 5 steps


def test_train_waits_for_every_dependency(tmp_path: Path, monkeypatch):
    """`c` starts only once both `a` (its init, quick) and `b` (a need, 1.5 s) are done: with three jobs free it
    would start as soon as `a` is done if train() looked at the init alone; its command fails if `b` is not done."""

    def command(run: Run, out: Path) -> list[str]:
        done = [str(study.run_dir(out, d) / "done.json") for d in (run.init, *run.needs) if d]
        code = (f"import pathlib, sys, time; time.sleep({1.5 if run.name == 'b' else 0.0}); "
                f"sys.exit(0 if all(pathlib.Path(p).is_file() for p in {done!r}) else 3)")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(study, "run_command", command)
    runs = [Run("a", None), Run("b", None), Run("c", None, init="a", needs=("b",))]
    train(runs, tmp_path, jobs=3, poll_seconds=0.05)
    assert all(study.is_done(tmp_path, r.name) for r in runs)
    with pytest.raises(RuntimeError, match="d needs e"):  # a dependency outside the run list never finishes
        train([Run("d", None, needs=("e",))], tmp_path, jobs=1, poll_seconds=0.05)


def test_a_resumed_runs_training_time_counts_every_sitting(tmp_path: Path, monkeypatch):
    """The first sitting is stopped after about 0.8 s (as a closed session kills it), the second finishes: `done.json`
    counts both sittings, not the last one alone."""

    def command(run: Run, out: Path) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(2.0)"]

    monkeypatch.setattr(study, "run_command", command)
    monkeypatch.setattr(study.time, "sleep", _stop_after(0.8))
    with pytest.raises(_Stopped):
        train([Run("a", None)], tmp_path, jobs=1, poll_seconds=0.05)
    first = json.loads((study.run_dir(tmp_path, "a") / "elapsed.json").read_text())["seconds"]
    assert first > 0.5 and not study.is_done(tmp_path, "a")
    monkeypatch.undo()
    monkeypatch.setattr(study, "run_command", command)
    train([Run("a", None)], tmp_path, jobs=1, poll_seconds=0.05)
    total = json.loads((study.run_dir(tmp_path, "a") / "done.json").read_text())["seconds"]
    assert total >= first + 2.0


class _Stopped(Exception):
    """Stands for the signal that stops a sitting."""


def _stop_after(seconds: float):
    """A `time.sleep` that raises `_Stopped` once `seconds` have passed: the poll loop stops mid-run."""
    import time

    start, real_sleep = time.perf_counter(), time.sleep

    def sleep(dt: float) -> None:
        if time.perf_counter() - start > seconds:
            raise _Stopped
        real_sleep(dt)

    return sleep


def _toy_eval(folder: Path, rows: list[tuple[int, float, float]], finished: bool = True) -> None:
    folder.mkdir(parents=True)
    with (folder / "toy_eval.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "toy/acc_colour", "toy/acc_joint", "toy/fd"])
        writer.writerows([step, 0.5, joint, fd] for step, joint, fd in rows)
    if finished:
        (folder / "done.json").write_text(json.dumps({"seconds": 60.0}))


def test_training_curves_are_seed_means(tmp_path: Path):
    runs = [Run(f"tmd_s{k}", "distill", family="TMD", seed=k) for k in (0, 1)]
    runs += [Run("s1_tm_s0", "adapt_head", family="Stage 1, plain TM"),  # not drawn: only Stage 1 TM-MF is
             Run("dmd2_m2_s0", "distill_dmd2", family="DMD2-v 2 steps")]  # no toy_eval.csv: left out
    _toy_eval(tmp_path / "runs" / "tmd_s0", [(75, 0.2, 0.5), (150, 0.4, 0.3), (225, 0.5, 0.25), (300, 0.6, 0.2)])
    # seed 1 was not evaluated at 75, and evaluated 300 twice (a resumed run): its last row counts
    _toy_eval(tmp_path / "runs" / "tmd_s1", [(150, 0.2, 0.5), (225, 0.7, 0.15), (300, 0.1, 0.9), (300, 0.62, 0.1)])
    _toy_eval(tmp_path / "runs" / "s1_tm_s0", [(75, 0.1, 1.0)])
    # seed 2 is still training: its partial curve is not the family's
    runs.append(Run("tmd_s2", "distill", family="TMD", seed=2))
    _toy_eval(tmp_path / "runs" / "tmd_s2", [(150, 0.9, 0.05)], finished=False)
    (curve,) = training_curves(runs, tmp_path)
    assert curve.family == "TMD" and curve.seeds == 2 and curve.steps == [150, 225, 300]
    assert curve.values["toy/acc_joint"] == pytest.approx([0.3, 0.6, 0.61])
    assert curve.values["toy/fd"] == pytest.approx([0.4, 0.2, 0.15])
    lines = curves_section(runs, tmp_path)
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert "![training curves](training_curves.png)" in lines
    # 192 videos at joint 0.6 and 0.61: twice the sampling error of the change is 2 sqrt((.24 + .2379) / 192)
    assert ("- TMD: joint 0.600 -> 0.610, toy-FD 0.200 -> 0.150 over the last 75 iterations (225 -> 300): **flat** "
            "(joint +0.010, twice its sampling error 0.100)") in lines
    assert lines[-2].startswith("Every curve's joint accuracy is flat")


def test_a_curve_that_moves_beyond_its_sampling_error_is_named():
    # one seed, 96 videos: 0.615 -> 0.771 is a change of 0.156 against twice its error 2 sqrt((.2368 + .1766) / 96)
    moving = Curve("TMD", "iterations", 1, [1125, 1500], {"toy/acc_joint": [0.615, 0.771], "toy/fd": [0.21, 0.18]})
    steady = Curve("DMD2-v 2 steps", "iterations", 1, [1125, 1500],
                   {"toy/acc_joint": [0.656, 0.667], "toy/fd": [0.171, 0.173]})
    assert joint_step(moving) == pytest.approx((0.156, 2 * ((0.615 * 0.385 + 0.771 * 0.229) / 96) ** 0.5))
    assert not curve_flat(moving) and curve_flat(steady)
    assert "**still moving** (joint +0.156, twice its sampling error 0.131)" in curve_line(moving)
    sentence = curves_verdict([moving, steady])
    assert "TMD." in sentence and "DMD2-v" not in sentence


def test_the_plot_draws_the_teachers_samplers_with_and_without_cfg_as_two_lines():
    samplers = (("Euler 1 x CFG 2", 0.47), ("Euler 2, no CFG", 0.16), ("Euler 2 x CFG 2", 0.15),
                ("Euler 3, no CFG", 0.12))
    cells = [Cell("teacher", s, {"toy_fd": [v]}) for s, v in samplers]
    tmd = [Cell("TMD", "TMD M=1 N=2", {"toy_fd": [0.14]}), Cell("TMD", "TMD M=2 N=2", {"toy_fd": [0.12]})]
    series = plot_series(cells + tmd)
    assert {k: [c.sampler for c in v] for k, v in series.items()} == {
        "teacher, with CFG": ["Euler 1 x CFG 2", "Euler 2 x CFG 2"],
        "teacher, no CFG": ["Euler 2, no CFG", "Euler 3, no CFG"],
        "TMD": ["TMD M=1 N=2", "TMD M=2 N=2"]}


def test_curves_section_is_skipped_without_toy_eval_files(tmp_path: Path):
    assert curves_section(study_runs([0], QUICK), tmp_path) == []
    assert not (tmp_path / "training_curves.png").exists()


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
    one = Comparison("x", _cell([0.1]), _cell([0.2]), "toy_fd")  # a single training seed: no spread to speak of
    assert verdict([one, one]) == "**holds on one seed** (no seed spread yet)"
    assert one.line().endswith("better on one seed (no spread yet)")
    assert means.line().endswith("better on the mean, within the seed spread")
    assert verdict([one, means]).startswith("**holds on the means**")


def test_a_comparison_uses_the_seeds_both_families_have():
    # TMD has seeds 0 and 1, the ablation only seed 0: the claim compares seed 0 with seed 0, not a two-seed mean
    rows = [{"family": "TMD", "sampler": "s", "seed": 0, "acc_joint": 0.75},
            {"family": "TMD", "sampler": "s", "seed": 1, "acc_joint": 0.65},
            {"family": "ablation", "sampler": "s", "seed": 0, "acc_joint": 0.745}]
    cells = aggregate(rows)
    c = Comparison("x", cells[("TMD", "s")], cells[("ablation", "s")], "acc_joint")
    assert c.common_seeds == {0} and c.one_seed and c.outcome == "means"  # pooled it would be 0.70 < 0.745: "no"
    assert c.line() == ("- x, joint (higher is better): 0.750 vs 0.745 (on training seed 0, the one both have) — "
                        "better on one seed (no spread yet)")
    rows.append({"family": "ablation", "sampler": "s", "seed": 1, "acc_joint": 0.6})
    cells = aggregate(rows)
    both = Comparison("x", cells[("TMD", "s")], cells[("ablation", "s")], "acc_joint")
    assert both.common_seeds is None and both.seed_wins() == (2, 2) and both.outcome == "means"
    assert both.line().endswith("better on the mean, within the seed spread; better on 2 of 2 seeds")
    disjoint = Comparison("x", cells[("TMD", "s")], Cell("b", "s", {"acc_joint": [0.1]}, {"acc_joint": [2]}),
                          "acc_joint")
    assert disjoint.paired == (disjoint.a, disjoint.b) and "no training seed in common" in disjoint.line()


def test_the_report_does_not_depend_on_which_runs_this_invocation_scored(tmp_path: Path):
    """`--only` puts the runs it scored before the cached ones; the page is the same either way, and its headline
    table lists the teacher first, then the students from the cheapest (effective NFE)."""
    runs = study_runs([0], QUICK)

    def row(run: str, family: str, sampler: str, nfe: float, joint: float) -> dict:
        return {"run": run, "family": family, "sampler": sampler, "seed": 0, "effective_nfe": nfe,
                "seconds_per_video": 0.01 * nfe, "acc_joint": joint, "toy_fd": 1.0 - joint}

    cached = [row("teacher", "teacher", "Euler 50 x CFG 2", 100.0, 0.99),
              row("tmd_s0", "TMD", "TMD M=2 N=2", 2.33, 0.7), row("tmd_s0", "TMD", "TMD M=1 N=2", 1.17, 0.3),
              row("kd_warmup_s0", KD_FAMILY, "few-step M=1", 1.0, 0.35),
              row("dmd2_m3_s0", "DMD2-v 3 steps", "few-step M=3", 3.0, 0.76)]
    scored = [row("dmd2_m1_s0", "DMD2-v 1 step", "few-step M=1", 1.0, 0.37)]
    pages = []
    for name, rows in (("only", scored + cached), ("report_only", cached + scored)):
        out = tmp_path / name
        out.mkdir()
        pages.append(write_report(rows, runs, out, QUICK, True, [0], "cmd").read_text())
        assert (out / "results.csv").read_text() == (tmp_path / "only" / "results.csv").read_text()
    assert pages[0] == pages[1]
    headline = pages[0].split("## Quality against cost")[1].split("![")[0]
    models = [line.split(" | ")[0].strip("| ") for line in headline.splitlines() if line.startswith("| ")][1:]
    assert models == ["teacher", "DMD2-v 1 step", "KD warm-up, 1 step", "TMD", "TMD", "DMD2-v 3 steps"]


def test_quick_study_end_to_end_and_resume(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("TMD_ROOT", str(tmp_path))  # the toy worlds go to tmp_path/data, as `fit` puts them
    out = tmp_path / "study"
    argv = ["--quick", "--seeds", "0", "--only", "s1_tmmf_s0,tmd_s0", "--out", str(out), "--jobs", "1"]
    main(argv)
    report = (out / "REPORT.md").read_text()
    assert "Quality rises with N" in report and "quick smoke run" in report
    assert (out / "quality_vs_nfe.png").stat().st_size > 0
    assert (out / "training_curves.png").stat().st_size > 0 and "## Training curves" in report
    assert "- TMD: joint" in report and "over the last 5 iterations (5 -> 10)" in report
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
    # the console output and Hydra's job log are two files, so neither holds each log record twice
    for log in (out / "runs" / "tmd_s0" / "console.log", out / "runs" / "tmd_s0" / "fit.log"):
        records = [line for line in log.read_text().splitlines() if "][INFO] - " in line]
        assert records and len(records) == len(set(records)), log
    scores = json.loads((out / "scores" / "tmd_s0.json").read_text())
    # the sample grid: every scored model's samplers on the grid prompts, one row each, in the report
    for name in ("teacher", "s1_tmmf_s0", "tmd_s0"):
        prompts, seed, samples = read_samples(study.samples_file(out, name))
        assert prompts == grid_prompts() and seed == QUICK.eval_seeds[0]
        assert [label for label, _ in samples] == [r["sampler"] for r in rows if r["run"] == name]
        for _, videos in samples:
            assert videos.dtype == np.uint8 and videos.shape == (len(prompts), 9, 16, 16, 3)
    teacher_samples = dict(read_samples(study.samples_file(out, "teacher"))[2])
    assert not np.array_equal(teacher_samples["Euler 20 x CFG 2"], teacher_samples["Euler 1 x CFG 2"])
    assert "## Samples" in report and "one row per model and sampler" in report
    with Image.open(out / "samples.gif") as gif:  # teacher 5 rows, TMD 4 (Stage 1 alone is an ablation)
        assert gif.n_frames == 9 and gif.height > 9 * 64
    assert Image.open(out / "samples.png").size == Image.open(out / "samples.gif").size
    capsys.readouterr()
    main(argv)  # everything done: no run restarts, no model is scored again
    printed = capsys.readouterr().out
    assert "start" not in printed and "score" not in printed.replace("scores", "")
    assert json.loads((out / "scores" / "tmd_s0.json").read_text()) == scores
    main([*argv[:4], "s1_tmmf_s0", *argv[5:]])  # a narrower --only: the report still covers tmd_s0's scores
    assert {r["run"] for r in csv.DictReader((out / "results.csv").open())} == {"teacher", "s1_tmmf_s0", "tmd_s0"}
    assert "- TMD: joint" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    # a later sitting on a fresh clone: the run folders (not in git) are gone, the scores and their records are not
    (out / "runs").rename(tmp_path / "runs_elsewhere")
    main(argv)
    printed = capsys.readouterr().out
    assert "start" not in printed and "score" not in printed.replace("scores", "")
    assert "kept from earlier sittings (scores cached): s1_tmmf_s0, tmd_s0" in printed
    assert {r["run"] for r in csv.DictReader((out / "results.csv").open())} == {"teacher", "s1_tmmf_s0", "tmd_s0"}
    again = (out / "REPORT.md").read_text()
    assert "- TMD: joint" in again and "| tmd_s0 |" in again  # the curve and the training time kept beside the scores
    assert "## Samples" in again  # the grid's videos kept beside the scores


def test_grid_prompts_cover_the_grammar_evenly():
    from tmd_lightning.data.toy_world import COLOURS, DIRECTIONS, SHAPES, all_captions

    prompts = grid_prompts()
    assert len(set(prompts)) == 8 and set(prompts) <= set(all_captions())
    for words, each in ((COLOURS, 2), (DIRECTIONS, 2)):
        assert all(sum(p.split()[1] == w or p.split()[-1] == w for p in prompts) == each for w in words)
    assert {p.split()[2] for p in prompts} == set(SHAPES)


def test_carried_runs_train_again_only_when_a_run_needs_their_checkpoint(tmp_path: Path):
    """A run scored in an earlier sitting whose folder is gone is kept as it is, unless a run still to train starts
    from it; then it trains again first (and the runs it needs in turn)."""
    m = ({"M": 1},)  # a model (scored); the pairs make data (no samplers, never scored)
    runs = [Run("pairs", None), Run("kd_s0", "kd_warmup", needs=("pairs",), samplers=m),
            Run("s1_s0", "adapt_head", samplers=m), Run("tmd_s0", "distill", init="s1_s0", samplers=m),
            Run("norollout_s0", "distill", init="s1_s0", samplers=m),
            Run("dmd2_m1_s0", "distill_dmd2", needs=("kd_s0",), samplers=m), Run("s1_s1", "adapt_head", samplers=m)]
    (tmp_path / "scores").mkdir()
    for name in ("kd_s0", "s1_s0", "tmd_s0", "dmd2_m1_s0", "s1_s1"):
        (tmp_path / "scores" / f"{name}.json").write_text("[]")
    (tmp_path / "runs" / "s1_s1").mkdir(parents=True)
    (tmp_path / "runs" / "s1_s1" / "done.json").write_text("{}")  # finished here
    assert [r.name for r in study.runs_to_train(runs, tmp_path)] == ["s1_s0", "norollout_s0"]
    assert study.is_carried(tmp_path, "tmd_s0") and not study.is_carried(tmp_path, "s1_s1")
    (tmp_path / "scores" / "norollout_s0.json").write_text("[]")
    assert study.runs_to_train(runs, tmp_path) == []
    (tmp_path / "scores" / "dmd2_m1_s0.json").unlink()  # its KD warm-up and the pairs train again
    assert [r.name for r in study.runs_to_train(runs, tmp_path)] == ["pairs", "kd_s0", "dmd2_m1_s0"]
    # `--only dmd2_m1_s0`: what it needs comes from the whole study
    only = [r for r in runs if r.name == "dmd2_m1_s0"]
    assert [r.name for r in study.runs_to_train(only, tmp_path, runs)] == ["pairs", "kd_s0", "dmd2_m1_s0"]
    assert [r.name for r in study.runs_to_train(only, tmp_path)] == ["dmd2_m1_s0"]  # (train then stops: kd_s0 missing)


def test_stale_scores_are_scored_again(tmp_path: Path):
    """A cached score counts only for the samplers it was made with, and only if the run has not finished since."""
    samplers = [{"steps": 50, "cfg": 2.0}, {"steps": 2, "cfg": 1.0}]
    cache, done = tmp_path / "teacher.json", tmp_path / "done.json"
    rows = [{"sampler": "a", **samplers[0], "acc_joint": 0.9}, {"sampler": "b", **samplers[1], "acc_joint": 0.5}]
    assert cached_rows(cache, samplers) is None  # nothing cached
    cache.write_text(json.dumps(rows))
    assert cached_rows(cache, samplers) == rows
    assert cached_rows(cache, [{"steps": 50, "cfg": 5.0}, samplers[1]]) is None  # another guidance scale
    assert cached_rows(cache, samplers[:1]) is None  # another sampler list
    done.write_text("{}")
    os.utime(cache, (1, 1))  # scored long before the run finished
    assert cached_rows(cache, samplers, done) is None
    os.utime(done, (0, 0))
    assert cached_rows(cache, samplers, done) == rows


def test_the_teachers_score_is_tied_to_its_weights(tmp_path: Path):
    """The teacher's cached score counts only with a record of the weights it was made with, and only for those."""
    samplers = [{"steps": 50, "cfg": 2.0}]
    cache = tmp_path / "teacher.json"
    rows = [{"sampler": "a", **samplers[0], "acc_joint": 0.9}]
    cache.write_text(json.dumps(rows))
    assert cached_rows(cache, samplers) == rows  # a student's check: no weights asked for
    assert cached_rows(cache, samplers, weights="abc") is None  # scored before weights were recorded
    weights_record(cache).write_text("abc\n")
    assert cached_rows(cache, samplers, weights="abc") == rows
    assert cached_rows(cache, samplers, weights="def") is None  # the teacher was retrained since


def test_a_changed_recipe_sets_its_runs_aside(tmp_path: Path, capsys):
    """A run trained with another recipe (here: the toy's grid shift changed after Stage 1 was trained), and every
    run that starts from it, is set aside with its cached scores, so it trains and is scored again; a run trained
    before recipes were recorded counts as changed; nothing is deleted."""
    runs = [r for r in study_runs([0], QUICK) if r.name in ("s1_tmmf_s0", "s1_tm_s0", "tmd_s0")]
    for r in runs:
        study.run_dir(tmp_path, r.name).mkdir(parents=True)
        (study.run_dir(tmp_path, r.name) / "done.json").write_text(json.dumps({"seconds": 60, "recipe": run_recipe(r)}))
        study.score_file(tmp_path, r.name).parent.mkdir(exist_ok=True)
        study.score_file(tmp_path, r.name).write_text("[]")
    study.samples_file(tmp_path, "tmd_s0").write_bytes(b"")
    assert retire_stale(runs, tmp_path) == []  # recorded as trained: nothing to redo
    changed = [replace(r, overrides=(*r.overrides, "model.student_grid_gamma=10.0")) if r.name == "s1_tmmf_s0" else r
               for r in runs]
    assert retire_stale(changed, tmp_path, set_aside=False) == ["s1_tmmf_s0", "tmd_s0"]
    printed = capsys.readouterr().out
    assert "s1_tmmf_s0: recipe changed (model.student_grid_gamma: 1.0 -> 10.0)" in printed
    assert "tmd_s0: recipe changed (it starts from s1_tmmf_s0, which trains again)" in printed
    assert all(study.is_done(tmp_path, r.name) for r in runs)  # only reported so far
    assert retire_stale(changed, tmp_path) == ["s1_tmmf_s0", "tmd_s0"]
    assert not study.run_dir(tmp_path, "s1_tmmf_s0").exists() and not study.score_file(tmp_path, "tmd_s0").exists()
    assert len(list((tmp_path / "runs" / ".stale").iterdir())) == 2
    assert len(list((tmp_path / "scores" / ".stale").iterdir())) == 3  # two scores, tmd_s0's samples
    assert not study.samples_file(tmp_path, "tmd_s0").exists()
    assert study.is_done(tmp_path, "s1_tm_s0") and study.score_file(tmp_path, "s1_tm_s0").is_file()
    (study.run_dir(tmp_path, "s1_tm_s0") / "done.json").write_text(json.dumps({"seconds": 60}))
    assert retire_stale(changed, tmp_path, set_aside=False) == ["s1_tm_s0"]
    assert "s1_tm_s0: recipe changed (none recorded: trained before recipes were recorded)" in capsys.readouterr().out


def test_an_enabled_ema_is_part_of_the_recipe():
    """The student's EMA decides which weights a Stage-2 run exports and the study scores, so a run made before it
    was switched on is a run of another recipe; a disabled EMA (Stage 1's callbacks have none) adds nothing."""
    runs = {r.name: r for r in study_runs([0], QUICK)}
    off, s1 = run_recipe(runs["tmd_s0"]), run_recipe(runs["s1_tmmf_s0"])  # the toy's Stage 2 keeps no EMA
    assert not any(k.startswith("callbacks.") for k in off)
    assert not any(k.startswith("callbacks.") for k in s1)
    tmd = run_recipe(replace(runs["tmd_s0"], overrides=(*runs["tmd_s0"].overrides, "callbacks.ema.enabled=true")))
    assert tmd["callbacks.ema.enabled"] is True and tmd["callbacks.ema.target"] == "student"
    assert {k: v for k, v in tmd.items() if not k.startswith("callbacks.")} == off


def test_the_kd_pairs_recipe_holds_only_what_the_teacher_reads():
    """The KD pairs are the teacher's samples: a student-only model key (the students' grid shift, H, the
    discriminator) leaves their recipe as it is, so they are not made again; the teacher's guidance changes it."""
    pairs = next(r for r in study_runs([0], QUICK) if r.name == "kd_pairs")
    base = run_recipe(pairs)
    assert base["model.guidance_scale"] == 2.0 and "model.student_grid_gamma" not in base
    for override in ("model.student_grid_gamma=3.0", "model.head_blocks=2", "model.disc_width=32"):
        assert run_recipe(replace(pairs, overrides=(*pairs.overrides, override))) == base, override
    cfg5 = run_recipe(replace(pairs, overrides=(*pairs.overrides, "model.guidance_scale=5.0")))
    assert differences(base, cfg5) == "model.guidance_scale: 2.0 -> 5.0"


def test_an_interrupted_run_resumes_instead_of_being_set_aside(tmp_path: Path):
    """A run folder without `done.json` or scores is a run interrupted (or still training): it resumes, and is set
    aside only when the run it starts from trains again."""
    runs = [r for r in study_runs([0], QUICK) if r.name in ("s1_tmmf_s0", "tmd_s0")]
    s1, tmd = (study.run_dir(tmp_path, r.name) for r in runs)
    s1.mkdir(parents=True)
    (s1 / "done.json").write_text(json.dumps({"seconds": 60, "recipe": run_recipe(runs[0])}))
    (tmd / "checkpoints").mkdir(parents=True)
    (tmd / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert retire_stale(runs, tmp_path) == [] and tmd.is_dir()
    (s1 / "done.json").write_text(json.dumps({"seconds": 60}))  # its init trained before recipes were recorded
    assert retire_stale(runs, tmp_path) == ["s1_tmmf_s0", "tmd_s0"] and not tmd.exists()
