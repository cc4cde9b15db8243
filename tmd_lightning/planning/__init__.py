"""The memory plan: what every stage of a run costs per GPU, before any weight is downloaded.

The library behind `python -m tmd_lightning.plan` (docs/plan.md), the setup guard's memory check
(`guards.check_memory`) and the "plan" column of `benchmarks/scale.py`. One concept per module, in the order a plan
is built:

- `networks`: every network of a run on the meta device (shapes, no memory, no weights);
- `counts`: their parameter counts (whole, Linear, LoRA adapters, largest Wan block);
- `shapes`: the latent and token grid and the widths activations scale with;
- `run_setup`: strategy, world size and precision read from the trainer config;
- `activations`: the bytes autograd keeps per network call and per training iteration;
- `iterations`: the (stage, mode) columns and the calls each iteration of a stage runs;
- `memory`: per-GPU weights, gradients, AdamW states, strategy buffers, autocast copies and totals of a column;
- `planner`: the whole plan of a config and its verdict per GPU size;
- `tables`: the plan as Markdown;
- `measure`: `TensorBytes`, the CPU stand-in for `torch.cuda.max_memory_allocated` the tests check the plan with;
- `units`: GiB and bytes per dtype.
"""

from tmd_lightning.planning.activations import (
    BLOCK_SAVES,
    BlockSaves,
    Call,
    Iteration,
    block_bytes,
    call_bytes,
    call_constant_bytes,
    discriminator_bytes,
    extras_bytes,
    iteration_bytes,
    working_set_bytes,
)
from tmd_lightning.planning.counts import Counts, count, count_all, linear_params, lora_linears, numel
from tmd_lightning.planning.iterations import COLUMNS, MODES, iterations
from tmd_lightning.planning.measure import TensorBytes
from tmd_lightning.planning.memory import (
    Member,
    full_precision_head,
    iteration_totals,
    members,
    mixed_policy,
    stage_memory,
    static_rows,
    strategy_buffers,
    weight_copies,
)
from tmd_lightning.planning.networks import build_codec, build_networks, build_text_encoder, wan_architecture
from tmd_lightning.planning.planner import columns, plan, verdicts
from tmd_lightning.planning.run_setup import (
    STRATEGIES,
    Precision,
    Setup,
    make_setup,
    parse_precision,
    strategy_name,
    world_size,
)
from tmd_lightning.planning.shapes import Sizes, sizes
from tmd_lightning.planning.tables import gib, memory_table, params_table, report, summary_lines, verdict_table
from tmd_lightning.planning.units import DTYPE_BYTES, GIB, dtype_bytes

__all__ = [
    "BLOCK_SAVES", "COLUMNS", "DTYPE_BYTES", "GIB", "MODES", "STRATEGIES", "BlockSaves", "Call", "Counts", "Iteration",
    "Member", "Precision", "Setup", "Sizes", "TensorBytes", "block_bytes", "build_codec", "build_networks",
    "build_text_encoder", "call_bytes", "call_constant_bytes", "columns", "count", "count_all", "discriminator_bytes",
    "dtype_bytes", "extras_bytes", "full_precision_head", "gib", "iteration_bytes", "iteration_totals", "iterations",
    "linear_params", "lora_linears", "make_setup", "members", "memory_table", "mixed_policy", "numel",
    "params_table", "parse_precision", "plan", "report", "sizes", "stage_memory", "static_rows", "strategy_buffers",
    "strategy_name", "summary_lines", "verdict_table", "verdicts", "wan_architecture", "weight_copies",
    "working_set_bytes", "world_size",
]
