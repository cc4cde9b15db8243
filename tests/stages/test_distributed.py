"""Data parallelism on CPU with two gloo processes (docs/method.md §9): `trainer=ddp` and `trainer=fsdp` (FSDP2).

The two ranks run in `distributed_worker.py` (started once for the module); this file checks what they saved against
single-process runs it makes itself. The comparisons are built so that they can only pass when gradients really
are averaged across ranks (and sharded weights really are gathered), not merely when a run finishes:

- **One step = the mean of the ranks' steps.** Rank r trains on its own half of 4 samples (the distributed sampler
  picks it; the worker records which) and draws its own noise: `VideoStage.setup` restarts rank r's generators
  from seed + r. A single process given rank r's samples and seed reproduces rank r's loss exactly. With plain SGD
  one step moves the weights by `-lr * grad`, so the 2-rank step with the averaged gradient must equal the mean of
  the two single-process steps. Without synchronisation each rank would keep its own step; with a sum instead of
  a mean the step would be twice as large; a sharding bug would scramble it. The two per-rank steps differ by
  orders of magnitude more than the tolerance, which the test checks too (so it is not trivially met).
- **Resume is exact.** 4 iterations straight vs 2, checkpoint (a DCP folder under FSDP2), resume, 2 more: identical
  weights, including Adam states, the TTUR phase and every rank's random streams.
- **DDP and FSDP2 agree** over several AdamW iterations with clipping, and the consolidated export of an FSDP2 run
  equals its gathered weights.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import distributed_worker as W
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 420
# which networks each one-step case trains (the others must not move)
TRAINED = {("adapt_head", 0): ("student",), ("tmd", 0): ("student",), ("tmd", 1): ("fake_score", "discriminator"),
           ("dmd2", 0): ("student",)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(command: list[str], out: Path, timeout: float = TIMEOUT_S) -> float:
    """Starts rank 0 and rank 1 of `command` (Lightning joins them through LOCAL_RANK / WORLD_SIZE / MASTER_*),
    waits for both, and fails with both logs' tails when either fails or the pair hangs; returns the wall time."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE="2", NODE_RANK="0", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start, procs, logs = time.perf_counter(), [], [out / f"rank{r}.log" for r in (0, 1)]
    for rank, log in enumerate(logs):
        with open(log, "w") as fh:
            procs.append(subprocess.Popen(command, env=env | {"LOCAL_RANK": str(rank)}, stdout=fh,
                                          stderr=subprocess.STDOUT, cwd=out))
    try:
        codes = [p.wait(timeout=max(1.0, timeout - (time.perf_counter() - start))) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0, 0], f"2-rank run failed (exit codes {codes}):\n{tails}"
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    seconds = launch_two_ranks([sys.executable, str(WORKER), str(out)], out)
    print(f"\n2-rank worker: {seconds:.1f} s; scenarios (s): {(out / 'timings.json').read_text()}")
    return out


