"""Sampling fixed prompts x seeds (`tmd_lightning.evaluation.generate`): how samplers are named in the tables."""

from __future__ import annotations

from tmd_lightning.evaluation import sampler_label


def test_sampler_labels():
    assert sampler_label({"steps": 50, "cfg": 5.0}) == "Euler 50 x CFG 5"
    assert sampler_label({"steps": 2, "cfg": 1.0}) == "Euler 2, no CFG"
    assert sampler_label({"M": 2, "N": 4}) == "TMD M=2 N=4"
    assert sampler_label({"M": 3}) == "few-step M=3"
