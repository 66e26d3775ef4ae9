#!/usr/bin/env bash
# The CUDA paths end to end on one GPU machine, in a few minutes (not run in CI, which has no GPU):
#   1. the memory plan (--estimate) against the peak measured on the GPUs (--measure_memory);
#   2. FSDP2 over NCCL with bfloat16 compute, activation checkpointing and compile, a checkpoint every 20 steps;
#   3. the same run killed with SIGKILL after its first checkpoint and resumed (on half the GPUs with twice the
#      micro-batches when there are several), against the uninterrupted run;
#   4. tokens/s and peak memory from the log, and sampling from the trained checkpoint at two depths.
# Usage: bash scripts/gpu_check.sh [OUT]     (OUT defaults to /tmp/gpu_check; it is emptied first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
NGPU=$(python -c "import torch; print(min(torch.cuda.device_count(), 8))")
if [ "$NGPU" -lt 1 ]; then echo "error: no CUDA device is visible" >&2; exit 1; fi
rm -rf "$OUT" && mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
                               torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())"

# a 0.8B-parameter LLaMA (16 layers of dim 2048) on the built-in tasks, as a fine-tuning run would be set up
FLAGS=(--model 7B --dim 2048 --n_layers 16 --n_heads 16 --n_kv_heads 4 --max_seq_len 256 --dtype bfloat16
       --activation_checkpointing --compile --lr 3e-4 --warmup 10 --max_steps 60 --eval_interval 20
       --save_interval 20 --num_examples 20000 --seed 1)
BATCH=(--batch_size 16 --grad_accum 1)
run() { torchrun --standalone --nproc_per_node "$1" sorted_train.py "${FLAGS[@]}" "${@:2}"; }

echo "=== 1. memory: simulated for $NGPU GPUs, then measured on them (batch 16 x 256 tokens, all targets)"
python sorted_train.py --estimate --nproc "$NGPU" "${FLAGS[@]}" "${BATCH[@]}" --vocab_size 512 | grep -v "^largest"
run "$NGPU" --measure_memory "${BATCH[@]}" --vocab_size 512

echo "=== 2. training on $NGPU GPUs: NCCL, bfloat16, activation checkpointing, compile"
start=$(date +%s)
run "$NGPU" "${BATCH[@]}" --out "$OUT/full"
echo "uninterrupted run: $(( $(date +%s) - start )) s"

echo "=== 3. the same run, killed after its first checkpoint and resumed"
setsid torchrun --standalone --nproc_per_node "$NGPU" sorted_train.py "${FLAGS[@]}" "${BATCH[@]}" \
    --out "$OUT/cut" > "$OUT/cut.log" 2>&1 &
pid=$!
until [ -e "$OUT/cut/latest" ] || ! kill -0 "$pid" 2> /dev/null; do sleep 1; done
# torchrun starts each worker in a session of its own: kill them, then the launcher
pkill -9 -P "$pid" 2> /dev/null || true
kill -9 "$pid" 2> /dev/null || true
wait "$pid" 2> /dev/null || true
echo "killed at $(readlink "$OUT/cut/latest")"
if [ "$NGPU" -ge 2 ]; then  # the training state is resharded for another number of processes
    run $((NGPU / 2)) --batch_size 16 --grad_accum 2 --out "$OUT/cut" --resume
else
    run 1 "${BATCH[@]}" --out "$OUT/cut" --resume
fi

echo "=== 4. results"
python - "$OUT" <<'PY'
import json, statistics, sys
from safetensors.torch import load_file
out = sys.argv[1]
a, b = load_file(f"{out}/full/latest/model.safetensors"), load_file(f"{out}/cut/latest/model.safetensors")
diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
scale = max(a[k].float().abs().max().item() for k in a)
print(f"resumed vs uninterrupted: max weight difference {diff:.3g} (largest weight {scale:.3g})")
log = [json.loads(l) for l in open(f"{out}/full/log.jsonl")]
steps = [l for l in log if "tokens_per_sec" in l][5:]  # past compilation
tokens_per_s = statistics.median(l["tokens_per_sec"] for l in steps)
print(f"tokens/s, all GPUs together (median of steps 6-60): {tokens_per_s:.0f}")
print(f"peak memory (CUDA allocator, rank 0): {max(l['peak_mem_gb'] for l in steps):.2f} GiB")
print("final losses per exit:", log[-1].get("val_loss"))
PY
python generate.py --ckpt "$OUT/full" --compare 8,16 --max_new_tokens 20
