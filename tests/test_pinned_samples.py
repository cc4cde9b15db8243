"""A checkpoint generates what it generated when it was pinned: a tiny teacher, a Stage-1 checkpoint and a DMD2-v
export, each with its default sampler and one other setting, must give bit-identical latents
(`tests/fixtures/make_pinned.py` wrote them and says when to rewrite them)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
from make_pinned import OUT, machine, sample_case  # noqa: E402

PINNED = torch.load(OUT / "expected.pt")
EXPECTED = PINNED["latents"]
# bit-identical where the pin was made (same torch build, CPU kernels and thread count); elsewhere float32 kernels
# may sum in another order, so only rounding-level differences are allowed
SAME_MACHINE = PINNED["machine"] == machine()


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_a_pinned_checkpoint_samples_bit_identical_latents(key: str) -> None:
    name, opts = key.split("|")
    latents = sample_case(OUT / name, dict(ast.literal_eval(opts)))
    assert latents.dtype == EXPECTED[key].dtype and latents.shape == EXPECTED[key].shape
    diff = f"{key}: max |diff| {(latents - EXPECTED[key]).abs().max():.3g} (pinned on {PINNED['machine']})"
    if SAME_MACHINE:
        assert torch.equal(latents, EXPECTED[key]), diff
    else:
        torch.testing.assert_close(latents, EXPECTED[key], rtol=1e-5, atol=1e-5, msg=diff)


def test_the_pinned_cases_cover_every_kind_of_network() -> None:
    assert {key.split("|")[0] for key in EXPECTED} == {"teacher", "stage1.ckpt", "dmd2v"}
    assert len({key for key in EXPECTED}) == 6 and all(torch.isfinite(v).all() for v in EXPECTED.values())
