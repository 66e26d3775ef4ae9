"""The CUDA paths end to end, settled in one run: a line a check (PASS or FAIL, its seconds, what it measured), then
the total time against the 5 minutes it should take on one GPU, and a verdict; the exit code says whether all held.

  python scripts/gpu_check.py [--out /tmp/gpu_check]            # on a GPU machine: every GPU it sees, at most 8
  python scripts/gpu_check.py --cpu --gpus 4                     # rehearsed on this CPU: gloo processes, a tiny model
  python scripts/gpu_check.py --cpu --gpus 2 --inject grad_scale # a defect put in: the check it names must FAIL

N processes train a LLaMA on the built-in tasks (GPU: 8 layers of dim 1024; CPU: 4 of 64) in bfloat16, or float32
where the GPU has no bfloat16 (the trainer's own test). Every run goes through HARNESS (below), which counts what
dynamo did and puts in the defect --inject names, without touching the trainer's files; every run is a process
group of its own, killed whole when it outlives its deadline.

| check       | what it proves                                                      | fails on (--inject)          |
| ----------- | ------------------------------------------------------------------- | ---------------------------- |
| compile     | under FSDP2 every block runs compiled on batches of varying length: | compile_off, graph_break,    |
|             | no graph break, no recompile limit hit, and in a profiled step one  | recompile_limit              |
|             | compiled region per block and micro-batch                           |                              |
| parity      | N processes (FSDP2, compiled) against one (python sorted_train.py,  | grad_scale                   |
|             | autocast), step by step: every exit's loss, the gradient norm (a    |                              |
|             | constant scale of the gradient shows there only: AdamW ignores it), |                              |
|             | the val loss with a rank out of examples; and the loss fell         |                              |
| one_process | the one-process run, killed after its torch.save checkpoint and     | wrong_resume                 |
|             | resumed, goes on as the N-process run: losses, norms, weights       |                              |
| resume      | the N-process run killed (SIGKILL) after its DCP checkpoint and     | wrong_resume                 |
|             | resumed on N-1 processes: the same                                  |                              |
| hsdp        | at N >= 4: --hsdp N/2 (2 replicas) against plain FSDP, step by step | hsdp_sync                    |
| init        | the trained run exported to a Hugging Face folder and read back by  | init_rows                    |
|             | N processes with --init, each its own rows: the same val loss       |                              |
| memory      | --estimate within 15% plus a floor (CUDA 128 MiB) of the peak the   | memory_plan                  |
|             | allocator handed out (--measure_memory), at GiBs a GPU at any N     |                              |
| decode      | compiled decoding (CUDA graphs) gives eager's greedy tokens in      | decode_mask                  |
|             | float32 (bfloat16's near-ties flip), at two depths, sharp weights   |                              |
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bfloat16 keeps 8 bits (0.4%): runs that differ only in rounding (compiled kernels, autocast against FSDP's cast,
# how a batch is split among processes) agree per step within these relative gaps; a scale of the gradient, a step
# replayed, a rank's wrong rows or replicas that never sync do not
GAP = dict(loss=0.02, grad_norm=0.1, val=0.02, weights=0.02, init=0.01)

# --inject: the defect, the runs it is put into, the check that must then fail
DEFECTS = {
    "compile_off": ("fsdp", "compile", "wrap_blocks compiles nothing"),
    "graph_break": ("fsdp", "compile", "a graph break in every block's forward"),
    "recompile_limit": ("fsdp", "compile", "dynamo's recompile limit at 1: a new batch length runs eager"),
    "grad_scale": ("fsdp", "parity", "every rank's loss doubled: only the gradient norm changes"),
    "wrong_resume": ("one cut", "one_process resume", "a resumed run replays the step before its checkpoint's"),
    "hsdp_sync": ("hsdp", "hsdp", "the replicas never all-reduce their gradients"),
    "init_rows": ("init", "init", "rank 1 reads rank 0's rows of every tensor of --init"),
    "memory_plan": ("estimate", "memory", "the plan leaves out the activations"),
    "decode_mask": ("decode", "decode", "compiled decoding lets each query see the next column of its cache"),
}

HARNESS = r'''"""gpu_check's harness: `python harness.py SCRIPT ARGS` runs the repository's SCRIPT as `python SCRIPT
ARGS` would, after putting in the defect GPU_CHECK_INJECT names; at exit each process writes what dynamo did to
GPU_CHECK_REPORT.RANK.json. Written by scripts/gpu_check.py."""
import atexit, json, logging, os, runpy, sys, time
import torch
from torch._dynamo.utils import counters

sys.path.insert(0, {root!r})
rank, inject, report = int(os.environ.get("RANK", 0)), os.environ["GPU_CHECK_INJECT"], os.environ["GPU_CHECK_REPORT"]
profile_at, hang_at = int(os.environ["GPU_CHECK_PROFILE_AT"]), int(os.environ["GPU_CHECK_HANG_AT"])

if os.environ["GPU_CHECK_BACKEND"]:  # the CPU rehearsal: dynamo's graphs, run without code generation, in seconds
    compile = torch.compile
    torch.compile = lambda fn=None, **kw: compile(fn, **{{**kw, "backend": os.environ["GPU_CHECK_BACKEND"],
                                                         "mode": None}})

# what dynamo did: graph breaks, graphs, recompile limits hit (a warning, and the frame runs eager from then on)
limit_hits = []
hits = logging.Handler()
hits.emit = lambda record: limit_hits.append(1) if "hit config." in record.getMessage() else None
logging.getLogger("torch._dynamo").addHandler(hits)

# the token lengths of the training batches, which vary from one to the next
import data
lengths, batch_tensors = set(), data.batch_tensors
data.batch_tensors = lambda batch, device: lengths.add(max(len(ids) for ids, _ in batch)) or \
    batch_tensors(batch, device)

# after optimizer step profile_at, the next step is profiled: its compiled regions (one a block's forward) counted;
# at step hang_at every process stops, as on a lost node, until gpu_check kills it
steps, profiler, regions = 0, None, []


def after_step(*_):
    global steps, profiler
    steps += 1
    if steps == profile_at:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.__enter__()
    elif profiler is not None and not regions:
        profiler.__exit__(None, None, None)
        regions.append(sum(e.name.startswith("Torch-Compiled Region") for e in profiler.events()))
    if steps == hang_at:
        open(f"{{report}}.hung", "w").close()
        time.sleep(3600)


from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(after_step)


@atexit.register
def write_report():
    with open(f"{{report}}.{{rank}}.json", "w") as f:
        json.dump(dict(breaks=sum(counters["graph_break"].values()), graphs=counters["stats"]["unique_graphs"],
                       limit_hits=len(limit_hits), regions=regions[0] if regions else None, lengths=sorted(lengths)), f)


# --- the defects
if inject == "compile_off":
    import scale.fsdp as fsdp
    wrap = fsdp.wrap_blocks
    fsdp.wrap_blocks = lambda model, activation_checkpointing=False, compile=False: wrap(model,
                                                                                         activation_checkpointing)
elif inject == "graph_break":
    import model
    forward = model.TransformerBlock.forward

    def broken(self, *args, **kw):
        torch._dynamo.graph_break()
        return forward(self, *args, **kw)
    model.TransformerBlock.forward = broken
elif inject == "recompile_limit":
    torch._dynamo.config.recompile_limit = 1
elif inject == "grad_scale":
    from scale.fused_ce import SortedObjective
    objective = SortedObjective.forward
    SortedObjective.forward = lambda self, tokens, positions, targets, exits, weights, scale=1.0: objective(
        self, tokens, positions, targets, exits, weights, 2 * scale)
elif inject == "wrong_resume":
    import checkpoints
    resume = checkpoints.resume
    checkpoints.resume = lambda *args, **kw: resume(*args, **kw) - 1
elif inject == "hsdp_sync":
    from scale.fsdp import Sharded
    Sharded.micro_batch = lambda self, last: self.root.set_requires_all_reduce(False) if self.mesh.ndim == 2 else None
elif inject == "init_rows" and rank == 1:
    import scale.fsdp as fsdp
    rows_of = fsdp.rows_of
    fsdp.rows_of = lambda p: (lambda start, end: (0, end - start))(*rows_of(p))
elif inject == "memory_plan":
    import scale.memory as memory
    tracked = memory.PeakMemory.__exit__

    def without_activations(self, *exc):
        tracked(self, *exc)
        self.peak["total"] -= self.peak["activations"]
    memory.PeakMemory.__exit__ = without_activations
elif inject == "decode_mask":
    import decoding.step as step

    def decode_step(model, x, pos, first, last, pad=None):  # decoding/step.py's without padding, its mask off by one
        cache_len, T = model.layers[0].attention.cache.k.size(2), x.size(1)
        columns = pos + torch.arange(T, device=pos.device)
        mask = torch.arange(cache_len, device=pos.device)[None] <= columns[:, None] + 1
        h = model.tok_embeddings(x) if first == 0 else x
        return model.run_layers(h, pos, first, last, columns, mask.view(1, 1, T, cache_len))
    step.decode_step = decode_step

if sys.argv[1].endswith("sorted_train.py"):
    import scale.memory as memory  # the memory plan's peak is all gpu_check reads: no search for the largest batch
    plan_run = memory.plan_run
    memory.plan_run = lambda *args: plan_run(*args[:-1], False)
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join({root!r}, sys.argv[0]), run_name="__main__")
'''

# the model and the runs, on a GPU and in the CPU rehearsal; the memory check's model is sized so that a GPU holds
# GiBs at any number of GPUs (its activations do not shrink with N), where the floor for cuBLAS's workspaces and the
# allocator's rounding is a small part of the band
SIZES = {
    "gpu": dict(model=["--model", "7B", "--dim", "1024", "--n_heads", "8", "--n_kv_heads", "2"], layers=8, vocab=512,
                seq=256, steps=20, lr=1e-3, warmup=4, examples=4000, floor=128 * 2 ** 20, limit=240, deadline=600,
                memory=["--model", "7B", "--dim", "1024", "--n_layers", "8", "--n_heads", "8", "--n_kv_heads", "2",
                        "--batch_size", "16", "--max_seq_len", "512", "--grad_accum", "2"]),
    "cpu": dict(model=["--model", "7B", "--dim", "64", "--n_heads", "4", "--n_kv_heads", "2"], layers=4, vocab=400,
                seq=128, steps=8, lr=3e-3, warmup=2, examples=600, floor=0, limit=600, deadline=3600,
                memory=["--model", "tiny", "--n_layers", "4", "--batch_size", "16", "--max_seq_len", "128",
                        "--grad_accum", "2"]),
}
BATCH = 2  # examples a micro-batch a process


class RunFailed(Exception):
    pass


# --- processes: each in a session of its own, every wait with a deadline, killed with all it started

def tree(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts each worker in a session of its own)."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (ValueError, OSError):  # not a process, or one that just ended
            pass
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def kill(proc: subprocess.Popen):
    """SIGKILL to the process group of proc and of every process below it; then reaped, with a deadline."""
    groups = set()
    for pid in tree(proc.pid):
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgrp()}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


class Runs:
    """The runs the checks read: each started on first use (the trainer through HARNESS), its output in
    out/logs/NAME.txt; one that outlives its share of the time is killed whole and fails its check."""

    def __init__(self, out: str, n: int, cpu: bool, dtype: str, inject: str | None):
        self.out, self.n, self.cpu, self.dtype, self.inject = out, n, cpu, dtype, inject
        self.size = SIZES["cpu" if cpu else "gpu"]
        self.steps, self.half = self.size["steps"], self.size["steps"] // 2
        self.accum = max(n - 1, 1)  # a global batch that N and N-1 processes both make: N-1 or N micro-batches
        self.global_batch = BATCH * n * self.accum
        self.deadline = time.monotonic() + self.size["deadline"]
        self.live, self.done, self.seconds, self.early, self.beside = [], {}, {}, {}, set()
        self.harness = os.path.join(out, "harness.py")
        with open(self.harness, "w") as f:
            f.write(HARNESS.format(root=ROOT))
        for folder in ("logs", "reports"):
            os.makedirs(os.path.join(out, folder), exist_ok=True)

    def flags(self, nproc: int) -> list[str]:
        """The trainer's flags for nproc processes of the global batch; val examples one more than two batches of
        every process, so that in evaluation all but rank 0 run out of examples for the last batch."""
        s = self.size
        return [*s["model"], "--n_layers", str(s["layers"]), "--vocab_size", str(s["vocab"]), "--max_seq_len",
                str(s["seq"]), "--num_examples", str(s["examples"]), "--val_size", str(2 * BATCH * self.n + 1),
                "--dtype", self.dtype, "--device", "cpu" if self.cpu else "cuda", "--lr", str(s["lr"]), "--min_lr",
                str(s["lr"]), "--warmup", str(s["warmup"]), "--max_steps", str(self.steps), "--eval_interval",
                str(self.half), "--save_interval", str(self.half), "--seed", "1", "--batch_size", str(BATCH),
                "--grad_accum", str(self.global_batch // (BATCH * max(nproc, 1)))]

    def start(self, name: str, nproc: int, args: list[str], hang_at: int = 0, profile_at: int = 0):
        """nproc processes of torchrun (0: one plain process) running HARNESS with args."""
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
            if nproc else [sys.executable]
        into, _, _ = DEFECTS.get(self.inject, ("",) * 3)
        env = {**os.environ, "GPU_CHECK_INJECT": self.inject if name.split("_")[0] in into.split() else "",
               "GPU_CHECK_REPORT": os.path.join(self.out, "reports", name), "GPU_CHECK_HANG_AT": str(hang_at),
               "GPU_CHECK_PROFILE_AT": str(profile_at), "GPU_CHECK_BACKEND": "eager" if self.cpu else ""}
        log = open(os.path.join(self.out, "logs", f"{name}.txt"), "w")
        proc = subprocess.Popen([*launch, self.harness, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        log.close()
        proc.name, proc.t0 = name, time.monotonic()
        self.live.append(proc)
        return proc

    def until(self) -> float:
        return min(time.monotonic() + self.size["limit"], self.deadline)

    def finish(self, proc, killed: bool = False) -> str:
        """Its output, once it has ended; RunFailed if it failed."""
        self.live.remove(proc)
        self.seconds[proc.name] = self.seconds.get(proc.name, 0) + time.monotonic() - proc.t0
        text = self.output(proc.name)
        if proc.returncode and not killed:
            raise RunFailed(f"run {proc.name} exited {proc.returncode}: {cause(text)[:200]} "
                            f"({os.path.join(self.out, 'logs', proc.name)}.txt)")
        return text

    def output(self, name: str) -> str:
        with open(os.path.join(self.out, "logs", f"{name}.txt")) as f:
            return f.read()

    def run(self, name: str, nproc: int, args: list[str], profile_at: int = 0) -> str:
        """Started and waited for, at most its share of the time; its output."""
        if name not in self.done:
            proc = self.early.pop(name, None) or self.start(name, nproc, args, profile_at=profile_at)
            try:
                proc.wait(timeout=max(self.until() - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                kill(proc)
                self.finish(proc, killed=True)
                raise RunFailed(f"run {name} killed after {time.monotonic() - proc.t0:.0f} s, its deadline")
            self.done[name] = self.finish(proc)
        return self.done[name]

    def begin(self, name: str, nproc: int, args: list[str]):
        """Start a run now, beside the others; run(name, ...) waits for it."""
        self.early[name] = self.start(name, nproc, args)
        self.beside.add(name)

    def cut(self, name: str, nproc: int, args: list[str]) -> str:
        """A run that stops two steps after its checkpoint at mid-run, every process hung as on a lost node, and is
        killed there with SIGKILL; its output."""
        proc, marker, until = self.start(name, nproc, args, hang_at=self.half + 2), self.report(name) + ".hung", \
            self.until()
        while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < until:
            time.sleep(0.2)
        alive = proc.poll() is None
        if alive:
            kill(proc)
        text = self.finish(proc, killed=alive)
        if not os.path.exists(marker):
            raise RunFailed(f"run {name} did not reach step {self.half + 2} " +
                            ("in time" if alive else f"(exited {proc.returncode})"))
        return text

    def report(self, name: str) -> str:
        return os.path.join(self.out, "reports", name)

    def close(self):
        for proc in list(self.live):
            kill(proc)
            self.live.remove(proc)

    # --- the runs the checks share

    def fsdp(self) -> str:
        """The N-process run: FSDP2 with activation checkpointing and compile; step half + 1 profiled."""
        self.run("fsdp", self.n, ["sorted_train.py", *self.flags(self.n), "--out", self.folder("fsdp"),
                                  "--activation_checkpointing", "--compile"], profile_at=self.half + 1)
        return self.folder("fsdp")

    def one(self) -> str:
        """The one-process run (python sorted_train.py: autocast, torch.save), cut after its first checkpoint and
        resumed."""
        if "one_resumed" not in self.done:
            args = ["sorted_train.py", *self.flags(0), "--out", self.folder("one")]
            self.cut("one", 0, args)
            self.run("one_resumed", 0, [*args, "--resume"])
        return self.folder("one")

    def folder(self, name: str) -> str:
        return os.path.join(self.out, name)


# --- reading the runs

def cause(text: str) -> str:
    """The line of a failed run's output that says why: the trainer's one-line error, else a traceback's last."""
    lines = [line.strip() for line in text.splitlines()]
    for found in ([line for line in lines if "error: " in line],
                  [line for line in lines if line.split(":")[0].endswith(("Error", "Exception", "Failed"))],
                  [line for line in lines if line.strip("=-* ")]):
        if found:
            return found[-1]
    return "no output"


