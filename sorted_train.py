"""Sorted Fine-Tuning (SoFT, arXiv 2309.08968) of LLaMA 2: every exit through the shared norm and head.

One forward pass through the full depth keeps the hidden state at each exit (13B: layers 12, 16, ..., 40);
each goes through the same final RMSNorm and the same output head; the exits' cross-entropies on the
response tokens are summed into one loss and back-propagated together. --mode sft trains the last layer
only (the paper's standard fine-tuning baseline); --mode ict freezes an SFT model and tunes a separate head
per exit (SFT+ICT, the paper's early-exit baseline).

  python sorted_train.py                                   # the tiny demo on built-in tasks, CPU, minutes
  python sorted_train.py --estimate --nproc 8 --init llama-2-13b ...   # per-GPU memory, simulated here
  torchrun --nproc_per_node 8 sorted_train.py --init llama-2-13b --data alpaca_data.json
  torchrun --nproc_per_node 8 --max-restarts 1 sorted_train.py ... --resume   # a killed worker carries on

Under torchrun the model is sharded with FSDP2 (distributed.py: fully_shard per block, then the root; NCCL on
CUDA, gloo on CPU). With --dtype bfloat16 (the default on CUDA) parameters are kept in float32 and computed in
bfloat16, gradients reduced in float32.
"""
import argparse
import contextlib
import io
import json
import math
import os
import random
import resource
import string
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distributed
from distributed import Dist
from generate import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_prompt
from load_llama import CheckpointError, Tokenizer, iter_state_dict, load_tokenizer, read_args, read_json, resolve
from model import PRESETS, ModelArgs, Transformer, default_exits, init_weights


