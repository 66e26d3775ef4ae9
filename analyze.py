"""What SoFT buys, per exit: quality against standard fine-tuning (SFT) and SFT+ICT, and the paper's KL and
cosine analysis (arXiv 2309.08968, Figures 4-5).

  python analyze.py --ckpt out                                   # one checkpoint, every exit
  python analyze.py --ckpt out/sorted --vs out/sft out/ict --plot compare.png --json compare.json
  python analyze.py --reproduce                  # the paper's setting in miniature: pretrain, SoFT / SFT / SFT+ICT
  python analyze.py --reproduce --variant no_norm                # one of the paper's open questions per variant

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

from checkpoints import CheckpointError, read_json, resolve, trained_exits
from data import DataError, alpaca_prompt, collate, held_out, load_records, tokenize
from flags import FlagError, device_and_dtype, parse_depths
from generate import generate_batch
from load_llama import load_model, read_args
from tasks import exact_match
from tokenizer import check_vocab, load_tokenizer


POSITIONS = 20  # the answer tokens the paper's Figures 4-5 plot KL and cosine over

# --- the metrics, on tensors

def kl_divergence(logits_p, logits_q):
    """KL(p || q) per row, for next-token distributions given as logits (..., vocab)."""
    logp, logq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def cosine(a, b):
    """Cosine similarity per row of hidden states (..., dim)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


# --- one checkpoint

def our_params(ckpt: str) -> dict:
    """Our params.json (mode, step, exits, the trainer's configuration); {} for a Hugging Face folder."""
    path = os.path.join(resolve(ckpt), "params.json")
    return read_json(path) if os.path.exists(path) else {}


def held_out_of(ckpt: str, data: str | None, limit: int) -> list[dict]:
    """The records the trainer held out for this checkpoint; or those of the file `data`: all of them, unless the
    checkpoint was trained on that file, then the part the trainer held out."""
    config = our_params(ckpt).get("train_config")
    if config is None and data is None:
        raise DataError(f"{ckpt} was not trained here, so it has no held-out split: pass --data FILE (Alpaca JSON)")
    trained_on = (config or {}).get("data")
    if data is not None and not (trained_on and os.path.realpath(trained_on) == os.path.realpath(data)):
        return load_records(data)[:limit]
    return held_out(config, data)[:limit]