def read_log(folder: str) -> tuple[dict, dict]:
    """({step: its training line}, {step: its val losses}) of a run's log.jsonl; a step logged twice fails."""
    train, val = {}, {}
    with open(os.path.join(folder, "log.jsonl")) as f:
        for line in map(json.loads, f):
            lines = train if "loss" in line else val
            if line["step"] in lines:
                raise RunFailed(f"{folder}/log.jsonl logs step {line['step']} twice")
            lines[line["step"]] = line if "loss" in line else line["val_loss"]
    return train, val


def rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-12)


def gaps(run: dict, ref: dict, steps) -> tuple[float, float]:
    """The largest relative gaps of run's training lines from ref's over these steps: every exit's loss, the
    gradient norm."""
    missing = [s for s in steps if s not in run or s not in ref]
    if missing:
        raise RunFailed(f"steps {missing} are not logged")
    return (max(rel(run[s]["loss"][e], ref[s]["loss"][e]) for s in steps for e in ref[s]["loss"]),
            max(rel(run[s]["grad_norm"], ref[s]["grad_norm"]) for s in steps))


def val_gap(run: dict, ref: dict) -> float:
    return max(rel(run[e], ref[e]) for e in ref)


def weight_gap(folder: str, ref: str) -> float:
    """|w - w_ref| / |w_ref| over all the weights of two runs' last checkpoints. Not tensor by tensor: AdamW moves a
    weight by about lr whatever its gradient's size, so one whose gradient is zero up to rounding goes either way,
    and a tensor can differ by a few per cent where the model as a whole (and its losses) does not."""
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(f, "latest", "model.safetensors")) for f in (folder, ref))
    return math.sqrt(sum((a[k].double() - b[k].double()).square().sum().item() for k in b) /
                     sum(b[k].double().square().sum().item() for k in b))


