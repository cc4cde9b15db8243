"""The toy study's training runs: which configurations, with which budget, run how.

Every configuration is an ordinary `python -m tmd_lightning.fit` run in its own folder (`<out>/runs/<name>`), so
each can be inspected, sampled and resumed like any other run: a finished run has a `done.json`, an interrupted one
resumes from its `last.ckpt`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes of one study (the full one took about 2.4 hours on 2 CPU cores, two trainings
    at a time)."""

    stage1_steps: int = 300  # Stage 1 optimizer steps (batch 32); the README's single run uses 600
    distill_iterations: int = 300  # Stage 2 iterations (batch 16, 1 in 5 a student step); the single run uses 1500
    eval_prompts: int = 48  # toy captions scored per model (all 48)
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3)  # sampling seeds per prompt
    teacher_steps: int = 50  # the reference sampler: Euler 50 x CFG 5
    overrides: tuple[str, ...] = ()  # added to every run's command line


FULL = Budget()
QUICK = Budget(stage1_steps=10, distill_iterations=10, eval_prompts=12, eval_seeds=(0, 1), teacher_steps=20,
               # a small toy world of its own (4 videos per caption), decoded only as far as ten steps read
               overrides=("data.toy.root=${paths.data_dir}/toy_quick_${data.num_frames}x${data.height}x${data.width}",
                          "data.toy.videos_per_caption=4", "data.cache_decoded=false"))


@dataclass(frozen=True)
class Run:
    """One training run of the study: a `fit` experiment, its overrides, and the Stage-1 run it starts from."""

    name: str
    experiment: str
    overrides: tuple[str, ...] = ()
    init: str | None = None  # the Stage-1 run whose final student Stage 2 distils
    family: str = ""  # the model the run trains, as reported (seeds of one family are aggregated)
    seed: int = 0
    samplers: tuple[dict[str, Any], ...] = field(default_factory=tuple)


TMD_SAMPLERS = ({"M": 1, "N": 2}, {"M": 1, "N": 4}, {"M": 2, "N": 2}, {"M": 2, "N": 4})
# LoRA mode (docs/method.md §9): the fake score as a rank-16 adapter on the teacher (rank 64 is nearly full size at
# the toy's width)
LORA_FAKE_SCORE = ("stage.lora.fake_score=true", "stage.lora.rank=16", "stage.lora.alpha=16")
# DMD2-v steps -> student grid shift (docs/method.md §5: 10 for 2 steps, 5 for 3-4)
DMD2_STEPS = {1: 5.0, 2: 10.0, 3: 5.0}


def study_runs(seeds: list[int], budget: Budget) -> list[Run]:
    """Every training run of the study, Stage-1 runs first (they are the others' inits)."""
    s1 = (*budget.overrides, f"trainer.max_steps={budget.stage1_steps}",
          f"callbacks.model_checkpoint.every_n_train_steps={max(budget.stage1_steps // 3, 5)}")
    d = (*budget.overrides, f"stage.max_iterations={budget.distill_iterations}",
         f"callbacks.model_checkpoint.every_n_train_steps={max(budget.distill_iterations // 2, 5)}",
         f"callbacks.toy_eval.every_n_steps={max(budget.distill_iterations // 2, 5)}")
    runs: list[Run] = []
    for k in seeds:
        runs += [Run(f"s1_tmmf_s{k}", "adapt_head", s1, family="Stage 1, TM-MF", seed=k, samplers=TMD_SAMPLERS),
                 Run(f"s1_tm_s{k}", "adapt_head", (*s1, "stage.plain_tm=true"), family="Stage 1, plain TM", seed=k,
                     samplers=TMD_SAMPLERS)]
    for k in seeds:
        runs += [Run(f"tmd_s{k}", "distill", d, init=f"s1_tmmf_s{k}", family="TMD", seed=k, samplers=TMD_SAMPLERS),
                 Run(f"tmd_norollout_s{k}", "distill", (*d, "stage.rollout=false"), init=f"s1_tmmf_s{k}",
                     family="TMD, no rollout", seed=k, samplers=TMD_SAMPLERS),
                 Run(f"tmd_noshift_s{k}", "distill", (*d, "stage.dmd_shift=1.0"), init=f"s1_tmmf_s{k}",
                     family="TMD, no t_dmd shift", seed=k, samplers=TMD_SAMPLERS),
                 Run(f"tmd_from_tm_s{k}", "distill", d, init=f"s1_tm_s{k}", family="TMD, Stage 1 plain TM", seed=k,
                     samplers=TMD_SAMPLERS),
                 Run(f"tmd_lora_s{k}", "distill", (*d, *LORA_FAKE_SCORE), init=f"s1_tmmf_s{k}",
                     family="TMD, LoRA fake score", seed=k, samplers=TMD_SAMPLERS)]
        # every DMD2-v run starts from the teacher: the study has no KD warm-up run (which M = 1 would use by default)
        runs += [Run(f"dmd2_m{m}_s{k}", "distill_dmd2", (*d, f"tmd.M={m}", f"stage.grid_gamma={gamma}",
                                                         "stage.student.kd_warmup=false"),
                     family=f"DMD2-v {m} step{'s' if m > 1 else ''}", seed=k, samplers=({"M": m},))
                 for m, gamma in DMD2_STEPS.items()]
    return runs