@torch.no_grad()
def analyze(ckpt: str, records: list[dict], tokenizer_path: str | None = None, device="cpu", dtype=torch.float32,
            exits: list[int] | None = None, batch_size: int = 32, log=print) -> dict:
    """Every figure of one checkpoint (any layout load_model reads) at `exits` (default: its trained exits) and
    its last layer, on `records`."""
    model = load_model(ckpt, device=device, dtype=dtype)
    tokenizer = load_tokenizer(tokenizer_path or ckpt)
    check_vocab(model, tokenizer, ckpt)
    params = our_params(ckpt)
    L = model.args.n_layers
    exits = sorted(set(exits or trained_exits(ckpt, L)) | {L})
    max_len = model.args.max_seq_len
    ref, _, _ = tokenize(records, tokenizer, max_len)

    # validation loss of each exit on the reference answers
    loss_sum, n_tokens = torch.zeros(len(exits), dtype=torch.float64, device=device), 0
    for s in range(0, len(ref), batch_size):
        tokens, labels = collate(ref[s:s + batch_size], device)
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
        for s in range(0, len(prompts), batch_size):
            outs = generate_batch(model, prompts[s:s + batch_size], 64, layers=e, eos_id=tokenizer.eos_id)
            for i, (out, r) in enumerate(zip(outs, records[s:s + batch_size]), s):
                if e == L:
                    answers[i] = out
                if "task" in r:  # a built-in task: the answer can be checked
                    correct[e][r["task"]] += exact_match(tokenizer.decode(out), r["output"])
    log(f"  {len(exits) * len(prompts)} greedy answers in {time.perf_counter() - t0:.0f} s")

    agree, kl, cos = (torch.zeros(len(exits), device=device) for _ in range(3))
    n_gen = 0
    # and per position in the answer, over its first POSITIONS tokens (the paper's Figures 4-5)
    kl_at, cos_at = (torch.zeros(len(exits), POSITIONS, device=device) for _ in range(2))
    n_at = torch.zeros(POSITIONS, device=device)
    gen = [(p + answers[i] + [tokenizer.eos_id], len(p)) for i, p in enumerate(prompts)]
    for s in range(0, len(gen), batch_size):
        tokens, labels = collate(gen[s:s + batch_size], device)
        mask = labels != -100  # the positions that produced the generated answer (and its EOS)
        at = (mask.cumsum(1) - 1)[mask]  # each one's place in its answer: 0 for the first answer token
        early = at < POSITIONS
        hidden = model(tokens, exits=exits)
        last_h = hidden[-1][mask]
        last = model.head(last_h, L)
        for i, (e, h) in enumerate(zip(exits, hidden)):
            logits = model.head(h[mask], e)
            agree[i] += (logits.argmax(-1) == last.argmax(-1)).sum()
            kl_i, cos_i = kl_divergence(last, logits), cosine(h[mask], last_h)
            kl[i] += kl_i.sum()
            cos[i] += cos_i.sum()
            kl_at[i].index_add_(0, at[early], kl_i[early])
            cos_at[i].index_add_(0, at[early], cos_i[early])
        n_at += torch.bincount(at[early], minlength=POSITIONS)
        n_gen += int(mask.sum())
    seen = int((n_at > 0).sum())  # answers are shorter than POSITIONS tokens on the built-in tasks

    tasks = sorted({r["task"] for r in records if "task" in r})
    per_task_n = {t: sum(r.get("task") == t for r in records) for t in tasks}
    rows = []
    for i, e in enumerate(exits):
        row = dict(exit=e, val_loss=loss_sum[i].item() / n_tokens, ppl=float(torch.exp(loss_sum[i] / n_tokens)),
                   top1_agreement=agree[i].item() / n_gen, kl_last_exit=kl[i].item() / n_gen,
                   cosine_to_last=cos[i].item() / n_gen,
                   kl_by_position=(kl_at[i, :seen] / n_at[:seen]).tolist(),
                   cosine_by_position=(cos_at[i, :seen] / n_at[:seen]).tolist())
        if tasks:
            by_task = {t: correct[e][t] / per_task_n[t] for t in tasks}
            row["accuracy"] = sum(by_task.values()) / len(tasks)  # every task counts the same
            row["accuracy_by_task"] = by_task
        rows.append(row)
    return dict(ckpt=ckpt, mode=params.get("mode"), step=params.get("step"), n_layers=L,
                n_params=sum(p.numel() for p in model.parameters()), n_examples=len(records),
                n_generated_tokens=n_gen, answers_at_position=n_at[:seen].int().tolist(), exits=rows)


def print_table(result: dict):
    print(f"\n{result['ckpt']} ({result['label']}, step {result['step']}, {result['n_params'] / 1e6:.2f}M parameters, "
          f"{result['n_examples']} held-out examples)")
    has_acc = "accuracy" in result["exits"][0]
    print(f"{'exit':>5}{'val loss':>10}{'ppl':>8}{'top-1 agree':>13}{'KL(last||exit)':>16}{'cosine':>8}"
          + (f"{'accuracy':>10}" if has_acc else ""))
    for r in result["exits"]:
        print(f"{r['exit']:>5}{r['val_loss']:>10.3f}{r['ppl']:>8.2f}{r['top1_agreement']:>13.1%}"
              f"{r['kl_last_exit']:>16.3f}{r['cosine_to_last']:>8.3f}"
              + (f"{r['accuracy']:>10.1%}" if has_acc else ""))
    shown = range(min(10, len(result["answers_at_position"])))
    for key, title in (("kl_by_position", "KL(last || exit)"), ("cosine_by_position", "cosine to last")):
        print(f"{title} by answer token (0 = first):")
        print(f"{'exit':>5}" + "".join(f"{j:>7}" for j in shown))
        for r in result["exits"]:
            print(f"{r['exit']:>5}" + "".join(f"{r[key][j]:>7.3f}" for j in shown))


def print_comparison(results: list[dict]):
    """The paper's table in miniature: per depth, accuracy and loss of each checkpoint."""
    depths = sorted({row["exit"] for r in results for row in r["exits"]})
    print("\nper depth: exact-match accuracy / validation loss")
    print(f"{'layers':>7}" + "".join(f"{r['label']:>24}" for r in results))
    for d in depths:
        cells = []
        for r in results:
            row = next((x for x in r["exits"] if x["exit"] == d), None)
            cells.append("-" if row is None else f"{row.get('accuracy', float('nan')):.1%} / {row['val_loss']:.3f}")
        print(f"{d:>7}" + "".join(f"{c:>24}" for c in cells))


