"""Sorted Fine-Tuning (SoFT, arXiv 2309.08968) of LLaMA 2: every exit through the shared norm and head.

One forward pass through the full depth keeps the hidden state at each exit (13B: layers 12, 16, ..., 40);
each goes through the same final RMSNorm and the same output head; the exits' cross-entropies on the
response tokens are summed into one loss and back-propagated together. --mode sft trains the last layer
only (the paper's standard fine-tuning baseline); --mode ict freezes an SFT model and tunes a separate head
per exit (SFT+ICT, the paper's early-exit baseline).

  python sorted_train.py                                   # the tiny demo on built-in tasks, CPU, minutes
  torchrun --nproc_per_node 8 sorted_train.py --init llama-2-13b --data alpaca_data.json
  torchrun --nproc_per_node 8 --max-restarts 1 sorted_train.py ... --resume   # a killed worker carries on

Under torchrun the model is sharded with FSDP2 (fully_shard per block, then the root; NCCL on CUDA, gloo on
CPU). On CUDA parameters are kept in float32 and computed in bfloat16, gradients reduced in float32.
"""
import argparse
import io
import json
import math
import os
import random
import resource
import shutil
import string
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from generate import PROMPT_INPUT, PROMPT_NO_INPUT, alpaca_prompt
from load_llama import (CheckpointError, Tokenizer, iter_state_dict, load_tokenizer, read_args, read_json,
                        resolve, save_model)
from model import PRESETS, ModelArgs, Transformer, default_exits, init_weights


class DataError(Exception):
    """A problem with --data or a flag; printed as one line."""


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sorted fine-tuning (SoFT) of LLaMA 2.")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None, help="start from these weights (Meta, Hugging Face or our layout)")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="random init of this shape (without --init)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="Alpaca JSON (a list) or JSONL of {instruction, input, output}; "
                                                "default: the built-in tasks")
    g.add_argument("--tokenizer", default=None, help="tokenizer.model (default: beside --init, or trained on the built-in tasks)")
    g.add_argument("--vocab_size", type=int, default=512, help="size of the tokenizer trained for the built-in tasks")
    g.add_argument("--max_seq_len", type=int, default=256, help="longer examples are truncated (and counted)")
    g.add_argument("--val_size", type=int, default=256, help="examples held out for validation")
    g.add_argument("--num_examples", type=int, default=32000, help="size of the built-in training set")
    g = p.add_argument_group("objective")
    g.add_argument("--mode", default="sorted", choices=["sorted", "sft", "ict"])
    g.add_argument("--exits", default=None, help="comma-separated depths, e.g. 12,16,...,40 (default: evenly spaced)")
    g.add_argument("--exit_weights", default=None, help="comma-separated loss weights, one per exit (default: all 1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min_lr", type=float, default=None, help="end of the cosine decay (default: lr / 10)")
    g.add_argument("--warmup", type=float, default=30, help="warmup steps, or a fraction of all steps if < 1")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--batch_size", type=int, default=32, help="examples per micro-batch per process")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (global batch = batch x accum x world)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="checkpoints and log.jsonl go here")
    g.add_argument("--eval_interval", type=int, default=100, help="steps between validation losses (0: only at the end)")
    g.add_argument("--save_interval", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out if there is one")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on CPU); weights stay float32")
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
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


