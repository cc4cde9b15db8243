"""One rank of the 2-process (gloo, CPU) FSDP2 checks behind tests/stages/test_meta_init.py.

`python tests/stages/meta_init_worker.py OUT` with LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (and
TMD_DIST_DEVICE=cuda for NCCL on 2 GPUs, as benchmarks/gpu_check.sh runs it). Rank 0
writes a tiny Wan folder; both ranks then load a teacher (`load_transformer`) and a TMD student (`build_student`)
under `models.rank0.rank0_weights()`, so rank 1 builds them on the meta device, and `runtime.parallel.shard_stage`
shards them with FSDP2's bf16 `MixedPrecisionPolicy` and fills rank 1's shards from rank 0. Rank 0 saves what the
test compares to OUT/meta_init.pt: rank 0's loaded weights, the gathered sharded weights, what rank 1 held before
sharding, the dtypes the blocks' Linear layers saw in a forward and the gradients' dtypes.
Nothing is asserted here (the test does it).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import WanTransformer3DModel
from torch import nn

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=3)


class Holder(nn.Module):
    """A stand-in stage: a frozen teacher and a trainable student, the last student block kept float32 (as Stage 1's
    `full_precision_modules` asks)."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.student = student

    def full_precision_modules(self) -> list[nn.Module]:
        return [self.student.wan.blocks[-1]]


def main(out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from tmd_lightning.models import build_student, load_transformer
    from tmd_lightning.models.precision import cast_model
    from tmd_lightning.models.rank0 import rank0_weights
    from tmd_lightning.runtime.parallel import is_meta, shard_stage

    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    device = torch.device(os.environ.get("TMD_DIST_DEVICE", "cpu"))  # cuda: NCCL (benchmarks/gpu_check.sh)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=2)
    folder = out / "tiny_wan"
    if rank == 0:
        torch.manual_seed(0)
        WanTransformer3DModel(**TINY).save_pretrained(str(folder / "transformer"))
    dist.barrier()
    torch.manual_seed(100 + rank)  # different on each rank: the student's new head parts must come from rank 0
    with rank0_weights():
        teacher = cast_model(load_transformer(str(folder)), torch.bfloat16)  # the teacher as DistillStage.setup
        student = build_student(teacher=str(folder), head_blocks=1)
    holder = Holder(teacher, student)
    record: dict = {"meta_before": is_meta(teacher) and is_meta(student),
                    "bytes_before": sum(t.nbytes for t in [*holder.parameters(), *holder.buffers()] if not t.is_meta)}
    if rank == 0:
        record["loaded"] = {n: {k: v.detach().clone() for k, v in getattr(holder, n).state_dict().items()}
                            for n in ("teacher", "student")}
        record["buffers"] = {k: v.clone() for k, v in student.named_buffers()}
    mesh = init_device_mesh(device.type, (2,))
    record["units"] = shard_stage(holder, mesh, torch.bfloat16)
    record["meta_after"] = is_meta(holder)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in student.parameters()]
    record["local_numel"], record["full_numel"] = sum(t.numel() for t in local), sum(p.numel() for p in
                                                                                        student.parameters())
    record["sharded_dtypes"] = sorted({str(p.dtype) for p in student.parameters()})
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    gathered = {n: get_model_state_dict(getattr(holder, n), options=options) for n in ("teacher", "student")}
    buffers = {k: v.detach().cpu().clone() for k, v in student.named_buffers()}
    record["buffer_sums"] = {k: float(v.double().sum()) for k, v in buffers.items()}
    # a forward and backward under CPU bf16 autocast: which dtype each student block's weights arrive in
    seen: dict[str, str] = {}
    for i, block in enumerate(student.wan.blocks):
        def hook(module: nn.Module, args: tuple, name: str = f"block{i}") -> None:
            seen.setdefault(name, str(module.weight.dtype))

        block.attn1.to_q.register_forward_pre_hook(hook)
    torch.manual_seed(1)
    x, t, text = (v.to(device) for v in (torch.randn(2, 16, 1, 4, 4), torch.rand(2), torch.randn(2, 4, 32)))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = student(x, t, text).float().square().mean()
    loss.backward()
    record["grad_dtypes"] = sorted({str(p.grad.dtype) for p in student.parameters() if p.grad is not None})
    record["grads_finite"] = all(torch.isfinite(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                                 .all().item() for p in student.parameters() if p.grad is not None)
    record["seen"] = seen
    records = [None, None]
    dist.all_gather_object(records, {k: v for k, v in record.items() if k not in ("loaded", "buffers")})
    if rank == 0:
        torch.save({"rank0": record, "ranks": records, "gathered": gathered, "buffers_after": buffers},
                   out / "meta_init.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]))
        # the work is done and both ranks have left the group: skip interpreter teardown, where a gloo thread still
        # being destroyed has aborted rank 1 ("terminate called without an active exception", exit -6) under load
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
