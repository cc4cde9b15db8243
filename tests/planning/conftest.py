"""Shared fixtures of the memory-plan tests: the toy plan and the real toy networks it is checked against."""

from __future__ import annotations

import pytest
import torch
from plan_configs import plan_cfg

from tmd_lightning import planning as P
from tmd_lightning.models import TOY_MODEL_DIR, build_student, load_transformer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The toy's tiny ops run fastest on one thread (and do not spin against a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_nets():
    """The shipped toy teacher and a Stage-1 student built from it (copied by tests that change them)."""
    return load_transformer(pretrained=TOY_MODEL_DIR), build_student(teacher=str(TOY_MODEL_DIR), head_blocks=1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy plan (32-true on one device, as the toy trains on CPU; narrow discriminator heads keep the real
    optimizer step of the AdamW test fast) and its sizes and counts."""
    cfg = plan_cfg(tmp_path_factory.mktemp("plan"), "model=toy", "trainer.precision=32-true",
                   "discriminator_hidden_dim=16")
    networks = P.build_networks(cfg)
    return cfg, P.sizes(cfg, networks["codec"], P.wan_architecture(cfg.model)), P.count_all(networks, cfg.lora)