class DataError(Exception):
    """A problem with --data or a flag; printed as one line."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sorted fine-tuning (SoFT) of LLaMA 2.")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None, help="start from these weights (Meta, Hugging Face or our layout)")
    g.add_argument("--model", default="tiny", choices=list(PRESETS),
                   help="random init of this shape (without --init)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="Alpaca JSON (a list) or JSONL of {instruction, input, output}; "
                                                "default: the built-in tasks")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer.model (default: beside --init, or trained on the built-in tasks)")
    g.add_argument("--vocab_size", type=int, default=512, help="size of the tokenizer trained for the built-in tasks")
    g.add_argument("--max_seq_len", type=int, default=256, help="longer examples are truncated (and counted)")
    g.add_argument("--val_size", type=int, default=256, help="examples held out for validation")
    g.add_argument("--num_examples", type=int, default=32000, help="size of the built-in training set")
    g = p.add_argument_group("objective")
    g.add_argument("--mode", default="sorted", choices=["sorted", "sft", "ict"])
    g.add_argument("--exits", default=None, help="comma-separated depths, e.g. 12,16,...,40 (default: evenly spaced)")
    g.add_argument("--exit_weights", default=None, help="comma-separated loss weights, one per exit (default: all 1)")
    g = p.add_argument_group("optimisation (defaults: the demo's; with --init, fine-tuning's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; with --init 2e-5)")
    g.add_argument("--min_lr", type=float, default=None, help="end of the cosine decay (default lr/10; with --init 0)")
    g.add_argument("--warmup", type=float, default=None,
                   help="warmup steps, or a fraction of all steps if < 1 (default 30; with --init 0.03)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--beta2", type=float, default=None, help="AdamW's beta2 (default 0.95; with --init 0.999)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--batch_size", type=int, default=32, help="examples per micro-batch per process")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per step (global batch = batch x accum x processes)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="checkpoints and log.jsonl go here")
    g.add_argument("--eval_interval", type=int, default=100,
                   help="steps between validation losses (0: only at the end)")
    g.add_argument("--save_interval", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out if there is one")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on CPU); weights stay float32")
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g = p.add_argument_group("memory plan (no training)")
    g.add_argument("--estimate", action="store_true",
                   help="simulate one step of a torchrun run of --nproc processes and print each one's peak memory")
    g.add_argument("--nproc", type=int, default=8, help="--estimate: processes (GPUs) in the simulated run")
    g.add_argument("--gpu_memory", type=float, default=80, help="--estimate: GiB of memory per GPU")
    g.add_argument("--measure_memory", action="store_true",
                   help="run that step for real (under torchrun or alone) and print its measured peak memory")
    return p.parse_args(argv)


# --- data: Alpaca records, the built-in tasks, tokenization, batches

def load_records(path: str) -> list[dict]:
    """Alpaca JSON (a list of objects) or JSONL (one object per line), checked record by record."""
    if not os.path.isfile(path):
        raise DataError(f"--data {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot read ({e})")
    decoder, records = json.JSONDecoder(), []
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON list: decode element by element to name the broken record
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos < len(text) and text[pos] == "]":
                break
            try:
                rec, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(f"--data {path}: record {len(records) + 1} is not valid JSON ({e.msg}, line {e.lineno})")
            records.append(rec)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"--data {path}: record {len(records) + 1} (line {lineno}) is not valid JSON ({e.msg})")
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise DataError(f"--data {path}: record {i} is not an object with instruction, input, output")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"--data {path}: record {i} lacks a string field '{key}'")
        if not isinstance(rec.get("input", ""), str):
            raise DataError(f"--data {path}: record {i} has a non-string 'input'")
    if not records:
        raise DataError(f"--data {path}: the dataset is empty")
    return records


def dataset(a) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: --data split by a fixed permutation (the same for any --seed), or the built-in tasks."""
    records = load_records(a.data) if a.data else builtin_records(a.num_examples + a.val_size, seed=1234)
    split = random.Random(1234).sample(range(len(records)), len(records))
    n_val = min(a.val_size, len(records) // 10) if a.data else a.val_size
    return [records[i] for i in split[n_val:]], [records[i] for i in split[:n_val]]


def spaced(items) -> str:
    return " ".join(str(x) for x in items)


# small tasks with checkable answers, from a lookup (one layer suffices) to sorting, counting and adding
TASKS = {
    "next": ("Which letter comes next in the alphabet?",
             lambda r: (c := r.choice(string.ascii_lowercase[:-1]), chr(ord(c) + 1))),
    "parity": ("Is the number even or odd?",
               lambda r: (n := r.randint(0, 999), str(n), "even" if n % 2 == 0 else "odd")[1:]),
    "last": ("What is the last letter?",
             lambda r: (s := r.choices(string.ascii_lowercase, k=r.randint(3, 8)), spaced(s), s[-1])[1:]),
    "max": ("Which digit is the largest?",
            lambda r: (d := r.choices(range(10), k=r.randint(3, 8)), spaced(d), str(max(d)))[1:]),
    "sort": ("Sort the digits in increasing order.",
             lambda r: (d := r.choices(range(10), k=r.randint(4, 8)), spaced(d), spaced(sorted(d)))[1:]),
    "count": ("Count from the first number to the second.",
              lambda r: (a := r.randint(0, 90), b := a + r.randint(2, 8), f"{a} to {b}", spaced(range(a, b + 1)))[2:]),
    "add": ("Add the two numbers.",
            lambda r: (a := r.randint(0, 99), b := r.randint(0, 99), f"{a} + {b}", str(a + b))[2:]),
}


def builtin_records(n: int, seed: int) -> list[dict]:
    """n examples drawn evenly from TASKS, the same for the same seed."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        task = list(TASKS)[i % len(TASKS)]
        instruction, make = TASKS[task]
        inp, out = make(rng)
        records.append({"instruction": instruction, "input": inp, "output": out, "task": task})
    rng.shuffle(records)
    return records


def train_tokenizer(records: list[dict], vocab_size: int, path: str):
    """A small LLaMA-style sentencepiece BPE (unk 0, bos 1, eos 2, digits split, byte fallback), written to path.

    The template's fixed strings are single tokens, as a chat template's markers are: a tiny model then spends
    its compute on the instruction and the input rather than on the boilerplate.
    """
    import sentencepiece as spm
    texts = [alpaca_prompt(r["instruction"], r["input"]) + r["output"] for r in records]
    fixed = [PROMPT_INPUT.split("{instruction}")[0], PROMPT_NO_INPUT.split("{instruction}")[0],
             "\n\n### Input:\n", "\n\n### Response:\n"]
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            split_digits=True, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
            hard_vocab_limit=False, user_defined_symbols=[s.replace(" ", "\u2581") for s in fixed])
    except RuntimeError as e:  # e.g. fewer pieces than the 256 bytes + characters need
        raise DataError(f"--vocab_size {vocab_size}: sentencepiece refused ({str(e).split('] ')[-1][:200]})")
    atomic_write(path, buf.getvalue())


def atomic_write(path: str, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tokenize(records: list[dict], tokenizer: Tokenizer, max_seq_len: int):
    """(ids, n_prompt) per record: BOS + templated prompt, then response + EOS; counts of truncated/dropped."""
    examples, truncated, dropped = [], 0, 0
    for r in records:
        prompt = tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", "")), bos=True)
        ids = prompt + tokenizer.encode(r["output"], bos=False, eos=True)
        if len(prompt) >= max_seq_len:  # no response token would be left to learn from
            dropped += 1
            continue
        if len(ids) > max_seq_len:
            ids, truncated = ids[:max_seq_len], truncated + 1
        examples.append((ids, len(prompt)))
    return examples, truncated, dropped


def collate(examples, device):
    """Pad to the longest in the batch; labels are the next token, -100 on the prompt and the padding."""
    T = max(len(ids) for ids, _ in examples) - 1
    tokens = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        ids = torch.tensor(ids)
        tokens[i, :len(ids) - 1] = ids[:-1]
        labels[i, n_prompt - 1:len(ids) - 1] = ids[n_prompt:]  # predict the response tokens only
    return tokens.to(device), labels.to(device)


def n_targets(example) -> int:
    ids, n_prompt = example
    return len(ids) - n_prompt


def step_batches(examples, step: int, a, rank: int, world: int):
    """This rank's micro-batches for a step and the global batch's target count; a pure function of the step,
    so a resumed run sees exactly the batches an uninterrupted one would."""
    global_batch = a.batch_size * a.grad_accum * world
    per_epoch = len(examples) // global_batch
    epoch, i = divmod(step, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(a.seed + epoch)).tolist()
    chosen = [examples[j] for j in order[i * global_batch:(i + 1) * global_batch]]
    micro = [chosen[(m * world + rank) * a.batch_size:(m * world + rank + 1) * a.batch_size] for m in range(a.grad_accum)]
    return micro, sum(n_targets(e) for e in chosen)


# --- the loss: cross-entropy through the shared head without (tokens x vocab) tensors that outlive a chunk

class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(x_i @ W.T, y_i), with the gradient worked out chunk by chunk in the forward pass.

    Only a (chunk, vocab) slice of the logits exists at any time, and nothing is recomputed in backward,
    which only scales the stored gradients: summing many exits costs their matmuls and no more memory
    than their hidden states.
    """

    @staticmethod
    def forward(ctx, x, weight, labels, row_weights, chunk: int):
        ce = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, x.size(0), chunk):
            xc, yc = x[s:s + chunk], labels[s:s + chunk]
            logits = (xc @ weight.T).float()  # (chunk, vocab)
            target = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            # exp(logit - max), written over the logits to save memory; clamped so that no probability is a
            # denormal float, which would slow the CPU matmuls below tenfold (e^-80 is still a normal float)
            g = logits.sub_(top).clamp_(min=-80.0).exp_()
            total = g.sum(-1, keepdim=True)
            ce[s:s + chunk] = (top + total.log()).squeeze(1) - target
            # d CE / d logits = softmax - onehot
            g.div_(total)
            g[torch.arange(len(yc), device=g.device), yc] -= 1.0
            g.mul_(row_weights[s:s + chunk, None])
            g = g.to(weight.dtype)
            grad_x[s:s + chunk] = g @ weight
            grad_w.add_(g.T @ xc)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce)
        return (ce * row_weights).sum(), ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None


