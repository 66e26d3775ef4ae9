#!/usr/bin/env bash
# The CUDA paths end to end on one GPU machine, settled in one run (scripts/gpu_check.py's docstring has the table of
# checks): blocks compiled under FSDP2 with no graph break, N processes against one on every step's loss and gradient
# norm, kill-and-resume in one process and on N-1, HSDP at 4 GPUs or more, an --init round trip through a Hugging Face
# folder, the memory plan against the allocator, compiled decoding against eager. At most 5 minutes on one GPU;
# every run killed whole at its deadline. Not run in CI, which has no GPU.
#   bash scripts/gpu_check.sh [--out DIR]     (--cpu --gpus 2: rehearse on a CPU; --inject DEFECT: its check must FAIL)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
