"""One rank of the 2-process (gloo, CPU) runs behind tests/stages/test_distributed.py, and the pieces both share.

`python tests/stages/distributed_worker.py OUT [SCENARIO ...]` (all scenarios by default) with LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (the test starts both ranks): Lightning sees an external launcher and
joins the process group; every scenario then runs its Trainer with `trainer=ddp` or `trainer=fsdp`'s strategy
(instantiated from configs/trainer/*.yaml) inside the same two processes, and rank 0 saves what the test compares
(losses per rank, full weights) to OUT/<scenario>.pt.
Nothing is asserted here: the test process does that, against single-process runs it makes itself.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from diffusers import WanTransformer3DModel
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tmd_lightning.data.toy_world import all_captions
from tmd_lightning.models import TOY_MODEL_DIR, Discriminator, PixelCodec, TextEncoder, TMDTransformer
from tmd_lightning.stages import AdaptHeadStage, DMD2Stage, TMDDistillStage

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
            text_dim=64, freq_dim=32, ffn_dim=64, num_layers=3)
BASE_SEED = 7
NETWORKS = {"adapt_head": ("student",), "tmd": ("student", "fake_score", "discriminator"), "dmd2": ("student",)}
SGD = partial(torch.optim.SGD, lr=0.5)  # linear in the gradient: one step of the mean gradient = mean of the steps
# Stage 1 with rows that need the CFG / finite-difference calls on rank 1 only: under FSDP2 rank 0 must join them
UNEVEN_ROWS = ({"p_r_equals_s": 1.0, "cond_dropout": 1.0}, {"p_r_equals_s": 0.0, "cond_dropout": 0.0})


# -- what the worker and the single-process references share -----------------------------------------------------------
def text_encoder() -> TextEncoder:
    return TextEncoder.from_pretrained(TOY_MODEL_DIR, max_length=8, model_class="T5EncoderModel")


def make_stage(kind: str, encoder: nn.Module, optimizer: partial = SGD, **kw: Any) -> L.LightningModule:
    """A tiny stage of `kind` (adapt_head / tmd / dmd2) whose weights depend only on the seed set before the call."""
    torch.manual_seed(0)
    teacher = WanTransformer3DModel(**TINY)
    with torch.no_grad():
        teacher.proj_out.weight.normal_(std=0.1)  # a non-trivial output (Wan zero-initialises nothing here, but small)
    if kind == "adapt_head":
        student = TMDTransformer.from_teacher(teacher, head_blocks=1)
        return AdaptHeadStage(student, PixelCodec(4), encoder, optimizer=optimizer, **kw)
    kw.setdefault("discriminator", partial(Discriminator, feature_blocks=(0, 1), hidden_dim=8))
    kw.setdefault("grad_clip", None)
    if kind == "tmd":
        student = TMDTransformer.from_teacher(teacher, head_blocks=1)
        return TMDDistillStage(student, teacher, PixelCodec(4), encoder, optimizer=optimizer, N=2, **kw)
    return DMD2Stage(WanTransformer3DModel.from_config(teacher.config), teacher, PixelCodec(4), encoder,
                     optimizer=optimizer, **kw)


class Videos(Dataset):
    """`n` fixed random uint8 videos with toy captions; `indices` picks a subset (a single-process reference)."""

    def __init__(self, n: int, indices: list[int] | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        self.video = torch.randint(0, 256, (n, 9, 16, 16, 3), generator=g, dtype=torch.uint8)
        caps = all_captions()
        self.caption = [caps[(7 * i) % len(caps)] for i in range(n)]
        self.indices = list(range(n)) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = self.indices[i]
        return {"video": self.video[j], "caption": self.caption[j], "index": j}


class Recorder(L.Callback):
    """This rank's sample indices per step and its logged `train/*` values after it (Lightning logs rank 0's)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.batches: list[list[int]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict, *args: Any) -> None:
        self.batches.append(batch["index"].tolist())

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


