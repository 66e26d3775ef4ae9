"""The memory plan: one training step of a torchrun run, simulated for N GPUs on this machine, or measured.

sorted_train.py --estimate runs the trainer's own model building, sharding and training step on fake tensors,
which have shapes but no data, in a fake process group of N ranks, so that a step of 70B runs on a CPU; torch's
FSDPMemTracker reads each rank's peak by kind. --measure_memory, under torchrun, takes the same step for real and
prints the allocator's peak beside the tracker's.
"""
import contextlib
import json
import os
import sys
import tempfile

import torch
import torch.nn as nn

from flags import FlagError
from scale.fsdp import Sharded

MEMORY_KINDS = {  # FSDPMemTracker's categories, grouped
    "parameters": ("Sharded Param", "Unsharded Param", "Buffer"),
    "gradients": ("Sharded Grad", "Unsharded Grad"),
    "optimizer state": ("OptState",),
    "activations": ("Activation", "Temp", "Inputs"),
    "communication buffers": ("All Gather", "Reduce Scatter"),
}


class PeakMemory:
    """`with PeakMemory(root, opt) as m:` one training step, then m.peak: this rank's bytes at the step's peak, by
    kind, as torch's FSDPMemTracker sees the tensors live (parameters, gradients, AdamW state, inputs, the rest)."""

    def __init__(self, root, opt):
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        self.tracker, self.peak = FSDPMemTracker(mod=root, optm=opt), {}

    def __enter__(self):
        self.tracker.__enter__()
        return self

    def again(self):
        """Call before each further forward of the same modules (gradient accumulation): the tracker's per-module
        records expect one forward each, the step's peak is kept."""
        self.tracker.reset_mod_stats()

    def __exit__(self, *exc):
        self.tracker.__exit__(*exc)
        by_category = {}
        for snapshot in self.tracker.get_tracker_snapshot("peak").values():  # one device
            for k, v in snapshot.items():
                key = getattr(k, "value", k)
                by_category[key] = by_category.get(key, 0) + v
        self.peak = {kind: sum(by_category.get(c, 0) for c in cats) for kind, cats in MEMORY_KINDS.items()}
        self.peak["total"] = by_category["Total"]


