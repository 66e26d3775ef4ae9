"""What SoFT buys, per exit: quality against standard fine-tuning (SFT) and SFT+ICT, and the paper's KL and
cosine analysis (arXiv 2309.08968, Figures 4-5).

  python analyze.py --ckpt out                                   # one checkpoint, every exit
  python analyze.py --ckpt out/sorted --vs out/sft out/ict --plot compare.png --json compare.json
  python analyze.py --reproduce                                  # the paper's comparison in miniature, < 20 min

Per exit, on the held-out split the trainer kept aside (or --data): validation loss and perplexity on the
reference answers; over the answers the full model generates greedily, the top-1 agreement of the exit with
the last layer, the mean KL(last || exit) of their next-token distributions and the cosine similarity of the
exit's hidden state to the last layer's; and, for the built-in tasks, the exact-match accuracy of the exit's
own greedy answers.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from data import DataError, alpaca_prompt, collate, exact_match, held_out, tokenize
from generate import generate
from load_llama import CheckpointError, load_model, load_tokenizer, read_json, resolve
from model import default_exits


# --- the metrics, on tensors

def kl_divergence(logits_p, logits_q):
    """KL(p || q) per row, for next-token distributions given as logits (..., vocab)."""
    logp, logq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def cosine(a, b):
    """Cosine similarity per row of hidden states (..., dim)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


# --- one checkpoint

def held_out_of(ckpt: str, data: str | None, limit: int) -> list[dict]:
    """The validation records the trainer held out for this checkpoint (or those of --data)."""
    config = read_json(os.path.join(resolve(ckpt), "params.json")).get("train_config") or {}
    return held_out(config, data)[:limit]