def _load(runs: Path, name: str) -> dict:
    return torch.load(runs / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return W.text_encoder()


_REFERENCES: dict[tuple, tuple] = {}


def reference(kind: str, iteration: int, rank: int, samples: list[int], encoder: torch.nn.Module, root: Path,
              uneven: bool = False) -> tuple[list[dict[str, float]], dict[str, dict[str, torch.Tensor]]]:
    """Rank `rank`'s step replayed in this process: the same init, its samples in its order, its seed (seed + rank)."""
    key = (kind, iteration, rank, tuple(samples), uneven)
    if key not in _REFERENCES:
        with one_thread():
            _REFERENCES[key] = _fit_reference(kind, iteration, rank, samples, encoder, root,
                                              W.UNEVEN_ROWS[rank] if uneven else {})
    return _REFERENCES[key]


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread is fastest and avoids oversubscribing a loaded machine (as the workers do)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_reference(kind: str, iteration: int, rank: int, samples: list[int], encoder: torch.nn.Module,
                   root: Path, stage_kw: dict) -> tuple[list[dict[str, float]], dict[str, dict[str, torch.Tensor]]]:
    L.seed_everything(W.BASE_SEED, verbose=False)
    stage = W.make_stage(kind, encoder, **({} if kind == "adapt_head" else {"max_iterations": iteration + 1}),
                         **stage_kw)
    if kind != "adapt_head":
        stage.iteration = iteration
    recorder = W.Recorder()
    trainer = W.trainer(root, callbacks=[recorder, W.SeedAtSetup(W.BASE_SEED + rank)], **W.fit_kw(kind, 1))
    trainer.fit(stage, DataLoader(W.Videos(4, samples), batch_size=2, shuffle=False))
    return recorder.steps, {n: {k: v.detach().clone() for k, v in getattr(stage, n).state_dict().items()}
                            for n in W.NETWORKS[kind]}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind,iteration,strategy,uneven", [
    ("adapt_head", 0, "ddp", False), ("adapt_head", 0, "fsdp", False), ("adapt_head", 0, "fsdp", True),
    ("tmd", 0, "ddp", False), ("tmd", 0, "fsdp", False), ("tmd", 1, "ddp", False), ("tmd", 1, "fsdp", False),
    ("dmd2", 0, "fsdp", False),
])
def test_one_step_is_the_mean_of_the_per_rank_steps(runs, encoder, tmp_path, kind, iteration, strategy, uneven):
    """See the module docstring. Iteration 0 of distillation is a student step, iteration 1 a critic step (fake
    score + discriminator); the FSDP2 runs also use activation checkpointing, the references do not.

    `uneven`: Stage 1 where only rank 1 has rows that need the CFG-target and finite-difference calls (rank 0 drops
    every caption and trains r = s only). Under FSDP2 rank 0 must still join those calls (they gather weights) and
    discard them, or the ranks deadlock; its loss and the averaged step must be unaffected.
    """
    run = _load(runs, f"{kind}{'_uneven' if uneven else ''}_it{iteration}_{strategy}")
    batches = [run["batches"][r][0] for r in (0, 1)]
    assert sorted(batches[0] + batches[1]) == [0, 1, 2, 3]  # the sampler split the data, no sample twice
    refs = [reference(kind, iteration, r, batches[r], encoder, tmp_path, uneven) for r in (0, 1)]
    for rank, (losses, _) in enumerate(refs):  # each rank saw exactly its reference's data and noise
        logged = run["losses"][rank][0]
        losses_keys = [k for k in losses[0] if "loss" in k]
        assert losses_keys
        for k in losses_keys:
            assert logged[k] == pytest.approx(losses[0][k], rel=1e-6, abs=1e-7), (rank, k)
    for name in W.NETWORKS[kind]:
        mean = {k: (refs[0][1][name][k] + refs[1][1][name][k]) / 2 for k in refs[0][1][name]}
        assert _max_diff(run["state"][name], mean) < 1e-6, name
        spread = _max_diff(refs[0][1][name], refs[1][1][name])
        if name in TRAINED[(kind, iteration)]:
            assert spread > 1e-3, f"{name}: the ranks' steps barely differ ({spread}); the test would prove nothing"
        else:
            assert spread == 0, f"{name} moved in an iteration that does not train it"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_continues_exactly(runs, strategy):
    run = _load(runs, f"resume_{strategy}")
    assert run["resumed_iteration"] == 4
    for name in W.NETWORKS["tmd"]:
        for k, v in run["straight"][name].items():
            assert torch.equal(v, run["resumed"][name][k]), f"{name}.{k}"
    for rank in (0, 1):  # the resumed steps (iterations 3 and 4) logged what the straight run logged
        for resumed, straight in zip(run["resumed_losses"][rank], run["straight_losses"][rank][2:], strict=True):
            assert resumed.items() <= straight.items()  # (the straight run's metrics also hold older steps' keys)