def read_bytes(text: str, label: str) -> float:
    """The memory printed after label ('  total   1.23 GiB'), in bytes."""
    if label not in text:
        raise RunFailed(f"no '{label.strip()}' in the output")
    value, unit = text.split(label)[1].split()[:2]
    return float(value) * {"GiB": 2 ** 30, "MiB": 2 ** 20}[unit]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2**20:.1f} MiB"


def decoded(text: str) -> dict[str, tuple[str, int, float]]:
    """generate.py --compare's output: {'k/n': (the text depth k gave, its tokens, tokens/s)}."""
    out, depth = {}, None
    for line in text.splitlines():
        if line.startswith("--- layers "):
            depth, lines = line.split()[2], []
        elif depth and line.startswith("[") and " tokens in " in line:
            words = line.strip("[]").split()
            out[depth], depth = ("\n".join(lines), int(words[0]), float(words[-2])), None
        elif depth:
            lines.append(line)
    return out


def same_steps(runs: Runs, folder: str, text: str, label: str) -> tuple[bool, str]:
    """A run cut after its checkpoint at mid-run and resumed against the uninterrupted N-process run: resumed from
    that checkpoint, every step logged once, each step after it within bfloat16's gaps, the same weights."""
    ref, _ = read_log(runs.fsdp())
    train, _ = read_log(folder)
    if f"at step {runs.half}" not in text or sorted(train) != list(range(1, runs.steps + 1)):
        return False, f"{label}: not resumed at step {runs.half} (steps logged: {sorted(train)})"
    loss, norm = gaps(train, ref, range(runs.half + 1, runs.steps + 1))
    weights = weight_gap(folder, runs.fsdp())
    ok = loss <= GAP["loss"] and norm <= GAP["grad_norm"] and weights <= GAP["weights"]
    return ok, (f"{label}, steps {runs.half + 1}..{runs.steps} against the {runs.n}-process run's: losses within "
                f"{loss:.2%} (<= {GAP['loss']:.0%}), gradient norms {norm:.2%} (<= {GAP['grad_norm']:.0%}); "
                f"weights {weights:.2%} (<= {GAP['weights']:.0%})")