def linear_cross_entropy(x, weight, labels, row_weights):
    """(weighted sum of the rows' cross-entropies, per-row cross-entropy) for logits x @ weight.T."""
    chunk = max(1, 2 ** 24 // weight.size(0))  # rows per chunk: ~16M logits at a time
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(x, weight, labels, row_weights, chunk)
    ce = torch.cat([torch.nn.functional.cross_entropy((x[s:s + chunk] @ weight.T).float(), labels[s:s + chunk],
                                                      reduction="none") for s in range(0, x.size(0), chunk)])
    return (ce * row_weights).sum(), ce


def batch_tensors(examples, device):
    """tokens (B, T), and the flat positions (N,) of the response tokens with the tokens they predict (N,), all
    on device. The positions are found on the CPU, so that no boolean mask makes the GPU wait."""
    tokens, labels = collate(examples, "cpu")
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    return tokens.to(device), positions.to(device), labels.view(-1)[positions].to(device)


class SortedObjective(nn.Module):
    """The training loss as a module, so that FSDP's root wraps every use of the shared norm and head."""

    def __init__(self, model: Transformer, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, tokens, positions, targets, exits: list[int], weights: list[float], scale: float):
        """(loss, per-exit sums of token cross-entropies (E,)); loss = scale * sum_e weights[e] * CE sum at e.

        positions (N,) are the response tokens' indices in the flattened (B*T) batch and targets (N,) the tokens
        they predict: the head never sees a prompt position.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "ict"):  # ict: the trunk is frozen
            hidden = [h.flatten(0, 1)[positions] for h in self.model(tokens, exits=exits)]  # E x (N, dim)
        N = targets.numel()
        if self.mode == "ict":  # a separate head per exit
            heads = [self.model.exit_heads[str(e)] for e in exits]
            parts = [linear_cross_entropy(head.norm(h), head.output.weight, targets,
                                          torch.full((N,), w * scale, device=targets.device))
                     for head, h, w in zip(heads, hidden, weights)]
            return sum(p[0] for p in parts), torch.stack([p[1].sum() for p in parts])
        x = torch.cat([self.model.norm(h) for h in hidden])  # (E*N, dim): every exit through the shared norm ...
        w = torch.tensor(weights, device=targets.device).repeat_interleave(N) * scale
        loss, ce = linear_cross_entropy(x, self.model.output.weight, targets.repeat(len(exits)), w)  # ... and head
        return loss, ce.view(len(exits), N).sum(1)


def forward_backward(objective, micro, exits: list[int], weights: list[float], scale: float,
                     autocast=contextlib.nullcontext()):
    """Forward (under autocast) and backward over the micro-batches (tokens, positions, targets), gradients
    adding up; returns the per-exit sums of token cross-entropies (E,).

    Under FSDP every backward reduce-scatters its gradients, so that a rank holds only its shard of them
    between micro-batches, never the whole float32 gradient.
    """
    sums = 0
    for tokens, positions, targets in micro:
        with autocast:
            loss, ce = objective(tokens, positions, targets, exits, weights, scale)
        loss.backward()
        sums = sums + ce.detach()
    return sums


# --- the model, its optimizer and the run's settings

def model_args(a, vocab_size: int | None) -> ModelArgs:
    """The shape to train: --init's, or the preset with its overrides (vocabulary: the tokenizer's)."""
    if a.init:
        args, _ = read_args(a.init)
    else:
        args = ModelArgs(**PRESETS[a.model])
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(a, name) is not None:
                setattr(args, name, getattr(a, name))
        args.vocab_size = vocab_size or args.vocab_size
    args.max_seq_len = max(args.max_seq_len, a.max_seq_len)
    if args.dim % args.n_heads or args.n_heads % (args.n_kv_heads or args.n_heads):
        raise DataError(f"--dim {args.dim}, --n_heads {args.n_heads}, --n_kv_heads {args.n_kv_heads}: "
                        "dim must divide into heads and heads into kv heads")
    return args


def fill_defaults(a):
    """Optimisation defaults: the demo's for random init, fine-tuning's with --init (a pretrained model would be
    wrecked by the demo's lr 3e-3). The paper's lr (2e-5), Alpaca's warmup and decay to 0, AdamW's beta2."""
    tuned = a.init is not None
    a.lr = a.lr if a.lr is not None else (2e-5 if tuned else 3e-3)
    a.min_lr = a.min_lr if a.min_lr is not None else (0.0 if tuned else a.lr / 10)
    a.warmup = a.warmup if a.warmup is not None else (0.03 if tuned else 30)
    a.beta2 = a.beta2 if a.beta2 is not None else (0.999 if tuned else 0.95)
    for flag in ("batch_size", "grad_accum", "max_seq_len", "vocab_size", "nproc"):
        if getattr(a, flag) < 1:
            raise DataError(f"--{flag} must be at least 1")
    if a.device not in ("auto", "cuda", "cpu"):
        raise DataError(f"--device {a.device}: expected auto, cpu or cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")


def build_model(args: ModelArgs, mode: str, exits, d: Dist, compute_dtype, activation_checkpointing=False,
                compile=False, check=True):
    """The model on the meta device, checked to fit, sharded (distributed.shard), then given float32 memory on
    d.device: its values come from load_weights."""
    with torch.device("meta"):
        model = Transformer(args)
        if mode == "ict":
            model.add_exit_heads(exits)
    if mode == "ict":  # the trunk stays as SFT left it
        model.requires_grad_(False)
        model.exit_heads.requires_grad_(True)
    if check:
        check_memory(model, d)
    objective = SortedObjective(model, mode)
    distributed.shard(model, objective, d, compute_dtype, activation_checkpointing, compile)
    objective.to_empty(device=d.device)
    model.init_rope(d.device)
    return model, objective


def check_memory(model, d: Dist):
    """Refuse a run whose float32 weights, gradients and AdamW moments alone overflow the device."""
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = (4 * n_all + 12 * n_trained) / d.world  # bytes per process, sharded by FSDP
    if d.device.type == "cuda":
        have, where = torch.cuda.get_device_properties(d.device).total_memory, "GPU"
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        where = "process's share of this machine's memory"
    if need > have:
        raise DataError(f"{n_all / 1e9:.1f}B parameters need about {need / 2**30:.0f} GiB per process for float32 "
                        f"weights, gradients and AdamW, more than the {have / 2**30:.0f} GiB of this {where}: "
                        "use more GPUs with torchrun (plan it with --estimate --nproc N)")


def get_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def parse_exits(a, n_layers: int):
    if a.exits is None:
        exits = default_exits(n_layers)
    else:
        try:
            exits = [int(x) for x in a.exits.split(",") if x.strip()]
        except ValueError:
            raise DataError(f"--exits {a.exits!r}: expected comma-separated layer counts such as 12,16,20")
    if not exits or any(not 1 <= e <= n_layers for e in exits):
        raise DataError(f"--exits {a.exits}: every exit must be within 1..{n_layers} (the model's layers)")
    if any(x >= y for x, y in zip(exits, exits[1:])):
        raise DataError(f"--exits {a.exits}: exits must be strictly increasing")
    weights = [1.0] * len(exits)
    if a.exit_weights is not None:
        try:
            weights = [float(x) for x in a.exit_weights.split(",")]
        except ValueError:
            raise DataError(f"--exit_weights {a.exit_weights!r}: expected comma-separated numbers")
        if len(weights) != len(exits):
            raise DataError(f"--exit_weights has {len(weights)} values for {len(exits)} exits")
    return exits, weights


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kilobytes on Linux


@torch.no_grad()
def evaluate(objective, examples, exits, batch_size: int, d: Dist, autocast):
    """Per-exit mean token cross-entropy on the held-out examples."""
    objective.eval()
    sums = torch.zeros(len(exits) + 1, dtype=torch.float64)  # per exit, then the token count
    mine = examples[d.rank::d.world]
    for b in range(math.ceil(math.ceil(len(examples) / d.world) / batch_size)):  # the same count on every rank
        batch = mine[b * batch_size:(b + 1) * batch_size]
        with autocast:  # FSDP needs every rank in every forward: one that has run out does one example, unused
            _, ce = objective(*batch_tensors(batch or examples[:1], d.device), exits, [1.0] * len(exits), 1.0)
        if batch:
            sums[:-1] += ce.double().cpu()
            sums[-1] += sum(n_targets(e) for e in batch)
    sums = d.sum(sums)
    distributed.reshard(objective)
    objective.train()
    return (sums[:-1] / sums[-1]).tolist()


def compute_dtype_of(flag: str, device_type: str):
    """--dtype: auto is bfloat16 on CUDA, float32 elsewhere."""
    if flag == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, flag)


# --- training

def train(a):
    fill_defaults(a)
    d = distributed.setup(torch.cuda.is_available() and a.device in ("auto", "cuda"))
    say = print if d.master else (lambda *_, **__: None)
    torch.manual_seed(a.seed)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    compute_dtype = compute_dtype_of(a.dtype, d.device.type)
    os.makedirs(a.out, exist_ok=True)
    latest = os.path.join(a.out, "latest")
    resume_from = os.path.realpath(latest) if a.resume and os.path.exists(latest) else None

    # tokenizer and data
    train_records, val_records = dataset(a)
    records = train_records + val_records
    tok_path = os.path.join(a.out, "tokenizer.model")
    if resume_from:
        tok_src = os.path.join(resume_from, "tokenizer.model")
    elif a.tokenizer:
        tok_src = a.tokenizer
    elif a.init and os.path.exists(os.path.join(resolve(a.init), "tokenizer.model")):
        tok_src = os.path.join(resolve(a.init), "tokenizer.model")
    elif a.data:
        raise DataError("--data needs a tokenizer: pass --tokenizer path/to/tokenizer.model "
                        "(or an --init folder holding one)")
    else:
        tok_src = None
    if d.master:
        if tok_src is None:
            train_tokenizer(records, a.vocab_size, tok_path)
        elif os.path.realpath(tok_src) != os.path.realpath(tok_path):
            tokenizer = load_tokenizer(tok_src)  # fails with one line if unreadable
            with open(tokenizer.path, "rb") as f:
                atomic_write(tok_path, f.read())
    d.barrier()
    tokenizer = load_tokenizer(tok_path)
    train_ex, truncated, dropped = tokenize(train_records, tokenizer, a.max_seq_len)
    val_ex, _, _ = tokenize(val_records, tokenizer, a.max_seq_len)
    if not train_ex:
        raise DataError("no training example has a response within --max_seq_len")

    # the model, sharded, with its weights
    args = model_args(a, tokenizer.vocab_size)
    if a.init and args.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"--init {a.init} has a vocabulary of {args.vocab_size} but the tokenizer "
                              f"{tok_src} has {tokenizer.vocab_size}: pass the matching --tokenizer")
    exits, exit_weights = parse_exits(a, args.n_layers)
    loss_exits, loss_weights = (exits, exit_weights) if a.mode != "sft" else ([args.n_layers], [1.0])
    if a.mode == "ict" and not a.init:
        raise DataError("--mode ict tunes exit heads on a trained model: pass --init with an SFT checkpoint")
    model, objective = build_model(args, a.mode, exits, d, compute_dtype, a.activation_checkpointing, a.compile)
    if a.init:
        layout_args, layout = read_args(a.init)
        distributed.load_weights(model, iter_state_dict(resolve(a.init), layout_args, layout), a.init)
    else:
        g = torch.Generator().manual_seed(a.seed)
        shapes = [(n, p.shape) for n, p in model.named_parameters()]
        distributed.load_weights(model, ((n, init_weights(n, s, args.n_layers, g)) for n, s in shapes),
                                 "random init")
    if a.mode == "ict":  # each exit head starts as a copy of the shared head
        with torch.no_grad():
            for head in model.exit_heads.values():
                distributed.local(head.norm.weight).copy_(distributed.local(model.norm.weight))
                distributed.local(head.output.weight).copy_(distributed.local(model.output.weight))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)
    # one process has no FSDP to cast for it: autocast does, if asked
    autocast = torch.autocast(d.device.type, dtype=compute_dtype, enabled=not d.fsdp and
                              compute_dtype != torch.float32)

    # the schedule, and where a resumed run stands in it
    global_batch = a.batch_size * a.grad_accum * d.world
    per_epoch = len(train_ex) // global_batch
    if per_epoch == 0:
        raise DataError(f"{len(train_ex)} training examples are fewer than one global batch of {global_batch}")
    total = a.max_steps if a.max_steps is not None else max(1, int(a.epochs * per_epoch))
    warmup = int(a.warmup * total) if a.warmup < 1 else int(a.warmup)
    step = 0
    if resume_from:
        saved = read_json(os.path.join(resume_from, "params.json"))
        if saved.get("global_batch", global_batch) != global_batch:
            raise DataError(f"{resume_from} was trained with a global batch of {saved['global_batch']} (batch_size x "
                            f"grad_accum x processes), this run has {global_batch}: resume with the same global "
                            "batch, so that every step sees the examples it would have seen")
        distributed.restore_checkpoint(resume_from, objective, opt, d)
        step = saved["step"]
        say(f"resuming from {resume_from} at step {step}")
    log_path = os.path.join(a.out, "log.jsonl")
    if d.master:  # a resumed log continues where its checkpoint was written
        kept = []
        if resume_from and os.path.exists(log_path):
            with open(log_path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {args.n_layers} layers, dim {args.dim}, {n_params / 1e6:.1f}M parameters, vocab {args.vocab_size}; "
        f"mode {a.mode}, exits {exits}" + (f" (loss at {loss_exits})" if a.mode == "sft" else ""))
    say(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {truncated} truncated and {dropped} dropped "
        f"at max_seq_len {a.max_seq_len}; {total} steps of {global_batch} ({d.world} process"
        f"{'es' * (d.world > 1)}, {d.device}); lr {a.lr:g}, warmup {warmup} steps, cosine to {a.min_lr:g}")

    def save():
        extra = dict(exit_heads=exits) if a.mode == "ict" else {}
        distributed.save_checkpoint(a.out, step, objective, model, opt, d, compute_dtype, tok_path, exits=exits,
                                    mode=a.mode, world_size=d.world, global_batch=global_batch,
                                    train_config=vars(a), **extra)

    def log(entry):
        if d.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    pbar = tqdm(total=total, initial=step, disable=not d.master, dynamic_ncols=True)
    while step < total:
        t0 = time.perf_counter()
        # learning rate: warmup, then cosine decay
        lr = get_lr(step, a.lr, a.min_lr, warmup, total)
        for group in opt.param_groups:
            group["lr"] = lr
        # forward and backward on this rank's micro-batches; the loss is a mean over every target token of the
        # global batch, and FSDP averages gradients over ranks, hence the scale
        micro, n_global = step_batches(train_ex, step, a, d.rank, d.world)
        sums = forward_backward(objective, [batch_tensors(b, d.device) for b in micro], loss_exits, loss_weights,
                                d.world / n_global, autocast)
        n_tokens = sum(len(ids) for batch in micro for ids, _ in batch)
        stats = d.sum(torch.tensor([*sums.tolist(), n_tokens], dtype=torch.float64))
        exit_loss = (stats[:-1] / n_global).tolist()
        # clip, and stop before a non-finite gradient reaches the weights
        norm = nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if not all(math.isfinite(x) for x in exit_loss) or not math.isfinite(norm.item()):
            pbar.close()
            raise DataError(f"non-finite loss or gradient at step {step + 1} (losses {exit_loss}); stopping without "
                            f"saving, the last checkpoint in {a.out} is intact: lower --lr or check the data")
        # step
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        # log
        dt = time.perf_counter() - t0
        losses = {str(e): round(x, 4) for e, x in zip(loss_exits, exit_loss)}
        log(dict(step=step, loss=losses, lr=lr, sec_per_step=round(dt, 4),
                 tokens_per_sec=round(stats[-1].item() / dt, 1), peak_mem_gb=round(peak_memory_gb(d.device), 3)))
        pbar.set_postfix_str(" ".join(f"L{e} {x:.3f}" for e, x in losses.items()))
        pbar.update(1)
        # evaluate every exit on the held-out examples
        if val_ex and (step == total or (a.eval_interval and step % a.eval_interval == 0)):
            val = evaluate(objective, val_ex, exits, a.batch_size, d, autocast)
            log(dict(step=step, val_loss={str(e): round(x, 4) for e, x in zip(exits, val)}))
            if d.master:
                pbar.write(f"step {step}: val loss " + " ".join(f"L{e} {x:.3f}" for e, x in zip(exits, val)))
        # save
        if step == total or (a.save_interval and step % a.save_interval == 0):
            save()
    pbar.close()
    say(f"checkpoint: {os.path.join(a.out, 'latest')} -> step_{step:07d}; "
        f"try: python generate.py --ckpt {a.out} --compare")
    if d.fsdp:
        dist.destroy_process_group()


# --- the memory plan: one training step, simulated for N GPUs or measured here

def plan_memory(a, simulate: bool, search: bool = True):
    """--estimate: each process's peak memory in one training step of a torchrun run of --nproc processes,
    simulated on this machine: the trainer's own model building, sharding and step, run on fake tensors (shapes
    without data) with a fake process group (collectives that do nothing). --measure_memory: the same step run
    for real by this run's processes, its peak read from the allocator.

    The batch is the worst case: --batch_size rows of --max_seq_len tokens, every token a target. With `search`,
    the simulation also looks for the largest --batch_size that fits --gpu_memory.
    """
    fill_defaults(a)
    if simulate:
        from torch._subclasses.fake_tensor import FakeTensorMode
        d, tensors = distributed.fake(a.nproc), FakeTensorMode()
        compute_dtype = compute_dtype_of(a.dtype, "cuda")  # planning for GPUs
    else:
        d, tensors = distributed.setup(torch.cuda.is_available() and a.device in ("auto", "cuda")), \
            contextlib.nullcontext()
        compute_dtype = compute_dtype_of(a.dtype, d.device.type)
    args = model_args(a, a.vocab_size if a.model == "tiny" else None)
    exits, exit_weights = parse_exits(a, args.n_layers)
    loss_exits, loss_weights = (exits, exit_weights) if a.mode != "sft" else ([args.n_layers], [1.0])
    measured = distributed.AllocatorPeak(d.device) if not simulate else contextlib.nullcontext()
    with tensors, measured:
        model, objective = build_model(args, a.mode, exits, d, compute_dtype, a.activation_checkpointing,
                                       check=not simulate)
        if not simulate:  # real numbers, as a run would start with (no denormals or NaNs to slow the CPU)
            g = torch.Generator().manual_seed(a.seed)
            distributed.load_weights(model, ((n, init_weights(n, p.shape, args.n_layers, g))
                                             for n, p in model.named_parameters()), "random init")
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)

        def batch(B: int, T: int):
            tokens = torch.zeros(B, T, dtype=torch.long, device=d.device)
            return tokens, torch.arange(B * T, device=d.device), torch.zeros(B * T, dtype=torch.long, device=d.device)

        def step(B: int, T: int, tracker=None):
            def micro():  # from the second micro-batch on, each starts as the one before did: two show the peak
                for _ in range(min(a.grad_accum, 2)):
                    if tracker:
                        tracker.again()
                    yield batch(B, T)
            forward_backward(objective, micro(), loss_exits, loss_weights, 1.0 / (B * T))
            nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)

        def peak(B: int) -> dict:
            with distributed.PeakMemory(objective, opt) as tracker:
                step(B, a.max_seq_len, tracker)
            return tracker.peak

        step(1, 8)  # AdamW makes its state in its first step; the step measured is a later one
        result = peak(a.batch_size)
    budget = 0.9 * a.gpu_memory * 2 ** 30  # the rest for the CUDA context, NCCL's buffers, fragmentation
    n_params = sum(p.numel() for p in model.parameters())
    if d.master:
        where = (f"simulated for each of {a.nproc} processes under torchrun" if simulate else
                 f"measured on {d.world} process{'es' * (d.world > 1)} ({d.device})")
        size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
        print(f"memory of one training step, {where}: {args.n_layers} layers, dim {args.dim}, {size} "
              f"parameters, float32 weights and AdamW, {str(compute_dtype).removeprefix('torch.')} compute, "
              f"mode {a.mode}, exits {loss_exits}, batch {a.batch_size} x {a.max_seq_len} tokens (all targets) "
              f"x {a.grad_accum} micro-batches{', activation checkpointing' if a.activation_checkpointing else ''}")
        for kind, n in result.items():
            print(f"  {kind:<24}{gib(n):>10}")
    if simulate:
        fits = result["total"] <= budget
        print(f"{'fits' if fits else 'does not fit'} in {a.gpu_memory:g} GiB per GPU (with 10% of it left for the "
              "CUDA context, NCCL and fragmentation)")
    if simulate and search:
        with tensors:
            best, capped = largest_batch(lambda B: peak(B)["total"] <= budget, a.batch_size, fits)
        print(f"largest --batch_size that fits: {best}{' or more' if capped else ''}" if best else
              "no --batch_size fits: use more GPUs (--nproc), --activation_checkpointing or a shorter --max_seq_len")
    if not simulate:
        total = d.sum(torch.tensor([measured.peak], dtype=torch.float64)).item() / d.world
        if d.master:
            print(f"  {'measured (allocator)':<24}{gib(total):>10}   (mean over the processes)")
    if d.fsdp:
        dist.destroy_process_group()
    return result


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


def main(argv=None):
    a = get_args(argv)
    try:
        if a.estimate or a.measure_memory:
            plan_memory(a, simulate=a.estimate)
        else:
            train(a)
    except (DataError, CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