class SeedAtSetup(L.Callback):
    """Restarts the random streams where `VideoStage.setup` does for rank r of a data-parallel run (seed + r)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)


def trainer(root: Path, strategy: Any = "auto", devices: int = 1, callbacks: list | None = None,
            precision: str = "32-true", **kw: Any) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, precision=precision, default_root_dir=str(root),
                     callbacks=callbacks or [], **kw)


# -- gradient accumulation (stage.global_batch), fp64 with per-sample noise --------------------------------------------
ACCUMULATE = dict(optimizer=partial(torch.optim.SGD, lr=0.1), grad_clip=1.0, student_every=2, max_iterations=4)
ACCUMULATE_SAMPLES = 16  # 4 updates of 4 samples


def accumulation_stage(kind: str, encoder: nn.Module, global_batch: int | None) -> L.LightningModule:
    """A float64 stage (with `precision="64-true"`) whose noise belongs to the samples
    (tests/stages/per_sample_noise.py): an update is the same whichever micro-batch or rank a sample lands on."""
    from per_sample_noise import PerSampleNoise

    stage = make_stage(kind, encoder, global_batch=global_batch, **ACCUMULATE)
    encode = stage.encode_batch
    stage.encode_batch = lambda batch: tuple(t.double() for t in encode(batch))  # the stage casts to float32
    PerSampleNoise(stage)
    return stage


class ReductionCounter(L.Callback):
    """Gradient reductions per training batch: DDP's bucket all-reduces (a comm hook), FSDP2's reduce-scatters."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []
        self.count = 0
        self._restore: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.nn.parallel import DistributedDataParallel

        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
                self.count += 1
                return allreduce_hook(state, bucket)

            model.register_comm_hook(None, hook)
            return
        name = "reduce_scatter_single" if hasattr(torch.distributed, "reduce_scatter_single") \
            else "reduce_scatter_tensor"  # what FSDP2's DefaultReduceScatter calls (torch >= 2.10 / older)
        original = getattr(torch.distributed, name)

        def reduce_scatter(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return original(*args, **kwargs)

        setattr(torch.distributed, name, reduce_scatter)
        self._restore = (name, original)

    def on_train_batch_end(self, *args: Any) -> None:
        self.per_batch.append(self.count)
        self.count = 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restore is not None:
            setattr(torch.distributed, *self._restore)


def fit_kw(kind: str, steps: int) -> dict[str, Any]:
    """How many steps: Lightning's max_steps for adapt_head, the stage's max_iterations for distillation."""
    return {"max_steps": steps} if kind == "adapt_head" else {"max_steps": -1}


# -- evaluation split across ranks -------------------------------------------------------------------------------------
EVAL_PROMPTS = 3  # x 3 seeds = 9 items: rank 0 takes 5 (batches of 2, 2, 1), rank 1 4 (2, 2 and a padding call)
EVAL_SAMPLER = {"M": 2, "N": 2}


def eval_probe() -> Any:
    """A toy evaluation over 3 prompts x 3 seeds that keeps what it scored."""
    from tmd_lightning.callbacks import ToyEvalCallback

    class Probe(ToyEvalCallback):
        def prompts(self, trainer: L.Trainer) -> list[str]:
            return all_captions()[:EVAL_PROMPTS]

        def score(self, trainer: L.Trainer, videos: torch.Tensor, captions: list[str]) -> dict[str, float]:
            self.videos = videos.clone()
            return super().score(trainer, videos, captions)

        def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
            self.last = super().evaluate(trainer, pl_module)
            return self.last

    return Probe(every_n_steps=1, seeds=(0, 1, 2), sampler=EVAL_SAMPLER, batch_size=2, at_train_end=False)


def eval_stage(encoder: nn.Module) -> L.LightningModule:
    """A Stage-1 student whose one training step changes nothing (lr 0): the evaluation sees its initial weights."""
    return make_stage("adapt_head", encoder, optimizer=partial(torch.optim.SGD, lr=0.0))


# -- the worker --------------------------------------------------------------------------------------------------------
def strategy_from_config(name: str) -> Any:
    """The strategy block of configs/trainer/<name>.yaml, as `python -m tmd_lightning.fit trainer=<name>` builds it."""
    cfg = OmegaConf.load(ROOT / "configs" / "trainer" / f"{name}.yaml").strategy
    return instantiate(cfg, timeout=timedelta(seconds=120))


def full_state(stage: L.LightningModule, names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Unsharded CPU weights of the stage's networks (collective under FSDP2; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {n: {k: v.clone() for k, v in get_model_state_dict(getattr(stage, n), options=options).items()}
            for n in names}


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Worker:
    def __init__(self, out: Path) -> None:
        self.out, self.rank = out, int(os.environ["LOCAL_RANK"])
        self.encoder = text_encoder()
        self.timings: dict[str, float] = {}

    def save(self, name: str, record: dict[str, Any]) -> None:
        if self.rank == 0:
            torch.save(record, self.out / f"{name}.pt")

    def fit(self, stage: L.LightningModule, strategy_name: str, loader: DataLoader, steps: int, kind: str,
            root: Path, ckpt_path: Path | None = None) -> tuple[L.Trainer, Recorder]:
        recorder = Recorder()
        tr = trainer(root, strategy_from_config(strategy_name), devices=2, callbacks=[recorder], **fit_kw(kind, steps))
        tr.fit(stage, train_dataloaders=loader, ckpt_path=ckpt_path, weights_only=False)
        return tr, recorder

    def one_step(self, kind: str, strategy_name: str, start_iteration: int = 0, uneven: bool = False) -> None:
        """One SGD step on 4 samples (2 per rank; the distributed sampler decides which, the record says)."""
        L.seed_everything(BASE_SEED, verbose=False)
        extra = {} if kind == "adapt_head" else {"max_iterations": start_iteration + 1}
        stage = make_stage(kind, self.encoder, **extra, **(UNEVEN_ROWS[self.rank] if uneven else {}))
        stage.activation_checkpointing = strategy_name == "fsdp"  # FSDP2 runs with per-block checkpoints
        if kind != "adapt_head":
            stage.iteration = start_iteration
        loader = DataLoader(Videos(4), batch_size=2, shuffle=False)
        _, recorder = self.fit(stage, strategy_name, loader, 1, kind, self.out / "runs")
        self.save(f"{kind}{'_uneven' if uneven else ''}_it{start_iteration}_{strategy_name}",
                  {"losses": gather(recorder.steps), "batches": gather(recorder.batches),
                   "state": full_state(stage, NETWORKS[kind])})

    def resume(self, strategy_name: str) -> None:
        """TMD distillation with AdamW and clipping: 4 iterations straight vs 2 + checkpoint + resume + 2."""
        def fresh(iterations: int) -> L.LightningModule:
            L.seed_everything(BASE_SEED, verbose=False)  # also the seed of the distributed sampler's shuffle
            return make_stage("tmd", self.encoder, optimizer=partial(torch.optim.AdamW, lr=1e-3), grad_clip=1.0,
                              student_every=2, max_iterations=iterations)

        def loader() -> DataLoader:
            return DataLoader(Videos(8), batch_size=2, shuffle=True)

        runs = self.out / "runs"
        straight = fresh(4)
        _, rec = self.fit(straight, strategy_name, loader(), 4, "tmd", runs)
        record: dict[str, Any] = {"straight": full_state(straight, NETWORKS["tmd"]),
                                  "straight_losses": gather(rec.steps)}
        units = [n for n, m in straight.named_modules() if type(m).__name__.startswith("FSDP")]
        record["fsdp_units"] = units
        record["teacher_root_sharded"] = type(straight.teacher.patch_embedding.weight).__name__
        if strategy_name == "fsdp":
            wrote = straight.export_pretrained(str(self.out / "export_fsdp"))
            record["export_wrote"] = gather(wrote)
        half = fresh(2)
        tr, _ = self.fit(half, strategy_name, loader(), 2, "tmd", runs)
        ckpt = self.out / f"half_{strategy_name}.ckpt"
        tr.save_checkpoint(ckpt)
        record["half"] = full_state(half, NETWORKS["tmd"])
        resumed = fresh(4)  # its ranks restart from seed + rank at setup: the checkpoint's random states must win
        _, rec = self.fit(resumed, strategy_name, loader(), 4, "tmd", runs, ckpt_path=ckpt)
        record |= {"resumed": full_state(resumed, NETWORKS["tmd"]), "resumed_losses": gather(rec.steps),
                   "resumed_iteration": resumed.iteration}
        self.save(f"resume_{strategy_name}", record)

    def accumulate(self, strategy_name: str) -> None:
        """Global batch 4 = 2 ranks x micro batch 1 x k = 2 micro-steps, 4 updates (student, critics, student,
        critics) in float64; compared with one process taking batches of 4 (test_distill_accumulation.py)."""
        L.seed_everything(BASE_SEED, verbose=False)
        stage = accumulation_stage("tmd", self.encoder, global_batch=4)
        recorder, counter = Recorder(), ReductionCounter()
        # Lightning's FSDP2 strategy refuses precision="64-true": the same by hand (float64 weights and default dtype)
        precision = "64-true" if strategy_name == "ddp" else "32-true"
        tr = trainer(self.out / "runs", strategy_from_config(strategy_name), devices=2, callbacks=[recorder, counter],
                     precision=precision, max_steps=-1)
        default = torch.get_default_dtype()
        if precision == "32-true":
            stage.double()
            torch.set_default_dtype(torch.float64)
        try:
            tr.fit(stage, DataLoader(Videos(ACCUMULATE_SAMPLES), batch_size=1, shuffle=False), weights_only=False)
        finally:
            torch.set_default_dtype(default)
        self.save(f"accumulate_{strategy_name}",
                  {"state": full_state(stage, NETWORKS["tmd"]), "batches": gather(recorder.batches),
                   "losses": gather(recorder.steps), "reductions": gather(counter.per_batch),
                   "global_step": tr.global_step, "iteration": stage.iteration})

    def evaluate(self, strategy_name: str) -> None:
        """The toy evaluation after one (no-op) step: rank r samples items r, r + 2, ... and rank 0 scores."""
        L.seed_everything(BASE_SEED, verbose=False)
        stage = eval_stage(self.encoder)
        calls: list[int] = []
        generate = stage.generate

        def counted(captions: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(len(captions))
            return generate(captions, *args, **kwargs)

        stage.generate = counted
        probe = eval_probe()
        tr = trainer(self.out / "runs", strategy_from_config(strategy_name), devices=2, callbacks=[probe], max_steps=1)
        tr.fit(stage, DataLoader(Videos(4), batch_size=2, shuffle=False), weights_only=False)
        self.save(f"evaluate_{strategy_name}", {"metrics": gather(probe.last), "calls": gather(calls),
                                                "videos": getattr(probe, "videos", None)})

    def stray_parameter(self) -> None:
        """A trainable parameter outside every network must stop an FSDP2 run at setup, naming it."""
        L.seed_everything(BASE_SEED, verbose=False)
        stage = make_stage("adapt_head", self.encoder)
        stage.register_parameter("stray_scale", nn.Parameter(torch.ones(1)))
        try:
            self.fit(stage, "fsdp", DataLoader(Videos(4), batch_size=2), 1, "adapt_head", self.out / "runs")
            message = None
        except RuntimeError as err:
            message = str(err)
        self.save("stray_parameter", {"message": message})

    def timed(self, name: str, fn: Any, *args: Any) -> None:
        start = time.perf_counter()
        fn(*args)
        self.timings[name] = round(time.perf_counter() - start, 2)


def main(out: str, scenarios: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    worker = Worker(Path(out))
    if scenarios:  # only these (e.g. `accumulate_ddp`), instead of the full set below
        for name in scenarios:
            method, _, strategy_name = name.rpartition("_")
            worker.timed(name, getattr(worker, method), strategy_name)
        if worker.rank == 0:
            (Path(out) / "timings.json").write_text(json.dumps(worker.timings, indent=1))
        return
    for strategy_name in ("ddp", "fsdp"):
        worker.timed(f"adapt_head_{strategy_name}", worker.one_step, "adapt_head", strategy_name)
        worker.timed(f"tmd_student_{strategy_name}", worker.one_step, "tmd", strategy_name, 0)
        worker.timed(f"tmd_critic_{strategy_name}", worker.one_step, "tmd", strategy_name, 1)
        worker.timed(f"resume_{strategy_name}", worker.resume, strategy_name)
    worker.timed("dmd2_student_fsdp", worker.one_step, "dmd2", "fsdp", 0)
    worker.timed("adapt_head_uneven_fsdp", worker.one_step, "adapt_head", "fsdp", 0, True)
    worker.timed("stray_parameter", worker.stray_parameter)
    if worker.rank == 0:
        (Path(out) / "timings.json").write_text(json.dumps(worker.timings, indent=1))


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2:])
        if torch.distributed.is_initialized():  # both ranks leave together: gloo aborts a rank whose peer has gone
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()  # and skip interpreter teardown, where gloo's threads have aborted a rank (exit -6)
        sys.stderr.flush()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not hang in atexit handlers while the other rank waits in a collective