# --- the checks: each (ok, what it measured), or RunFailed

def check_compile(runs: Runs):
    runs.fsdp()
    reports = []
    for rank in range(runs.n):
        with open(f"{runs.report('fsdp')}.{rank}.json") as f:
            reports.append(json.load(f))
    per_step = runs.size["layers"] * runs.accum  # every block's forward, every micro-batch
    ok = all(r["breaks"] == 0 and r["limit_hits"] == 0 and r["graphs"] > 0 and r["regions"] == per_step
             for r in reports)
    r = reports[-1]
    speed = sorted(line["tokens_per_sec"] for line in read_log(runs.fsdp())[0].values())
    print(f"INFO  speed       training tokens/s on {runs.n} processes, the median step: {speed[len(speed) // 2]:.0f}",
          flush=True)
    return ok, (f"{runs.n} processes, {'eager backend (CPU)' if runs.cpu else 'inductor'}, checkpointing, "
                f"{len(r['lengths'])} batch lengths {r['lengths'][0]}..{r['lengths'][-1]}; per rank: graph breaks "
                f"{[r['breaks'] for r in reports]}, recompile limits hit {[r['limit_hits'] for r in reports]}, graphs "
                f"{[r['graphs'] for r in reports]}, compiled regions in step {runs.half + 2} "
                f"{[r['regions'] for r in reports]} (want {per_step}: a block a micro-batch)")


