#!/usr/bin/env bash
# The CUDA paths end to end on a GPU machine, checked (scripts/gpu_check.py says which): NCCL FSDP2 in bfloat16 with
# activation checkpointing and compile, a kill and a resume on another number of GPUs, the memory plan against the
# measured peak, compiled decoding against eager. Not run in CI, which has no GPU.
#   bash scripts/gpu_check.sh [--out DIR]          (--cpu --gpus 2: rehearse the same checks on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