class AllocatorPeak:
    """`with AllocatorPeak(device) as m:` ... then m.peak: the most bytes the allocator had handed out at once.

    CUDA keeps that count itself; the CPU allocator does not, so there the profiler records every allocation and
    free, and their running sum gives it.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.reserved = device, 0, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base, self.base_reserved = torch.cuda.memory_allocated(self.device), \
                torch.cuda.memory_reserved(self.device)
        else:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":  # and what the allocator held: handed out, cached, lost to fragmentation
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            self.reserved = torch.cuda.max_memory_reserved(self.device) - self.base_reserved
            return
        self.profiler.__exit__(*exc)
        with tempfile.TemporaryDirectory() as tmp:
            self.profiler.export_chrome_trace(os.path.join(tmp, "trace.json"))
            with open(os.path.join(tmp, "trace.json")) as f:
                events = json.load(f)["traceEvents"]
        running = 0
        for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
            running += e["args"]["Bytes"]
            self.peak = max(self.peak, running)


def largest_batch(fits, start: int, start_fits: bool, most: int = 1024) -> tuple[int, bool]:
    """(the largest batch size b <= most with fits(b), whether it is `most`), by doubling and then bisecting:
    a batch that does not fit has no larger one that fits. (0, False) if none fits."""
    lo, hi = (start, None) if start_fits else (0, start)  # fits(lo) holds (0: trivially), fits(hi) does not
    while hi is None:
        if 2 * lo > most:
            return lo, True
        if fits(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, lo == most


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2**20:.1f} MiB"


def plan(build, run: Sharded, simulate: bool, grad_clip: float, batch_size: int, seq_len: int, grad_accum: int,
         gpu_memory: float, search: bool = True) -> dict:
    """Each process's peak memory in one training step of sorted_train.py, by kind; printed, and returned in bytes.

    build() makes the model, its loss, AdamW and the exits as the trainer does, in run. simulate: run is rank 0 of a
    fake process group, and everything happens on fake tensors. Otherwise this run's own processes (under torchrun)
    take the step for real, and the allocator's peak is printed beside the tracker's. The batch is the worst case:
    every row seq_len tokens, every token a target. With `search`, a simulation also finds the largest batch size
    that fits gpu_memory (GB, 10^9 bytes, as GPU vendors count: an "80 GB" card holds about 79.2 GiB).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    tensors = FakeTensorMode() if simulate else contextlib.nullcontext()
    with tensors, (contextlib.nullcontext() if simulate else AllocatorPeak(run.device)) as measured:
        model, objective, opt, (_, exits, weights, _) = build()  # measured: with the weights a run starts with
        trainable = [p for p in model.parameters() if p.requires_grad]

        def step(B: int, T: int, tracker=None):
            """The trainer's step (sorted_train.py train), on micro-batches of B rows of T tokens, all targets."""
            for i in range(min(grad_accum, 2)):  # from the second on, each starts as the one before: two show the peak
                if tracker:
                    tracker.again()
                run.micro_batch(last=i == min(grad_accum, 2) - 1)
                tokens = torch.zeros(B, T, dtype=torch.long, device=run.device)
                targets = torch.zeros(B * T, dtype=torch.long, device=run.device)
                with run.autocast:
                    loss, _ = objective(tokens, torch.arange(B * T, device=run.device), targets, exits, weights, 1e-3)
                loss.backward()
            nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)

        def peak(B: int) -> dict:
            with PeakMemory(objective, opt) as tracker:
                step(B, seq_len, tracker)
            return tracker.peak

        step(1, 8)  # AdamW makes its state in its first step; the step measured is a later one
        result = peak(batch_size)
    args = model.args
    run.say("memory of one training step, " + (f"simulated for each of {run.world} processes under torchrun"
            if simulate else f"measured on {run.world} process{'es' * (run.world > 1)} ({run.device})") +
            f": {sum(p.numel() for p in objective.parameters()) / 1e6:,.1f}M parameters, float32 weights and AdamW, "
            f"{args.n_layers} layers, dim {args.dim}, {str(run.dtype).removeprefix('torch.')} compute, exits {exits}, "
            f"batch {batch_size} x {seq_len} tokens (all targets) x {grad_accum} micro-batches"
            + (", activation checkpointing" if run.flags["activation_checkpointing"] else ""))
    for kind, n in result.items():
        run.say(f"  {kind:<24}{gib(n):>10}")
    if not simulate:
        total = run.sum(torch.tensor([measured.peak], dtype=torch.float64)).item() / run.world
        run.say(f"  {'measured (allocator)':<24}{gib(total):>10}   (mean over the processes)")
        if measured.reserved is not None:
            reserved = run.sum(torch.tensor([measured.reserved], dtype=torch.float64)).item() / run.world
            run.say(f"  {'measured (reserved)':<24}{gib(reserved):>10}   (mean over the processes)")
        run.close()
        if run.device.type == "cpu":
            # On the CPU the measurement ran torch's profiler, and a CUDA build of torch on a machine without a GPU
            # sometimes aborts at interpreter exit after that (a profiler thread destroyed while still joinable:
            # about 1 run in 30, torch 2.14.1+cu130). All is printed and the process group is closed by now, so the
            # process leaves without the teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return result
    budget = 0.9 * gpu_memory * 1e9  # GB as vendors count; the last 10% for the CUDA context, NCCL, fragmentation
    fits = result["total"] <= budget
    print(f"{'fits' if fits else 'does not fit'} in {gpu_memory:g} GB ({gpu_memory * 1e9 / 2**30:.1f} GiB) per GPU, "
          "with 10% of it left for the CUDA context, NCCL and fragmentation")
    if search:
        with tensors:
            best, capped = largest_batch(lambda b: peak(b)["total"] <= budget, batch_size, fits)
        print(f"largest --batch_size that fits: {best}{' or more' if capped else ''}" if best else "no --batch_size "
              "fits: use more GPUs (--nproc), --activation_checkpointing or a shorter --max_seq_len")
    run.close()
    return result


def plan_run(start, build, simulate: bool, nproc: int, dtype: str, grad_clip: float, batch_size: int, seq_len: int,
             grad_accum: int, gpu_memory: float, search: bool = True) -> dict:
    """sorted_train.py --estimate (simulate) and --measure_memory: plan() for the trainer's run, made by
    start(dtype, fake_world), and its model, made by build(run, real)."""
    if not simulate and "RANK" not in os.environ:
        raise FlagError("--measure_memory measures the FSDP step of a torchrun run: launch it with "
                        "torchrun --nproc_per_node N sorted_train.py --measure_memory ...")
    run = start("bfloat16" if simulate and dtype == "auto" else dtype, nproc if simulate else None)  # GPUs' dtype
    return plan(lambda: build(run, not simulate), run, simulate, grad_clip, batch_size, seq_len, grad_accum,
                gpu_memory, search)
