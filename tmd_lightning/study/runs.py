"""The toy study's training runs: which configurations, with which budget, run how.

Every configuration is an ordinary `python -m tmd_lightning.fit` run in its own folder (`<out>/runs/<name>`), so
each can be inspected, sampled and resumed like any other run: a finished run has a `done.json`, an interrupted one
resumes from its `last.ckpt`. One run is not a training: `kd_pairs` writes the teacher's noise -> sample pairs that
the one-step DMD2-v's KD warm-up trains on (`python -m tmd_lightning.kd_pairs`, resumable by its own shards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Budget:
    """Training and evaluation sizes of one study: the demo's budgets (`make demo`), by which the toy-eval curves of
    the width-256 teacher's students have flattened (README, "Results on the toy"). About 7.5 hours per seed on 2 CPU
    cores (two runs at a time); it resumes, so it can run over several sittings."""

    stage1_steps: int = 500  # Stage 1 optimizer steps (batch 32), as the demo
    distill_iterations: int = 1500  # Stage 2 iterations (batch 16, 1 in 5 a student step), as the demo
    eval_prompts: int = 48  # toy captions scored per model (all 48)
    eval_seeds: tuple[int, ...] = (0, 1, 2, 3)  # sampling seeds per prompt
    teacher_steps: int = 50  # the reference sampler: 50 Euler steps with the model's guidance
    kd_steps: int = 100  # KD warm-up steps of the one-step DMD2-v (experiment=kd_warmup's default, batch 32)
    kd_pairs_overrides: tuple[str, ...] = ()  # the KD pairs' command line (default: model.kd_pairs = 192 pairs,
    #   the teacher's 50 Euler steps with the model's guidance)
    overrides: tuple[str, ...] = ()  # added to every toy-data run's command line (not to the KD warm-up: data=cache)


FULL = Budget()
QUICK = Budget(stage1_steps=10, distill_iterations=10, eval_prompts=12, eval_seeds=(0, 1), teacher_steps=20,
               kd_steps=5, kd_pairs_overrides=("num_pairs=16", "sampler.steps=4"),
               # a small toy world of its own (4 videos per caption), decoded only as far as ten steps read
               overrides=("data.toy.root=${paths.data_dir}/toy_quick_${data.num_frames}x${data.height}x${data.width}",
                          "data.toy.videos_per_caption=4", "data.cache_decoded=false"))


RUNS = "{runs}"  # placeholder in a run's overrides for `<out>/runs` (study_runs does not know the study folder)


@dataclass(frozen=True)
class Run:
    """One run of the study: an entry point (`fit` with an experiment, or `kd_pairs`), its overrides, and the runs
    it needs finished first.

    Overrides may name other runs' folders as `{runs}/<name>/...` (RUNS); the command builders fill in the study
    folder. A run without samplers (the KD pairs) is not scored.
    """

    name: str
    experiment: str | None  # the `fit` experiment (None for other entry points)
    overrides: tuple[str, ...] = ()
    init: str | None = None  # the Stage-1 run whose last.ckpt Stage 2 distils (stage.student.checkpoint)
    needs: tuple[str, ...] = ()  # further runs that must be done before this one starts
    entry: str = "fit"  # the entry module: "fit" or "kd_pairs" (ENTRY_COMMANDS)
    family: str = ""  # the model the run trains, as reported (seeds of one family are aggregated)
    seed: int = 0
    samplers: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def depends(self) -> tuple[str, ...]:
        """Every run this one waits for: its init, then its other needs."""
        return tuple(dict.fromkeys((*((self.init,) if self.init else ()), *self.needs)))


TMD_SAMPLERS = ({"M": 1, "N": 2}, {"M": 1, "N": 4}, {"M": 2, "N": 2}, {"M": 2, "N": 4})
# LoRA mode (docs/method.md §9): the fake score as a rank-16 adapter on the teacher (rank 64 is nearly full size at
# the toy's width)
LORA_FAKE_SCORE = ("stage.lora.fake_score=true", "stage.lora.rank=16", "stage.lora.alpha=16")
# DMD2-v's step counts. Their grid shift is the toy's (`model.student_grid_gamma`, as TMD's), not the paper's 10 for
# 2 steps and 5 for 3-4 (docs/method.md §5): on the toy both methods sample on the same grid
DMD2_STEPS = (1, 2, 3)
KD_FAMILY = "KD warm-up, 1 step"  # the one-step DMD2-v's init, scored alone: what DMD2-v adds on top of it
KD_PAIRS = f"{RUNS}/kd_pairs/pairs"  # the pair cache the KD warm-ups train on
STAGE2_EXPERIMENTS = ("distill", "distill_dmd2")


def eval_every(budget_steps: int) -> int:
    """The toy-eval period: a quarter of the run (at least 5 steps), so each training curve has four points and a
    reader can see whether it has flattened by the end of the budget."""
    return max(budget_steps // 4, 5)


def kd_runs(seeds: list[int], budget: Budget) -> list[Run]:
    """The one-step DMD2-v's KD warm-up (the paper's Table 7): one seed-independent pair cache (the teacher's
    noise -> sample pairs are data, not a trained model) and one warm-up per seed, scored with one step."""
    pairs = Run("kd_pairs", None, (f"output={KD_PAIRS}", *budget.kd_pairs_overrides), entry="kd_pairs")
    # data=cache: the toy-world overrides (budget.overrides) have no `data.toy` to set here
    return [pairs] + [Run(f"kd_warmup_s{k}", "kd_warmup", (f"data.cache_dir={KD_PAIRS}",
                                                           f"trainer.max_steps={budget.kd_steps}"),
                          needs=(pairs.name,), family=KD_FAMILY, seed=k, samplers=({"M": 1},)) for k in seeds]


def dmd2_runs(k: int, d: tuple[str, ...]) -> list[Run]:
    """DMD2-v with 1, 2 and 3 steps for seed k. As in the paper (Table 7), only the one-step student starts from a
    KD warm-up (seed k's export, so seeds stay independent); two and three steps start from the teacher."""
    runs = []
    for m in DMD2_STEPS:
        kd = f"kd_warmup_s{k}" if m == 1 else None
        init = (("stage.student.kd_warmup=true", f"stage.student.kd_export={RUNS}/{kd}/export/student") if kd
                else ("stage.student.kd_warmup=false",))
        runs.append(Run(f"dmd2_m{m}_s{k}", "distill_dmd2", (*d, f"tmd.M={m}", *init),
                        needs=(kd,) if kd else (), family=f"DMD2-v {m} step{'s' if m > 1 else ''}", seed=k,
                        samplers=({"M": m},)))
    return runs


def study_runs(seeds: list[int], budget: Budget) -> list[Run]:
    """Every run of the study, each after the runs it depends on (Stage 1 and the KD warm-ups come first)."""
    s1 = (*budget.overrides, f"trainer.max_steps={budget.stage1_steps}",
          f"callbacks.model_checkpoint.every_n_train_steps={max(budget.stage1_steps // 3, 5)}",
          f"callbacks.toy_eval.every_n_steps={eval_every(budget.stage1_steps)}")
    d = (*budget.overrides, f"stage.max_iterations={budget.distill_iterations}",
         f"callbacks.model_checkpoint.every_n_train_steps={max(budget.distill_iterations // 2, 5)}",
         f"callbacks.toy_eval.every_n_steps={eval_every(budget.distill_iterations)}")
    runs: list[Run] = []
    for k in seeds:
        runs += [Run(f"s1_tmmf_s{k}", "adapt_head", s1, family="Stage 1, TM-MF", seed=k, samplers=TMD_SAMPLERS),
                 Run(f"s1_tm_s{k}", "adapt_head", (*s1, "stage.plain_tm=true"), family="Stage 1, plain TM", seed=k,
                     samplers=TMD_SAMPLERS)]
    runs += kd_runs(seeds, budget)
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
        runs += dmd2_runs(k, d)
    return runs


# -- training ------------------------------------------------------------------------------------------------------
def run_dir(out: Path, name: str) -> Path:
    return out / "runs" / name


def student_export(out: Path, name: str) -> Path:
    """The final student a run exports at train end (a diffusers folder `sample` and `evaluate` load)."""
    return run_dir(out, name) / "export" / "student"


def run_overrides(run: Run, out: Path) -> list[str]:
    """The run's overrides with `{runs}` replaced by `<out>/runs` (str.replace: overrides hold `${...}`
    interpolations that str.format would trip on)."""
    return [a.replace(RUNS, str(out / "runs")) for a in run.overrides]


def fit_command(run: Run, out: Path) -> list[str]:
    """The `fit` command line of one run; an interrupted run resumes from its own `last.ckpt`."""
    folder = run_dir(out, run.name)
    args = [sys.executable, "-m", "tmd_lightning.fit", f"experiment={run.experiment}", f"seed={run.seed}",
            f"task_name=study_{run.name}", f"hydra.run.dir={folder}", f"paths.log_dir={out / 'runs' / '.latest'}",
            "callbacks.rich_progress_bar=null", *run_overrides(run, out)]
    if run.init is not None:
        args.append(f"stage.student.checkpoint={run_dir(out, run.init) / 'checkpoints' / 'last.ckpt'}")
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        args.append(f"ckpt_path={last}")
    return args


def kd_pairs_command(run: Run, out: Path) -> list[str]:
    """The `kd_pairs` command line; a rerun writes only the shards still missing."""
    return [sys.executable, "-m", "tmd_lightning.kd_pairs", f"hydra.run.dir={run_dir(out, run.name)}",
            *run_overrides(run, out)]


ENTRY_COMMANDS = {"fit": fit_command, "kd_pairs": kd_pairs_command}


def run_command(run: Run, out: Path) -> list[str]:
    """The command line of any run of the study, by its entry point."""
    return ENTRY_COMMANDS[run.entry](run, out)


def folder_log(out: Path, run: Run) -> Path:
    """Where a run's console output goes: `<run>/console.log` (warnings, progress and log records; Hydra's own
    `<entry>.log` beside it holds the log records only, so the two must not be one file)."""
    return run_dir(out, run.name) / "console.log"


def is_done(out: Path, name: str) -> bool:
    return (run_dir(out, name) / "done.json").is_file()


def score_file(out: Path, name: str) -> Path:
    """A model's cached score rows (`scores/<run>.json`, kept in git)."""
    return out / "scores" / f"{name}.json"


def is_carried(out: Path, name: str) -> bool:
    """A run finished and scored elsewhere (an earlier sitting, maybe another machine): its scores are cached but its
    folder (not in git) holds no finished run here. It counts as finished unless a run still to train needs its
    checkpoint."""
    return not is_done(out, name) and score_file(out, name).is_file()


KEPT_RECORDS = ("done.json", "toy_eval.csv")  # a run's files copied beside its scores (`kept_record`)


def kept_record(out: Path, name: str, file: str) -> Path:
    """Where a run's `done.json` or `toy_eval.csv` is copied beside its scores when it is scored (kept in git)."""
    return out / "scores" / f"{name}.{file}"


def samples_file(out: Path, name: str) -> Path:
    """A model's few videos for the report's sample grid (`scores/<run>.samples.npz`, kept in git: 40-200 KB)."""
    return out / "scores" / f"{name}.samples.npz"


def run_record(out: Path, name: str, file: str) -> Path:
    """A finished run's `done.json` or `toy_eval.csv`: from its folder, else the copy kept beside its scores
    (`kept_record`), so a carried run keeps its training time and curve. A run still training (no `done.json` in its
    folder) has only the kept copy, if any: its partial curve is not the study's."""
    local = run_dir(out, name) / file
    return local if local.is_file() and is_done(out, name) else kept_record(out, name, file)


def runs_to_train(runs: list[Run], out: Path, study: list[Run] | None = None) -> list[Run]:
    """The runs `train` starts: every unfinished run of `runs` that is not carried, and every carried run (or
    data-making run) of the whole `study` (default: `runs`) whose output one of those still needs (it trains again
    here, and is scored again), in the study's order."""
    study = runs if study is None else study
    by_name = {r.name: r for r in (*study, *runs)}
    providers = {dep for r in by_name.values() for dep in r.depends}
    # a run that makes data for others (the KD pairs: no samplers, never scored) trains when one of them does
    todo = {r.name for r in runs if not is_done(out, r.name) and not is_carried(out, r.name)
            and (r.samplers or r.name not in providers)}
    stack = list(todo)
    while stack:
        for dep in by_name[stack.pop()].depends:
            if dep in by_name and dep not in todo and not is_done(out, dep):
                todo.add(dep)
                stack.append(dep)
    return [r for r in by_name.values() if r.name in todo]


def train(runs: list[Run], out: Path, jobs: int = 1, poll_seconds: float = 2.0,
          study: list[Run] | None = None, recipe: Callable[[Run], dict[str, Any]] | None = None) -> list[Run]:
    """Runs every unfinished run (`runs_to_train`: with the runs of the whole `study` they need), `jobs` at a time,
    each once every run it depends on is done; stops on the first failure; returns the runs it started. Each run's
    output goes to `<run>/<entry>.log`; its `done.json` records its training time and `recipe(run)` (the study's
    `recipes.run_recipe`), by which a later sitting tells a run made with another recipe. The training time sums
    every sitting of a run that resumed: each poll writes the run's time so far to `<run>/elapsed.json`, so a sitting
    stopped by a kill or a closed session counts up to its last poll.

    With several jobs each process gets an equal share of the CPU threads (`OMP_NUM_THREADS`), which on a small
    machine gives more throughput than one multi-threaded run at a time.
    """
    pending = runs_to_train(runs, out, study)
    started_runs = list(pending)
    recipes = {r.name: recipe(r) for r in pending} if recipe else {}
    carried = [r.name for r in runs if is_carried(out, r.name) and r not in pending]
    if carried:
        print(f"[{time.strftime('%H:%M:%S')}] kept from earlier sittings (scores cached): {', '.join(carried)}",
              flush=True)
    total, started = len(pending), 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    active: dict[str, tuple[subprocess.Popen, float, Any, Run]] = {}
    while pending or active:
        for run in [r for r in pending if all(is_done(out, d) for d in r.depends)][: jobs - len(active)]:
            pending.remove(run)
            folder = run_dir(out, run.name)
            folder.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                   "PYTHONUNBUFFERED": "1"}
            logfile = open(folder_log(out, run), "a")  # noqa: SIM115 - closed when the process ends
            started += 1
            print(f"[{time.strftime('%H:%M:%S')}] start {run.name} ({started}/{total})", flush=True)
            active[run.name] = (subprocess.Popen(run_command(run, out), stdout=logfile, stderr=subprocess.STDOUT,
                                                 env=env), time.perf_counter() - earlier_seconds(out, run.name),
                                logfile, run)
        if not active:
            missing = "; ".join(f"{r.name} needs {', '.join(d for d in r.depends if not is_done(out, d))}"
                                for r in pending)
            raise RuntimeError(f"cannot start {missing}: not done (excluded by --only?)")
        time.sleep(poll_seconds)
        for name, (proc, start, logfile, run) in list(active.items()):
            if proc.poll() is None:
                write_elapsed(out, name, time.perf_counter() - start)
                continue
            logfile.close()
            del active[name]
            if proc.returncode != 0:
                for other, _, fh, _ in active.values():
                    other.kill()
                    fh.close()
                raise RuntimeError(f"run {name} failed (exit {proc.returncode}): see {folder_log(out, run)}")
            seconds = time.perf_counter() - start
            record = {"seconds": seconds, **({"recipe": recipes[name]} if name in recipes else {})}
            (run_dir(out, name) / "done.json").write_text(json.dumps(record))
            print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {seconds / 60:.1f} min", flush=True)
    return started_runs


def elapsed_file(out: Path, name: str) -> Path:
    """A run's training time so far, over all its sittings (`train` rewrites it at every poll)."""
    return run_dir(out, name) / "elapsed.json"


def earlier_seconds(out: Path, name: str) -> float:
    """Training time of a run's earlier, interrupted sittings (0 for a run starting afresh)."""
    path = elapsed_file(out, name)
    return float(json.loads(path.read_text())["seconds"]) if path.is_file() else 0.0


def write_elapsed(out: Path, name: str, seconds: float) -> None:
    """Records a running run's training time so far; atomic, so a kill mid-write leaves the last record."""
    from tmd_lightning.data.sharding import atomic_write_text

    atomic_write_text(elapsed_file(out, name), json.dumps({"seconds": seconds}))


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
