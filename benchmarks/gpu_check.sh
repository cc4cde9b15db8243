#!/usr/bin/env bash
# First-GPU check (benchmarks/gpu_check.py): (a) the 2-process FSDP2 tests on NCCL when 2 GPUs are visible, (b) teacher
# 50 x 2 vs TMD sampling speed at 81 x 480 x 832 on the 1.3B architecture, (c) peak memory of one Stage-1 step and one
# Stage-2 student / critic iteration beside the plan, (d) bf16 vs float32 Stage-1 du/ds. Runs from any directory.
#   bash benchmarks/gpu_check.sh            # CUDA: about 5 minutes on one H200 (budget: 8)
#   bash benchmarks/gpu_check.sh --tiny     # CPU: tiny widths and video (CI, tests/test_gpu_check.py)
# Exit status: 0 when every section passed, else the number of failed sections.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
