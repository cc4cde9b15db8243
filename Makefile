# `make demo` and `make test` create .venv and install the project unless a virtualenv is already active.
# torch is installed first and pinned to the CPU build that satisfies the project's range (TORCH_SPEC), so pip
# never pulls a multi-GB CUDA build as a side effect; on a GPU machine, install your torch first.
SHELL := /bin/bash
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := $(VENV)/bin/python
endif

.PHONY: install demo baseline baseline-1step teacher-demo test lint bench teacher clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

# Main job on the embedded toy world: sample the shipped toy teacher (48 prompts x 4 seeds, 50 steps, CFG 5)
# and print its toy accuracy. Later stages extend this to adapt_head -> distill -> evaluate.
# The main job on the toy (about 35 minutes on 2 CPU cores): Stage 1 from the shipped teacher, Stage 2, then the
# quality-vs-cost table and Pareto plot of teacher, Stage 1, TMD (and DMD2-v if `make baseline` ran).
demo: install
	$(PYTHON) -m tmd_lightning.fit experiment=adapt_head
	$(PYTHON) -m tmd_lightning.fit experiment=distill
	$(PYTHON) -m tmd_lightning.evaluate

# The DMD2-v baseline on the toy (about 18 minutes), for the demo's table.
baseline: install
	$(PYTHON) -m tmd_lightning.fit experiment=distill_dmd2

# The one-step DMD2-v baseline as the paper trains it: teacher noise -> sample pairs, the KD warm-up, then DMD2-v
# from the warm-up's export (stage.M=1 finds it through logs/kd_warmup/latest).
baseline-1step: install
	$(PYTHON) -m tmd_lightning.kd_pairs
	$(PYTHON) -m tmd_lightning.fit experiment=kd_warmup
	$(PYTHON) -m tmd_lightning.fit experiment=distill_dmd2 stage.M=1

# Sample the shipped toy teacher only (2.5 minutes).
teacher-demo: install
	$(PYTHON) -m tmd_lightning.sample task_name=teacher_demo

test: install
	$(PYTHON) -m pytest -q tests

lint: install
	$(PYTHON) -m ruff check tmd_lightning tests benchmarks

bench: install
	$(PYTHON) benchmarks/foundation.py

# Reproduces the shipped toy teacher (about 1.5 h on 2 CPU cores); see README.
teacher: install
	$(PYTHON) -m tmd_lightning.fit experiment=teacher

clean:
	rm -rf logs outputs .pytest_cache
