"""Noise that belongs to a sample, not to a batch: what makes k accumulated micro-batches comparable, bit for bit,
with one batch of all their samples (tests/stages/test_distill_accumulation.py and the 2-rank accumulation runs).

`PerSampleNoise(stage)` wraps the stage's `training_step`: while it runs, `torch.randn_like`, `torch.rand` and
`torch.randint` draw each row from its own generator, seeded by (seed, the stage's iteration, the draw's position in
the step, the row's sample index `batch["index"]`). A micro-step of an update makes the same sequence of draws as the
whole batch does, so every sample receives the same ε, t, inner noise and critic noise either way, whichever rank or
micro-step it lands on.
"""

from __future__ import annotations

from typing import Any

import torch

_RANDN, _RAND, _RANDINT = torch.randn, torch.rand, torch.randint  # the real draws (the patched names are swapped)


class PerSampleNoise:
    def __init__(self, stage: Any, seed: int = 0) -> None:
        self.stage, self.seed = stage, seed
        self.ids: list[int] = []
        self.draws = 0
        original = stage.training_step

        def training_step(batch: dict, batch_idx: int) -> Any:
            self.ids, self.draws = [int(i) for i in batch["index"]], 0
            saved = torch.randn_like, torch.rand, torch.randint
            torch.randn_like, torch.rand, torch.randint = self.randn_like, self.rand, self.randint
            try:
                return original(batch, batch_idx)
            finally:
                torch.randn_like, torch.rand, torch.randint = saved

        stage.training_step = training_step

    def _rows(self, shape: tuple[int, ...], draw: Any) -> torch.Tensor:
        if not shape or shape[0] != len(self.ids):
            raise AssertionError(f"a draw of shape {shape} in a batch of {len(self.ids)} samples")
        self.draws += 1
        rows = []
        for i in self.ids:
            g = torch.Generator().manual_seed(((self.seed * 100_003 + self.stage.iteration) * 1_009 + self.draws)
                                              * 1_000_003 + i)
            rows.append(draw(tuple(shape[1:]), g))
        return torch.stack(rows)

    def randn_like(self, t: torch.Tensor, *, dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
        dtype = dtype or t.dtype
        return self._rows(tuple(t.shape), lambda s, g: _RANDN(s, generator=g, dtype=torch.float64)) \
            .to(t.device, dtype)

    def rand(self, *size: Any, dtype: torch.dtype | None = None, device: Any = None, **_: Any) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return self._rows(shape, lambda s, g: _RAND(s, generator=g, dtype=torch.float64)) \
            .to(device, dtype or torch.get_default_dtype())

    def randint(self, low: int, high: int, size: tuple[int, ...], *, device: Any = None,
                dtype: torch.dtype | None = None, **_: Any) -> torch.Tensor:
        return self._rows(tuple(size), lambda s, g: _RANDINT(low, high, s, generator=g)) \
            .to(device, dtype or torch.int64)
