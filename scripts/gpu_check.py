"""The CUDA paths end to end, checked: one line per check, then a verdict; the exit code says whether all held.

  python scripts/gpu_check.py [--out /tmp/gpu_check]        # on a GPU machine: every GPU it sees
  python scripts/gpu_check.py --cpu --gpus 2                # the same checks on this CPU (gloo), to rehearse them

On the GPUs it finds (N of them), with a 16-layer LLaMA of dim 1024 trained on the built-in tasks under torchrun:
  train     bfloat16 FSDP2 over NCCL at world size N, activation checkpointing with compile: every exit's loss falls
  resume    the run killed (SIGKILL) after its first checkpoint and resumed, on N-1 processes when N > 1 (the same
            global batch), ends as the uninterrupted run did: losses and weights to what bfloat16 allows
  memory    the memory plan (--estimate) within 15% of the reserved peak that --measure_memory measures
  decode    compiled decoding (CUDA graphs on a GPU) gives eager decoding's greedy tokens, at two depths
  speed     tokens/s at every depth (reported, not checked)
It runs in a few minutes on one large GPU; scripts/gpu_check.sh calls it.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sh(*args, timeout=900, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def torchrun(n: int, *args, **kw):
    return sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
              "sorted_train.py", *args, **kw)


def log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


class Checks:
    def __init__(self):
        self.failed = []

    def report(self, name: str, ok: bool, detail: str):
        print(f"{'PASS' if ok else 'FAIL'}  {name:<8} {detail}", flush=True)
        if not ok:
            self.failed.append(name)

    def ran(self, name: str, p: subprocess.CompletedProcess) -> bool:
        if p.returncode:
            self.report(name, False, f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        return p.returncode == 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/gpu_check", help="emptied first")
    p.add_argument("--cpu", action="store_true", help="rehearse on the CPU with gloo (no CUDA graphs, no compile)")
    p.add_argument("--gpus", type=int, default=None, help="processes (default: every GPU, at most 8)")
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    import torch
    n = a.gpus or (2 if a.cpu else min(torch.cuda.device_count(), 8))
    if not a.cpu and n < 1:
        sys.exit("error: no CUDA device is visible (rehearse on the CPU with --cpu)")
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    where = "cpu" if a.cpu else f"{torch.cuda.get_device_name(0)} x {n}"
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {where}; {n} process{'es' * (n > 1)}", flush=True)
    dtype = "bfloat16" if a.cpu or torch.cuda.is_bf16_supported() else "float32"
    shape = ["--model", "7B", "--dim", "128", "--n_layers", "8", "--n_heads", "4", "--n_kv_heads", "2"] if a.cpu else \
        ["--model", "7B", "--dim", "1024", "--n_layers", "16", "--n_heads", "8", "--n_kv_heads", "2"]
    fast = [] if a.cpu else ["--activation_checkpointing", "--compile"]
    # a global batch that N and N-1 processes both make: 2 a micro-batch, N-1 or N of them
    m = max(n - 1, 1)
    flags = [*shape, "--max_seq_len", "256", "--dtype", dtype, *fast, "--lr", "3e-4", "--warmup", "5",
             "--max_steps", str(a.steps), "--eval_interval", str(a.steps // 2), "--save_interval", str(a.steps // 2),
             "--num_examples", "4000", "--val_size", "64", "--vocab_size", "512", "--seed", "1",
             "--device", "cpu" if a.cpu else "cuda"]
    batch = ["--batch_size", "2", "--grad_accum", str(m)]
    checks = Checks()

    # train: every exit's loss falls
    full = os.path.join(a.out, "full")
    t0 = time.perf_counter()
    if checks.ran("train", torchrun(n, *flags, *batch, "--out", full)):
        entries = log(full)
        first, last = entries[0]["loss"], [e for e in entries if "val_loss" in e][-1]["val_loss"]
        fell = all(last[e] < 0.8 * first[e] for e in first)
        checks.report("train", fell, f"{n} x {dtype}{' with checkpointing and compile' * bool(fast)}, "
                      f"{time.perf_counter() - t0:.0f} s: loss per exit {first} -> {last}")

    # resume: killed after its first checkpoint, resumed on N-1 processes (the same global batch)
    cut = os.path.join(a.out, "cut")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "sorted_train.py",
           *flags, *batch, "--out", cut]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while not os.path.exists(os.path.join(cut, "latest")) and proc.poll() is None:
        time.sleep(0.5)
    # as a lost node would: torchrun starts each worker in a session of its own, so the workers first, then torchrun
    subprocess.run(["pkill", "-9", "-P", str(proc.pid)])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    killed_at = os.readlink(os.path.join(cut, "latest")) if os.path.lexists(os.path.join(cut, "latest")) else None
    resume_batch = ["--batch_size", "2", "--grad_accum", str(n)] if n > 1 else batch
    resumed = torchrun(m if n > 1 else 1, *flags, *resume_batch, "--out", cut, "--resume")
    if killed_at is None or killed_at == f"step_{a.steps:07d}" or "resuming from" not in resumed.stdout:
        checks.report("resume", False, f"the run was not cut before its end (killed at {killed_at})")
    elif checks.ran("resume", resumed) and os.path.exists(os.path.join(full, "latest")):
        from safetensors.torch import load_file
        w_full, w_cut = load_file(os.path.join(full, "latest", "model.safetensors")), \
            load_file(os.path.join(cut, "latest", "model.safetensors"))
        diff = max(((w_cut[k].float() - w_full[k].float()).norm() / w_full[k].float().norm()).item() for k in w_full)
        l_full, l_cut = [e["loss"] for e in log(full) if "loss" in e], [e["loss"] for e in log(cut) if "loss" in e]
        loss_diff = max(abs(x[e] - y[e]) / y[e] for x, y in zip(l_cut, l_full) for e in y)
        ok = len(l_full) == len(l_cut) and diff < 0.02 and loss_diff < 0.02
        checks.report("resume", ok, f"killed at {killed_at}, resumed on "
                      f"{m if n > 1 else 1}: weights within {diff:.2%} of the uninterrupted run's (tensor norms), "
                      f"losses within {loss_diff:.2%}")

    # memory: the plan against the measured peak, at the same batch
    plan = sh(sys.executable, "sorted_train.py", "--estimate", "--nproc", str(n), *flags, *batch)
    measured = torchrun(n, "--measure_memory", *flags, *batch)
    if checks.ran("memory", plan) and checks.ran("memory", measured):
        total = float(plan.stdout.split("  total")[1].split()[0]) * {"GiB": 2 ** 30, "MiB": 2 ** 20}[
            plan.stdout.split("  total")[1].split()[1]]
        key = "measured (allocator)" if a.cpu else "measured (reserved)"
        value, unit = measured.stdout.split(key)[1].split()[:2]
        peak = float(value) * {"GiB": 2 ** 30, "MiB": 2 ** 20}[unit]
        checks.report("memory", abs(total - peak) <= 0.15 * peak, f"estimate {total / 2**30:.2f} GiB, {key} "
                      f"{peak / 2**30:.2f} GiB: {total / peak - 1:+.1%}")

    # decode: compiled decoding gives eager decoding's tokens; tokens/s per depth
    if os.path.exists(os.path.join(full, "latest")):
        from generate import generate
        from load_llama import load_model, load_tokenizer
        from data import alpaca_prompt
        device = "cpu" if a.cpu else "cuda"
        model = load_model(full, device=device, dtype=getattr(torch, dtype))
        tok = load_tokenizer(full)
        prompt = tok.encode(alpaca_prompt("Count from the first number to the second.", "12 to 19"))
        same = []
        for depth in (model.args.n_layers // 2, model.args.n_layers):
            eager = generate(model, prompt, 24, layers=depth)
            compiled = generate(model, prompt, 24, layers=depth, compile=True)
            same.append(compiled == eager)
        checks.report("decode", all(same), f"compiled{' (CUDA graphs)' * (not a.cpu)} against eager, greedy, 24 tokens "
                      f"at depths {model.args.n_layers // 2} and {model.args.n_layers}: "
                      f"{'identical' if all(same) else 'different'}")
        speeds = []
        for depth in range(2, model.args.n_layers + 1, 2):
            generate(model, prompt, 8, layers=depth)  # warm-up
            t0 = time.perf_counter()
            n_tokens = len(generate(model, prompt, 64, layers=depth))
            speeds.append(f"{depth}: {n_tokens / (time.perf_counter() - t0):.0f}")
        print(f"INFO  speed    eager tokens/s by depth, batch 1: {', '.join(speeds)}", flush=True)

    print(f"verdict: {'every check held' if not checks.failed else 'FAILED: ' + ', '.join(checks.failed)}")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