class SortedObjective(nn.Module):
    """The training loss as a module, so that FSDP's root wraps every use of the shared norm and head."""

    def __init__(self, model: Transformer, mode: str):
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, tokens, labels, exits: list[int], weights: list[float], scale: float):
        """(loss, per-exit sums of token cross-entropies (E,)); loss = scale * sum_e weights[e] * CE sum at e."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "ict"):  # ict: the trunk is frozen
            hidden = self.model(tokens, exits=exits)  # E x (B, T, dim)
        mask = labels != -100
        y = labels[mask]  # (N,) response tokens only: the head never sees prompt positions
        N = y.numel()
        if self.mode == "ict":  # a separate head per exit
            parts = [linear_cross_entropy(self.model.exit_heads[str(e)].norm(h[mask]), self.model.exit_heads[str(e)].output.weight,
                                          y, torch.full((N,), w * scale, device=y.device)) for e, h, w in zip(exits, hidden, weights)]
            return sum(p[0] for p in parts), torch.stack([p[1].sum() for p in parts])
        x = torch.cat([self.model.norm(h[mask]) for h in hidden])  # (E*N, dim): every exit through the shared norm ...
        w = torch.tensor(weights, device=y.device).repeat_interleave(N) * scale
        loss, ce = linear_cross_entropy(x, self.model.output.weight, y.repeat(len(exits)), w)  # ... and the shared head
        return loss, ce.view(len(exits), N).sum(1)


# --- distributed setup and loading weights into (possibly sharded) parameters

def setup_device(a):
    """(rank, world size, device, fsdp?) — FSDP whenever launched by torchrun."""
    cuda = torch.cuda.is_available() and a.device in ("auto", "cuda")
    if a.device not in ("auto", "cuda", "cpu"):
        raise DataError(f"--device {a.device}: expected auto, cpu or cuda")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)  # before NCCL starts, so that each rank talks from its own GPU
        dist.init_process_group("nccl" if cuda else "gloo")
        return dist.get_rank(), dist.get_world_size(), device, True
    return 0, 1, torch.device("cuda" if cuda else "cpu"), False


def local(t):
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def load_weights(model: nn.Module, tensors, where: str, optional: str = "exit_heads."):
    """Copy full tensors (name, tensor), one at a time, into the parameters; each rank keeps only its shard.
    Parameters under `optional` may be absent (an SFT checkpoint has no ICT heads yet)."""
    params = dict(model.named_parameters())
    for name, full in tensors:
        if name not in params:
            raise CheckpointError(f"{where}: unexpected weight {name}")
        p = params.pop(name)
        if tuple(full.shape) != tuple(p.shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(full.shape)}, the model expects {tuple(p.shape)}")
        if isinstance(p, DTensor):  # take the local slice only, no communication
            full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        local(p).copy_(local(full))
    missing = sorted(n for n in params if not n.startswith(optional))
    if missing:
        raise CheckpointError(f"{where}: no weights for {', '.join(missing[:3])}")


def build_model(a, args: ModelArgs, exits, device, fsdp: bool, compute_dtype):
    with torch.device("meta"):
        model = Transformer(args)
        if a.mode == "ict":
            model.add_exit_heads(exits)
    objective = SortedObjective(model, a.mode)
    for block in model.layers:
        if a.activation_checkpointing:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if a.compile:
            block.compile()
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.layers:  # torchtitan's order: each block, then the rest with the root
            fully_shard(block, mp_policy=mp)
        fully_shard(objective, mp_policy=mp)  # the root: embeddings, the shared norm and head (and ICT heads)
    objective.to_empty(device=device)  # float32 master weights, filled in by load_weights
    model.init_rope(device)
    return model, objective


# --- checkpoints: full weights for inference, per-rank shards for an exact resume, swapped in atomically

def save_checkpoint(a, step, model, opt, args, exits, tokenizer_path, rank, world, fsdp, save_dtype):
    name = f"step_{step:07d}"
    tmp, final = os.path.join(a.out, f".tmp_{name}"), os.path.join(a.out, name)
    if rank == 0:
        for stale in os.listdir(a.out):  # left by a run killed while writing
            if stale.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(a.out, stale), ignore_errors=True)
        os.makedirs(os.path.join(tmp, "train_state"))
    barrier(fsdp)
    # each rank: its shard of weights and AdamW moments in float32, and the RNG, for an exact resume
    state = {}
    for pname, p in model.named_parameters():
        state[f"param/{pname}"] = local(p).detach()
        if p in opt.state:
            for k, v in opt.state[p].items():
                state[f"{k}/{pname}"] = local(v).detach()
    state["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        state["rng/cuda"] = torch.cuda.get_rng_state()
    save_file({k: v.contiguous().cpu() for k, v in state.items()}, os.path.join(tmp, "train_state", f"rank{rank:05d}.safetensors"))
    # the whole model for inference, gathered one tensor at a time on rank 0
    full = {}
    for pname, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        if rank == 0:
            full[pname] = t.detach().to("cpu", save_dtype).clone()
    barrier(fsdp)
    if rank == 0:
        extra = dict(exits=exits, mode=a.mode, step=step, world_size=world, train_config=vars(a))
        if a.mode == "ict":
            extra["exit_heads"] = exits
        save_model(full, args, tmp, tokenizer_path, **extra)
        if os.path.exists(final):  # written by a run killed before it switched `latest` over
            shutil.rmtree(final)
        os.rename(tmp, final)
        link = os.path.join(a.out, "latest")
        if os.path.lexists(link + ".tmp"):  # left by a run killed at this very line
            os.remove(link + ".tmp")
        os.symlink(name, link + ".tmp")
        os.replace(link + ".tmp", link)  # the switch to the new checkpoint is this one atomic rename
        for old in os.listdir(a.out):
            if old.startswith("step_") and old != name:
                shutil.rmtree(os.path.join(a.out, old), ignore_errors=True)
    barrier(fsdp)


@torch.no_grad()
def restore_checkpoint(ckpt: str, model, opt, rank: int, world: int) -> int:
    params = read_json(os.path.join(ckpt, "params.json"))
    if params.get("world_size") != world:
        raise CheckpointError(f"{ckpt} was written by {params.get('world_size')} processes, this run has {world}: "
                              "resume with the same number, or start anew with --init " + ckpt)
    with safe_open(os.path.join(ckpt, "train_state", f"rank{rank:05d}.safetensors"), framework="pt") as f:
        for pname, p in model.named_parameters():
            local(p).copy_(f.get_tensor(f"param/{pname}"))
            if f"step/{pname}" in f.keys():
                opt.state[p] = {"step": f.get_tensor(f"step/{pname}")}
                for k in ("exp_avg", "exp_avg_sq"):
                    opt.state[p][k] = torch.zeros_like(p)
                    local(opt.state[p][k]).copy_(f.get_tensor(f"{k}/{pname}"))
        torch.set_rng_state(f.get_tensor("rng/cpu"))
        if torch.cuda.is_available() and "rng/cuda" in f.keys():
            torch.cuda.set_rng_state(f.get_tensor("rng/cuda"))
    return params["step"]


def barrier(fsdp: bool):
    if fsdp:
        dist.barrier()


def all_reduce(t, fsdp: bool, device):
    """Sum a small CPU tensor over ranks (NCCL only reduces tensors on the GPU)."""
    if not fsdp:
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


# --- training

def get_lr(step: int, a, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    min_lr = a.lr / 10 if a.min_lr is None else a.min_lr
    if step < warmup:
        return a.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (a.lr - min_lr) * (1 + math.cos(math.pi * progress))


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
def evaluate(objective, examples, exits, a, rank, world, fsdp, device, autocast):
    """Per-exit mean token cross-entropy on the held-out examples."""
    objective.eval()
    sums = torch.zeros(len(exits) + 1, dtype=torch.float64)  # per exit, then the token count
    mine = examples[rank::world]
    for b in range(math.ceil(math.ceil(len(examples) / world) / a.batch_size)):  # the same count on every rank
        batch = mine[b * a.batch_size:(b + 1) * a.batch_size]
        if batch:
            tokens, labels = collate(batch, device)
            with autocast:
                _, ce = objective(tokens, labels, exits, [1.0] * len(exits), 1.0)
            sums[:-1] += ce.double().cpu()
            sums[-1] += sum(n_targets(e) for e in batch)
        else:  # FSDP needs every rank in every forward: run one example and discard it
            tokens, labels = collate(examples[:1], device)
            with autocast:
                objective(tokens, labels, exits, [1.0] * len(exits), 1.0)
    sums = all_reduce(sums, fsdp, device)
    objective.train()
    return (sums[:-1] / sums[-1]).tolist()


def train(a):
    rank, world, device, fsdp = setup_device(a)
    master = rank == 0
    say = print if master else (lambda *_, **__: None)
    torch.manual_seed(a.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    compute_dtype = getattr(torch, a.dtype if a.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"))
    for flag in ("batch_size", "grad_accum", "max_seq_len", "vocab_size"):
        if getattr(a, flag) < 1:
            raise DataError(f"--{flag} must be at least 1")
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
        raise DataError("--data needs a tokenizer: pass --tokenizer path/to/tokenizer.model (or an --init folder holding one)")
    else:
        tok_src = None
    if master:
        if tok_src is None:
            train_tokenizer(records, a.vocab_size, tok_path)
        elif os.path.realpath(tok_src) != os.path.realpath(tok_path):
            tokenizer = load_tokenizer(tok_src)  # fails with one line if unreadable
            atomic_write(tok_path, open(tokenizer.path, "rb").read())
    barrier(fsdp)
    tokenizer = load_tokenizer(tok_path)
    train_ex, truncated, dropped = tokenize(train_records, tokenizer, a.max_seq_len)
    val_ex, _, _ = tokenize(val_records, tokenizer, a.max_seq_len)
    if not train_ex:
        raise DataError("no training example has a response within --max_seq_len")

    # model shape
    if a.init:
        args, _ = read_args(a.init)
        if args.vocab_size != tokenizer.vocab_size:
            raise CheckpointError(f"--init {a.init} has a vocabulary of {args.vocab_size} but the tokenizer "
                                  f"{tok_src} has {tokenizer.vocab_size}: pass the matching --tokenizer")
    else:
        args = ModelArgs(**PRESETS[a.model])
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(a, name) is not None:
                setattr(args, name, getattr(a, name))
        args.vocab_size = tokenizer.vocab_size
    args.max_seq_len = max(args.max_seq_len, a.max_seq_len)
    if args.dim % args.n_heads or args.n_heads % (args.n_kv_heads or args.n_heads):
        raise DataError(f"--dim {args.dim}, --n_heads {args.n_heads}, --n_kv_heads {args.n_kv_heads}: "
                        "dim must divide into heads and heads into kv heads")
    exits, exit_weights = parse_exits(a, args.n_layers)
    loss_exits, loss_weights = (exits, exit_weights) if a.mode != "sft" else ([args.n_layers], [1.0])
    if a.mode == "ict" and not a.init:
        raise DataError("--mode ict tunes exit heads on a trained model: pass --init with an SFT checkpoint")

    model, objective = build_model(a, args, exits, device, fsdp, compute_dtype)
    if a.init:
        layout_args, layout = read_args(a.init)
        load_weights(model, iter_state_dict(resolve(a.init), layout_args, layout), a.init)
    else:
        g = torch.Generator().manual_seed(a.seed)
        shapes = [(n, p.shape) for n, p in model.named_parameters()]
        load_weights(model, ((n, init_weights(n, s, args.n_layers, g)) for n, s in shapes), "random init")
    if a.mode == "ict":  # the trunk stays as SFT left it; each exit head starts as a copy of the shared head
        model.requires_grad_(False)
        with torch.no_grad():
            for e in exits:
                head = model.exit_heads[str(e)]
                head.requires_grad_(True)
                local(head.norm.weight).copy_(local(model.norm.weight))
                local(head.output.weight).copy_(local(model.output.weight))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)
    autocast = (torch.autocast("cuda", dtype=compute_dtype) if device.type == "cuda" and not fsdp and compute_dtype != torch.float32
                else torch.autocast("cpu", enabled=False))

    global_batch = a.batch_size * a.grad_accum * world
    per_epoch = len(train_ex) // global_batch
    if per_epoch == 0:
        raise DataError(f"{len(train_ex)} training examples are fewer than one global batch of {global_batch}")
    total = a.max_steps if a.max_steps is not None else max(1, int(a.epochs * per_epoch))
    warmup = int(a.warmup * total) if a.warmup < 1 else int(a.warmup)
    step = 0
    if resume_from:
        step = restore_checkpoint(resume_from, model, opt, rank, world)
        say(f"resuming from {resume_from} at step {step}")
    log_path = os.path.join(a.out, "log.jsonl")
    if master:  # a resumed log continues where its checkpoint was written
        kept = [l for l in open(log_path)] if resume_from and os.path.exists(log_path) else []
        kept = [l for l in kept if json.loads(l)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {args.n_layers} layers, dim {args.dim}, {n_params / 1e6:.1f}M parameters, vocab {args.vocab_size}; "
        f"mode {a.mode}, exits {exits}" + (f" (loss at {loss_exits})" if a.mode == "sft" else ""))
    say(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {truncated} truncated and {dropped} dropped "
        f"at max_seq_len {a.max_seq_len}; {total} steps of {global_batch} ({world} process{'es' * (world > 1)}, {device})")

    def save():
        save_checkpoint(a, step, model, opt, args, exits, tok_path, rank, world, fsdp, compute_dtype)

    def log(entry):
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    pbar = tqdm(total=total, initial=step, disable=not master, dynamic_ncols=True)
    while step < total:
        t0 = time.perf_counter()
        lr = get_lr(step, a, total, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        micro, n_global = step_batches(train_ex, step, a, rank, world)
        exit_sums = torch.zeros(len(loss_exits), dtype=torch.float64)
        n_tokens = 0
        for m, batch in enumerate(micro):
            tokens, labels = collate(batch, device)
            n_tokens += sum(len(ids) for ids, _ in batch)
            if fsdp:  # reduce-scatter gradients once, after the last micro-batch
                objective.set_requires_gradient_sync(m == len(micro) - 1)
            with autocast:
                # FSDP averages gradients over ranks; the loss is a mean over all target tokens of the global batch
                loss, ce = objective(tokens, labels, loss_exits, loss_weights, world / n_global)
            loss.backward()
            exit_sums += ce.detach().double().cpu()
        stats = all_reduce(torch.tensor([*exit_sums.tolist(), n_tokens], dtype=torch.float64), fsdp, device)
        exit_loss = (stats[:-1] / n_global).tolist()
        norm = nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        if not all(math.isfinite(x) for x in exit_loss) or not math.isfinite(norm.item()):
            pbar.close()
            raise DataError(f"non-finite loss or gradient at step {step + 1} (losses {exit_loss}); stopping without "
                            f"saving, the last checkpoint in {a.out} is intact: lower --lr or check the data")
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        losses = {str(e): round(x, 4) for e, x in zip(loss_exits, exit_loss)}
        log(dict(step=step, loss=losses, lr=lr, sec_per_step=round(dt, 4), tokens_per_sec=round(stats[-1].item() / dt, 1),
                 peak_mem_gb=round(peak_memory_gb(device), 3)))
        pbar.set_postfix_str(" ".join(f"L{e} {x:.3f}" for e, x in losses.items()))
        pbar.update(1)
        if val_ex and (step == total or (a.eval_interval and step % a.eval_interval == 0)):
            val = evaluate(objective, val_ex, exits, a, rank, world, fsdp, device, autocast)
            log(dict(step=step, val_loss={str(e): round(x, 4) for e, x in zip(exits, val)}))
            if master:
                pbar.write(f"step {step}: val loss " + " ".join(f"L{e} {x:.3f}" for e, x in zip(exits, val)))
        if step == total or (a.save_interval and step % a.save_interval == 0):
            save()
    pbar.close()
    say(f"checkpoint: {os.path.join(a.out, 'latest')} -> step_{step:07d}; try: python generate.py --ckpt {a.out} --compare")
    if fsdp:
        dist.destroy_process_group()


def main(argv=None):
    a = get_args(argv)
    try:
        train(a)
    except (DataError, CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