def plot(results: list[dict], path: str):
    """Per exit: accuracy, loss, KL and cosine of each checkpoint; and a second figure (path's name + _positions)
    with KL and cosine per answer token, one curve per exit, a row per checkpoint (the paper's Figures 4-5)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("accuracy", "exact-match accuracy"), ("val_loss", "validation loss"),
              ("kl_last_exit", "KL(last || exit)"), ("cosine_to_last", "cosine to last layer")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for r in results:
            rows = [x for x in r["exits"] if key in x]
            ax.plot([x["exit"] for x in rows], [x[key] for x in rows], marker="o", label=r["label"])
        ax.set_title(title)
        ax.set_xlabel("layers")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(results), 2, figsize=(9, 2.8 * len(results)), squeeze=False)
    for (ax_kl, ax_cos), r in zip(axes, results):
        for row in r["exits"][:-1]:  # the last layer against itself: KL 0, cosine 1
            ax_kl.plot(row["kl_by_position"], marker=".", label=f"layer {row['exit']}")
            ax_cos.plot(row["cosine_by_position"], marker=".", label=f"layer {row['exit']}")
        ax_kl.set_title(f"{r['label']}: KL(last || exit)")
        ax_cos.set_title(f"{r['label']}: cosine to last layer")
        for ax in (ax_kl, ax_cos):
            ax.set_xlabel("answer token")
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + "_positions.png", dpi=120)
    plt.close(fig)


# --- the paper's setting in miniature: a base model pretrained on plain text (tasks.corpus) with the next-token
# loss, then fine-tuned on the instruction tasks by SoFT, SFT and SFT+ICT with the same number of steps

def runs(pretrain_steps: int, steps: int, ict_steps: int) -> dict:
    """name: (label, the run it starts from, its trainer flags). SFT+ICT spends its steps as SFT for
    steps - ict_steps, then tunes a head per exit on the frozen model for ict_steps: equal fine-tuning steps."""
    pretrain = ["--pretrain", "--max_steps", str(pretrain_steps), "--lr", "3e-3", "--warmup", "30"]
    tune = ["--lr", "1e-3", "--min_lr", "1e-4", "--warmup", "20", "--beta2", "0.95"]
    n, m = str(steps), str(steps - ict_steps)
    return {
        "base": ("base, last layer pretrained", None, pretrain + ["--mode", "sft"]),
        "sorted_base": ("base, every exit pretrained", None, pretrain + ["--mode", "sorted"]),
        "soft": ("SoFT", "base", tune + ["--mode", "sorted", "--max_steps", n]),
        "sft": ("SFT", "base", tune + ["--mode", "sft", "--max_steps", n]),
        "sft_part": ("SFT, first part of SFT+ICT", "base", tune + ["--mode", "sft", "--max_steps", m]),
        "sft_ict": ("SFT+ICT", "sft_part", tune + ["--mode", "ict", "--max_steps", str(ict_steps)]),
        "soft_no_norm": ("SoFT, no exit norm", "base", tune + ["--mode", "sorted", "--no_exit_norm", "--max_steps", n]),
        "soft_heads": ("SoFT, a head per exit", "base", tune + ["--mode", "sorted", "--separate_heads",
                                                                "--max_steps", n]),
        "soft_sorted_base": ("SoFT from sorted base", "sorted_base", tune + ["--mode", "sorted", "--max_steps", n]),
        "sft_sorted_base": ("SFT from sorted base", "sorted_base", tune + ["--mode", "sft", "--max_steps", n]),
    }


VARIANTS = {  # the runs each question compares
    "paper": ["soft", "sft", "sft_ict"],
    "no_norm": ["soft", "soft_no_norm"],
    "separate_heads": ["soft", "soft_heads"],
    "sorted_pretraining": ["soft", "sft", "soft_sorted_base", "sft_sorted_base"],
}


def reproduce(folder: str, variant: str, plan: dict) -> list[tuple[str, str]]:
    """Train what the variant compares, and the runs they start from, into folder/NAME (a run already there is
    reused: the variants share the base and SoFT); returns (label, checkpoint folder) of the compared runs."""
    trainer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sorted_train.py")

    def train(name: str):
        label, parent, flags = plan[name]
        out = os.path.join(folder, name)
        if os.path.exists(os.path.join(out, "latest")):
            print(f"=== {name}: reusing {out} (delete it to train it again)")
            return out
        if parent:
            flags = flags + ["--init", train(parent)]
        print(f"\n=== training {name} ({label}): python sorted_train.py {' '.join(flags)} --out {out}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run([sys.executable, trainer, *flags, "--eval_interval", "0", "--save_interval", "0",
                           "--out", out]).returncode:
            raise DataError(f"training {name} failed")
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s")
        return out
    return [(plan[name][0], train(name)) for name in VARIANTS[variant]]


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-exit quality, agreement, KL and cosine of (sorted) checkpoints.")
    p.add_argument("--ckpt", default="out", help="checkpoint folder")
    p.add_argument("--vs", nargs="*", default=[], help="more checkpoints to put side by side")
    p.add_argument("--data", default=None,
                   help="Alpaca JSON/JSONL to evaluate on: all of it, or the part the trainer held out if the "
                        "checkpoint was trained on it (default: the trainer's held-out split)")
    p.add_argument("--num_examples", type=int, default=256, help="held-out examples to use")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in each checkpoint folder)")
    p.add_argument("--exits", default=None,
                   help="comma-separated depths to analyse (default: the checkpoint's trained exits, else evenly "
                        "spaced ones); the last layer is always included")
    p.add_argument("--batch_size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--plot", default=None, help="draw the curves into this PNG (needs matplotlib)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--reproduce", nargs="?", const="out/reproduce", default=None, metavar="DIR",
                   help="pretrain a base, fine-tune it as --variant says into DIR, then compare the fine-tunings")
    p.add_argument("--variant", default="paper", choices=list(VARIANTS),
                   help="--reproduce: paper (SoFT, SFT, SFT+ICT), no_norm (SoFT without the exit norm), "
                        "separate_heads (SoFT with a head per exit), sorted_pretraining (SoFT and SFT from a "
                        "base pretrained at every exit)")
    p.add_argument("--pretrain_steps", type=int, default=600, help="--reproduce: steps pretraining the base")
    p.add_argument("--steps", type=int, default=400, help="--reproduce: fine-tuning steps of every method")
    p.add_argument("--ict_steps", type=int, default=100, help="--reproduce: of those, SFT+ICT's tuning its heads")
    a = p.parse_args(argv)
    if a.plot or a.reproduce:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            if a.plot:
                sys.exit("error: --plot needs matplotlib: pip install matplotlib")
            print("note: matplotlib is not installed, so --reproduce saves no plot")
    if not 0 < a.ict_steps < a.steps:
        sys.exit(f"error: --ict_steps {a.ict_steps} must lie between 0 and --steps {a.steps}")
    try:
        t0 = time.perf_counter()
        if a.reproduce:
            runs_ = reproduce(a.reproduce, a.variant, runs(a.pretrain_steps, a.steps, a.ict_steps))
            a.plot = a.plot or os.path.join(a.reproduce, f"{a.variant}.png")
            a.json = a.json or os.path.join(a.reproduce, f"{a.variant}.json")
        else:
            runs_ = [(None, ckpt) for ckpt in [a.ckpt] + a.vs]
        device, dtype = device_and_dtype(a.device, a.dtype)
        if a.batch_size < 1 or a.num_examples < 1:
            raise FlagError("--batch_size and --num_examples must be at least 1")
        results = []
        for label, ckpt in runs_:
            print(f"\nanalysing {ckpt} ...", flush=True)
            exits = parse_depths(a.exits, read_args(ckpt)[0].n_layers, "--exits") if a.exits else None
            result = analyze(ckpt, held_out_of(ckpt, a.data, a.num_examples), a.tokenizer, device, dtype, exits,
                             a.batch_size)
            result["label"] = label or result["mode"] or ckpt
            results.append(result)
        labels = [r["label"] for r in results]
        for r in results:
            if labels.count(r["label"]) > 1:  # two checkpoints of one mode: name them by folder
                r["label"] = r["ckpt"]
        for r in results:
            print_table(r)
        if len(results) > 1:
            print_comparison(results)
    except (CheckpointError, DataError, FlagError) as e:
        sys.exit(f"error: {e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {a.json}")
    if a.plot:
        try:
            plot(results, a.plot)
            print(f"wrote {a.plot} and {os.path.splitext(a.plot)[0]}_positions.png")
        except ImportError:
            print("note: matplotlib is not installed; no plot")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
