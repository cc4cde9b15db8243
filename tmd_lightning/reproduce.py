"""Entry point: `python -m tmd_lightning.reproduce` — the paper's claims checked on the toy world, one command.

Trains every configuration of the study (Stage 1 with TM-MF and plain TM; Stage 2 TMD with and without rollout and
the t_dmd shift, from either Stage-1 init; DMD2-v with 1, 2 and 3 steps, the one-step from a KD warm-up on the
teacher's noise -> sample pairs as in the paper) for two or more seeds, each as an ordinary
`python -m tmd_lightning.fit` run in its own folder (the pairs: one `python -m tmd_lightning.kd_pairs` run), then
samples and scores every model on the same prompts and seeds and writes `REPORT.md` (tables, a verdict per claim
with its numbers, the training curves), `results.csv` and plots.

Rerunning the command after a stop does only what is missing: finished runs are skipped, interrupted ones resume
from their `last.ckpt`, scores are cached per run. `--quick` shrinks every budget (a smoke test in minutes);
`--report-only` rebuilds the report from the cached scores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from fnmatch import fnmatch
from pathlib import Path

from tmd_lightning.quiet import quiet_third_party
from tmd_lightning.study.recipes import retire_stale, run_recipe
from tmd_lightning.study.report import write_report
from tmd_lightning.study.runs import FULL, QUICK, prepare_toy_data, run_record, study_runs, train
from tmd_lightning.study.scores import load_scores, score


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tmd_lightning.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="study folder (default results/toy; with --quick results/toy_quick)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds per configuration")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test in minutes")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time (CPU threads split between them)")
    parser.add_argument("--only", default="*", help="comma-separated glob patterns of the run names to train and "
                        "score (the report covers every run of the study with cached scores)")
    parser.add_argument("--report-only", action="store_true", help="no training or scoring: rebuild the report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    quiet_third_party()
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = args.out or Path("results/toy_quick" if args.quick else "results/toy")
    every = study_runs(args.seeds, budget)
    runs = [r for r in every if any(fnmatch(r.name, p) for p in args.only.split(","))]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.report_only:
        stale = retire_stale(every, out, set_aside=False)  # made with another recipe: not today's results
        every = [r for r in every if r.name not in stale]
        rows = load_scores(every, out)
    else:
        prepare_toy_data(budget)
        retire_stale(every, out)  # runs (and cached scores) made with another recipe train again
        # with the runs outside `--only` that they need; each records its recipe
        trained = train(runs, out, args.jobs, study=every, recipe=run_recipe)
        scored = [r for r in every if r in runs or r in trained]
        rows = score(scored, out, budget)
        # the report covers the whole study: the other runs count with their cached scores
        rows += [r for r in load_scores([r for r in every if r not in scored], out) if r["run"] != "teacher"]
    minutes = {r.name: json.loads(run_record(out, r.name, "done.json").read_text())["seconds"] / 60 for r in every
               if run_record(out, r.name, "done.json").is_file()}
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--report-only"]
    command = ("python -m tmd_lightning.reproduce " + shlex.join(given)).strip()
    report = write_report(rows, every, out, budget, args.quick, args.seeds, command,
                          None if args.report_only else (time.perf_counter() - start) / 60, minutes)
    curves = out / "training_curves.png"
    print(f"\nreport: {report}\nplot:   {out / 'quality_vs_nfe.png'}\ncsv:    {out / 'results.csv'}"
          + (f"\ncurves: {curves}" if curves.is_file() else ""))


if __name__ == "__main__":
    main()
