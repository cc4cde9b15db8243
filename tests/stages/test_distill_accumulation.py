"""Gradient accumulation in the distill stage (`stage.global_batch`): k micro-batches per update equal one batch of
all their samples, in float64 with per-sample noise (tests/stages/per_sample_noise.py), in one process and over two
gloo ranks (DDP and FSDP2), where gradients are reduced once per update."""

from __future__ import annotations

import sys
from pathlib import Path

import distributed_worker as W
import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

UPDATES = W.ACCUMULATE["max_iterations"]


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return W.text_encoder()


def _states(stage: L.LightningModule) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in getattr(stage, n).state_dict().items()} for n in W.NETWORKS["tmd"]}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _fit(kind: str, encoder: torch.nn.Module, root: Path, batch_size: int, global_batch: int | None,
         samples: list[int] | None = None) -> tuple[L.LightningModule, L.Trainer, W.Recorder]:
    L.seed_everything(W.BASE_SEED, verbose=False)
    stage = W.accumulation_stage(kind, encoder, global_batch)
    recorder = W.Recorder()
    trainer = W.trainer(root, callbacks=[recorder], precision="64-true", max_steps=-1)
    trainer.fit(stage, DataLoader(W.Videos(W.ACCUMULATE_SAMPLES, samples), batch_size=batch_size, shuffle=False))
    return stage, trainer, recorder


_ONE_BATCH: dict[str, tuple] = {}


def one_batch(kind: str, encoder: torch.nn.Module, root: Path) -> tuple:
    """4 updates of batch 4 without accumulation (shared by the single-process and 2-rank comparisons)."""
    if kind not in _ONE_BATCH:
        stage, trainer, recorder = _fit(kind, encoder, root, 4, None)
        assert stage.iteration == trainer.global_step == UPDATES
        _ONE_BATCH[kind] = (_states(stage), recorder)
    return _ONE_BATCH[kind]


@pytest.mark.parametrize("kind", ["tmd", "dmd2"])
def test_accumulated_micro_batches_equal_one_large_batch(encoder, tmp_path, kind):
    """k = 2 micro-batches of 2 per update vs batches of 4: the same student, fake score and discriminator after two
    student and two critic updates (SGD with clipping, float64), the same logged losses, updates counted alike."""
    names = W.NETWORKS["tmd"] if kind == "tmd" else ("student", "fake_score", "discriminator")
    L.seed_everything(W.BASE_SEED, verbose=False)
    init = _states(W.accumulation_stage(kind, encoder, None))
    large, large_rec = one_batch(kind, encoder, tmp_path / "large")
    stage, trainer, rec = _fit(kind, encoder, tmp_path / "accum", 2, 4)
    assert stage.iteration == trainer.global_step == UPDATES and stage.micro_step == 0
    assert len(rec.batches) == 2 * UPDATES and sum(rec.batches, []) == sum(large_rec.batches, [])
    accumulated = _states(stage)
    for name in names:
        assert _max_diff(accumulated[name], large[name]) < 1e-10, name
        assert _max_diff(large[name], init[name]) > 1e-3, f"{name} barely moved: the comparison would prove nothing"
    for step in range(UPDATES):  # losses are logged once per update: the mean over its micro-steps
        logged, expected = rec.steps[2 * step + 1], large_rec.steps[step]
        for key in [k for k in expected if "loss" in k]:
            assert logged[key] == pytest.approx(expected[key], rel=1e-6), (step, key)


def test_micro_batches_without_accumulation_differ(encoder, tmp_path):
    """The counter-check: batches of 2 stepped one by one do not reproduce the batch-4 run."""
    large, _ = one_batch("tmd", encoder, tmp_path / "large")
    stage, _, _ = _fit("tmd", encoder, tmp_path / "plain", 2, None)
    assert _max_diff(_states(stage)["student"], large["student"]) > 1e-3


def test_global_batch_must_divide_into_micro_batches(encoder):
    stage = W.make_stage("tmd", encoder, global_batch=6)
    with pytest.raises(ValueError, match="global_batch=6 is not a multiple of world size 1 x batch size 4"):
        stage.accumulation_steps(4)
    assert W.make_stage("tmd", encoder, global_batch=6).accumulation_steps(3) == 2
    assert W.make_stage("tmd", encoder).accumulation_steps(3) == 1
    with pytest.raises(ValueError, match="global_batch must be a positive"):
        W.make_stage("tmd", encoder, global_batch=0)


def test_checkpoint_mid_accumulation_restarts_the_update(encoder, caplog):
    from tmd_lightning.runtime.rng import rng_state

    stage = W.make_stage("tmd", encoder, global_batch=4)
    stage.micro_step = 1
    checkpoint = {"state_dict": {}, "tmd_lightning": {}}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint["distill"]["micro_step"] == 1
    resumed = W.make_stage("tmd", encoder, global_batch=4)
    with caplog.at_level("WARNING"):
        resumed.on_load_checkpoint({"distill": {"iteration": 3, "micro_step": 1, "rng": rng_state()}})
    assert resumed.iteration == 3 and resumed.micro_step == 0 and "restarts from its first micro-step" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_accumulating_equal_one_process_with_the_global_batch(encoder, tmp_path, strategy):
    """Global batch 4 = 2 ranks x micro batch 1 x 2 micro-steps: after 4 updates the weights equal a single process's
    batches of 4 (float64), and gradients are reduced only at the last micro-step of each update."""
    from test_distributed import WORKER, launch_two_ranks

    out = tmp_path / "runs"
    out.mkdir()
    launch_two_ranks([sys.executable, str(WORKER), str(out), f"accumulate_{strategy}"], out)
    run = torch.load(out / f"accumulate_{strategy}.pt", weights_only=False)
    assert run["iteration"] == run["global_step"] == UPDATES
    batches, order = run["batches"], []
    for update in range(UPDATES):  # the distributed sampler's order: update u took these 4 samples
        order += [i for r in (0, 1) for step in (2 * update, 2 * update + 1) for i in batches[r][step]]
    assert sorted(order) == list(range(W.ACCUMULATE_SAMPLES))  # one per rank and micro-step, none twice
    reference, _, _ = _fit("tmd", encoder, tmp_path / "reference", 4, None, samples=order)
    for name in W.NETWORKS["tmd"]:
        assert _max_diff(run["state"][name], _states(reference)[name]) < 1e-10, name
    for rank in (0, 1):
        reductions = run["reductions"][rank]
        assert len(reductions) == 2 * UPDATES
        assert reductions[0::2] == [0] * UPDATES, reductions  # first micro-step: gradients stay local
        assert all(n > 0 for n in reductions[1::2]), reductions  # last micro-step: reduced once