@torch.no_grad()
def analyze(ckpt: str, records: list[dict], batch_size: int = 32, log=print) -> dict:
    model = load_model(ckpt, dtype=torch.float32)
    tokenizer = load_tokenizer(ckpt)
    params = read_json(os.path.join(resolve(ckpt), "params.json"))
    L = model.args.n_layers
    exits = sorted(set(params.get("exits") or default_exits(L)) | {L})
    max_len = model.args.max_seq_len
    ref, _, _ = tokenize(records, tokenizer, max_len)

    # validation loss of each exit on the reference answers
    loss_sum, n_tokens = torch.zeros(len(exits), dtype=torch.float64), 0
    for s in range(0, len(ref), batch_size):
        tokens, labels = collate(ref[s:s + batch_size], "cpu")
        mask = labels != -100
        for i, (e, h) in enumerate(zip(exits, model(tokens, exits=exits))):
            loss_sum[i] += F.cross_entropy(model.head(h[mask], e), labels[mask], reduction="sum").double()
        n_tokens += int(mask.sum())

    # greedy answers: the full model's (for agreement, KL, cosine), and each exit's own (for accuracy)
    prompts = [tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", "")), bos=True) for r in records]
    prompts = [p[-(max_len - 64):] for p in prompts]
    correct = defaultdict(lambda: defaultdict(int))
    answers = {}
    t0 = time.perf_counter()
    for e in exits:
        for i, (p, r) in enumerate(zip(prompts, records)):
            out = generate(model, p, 64, layers=e, eos_id=tokenizer.eos_id)
            if e == L:
                answers[i] = out
            if "task" in r:
                correct[e][r["task"]] += exact_match(tokenizer.decode(out), r["output"])
    log(f"  {len(exits) * len(prompts)} greedy answers in {time.perf_counter() - t0:.0f} s")

    agree, kl, cos, n_gen = torch.zeros(len(exits)), torch.zeros(len(exits)), torch.zeros(len(exits)), 0
    gen = [(p + answers[i] + [tokenizer.eos_id], len(p)) for i, p in enumerate(prompts)]
    for s in range(0, len(gen), batch_size):
        tokens, labels = collate(gen[s:s + batch_size], "cpu")
        mask = labels != -100  # the positions that produced the generated answer (and its EOS)
        hidden = model(tokens, exits=exits)
        last_h = hidden[-1][mask]
        last = model.head(last_h, L)
        for i, (e, h) in enumerate(zip(exits, hidden)):
            logits = model.head(h[mask], e)
            agree[i] += (logits.argmax(-1) == last.argmax(-1)).sum()
            kl[i] += kl_divergence(last, logits).sum()
            cos[i] += cosine(h[mask], last_h).sum()
        n_gen += int(mask.sum())

    tasks = sorted({r["task"] for r in records if "task" in r})
    per_task_n = {t: sum(r.get("task") == t for r in records) for t in tasks}
    rows = []
    for i, e in enumerate(exits):
        row = dict(exit=e, val_loss=loss_sum[i].item() / n_tokens, ppl=float(torch.exp(loss_sum[i] / n_tokens)),
                   top1_agreement=agree[i].item() / n_gen, kl_last_exit=kl[i].item() / n_gen,
                   cosine_to_last=cos[i].item() / n_gen)
        if tasks:
            row["accuracy"] = sum(correct[e].values()) / sum(per_task_n.values())
            row["accuracy_by_task"] = {t: correct[e][t] / per_task_n[t] for t in tasks}
        rows.append(row)
    return dict(ckpt=ckpt, mode=params.get("mode", "?"), step=params.get("step"), n_layers=L,
                n_examples=len(records), n_generated_tokens=n_gen, exits=rows)


def print_table(result: dict):
    print(f"\n{result['ckpt']} (mode {result['mode']}, step {result['step']}, {result['n_examples']} held-out "
          "examples)")
    has_acc = "accuracy" in result["exits"][0]
    print(f"{'exit':>5}{'val loss':>10}{'ppl':>8}{'top-1 agree':>13}{'KL(last||exit)':>16}{'cosine':>8}"
          + (f"{'accuracy':>10}" if has_acc else ""))
    for r in result["exits"]:
        print(f"{r['exit']:>5}{r['val_loss']:>10.3f}{r['ppl']:>8.2f}{r['top1_agreement']:>13.1%}"
              f"{r['kl_last_exit']:>16.3f}{r['cosine_to_last']:>8.3f}"
              + (f"{r['accuracy']:>10.1%}" if has_acc else ""))


def print_comparison(results: list[dict]):
    """The paper's table in miniature: per depth, accuracy and loss of each checkpoint."""
    modes = [r["mode"] for r in results]
    names = [r["mode"] if modes.count(r["mode"]) == 1 else r["ckpt"] for r in results]  # unique labels
    depths = sorted({row["exit"] for r in results for row in r["exits"]})
    print("\nper depth: exact-match accuracy / validation loss")
    print(f"{'layers':>7}" + "".join(f"{n:>22}" for n in names))
    for d in depths:
        cells = []
        for r in results:
            row = next((x for x in r["exits"] if x["exit"] == d), None)
            cells.append("-" if row is None else f"{row.get('accuracy', float('nan')):.1%} / {row['val_loss']:.3f}")
        print(f"{d:>7}" + "".join(f"{c:>22}" for c in cells))


def plot(results: list[dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("accuracy", "exact-match accuracy"), ("val_loss", "validation loss"),
              ("kl_last_exit", "KL(last || exit)"), ("cosine_to_last", "cosine to last layer")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for r in results:
            rows = [x for x in r["exits"] if key in x]
            ax.plot([x["exit"] for x in rows], [x[key] for x in rows], marker="o", label=r["mode"])
        ax.set_title(title)
        ax.set_xlabel("layers")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- the reproduction in miniature

def reproduce(folder: str, steps: int, ict_steps: int) -> list[str]:
    """Train the demo model three ways on the same data and batches; returns the three checkpoint folders."""
    common = ["--max_steps", str(steps), "--eval_interval", "0", "--save_interval", "0", "--seed", "1337"]
    runs = [("sorted", ["--mode", "sorted"] + common), ("sft", ["--mode", "sft"] + common),
            # SFT+ICT: the SFT trunk frozen, a head per exit tuned on top (extra compute, all of it the baseline's)
            ("ict", ["--mode", "ict", "--init", os.path.join(folder, "sft"), "--max_steps", str(ict_steps),
                     "--lr", "1e-3", "--min_lr", "1e-4", "--beta2", "0.95", "--warmup", "20", "--eval_interval", "0",
                     "--save_interval", "0"])]
    trainer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sorted_train.py")
    for name, flags in runs:
        out = os.path.join(folder, name)
        print(f"\n=== training {name}: python sorted_train.py {' '.join(flags)} --out {out}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, trainer, *flags, "--out", out]).returncode:
            raise DataError(f"training {name} failed")
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s")
    return [os.path.join(folder, name) for name, _ in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-exit quality, agreement, KL and cosine of (sorted) checkpoints.")
    p.add_argument("--ckpt", default="out", help="checkpoint folder")
    p.add_argument("--vs", nargs="*", default=[], help="more checkpoints to put side by side")
    p.add_argument("--data", default=None,
                   help="Alpaca JSON/JSONL to evaluate on (default: the trainer's held-out split)")
    p.add_argument("--num_examples", type=int, default=256, help="held-out examples to use")
    p.add_argument("--plot", default=None, help="draw the curves into this PNG (needs matplotlib)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--reproduce", nargs="?", const="out/reproduce", default=None, metavar="DIR",
                   help="train sorted, sft and sft+ict demo models into DIR, then compare them")
    p.add_argument("--steps", type=int, default=1500, help="--reproduce: training steps of sorted and of sft")
    p.add_argument("--ict_steps", type=int, default=500, help="--reproduce: steps tuning the SFT+ICT heads")
    a = p.parse_args(argv)
    if a.plot or a.reproduce:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if a.plot:
                sys.exit("error: --plot needs matplotlib: pip install matplotlib")
            print("note: matplotlib is not installed, so --reproduce saves no plot")
    try:
        t0 = time.perf_counter()
        ckpts = reproduce(a.reproduce, a.steps, a.ict_steps) if a.reproduce else [a.ckpt] + a.vs
        if a.reproduce:
            a.plot = a.plot or os.path.join(a.reproduce, "compare.png")
            a.json = a.json or os.path.join(a.reproduce, "compare.json")
        results = []
        for ckpt in ckpts:
            print(f"\nanalysing {ckpt} ...", flush=True)
            results.append(analyze(ckpt, held_out_of(ckpt, a.data, a.num_examples)))
        for r in results:
            print_table(r)
        if len(results) > 1:
            print_comparison(results)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {a.json}")
    if a.plot:
        try:
            plot(results, a.plot)
            print(f"wrote {a.plot}")
        except ImportError:
            print("note: matplotlib is not installed; no plot")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