@pytest.mark.slow
def test_ddp_and_fsdp_agree_over_several_adamw_iterations(runs):
    """Same data, seeds and updates (AdamW, clipping, both TTUR phases twice); only reduction order differs.

    The discriminator's first conv biases feed a GroupNorm with one channel per group, so their gradient is zero in
    exact arithmetic and float noise; Adam divides that noise by its own size and takes O(lr) steps in either
    direction, so those two tensors are compared against the learning rate instead.
    """
    ddp, fsdp = _load(runs, "resume_ddp"), _load(runs, "resume_fsdp")
    noise_only = {"heads.0.0.bias", "heads.1.0.bias"}
    for name in W.NETWORKS["tmd"]:
        for k, v in ddp["straight"][name].items():
            tol = 4e-3 if name == "discriminator" and k in noise_only else 1e-5
            assert (v - fsdp["straight"][name][k]).abs().max() < tol, f"{name}.{k}"
    for rank in (0, 1):
        for a, b in zip(ddp["straight_losses"][rank], fsdp["straight_losses"][rank], strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


@pytest.mark.slow
def test_fsdp_layout_and_distributed_checkpoint_without_the_teacher(runs):
    import torch.distributed.checkpoint as dcp

    run = _load(runs, "resume_fsdp")
    blocks = [f"{net}.{i}" for net in ("student.wan.blocks", "teacher.blocks", "fake_score.blocks") for i in range(3)]
    assert set(run["fsdp_units"]) == {"student", "fake_score", "discriminator", *blocks}
    assert run["teacher_root_sharded"] == "Parameter"  # frozen: its embedders and head stay whole on every rank
    assert _load(runs, "resume_ddp")["fsdp_units"] == []
    folder = runs / "half_fsdp.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()
    keys = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata.keys()
    networks = {k.split(".")[1] for k in keys if k.startswith("state_dict.")}
    assert networks == {"student", "fake_score", "discriminator"}  # teacher, codec and text encoder left out
    assert {k.split(".")[0] for k in keys if not k.startswith("state_dict.")} == {"optimizer_0", "optimizer_1",
                                                                                "optimizer_2"}
    meta = torch.load(folder / "meta.pt", weights_only=False)
    assert meta["tmd_lightning"]["network_class"] == "TMDTransformer"  # not FSDP's generated subclass
    assert meta["distill"]["iteration"] == 2 and len(meta["distill"]["rng_by_rank"]) == 2


@pytest.mark.slow
def test_fsdp_export_and_consolidated_checkpoint_equal_the_gathered_weights(runs, tmp_path):
    from tmd_lightning.checkpoints import export_checkpoint, load_student
    from tmd_lightning.models import TMDTransformer

    run = _load(runs, "resume_fsdp")
    assert run["export_wrote"] == [True, False]  # every rank gathers, rank 0 writes
    exported = TMDTransformer.from_pretrained(str(runs / "export_fsdp"))
    assert _max_diff(exported.state_dict(), run["straight"]["student"]) == 0
    assert json.loads((runs / "export_fsdp" / "sampling.json").read_text())["sampler"]["N"] == 2
    half = run["half"]["student"]  # `python -m tmd_lightning.export DCP_FOLDER` and distill's Stage-1 loader
    out = export_checkpoint(runs / "half_fsdp.ckpt", tmp_path / "from_dcp")
    assert _max_diff(TMDTransformer.from_pretrained(str(out)).state_dict(), half) == 0
    assert _max_diff(load_student(runs / "half_fsdp.ckpt").state_dict(), half) == 0


@pytest.mark.slow
def test_evaluation_split_across_two_ranks_equals_one_process(tmp_path, encoder):
    """`SamplingEvalCallback` under DDP and FSDP2: 9 items (3 prompts x 3 seeds) split 5 / 4 in batches of 2, so both
    ranks run 3 generate calls (rank 1's last one is padding: under FSDP2 both ranks must join every forward); rank 0
    gathers the videos in order and scores them, both ranks return its numbers, equal to one process's."""
    launch_two_ranks([sys.executable, str(WORKER), str(tmp_path), "evaluate_ddp", "evaluate_fsdp"], tmp_path)
    L.seed_everything(W.BASE_SEED, verbose=False)
    stage = W.eval_stage(encoder).eval()
    probe = W.eval_probe()
    single = SimpleNamespace(datamodule=None, loggers=[], callbacks=[], global_step=1, default_root_dir=str(tmp_path))
    with one_thread():
        reference = probe.evaluate(single, stage)
    assert probe.videos.shape[0] == 9
    for strategy in ("ddp", "fsdp"):
        run = _load(tmp_path, f"evaluate_{strategy}")
        assert run["calls"] == [[2, 2, 1], [2, 2, 1]], strategy  # rank 1: 2 + 2 items, then 1 of padding
        assert run["metrics"][0] == run["metrics"][1], strategy  # rank 1 holds rank 0's numbers
        assert (run["videos"].int() - probe.videos.int()).abs().max() <= 1, strategy  # same videos, same order
        metrics = run["metrics"][0]
        assert metrics.keys() == reference.keys()
        for k, v in reference.items():
            if k != "toy/seconds_per_video":
                assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-4), (strategy, k)


@pytest.mark.slow
def test_a_trainable_parameter_outside_every_network_stops_fsdp_at_setup(runs):
    message = _load(runs, "stray_parameter")["message"]
    assert message is not None and "stray_scale" in message and "no FSDP unit" in message


def test_ema_refuses_fsdp_at_setup(encoder):
    from tmd_lightning.callbacks import EMA
    from tmd_lightning.runtime.strategies import FSDP2Strategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDP2Strategy(), logger=False)
    stage = W.make_stage("adapt_head", encoder)
    with pytest.raises(ValueError, match="EMA callback does not support FSDP2Strategy"):
        EMA(target="student").setup(trainer, stage, "fit")
    EMA(target="student", enabled=False).setup(trainer, stage, "fit")  # configured but off: fine


