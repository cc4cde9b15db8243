"""Tiny random toy batches and a loader for the distill-stage tests (shared by the full and LoRA-mode tests)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from tmd_lightning.data.toy_world import all_captions


def _videos(b: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    caps = all_captions()
    return {"video": torch.randint(0, 256, (b, 9, 16, 16, 3), generator=g, dtype=torch.uint8),
            "caption": [caps[(7 * i + seed) % len(caps)] for i in range(b)]}


class _Videos(Dataset):
    def __init__(self, n: int) -> None:
        self.batch = _videos(n)

    def __len__(self) -> int:
        return len(self.batch["caption"])

    def __getitem__(self, i: int) -> dict:
        return {"video": self.batch["video"][i], "caption": self.batch["caption"][i]}


def _loader(n: int = 10, batch_size: int = 2) -> DataLoader:
    return DataLoader(_Videos(n), batch_size=batch_size, shuffle=True)