def check_parity(runs: Runs):
    one_train, one_val = read_log(runs.one())  # the reference: one process, before its cut
    train, val = read_log(runs.fsdp())
    loss, norm = gaps(train, one_train, range(1, runs.half + 1))
    v = val_gap(val[runs.half], one_val[runs.half])
    first, last = train[1]["loss"], val[runs.steps]
    fell = all(last[e] < 0.9 * first[e] for e in first)  # and it trained
    ok = loss <= GAP["loss"] and norm <= GAP["grad_norm"] and v <= GAP["val"] and fell
    return ok, (f"{runs.n} processes against 1, steps 1..{runs.half}: every exit's loss within {loss:.2%} (<= "
                f"{GAP['loss']:.0%}), gradient norm {norm:.2%} (<= {GAP['grad_norm']:.0%}), val loss {v:.2%} (<= "
                f"{GAP['val']:.0%}){' with a rank out of examples' * (runs.n > 1)}; loss per exit "
                f"{ {e: round(x, 2) for e, x in first.items()} } -> { {e: round(x, 2) for e, x in last.items()} }"
                f"{'' if fell else ': it did not fall by 10%'}")


def check_one_process(runs: Runs):
    return same_steps(runs, runs.one(), runs.output("one_resumed"), "1 process (autocast, torch.save), killed at "
                      f"step {runs.half + 2}, resumed")


