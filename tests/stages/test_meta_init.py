"""FSDP2 memory on CPU with two gloo processes (tests/stages/meta_init_worker.py): meta-device initialisation with
rank-0 loading and broadcast, and the bf16 `MixedPrecisionPolicy` of trainable networks (runtime/parallel.py).

- Rank 1 builds the teacher and the TMD student on the meta device (`models.rank0.rank0_weights`): it holds no
  weight byte before sharding, only its shards after, and the gathered sharded weights equal, bit for bit, what
  rank 0 loaded from the folder (the bf16 teacher with its float32 norms, the student including its freshly
  initialised head parts, which differ per rank's seed and so must come from rank 0) and the rope buffers too.
- The student's sharded master weights and gradients stay float32 while its blocks' Linear layers see bf16 weights
  in the forward, except the block listed in `full_precision_modules` (float32, as Stage 1's FD head passes need).

What CPU/gloo cannot show: NCCL's broadcast of CPU-held rank-0 tensors (torch moves them to the GPU) and the
memory the bf16 gathers save on a GPU; benchmarks/gpu_check.sh runs these tests on NCCL where 2 GPUs exist.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_distributed import launch_two_ranks

WORKER = Path(__file__).with_name("meta_init_worker.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("meta_init")
    launch_two_ranks([sys.executable, str(WORKER), str(out)], out, timeout=240)
    return torch.load(out / "meta_init.pt", weights_only=False)


def test_rank1_builds_on_meta_and_receives_rank0_weights(result: dict) -> None:
    rank0, rank1 = result["ranks"]
    assert not rank0["meta_before"] and rank0["bytes_before"] > 0
    assert rank1["meta_before"] and rank1["bytes_before"] == 0  # no weight byte before sharding
    assert not rank1["meta_after"]
    for r in (rank0, rank1):  # each rank holds about half of the student after sharding
        assert r["local_numel"] < 0.55 * r["full_numel"]
    loaded, gathered = result["rank0"]["loaded"], result["gathered"]
    for name in ("teacher", "student"):
        assert loaded[name].keys() == gathered[name].keys()
        for key, value in loaded[name].items():
            assert gathered[name][key].dtype == value.dtype, key
            assert torch.equal(gathered[name][key], value), key
    assert {str(v.dtype) for v in gathered["teacher"].values()} == {"torch.bfloat16", "torch.float32"}
    assert rank0["buffer_sums"] == rank1["buffer_sums"]  # rope tables broadcast
    assert all(torch.equal(result["rank0"]["buffers"][k], v) for k, v in result["buffers_after"].items())


def test_bf16_gathers_with_float32_master_weights_and_gradients(result: dict) -> None:
    for r in result["ranks"]:
        assert r["sharded_dtypes"] == ["torch.float32"] and r["grad_dtypes"] == ["torch.float32"]
        assert r["grads_finite"]
        assert r["seen"] == {"block0": "torch.bfloat16", "block1": "torch.bfloat16", "block2": "torch.float32"}
    assert "student" in result["ranks"][0]["units"] and "teacher" not in result["ranks"][0]["units"]
