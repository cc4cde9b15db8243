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

.PHONY: help install smoke demo baseline baseline-1step teacher-demo test lint bench teacher clean

.DEFAULT_GOAL := help

$(VENV)/bin/python:
	python3 -m venv $(VENV)

help:  ## List the targets with a one-line description each
	@grep -E '^[A-Za-z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([A-Za-z0-9_-]+):.*## (.*)$$/\1\t\2/' | \
		awk -F '\t' '{printf "  %-16s %s\n", $$1, $$2}'

install: $(if $(VIRTUAL_ENV),,$(VENV)/bin/python)  ## Install the project + dev extra (in .venv unless a venv is active)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q -e ".[dev]"

# One batch through each stage (`debug=fdr`: no checkpoint, no export, no evaluation, `latest` untouched) on a small
# toy set of its own (data/toy_smoke, 48 + 48 videos); Stage 2 distils a student built from the teacher, since a
# smoke test of Stage 1 writes no checkpoint. Measured: see README (quick start).
SMOKE := debug=fdr 'data.toy.root=$${paths.data_dir}/toy_smoke' data.toy.videos_per_caption=1 \
	data.toy.val_videos_per_caption=1
smoke: install  ## One batch through teacher, adapt_head and distill (debug=fdr; under 3 min on 2 CPU cores)
	$(PYTHON) -m tmd_lightning.fit experiment=teacher $(SMOKE)
	$(PYTHON) -m tmd_lightning.fit experiment=adapt_head $(SMOKE)
	$(PYTHON) -m tmd_lightning.fit experiment=distill stage/student=from_teacher $(SMOKE)

# The main job on the toy (40-60 minutes on 2 idle CPU cores): Stage 1 from the shipped teacher, Stage 2, then the
# quality-vs-cost table and Pareto plot of teacher, Stage 1, TMD (and DMD2-v if `make baseline` ran).
demo: install  ## The toy pipeline: adapt_head -> distill -> evaluate (40-60 min on 2 CPU cores)
	$(PYTHON) -m tmd_lightning.fit experiment=adapt_head
	$(PYTHON) -m tmd_lightning.fit experiment=distill
	$(PYTHON) -m tmd_lightning.evaluate

# The DMD2-v baseline on the toy (about 18 minutes), for the demo's table.
baseline: install  ## Train the DMD2-v baseline on the toy (about 18 min)
	$(PYTHON) -m tmd_lightning.fit experiment=distill_dmd2

# The one-step DMD2-v baseline as the paper trains it: teacher noise -> sample pairs, the KD warm-up, then DMD2-v
# from the warm-up's export (stage.M=1 finds it through logs/kd_warmup/latest).
baseline-1step: install  ## The one-step DMD2-v: KD pairs, KD warm-up, then DMD2-v with M=1
	$(PYTHON) -m tmd_lightning.kd_pairs
	$(PYTHON) -m tmd_lightning.fit experiment=kd_warmup
	$(PYTHON) -m tmd_lightning.fit experiment=distill_dmd2 stage.M=1

# Sample the shipped toy teacher only (about 3 minutes).
teacher-demo: install  ## Sample the shipped toy teacher and print its toy accuracy (about 3 min)
	$(PYTHON) -m tmd_lightning.sample task_name=teacher_demo

test: install  ## Run the test suite (CPU)
	$(PYTHON) -m pytest -q tests

lint: install  ## ruff check (configured in pyproject.toml)
	$(PYTHON) -m ruff check tmd_lightning tests benchmarks

bench: install  ## Print the foundation benchmark table (toy, CPU)
	$(PYTHON) benchmarks/foundation.py

# The shipped toy teacher's recipe (width 256, K = 2 codec, shape-weighted loss): 7,000 steps at about 0.7 s per
# step on 2 idle CPU cores, so about 1.4 h (the shipped weights came from this recipe in phases: README, "The shipped
# toy teacher").
teacher: install  ## Train the toy teacher from scratch (about 1.5 h on 2 CPU cores)
	$(PYTHON) -m tmd_lightning.fit experiment=teacher

clean:  ## Remove logs/, outputs/ and .pytest_cache/
	rm -rf logs outputs .pytest_cache