# -- training ------------------------------------------------------------------------------------------------------
def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def student_export(out: Path, name: str) -> Path:
    """The final student a run exports at train end (a diffusers folder `sample` and `evaluate` load)."""
    return run_dir(out, name) / "export" / "student"


def fit_command(run: Run, out: Path) -> list[str]:
    """The `fit` command line of one run; an interrupted run resumes from its own `last.ckpt`."""
    folder = run_dir(out, run.name)
    args = [sys.executable, "-m", "tmd_lightning.fit", f"experiment={run.experiment}", f"seed={run.seed}",
            f"task_name=study_{run.name}", f"hydra.run.dir={folder}", f"paths.log_dir={out / 'runs' / '.latest'}",
            "callbacks.rich_progress_bar=null", *run.overrides]
    if run.init is not None:
        args.append(f"stage.student.checkpoint={run_dir(out, run.init) / 'checkpoints' / 'last.ckpt'}")
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        args.append(f"ckpt_path={last}")
    return args


def is_done(out: Path, name: str) -> bool:
    return (run_dir(out, name) / "done.json").is_file()


def train(runs: list[Run], out: Path, jobs: int = 1) -> None:
    """Runs every unfinished run, `jobs` at a time, each once its Stage-1 init is done; stops on the first failure.

    With several jobs each process gets an equal share of the CPU threads (`OMP_NUM_THREADS`), which on a small
    machine gives more throughput than one multi-threaded run at a time.
    """
    pending = [r for r in runs if not is_done(out, r.name)]
    total, started = len(pending), 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    active: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    while pending or active:
        for run in [r for r in pending if r.init is None or is_done(out, r.init)][: jobs - len(active)]:
            pending.remove(run)
            folder = run_dir(out, run.name)
            folder.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONUNBUFFERED": "1"}
            logfile = open(folder / "fit.log", "a")  # noqa: SIM115 - closed when the process ends
            started += 1
            print(f"[{time.strftime('%H:%M:%S')}] start {run.name} ({started}/{total})", flush=True)
            active[run.name] = (subprocess.Popen(fit_command(run, out), stdout=logfile, stderr=subprocess.STDOUT,
                                                 env=env), time.perf_counter(), logfile)
        if not active:
            missing = ", ".join(r.name for r in pending)
            raise RuntimeError(f"cannot start {missing}: their Stage-1 runs are not done (excluded by --only?)")
        time.sleep(2)
        for name, (proc, start, logfile) in list(active.items()):
            if proc.poll() is None:
                continue
            logfile.close()
            del active[name]
            if proc.returncode != 0:
                for other, _, fh in active.values():
                    other.kill()
                    fh.close()
                raise RuntimeError(f"run {name} failed (exit {proc.returncode}): see {run_dir(out, name) / 'fit.log'}")
            seconds = time.perf_counter() - start
            (run_dir(out, name) / "done.json").write_text(json.dumps({"seconds": seconds}))
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {seconds / 60:.1f} min", flush=True)


def project_root() -> Path:
    """Where `data/` and `logs/` live, as `fit` decides it: $TMD_ROOT, else the working directory."""
    return Path(os.environ.get("TMD_ROOT", os.getcwd())).resolve()


def prepare_toy_data(budget: Budget) -> None:
    """Writes the toy world the runs train on once, before parallel runs could race to write it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tmd_lightning.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=["experiment=adapt_head", f"paths.root_dir={project_root()}",
                                        "paths.output_dir=.", *budget.overrides])
    instantiate(cfg.data).prepare_data()
