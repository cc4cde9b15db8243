"""`planning.TensorBytes`: live and peak bytes of the storages operators create, views excluded."""

from __future__ import annotations

import torch

from tmd_lightning import planning as P


def test_tensor_bytes_tracks_live_and_peak() -> None:
    with P.TensorBytes() as tracker:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2
        del a
        view = b[:10]  # a view: no new storage
    assert tracker.live == 4000 and tracker.peak == 8000 and view.shape == (10,)
