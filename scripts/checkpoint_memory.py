"""Each process's peak memory while a sharded run writes its weights for inference, and while it reads its first
weights: what scale/ does now, against the way it did before, measured in one run on the CPU.

  torchrun --nproc_per_node 2 scripts/checkpoint_memory.py [--dim 1024 --n_layers 8]

Peak memory is the process's peak resident set (VmHWM, reset before each phase through /proc/self/clear_refs),
above what it held before the phase. "Before" re-enacts what scale/ did until it changed, for the comparison:
writing, every parameter gathered whole in float32 on every process and a bfloat16 copy of all of them kept by
rank 0 until safetensors writes them; reading (Meta's layout, two model-parallel shards, as 13B comes), every
process merging each whole tensor before cutting its shard.
"""
import argparse
import ctypes
import gc
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from load_llama import META_SPLIT_DIM, copy_weights, iter_state_dict  # noqa: E402
from model import ModelArgs, Transformer, fresh_weights  # noqa: E402
from scale import checkpoint  # noqa: E402
from scale.fsdp import Sharded, put  # noqa: E402


def peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def measured(phase):
    """phase() run with the peak resident set reset first: its peak above the start, MiB. What earlier phases freed
    is handed back to the system first (malloc_trim), so that no phase grows into memory another left."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = peak_kib()
    phase()
    gc.collect()
    return (peak_kib() - start) / 1024


@torch.no_grad()
def save_before(folder: str, model, master: bool, dtype):
    full = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        if master:
            full[name] = t.detach().to("cpu", dtype)
    if master:
        save_file(full, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def write_meta(folder: str, args: ModelArgs, state: dict):
    shards = [{}, {}]
    for name, t in state.items():
        dim = META_SPLIT_DIM.get(name.split(".")[-2])
        for shard, part in zip(shards, t.chunk(2, dim) if dim is not None else [t, t]):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f"consolidated.0{i}.pth"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n_layers", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32000)
    a = p.parse_args()
    if "RANK" not in os.environ:
        sys.exit("run it under torchrun: torchrun --nproc_per_node 2 scripts/checkpoint_memory.py")
    run = Sharded(False, torch.bfloat16)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.dim // 64, vocab_size=a.vocab_size, max_seq_len=256)
    model = run.build(lambda: Transformer(args))
    params = dict(model.named_parameters())
    for name, value in fresh_weights(model, 0):
        put(params[name], value)
    n = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        folder = run.decide(lambda: tmp)  # rank 0's folder, on this one machine every process's
        after = measured(lambda: checkpoint.save_full_weights(folder, model, run.master, torch.bfloat16))
        before = measured(lambda: save_before(folder, model, run.master, torch.bfloat16))
        run.barrier()
        if run.master:  # the same weights in Meta's layout, cut in two model-parallel shards as 13B's are
            write_meta(folder, model.args, load_file(os.path.join(folder, "model.safetensors")))
        run.barrier()
        read_now = measured(lambda: copy_weights(model, iter_state_dict(folder, args, "meta"), folder, put))
        read_before = measured(lambda: copy_weights(model, ((name, t.rows()) for name, t in iter_state_dict(
            folder, args, "meta")), folder, put))
        run.barrier()
    rows = torch.tensor([before, after, read_before, read_now], dtype=torch.float64)
    every = [torch.zeros_like(rows) for _ in range(run.world)]
    dist.all_gather(every, rows, group=run.io)
    if run.master:
        print(f"{n / 1e6:.0f}M parameters ({n * 4 / 2**20:.0f} MiB in float32, {n * 2 / 2**20:.0f} MiB in bfloat16), "
              f"{run.world} processes; peak resident memory above the start of each phase, MiB")
        print(f"{'process':>8}{'writing, before':>18}{'writing, now':>15}{'reading, before':>18}{'reading, now':>15}")
        for rank, r in enumerate(every):
            print(f"{rank:>8}{r[0]:>18.0f}{r[1]:>15.0f}{r[2]:>18.0f}{r[3]:>15.0f}")
    run.close()


if __name__ == "__main__":
    main()