def check_resume(runs: Runs):
    m = max(runs.n - 1, 1)
    cut = runs.folder("cut")
    runs.cut("cut", runs.n, ["sorted_train.py", *runs.flags(runs.n), "--out", cut])
    text = runs.run("cut_resumed", m, ["sorted_train.py", *runs.flags(m), "--out", cut, "--resume"])
    return same_steps(runs, cut, text, f"{runs.n} processes killed at step {runs.half + 2}, resumed on {m}")


def check_hsdp(runs: Runs):
    if runs.n < 4 or runs.n % 2:
        return None, f"needs an even number of processes, 4 or more ({runs.n} here)"
    flags = [*runs.flags(runs.n), "--max_steps", str(runs.half), "--hsdp", str(runs.n // 2)]
    runs.run("hsdp", runs.n, ["sorted_train.py", *flags, "--out", runs.folder("hsdp")])
    ref, _ = read_log(runs.fsdp())
    train, _ = read_log(runs.folder("hsdp"))
    loss, norm = gaps(train, ref, range(1, runs.half + 1))
    return loss <= GAP["loss"] and norm <= GAP["grad_norm"], (
        f"2 replicas x {runs.n // 2} shards against plain FSDP on {runs.n}, steps 1..{runs.half}: losses within "
        f"{loss:.2%} (<= {GAP['loss']:.0%}), gradient norms {norm:.2%} (<= {GAP['grad_norm']:.0%})")


def check_init(runs: Runs):
    from load_llama import export
    hf = runs.folder("hf")
    config = export(runs.fsdp(), hf)  # the trained model, whole, in Hugging Face's layout (q/k rows permuted)
    flags = [*runs.flags(runs.n), "--init", hf, "--lr", "0", "--min_lr", "0", "--max_steps", "1",
             "--eval_interval", "1"]
    runs.run("init", runs.n, ["sorted_train.py", *flags, "--out", runs.folder("init")])
    _, ref = read_log(runs.fsdp())
    _, val = read_log(runs.folder("init"))
    v = val_gap(val[1], ref[runs.steps])
    return v <= GAP["init"], (f"{runs.n} processes read a {config['num_hidden_layers']}-layer Hugging Face folder, "
                              f"each its rows, at learning rate 0: val loss within {v:.3%} of the trained run's "
                              f"(<= {GAP['init']:.1%})")


def memory_args(runs: Runs, mode: str) -> list[str]:
    """The trainer's --estimate (for N processes) or --measure_memory, of the memory check's model."""
    return ["sorted_train.py", mode, *(["--nproc", str(runs.n)] if mode == "--estimate" else []),
            *runs.size["memory"], "--dtype", runs.dtype, "--device", "cpu" if runs.cpu else "cuda"]


def check_memory(runs: Runs):
    plan = runs.run("estimate", 0, memory_args(runs, "--estimate"))
    measured = runs.run("measure", runs.n, memory_args(runs, "--measure_memory"))
    estimate, peak = read_bytes(plan, "  total"), read_bytes(measured, "measured (allocator)")
    band = 0.15 * peak + runs.size["floor"]
    reserved = "" if runs.cpu else f"; held (reserved) {gib(read_bytes(measured, 'measured (reserved)'))}"
    return abs(estimate - peak) <= band, (f"{runs.n} processes: estimate {gib(estimate)}, handed out by the "
                                          f"allocator {gib(peak)} ({estimate / peak - 1:+.1%}; band +-{gib(band)}: "
                                          f"15% + {runs.size['floor'] // 2**20} MiB){reserved}")


def sharp_copy(src: str, dst: str) -> str:
    """A checkpoint of src's shape and tokenizer with random weights five times a fresh model's (as in
    tests/conftest.py): its greedy tokens change with every input, where a model trained for a few steps repeats one
    token whatever it reads, which would hide a decoding defect."""
    from checkpoints import resolve, save_model
    from load_llama import load_model
    from model import fresh_weights
    model = load_model(src)
    save_model({n: t * 5 for n, t in fresh_weights(model, 0)}, model.args, dst,
               os.path.join(resolve(src), "tokenizer.model"))
    return dst


def check_decode(runs: Runs):
    layers = runs.size["layers"]
    args = ["generate.py", "--ckpt", sharp_copy(runs.fsdp(), runs.folder("sharp")), "--compare",
            f"{layers // 2},{layers}", "--max_new_tokens", "40", "--dtype", "float32", "--device",
            "cpu" if runs.cpu else "cuda"]
    eager, compiled = decoded(runs.run("eager_decode", 0, args)), decoded(runs.run("decode", 0, [*args, "--compile"]))
    same = eager.keys() == compiled.keys() and len(eager) == 2 and all(eager[d][0] == compiled[d][0] for d in eager)
    print("INFO  speed       decoding tokens/s, batch 1, eager / compiled: " +
          ", ".join(f"layers {d}: {eager[d][2]:.0f} / {compiled.get(d, (0, 0, 0))[2]:.0f}" for d in eager), flush=True)
    return same, (f"compiled{'' if runs.cpu else ' (CUDA graphs)'} against eager, float32, greedy, a sharp random "
                  f"model at layers {', '.join(eager)}: {'the same' if same else 'different'} text "
                  f"({' and '.join(str(n) for _, n, _ in eager.values())} tokens)")


CHECKS = {"compile": check_compile, "parity": check_parity, "one_process": check_one_process,
          "resume": check_resume, "hsdp": check_hsdp, "init": check_init, "memory": check_memory,
          "decode": check_decode}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/gpu_check", help="emptied first")
    p.add_argument("--cpu", action="store_true", help="rehearse on the CPU: gloo, a tiny model, dynamo's eager backend")
    p.add_argument("--gpus", type=int, default=None, help="processes (default: every GPU, at most 8; --cpu: 2)")
    p.add_argument("--inject", choices=list(DEFECTS), default=None, help="put in this defect: its check must FAIL")
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated, of " + ", ".join(CHECKS))
    a = p.parse_args()
    import shutil

    import torch
    n = a.gpus or (2 if a.cpu else min(torch.cuda.device_count(), 8))
    chosen = a.checks.split(",")
    if not a.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is visible (rehearse on the CPU with --cpu)")
    if n < 1 or set(chosen) - set(CHECKS):
        sys.exit(f"error: --gpus {n} must be at least 1 and --checks {a.checks} name some of {', '.join(CHECKS)}")
    # the trainer's own test: emulated bfloat16 (V100, T4) is not bfloat16, and the trainer refuses it
    dtype = "bfloat16" if a.cpu or torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    where = "CPU (gloo)" if a.cpu else f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {where}; {n} process{'es' * (n > 1)}, {dtype}"
          + (f"; defect put in: {a.inject} ({DEFECTS[a.inject][2]})" if a.inject else ""), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the runs below are killed on the way out
    runs, failed, t_start = Runs(a.out, n, a.cpu, dtype, a.inject), [], time.monotonic()
    try:
        if "memory" in chosen:  # the plan runs on fake tensors, its time on the host's cores: beside the first checks
            runs.begin("estimate", 0, memory_args(runs, "--estimate"))
        for name in chosen:
            t0 = time.monotonic()
            try:
                ok, detail = CHECKS[name](runs)
            except RunFailed as e:
                ok, detail = False, str(e)
            except Exception as e:  # a bug here, or output it cannot read: a failure, said in a line
                ok, detail = False, f"{type(e).__name__}: {e}"
            verdict = "SKIP" if ok is None else "PASS" if ok else "FAIL"
            print(f"{verdict}  {name:<11} {time.monotonic() - t0:4.0f} s  {detail}", flush=True)
            failed += [name] * (ok is False)
    finally:
        runs.close()
    total = time.monotonic() - t_start
    print(f"INFO  time        {total:.0f} s in all{'' if a.cpu else ' (target on one GPU: 300 s)'}; runs: "
          + ", ".join(f"{k} {v:.0f} s" + " (beside the others, until read)" * (k in runs.beside)
                      for k, v in runs.seconds.items()))
    if a.inject:
        must = DEFECTS[a.inject][1].split()
        held = [c for c in must if c in chosen and c not in failed]
        print(f"defect {a.inject}: {'caught by ' + ', '.join(failed) if failed else 'not caught'}"
              + (f"; {', '.join(held)} should have failed too" if held else ""))
    print(f"verdict: {'every check held' if not failed else 'FAILED: ' + ', '.join(failed)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