def test_manual_optimisation_needs_ddp_to_find_unused_parameters(encoder):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from tmd_lightning.runtime.parallel import configure_parallel

    stage = W.make_stage("tmd", encoder)
    for strategy, error, match in [(DDPStrategy(), ValueError, "find_unused_parameters=True"),
                                   (DDPStrategy(find_unused_parameters=True, static_graph=True), ValueError,
                                    "static_graph"),
                                   (FSDPStrategy(), TypeError, "trainer=fsdp")]:
        stage._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(error, match=match):
            configure_parallel(stage)
    stage._trainer = SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    configure_parallel(stage, activation_checkpointing=True)
    ignored = stage._ddp_params_and_buffers_to_ignore  # frozen weights are not broadcast by DDP
    assert any(n.startswith("teacher.") for n in ignored) and any(n.startswith("text_encoder.") for n in ignored)
    assert not any(n.startswith(("student.", "fake_score.", "discriminator.")) for n in ignored)
    assert stage.student.wan.gradient_checkpointing and stage.teacher.gradient_checkpointing


@pytest.mark.slow
def test_fit_entry_point_with_trainer_fsdp(tmp_path, encoder):
    """`python -m tmd_lightning.fit experiment=adapt_head trainer=fsdp` on 2 CPU processes through Hydra and
    Lightning's launcher: DCP checkpoints, the end-of-run export and toy evaluation (all ranks sample, rank 0 writes).
    """
    from tmd_lightning.checkpoints import export_checkpoint, load_checkpoint_stage
    from tmd_lightning.models import PixelCodec, TMDTransformer
    from tmd_lightning.sampling import TMDSampler

    command = [sys.executable, "-m", "tmd_lightning.fit", "experiment=adapt_head", "trainer=fsdp",
               "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
               "stage.activation_checkpointing=true", "trainer.max_steps=4", "trainer.val_check_interval=4",
               "trainer.log_every_n_steps=1", "callbacks.toy_eval.every_n_steps=0", "callbacks.toy_eval.seeds=[0]",
               "callbacks.model_checkpoint.every_n_train_steps=2", "data.toy.videos_per_caption=1",
               "data.toy.val_videos_per_caption=1", "data.batch_size=4", "data.val_batch_size=8",
               f"paths.root_dir={tmp_path}"]
    env_port = _free_port()  # Lightning's launcher starts rank 1 itself: only rank 0 is ours
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", MASTER_PORT=str(env_port), OMP_NUM_THREADS="1")
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    latest = tmp_path / "logs" / "adapt_head" / "latest"
    ckpt = latest / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file()  # a distributed checkpoint folder
    assert torch.load(ckpt / "meta.pt", weights_only=False)["global_step"] == 4
    exported = TMDTransformer.from_pretrained(str(latest / "export" / "student"))
    consolidated = TMDTransformer.from_pretrained(str(export_checkpoint(ckpt, tmp_path / "consolidated")))
    assert _max_diff(exported.state_dict(), consolidated.state_dict()) == 0  # last.ckpt is the final state
    stage = load_checkpoint_stage(ckpt, PixelCodec(4), encoder)  # what `sample checkpoint=.../last.ckpt` loads
    assert isinstance(stage.sampler, TMDSampler) and _max_diff(stage.network.state_dict(), exported.state_dict()) == 0
    rows = (latest / "toy_eval.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("4,")  # header + one evaluation, written once (by rank 0)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_trainer_configs_compose_into_the_strategies(tmp_path, name):
    """`trainer=ddp|fsdp` through Hydra: GPU + bf16-mixed by default, all devices of the node, num_nodes settable."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from tmd_lightning.config import CONFIG_DIR, register_resolvers
    from tmd_lightning.runtime.strategies import FSDP2Strategy

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fit", overrides=["experiment=distill", f"trainer={name}", f"paths.root_dir={tmp_path}",
                                        f"paths.output_dir={tmp_path}/out"])
        cpu = compose("fit", overrides=["experiment=distill", f"trainer={name}", "trainer.accelerator=cpu",
                                        "trainer.devices=2", "trainer.num_nodes=3", "trainer.precision=32-true",
                                        f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.devices) == ("gpu", "bf16-mixed", "auto")
    trainer = instantiate(cpu.trainer, logger=False, enable_checkpointing=False)
    assert trainer.num_nodes == 3 and trainer.world_size == 6
    if name == "ddp":
        assert isinstance(trainer.strategy, DDPStrategy)
        assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is True  # distill's manual optimisation
    else:
        assert isinstance(trainer.strategy, FSDP2Strategy) and trainer.strategy._save_distributed_checkpoint
