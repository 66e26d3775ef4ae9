"""Sorted Fine-Tuning (SoFT, arXiv 2309.08968) of LLaMA 2: every exit through the shared norm and head.

One forward pass through the full depth keeps the hidden state h_e after each exit e (13B: layers 12, 16, ...,
40), and the exits' cross-entropies on the response tokens y are summed into one loss (soft.py):

    loss = sum_e w_e * CE(output(norm(h_e)), y)      the same norm and output head at every exit

--mode sft trains the last layer only (the paper's standard fine-tuning baseline); --mode ict freezes an SFT
model and tunes a separate head per exit (SFT+ICT, the paper's early-exit baseline).

  python sorted_train.py                                   # the tiny demo on built-in tasks, CPU, minutes
  python sorted_train.py --estimate --nproc 8 --init llama-2-13b ...   # per-GPU memory, simulated here
  torchrun --nproc_per_node 8 sorted_train.py --init llama-2-13b --data alpaca_data.json
  torchrun --nproc_per_node 8 --max-restarts 1 sorted_train.py ... --resume   # a killed worker carries on

Under torchrun the model is sharded with FSDP2 (distributed.py: fully_shard per block, then the root; NCCL on
CUDA, gloo on CPU). With --dtype bfloat16 (the default on CUDA) parameters are kept in float32 and computed in
bfloat16, gradients reduced in float32.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import distributed
from data import DataError, atomic_write, batch_tensors, dataset, n_targets, step_batches, tokenize, train_tokenizer
from distributed import Dist
from load_llama import CheckpointError, iter_state_dict, load_tokenizer, parse_depths, read_args, read_json, resolve
from model import PRESETS, ModelArgs, Transformer, default_exits, init_weights
from soft import SortedObjective, forward_backward


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
    g.add_argument("--num_examples", type=int, default=32000,
                   help="size of the built-in training set (with --pretrain: documents of the corpus)")
    g.add_argument("--pretrain", action="store_true",
                   help="pretrain on the built-in corpus of plain text: next-token loss at every position")
    g = p.add_argument_group("objective")
    g.add_argument("--mode", default="sorted", choices=["sorted", "sft", "ict"])
    g.add_argument("--exits", default=None, help="comma-separated depths, e.g. 12,16,...,40 (default: evenly spaced)")
    g.add_argument("--exit_weights", default=None, help="comma-separated loss weights, one per exit (default: all 1)")
    g.add_argument("--separate_heads", action="store_true",
                   help="sorted: a norm and head of its own for each exit below the last, trained jointly")
    g.add_argument("--no_exit_norm", action="store_true",
                   help="exits below the last read the shared head without the final RMSNorm")
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
                   help="under torchrun: run that step for real and print its measured peak memory")
    return p.parse_args(argv)


# --- the objective: which exits carry a loss, with which weights

def objective_exits(mode: str, exits: str | None, exit_weights: str | None, n_layers: int):
    """(the exits trained and recorded, the exits the loss is taken at, their weights w_e) from --exits and
    --exit_weights: SoFT and SFT+ICT take the loss at every exit, SFT at the last layer only."""
    depths = default_exits(n_layers) if exits is None else parse_depths(exits, n_layers, "--exits", True)
    weights = [1.0] * len(depths)
    if exit_weights is not None:
        try:
            weights = [float(x) for x in exit_weights.split(",")]
        except ValueError:
            raise DataError(f"--exit_weights {exit_weights!r}: expected comma-separated numbers")
        if len(weights) != len(depths):
            raise DataError(f"--exit_weights has {len(weights)} values for {len(depths)} exits")
    if mode == "sft":
        return depths, [n_layers], [1.0]
    return depths, depths, weights


def fill_defaults(a):
    """Check the flags; optimisation defaults are the demo's for random init and fine-tuning's with --init (the
    demo's lr 3e-3 would wreck a pretrained model): the paper's lr 2e-5, Alpaca's warmup and decay to 0, AdamW's
    own beta2."""
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
    if a.mode == "ict" and not a.init:
        raise DataError("--mode ict tunes exit heads on a trained model: pass --init with an SFT checkpoint")
    if a.separate_heads and a.mode != "sorted":
        raise DataError(f"--separate_heads trains a head per exit with the summed loss of --mode sorted, not {a.mode}")
    if a.pretrain and a.data:
        raise DataError("--pretrain trains on the built-in corpus; it takes no --data")


# --- the model: its shape, built on the meta device, sharded, then its weights

def model_args(a, vocab_size: int | None, tokenizer_path: str | None = None) -> ModelArgs:
    """The shape to train: --init's (its vocabulary must be the tokenizer's), or the preset with its overrides and
    the tokenizer's vocabulary."""
    if a.init:
        args, _ = read_args(a.init)
        if tokenizer_path and args.vocab_size != vocab_size:
            raise CheckpointError(f"--init {a.init} has a vocabulary of {args.vocab_size} but the tokenizer "
                                  f"{tokenizer_path} has {vocab_size}: pass the matching --tokenizer")
    else:
        overrides = {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if getattr(a, k)}
        preset = PRESETS[a.model]
        args = ModelArgs(**{**preset, **overrides, "vocab_size": vocab_size or preset["vocab_size"]})
    args.max_seq_len = max(args.max_seq_len, a.max_seq_len)
    args.exit_norm = not a.no_exit_norm  # what this run trains, whatever --init was trained with
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise DataError(f"--dim {args.dim}, --n_heads {args.n_heads}, --n_kv_heads {args.n_kv_heads}: "
                        "dim must divide into heads and heads into kv heads")
    return args


def own_heads(mode: str, separate_heads: bool, exits: list[int], n_layers: int) -> list[int]:
    """The exits that read through a norm and head of their own: every exit for SFT+ICT, those below the last
    with --separate_heads, none for SoFT and SFT (the shared norm and head)."""
    if mode == "ict":
        return list(exits)
    return [e for e in exits if e < n_layers] if separate_heads else []


def build_model(args: ModelArgs, mode: str, exits, d: Dist, compute_dtype, activation_checkpointing=False,
                compile=False, check=True, heads=None):
    """The model on the meta device (with a head for each exit in `heads`; default: SFT+ICT's), checked to fit,
    sharded (distributed.shard), then given float32 memory on d.device: its values come from load_weights."""
    with torch.device("meta"):
        model = Transformer(args)
        model.add_exit_heads(own_heads(mode, False, exits, args.n_layers) if heads is None else heads)
    if mode == "ict":  # the trunk stays as SFT left it
        model.requires_grad_(False)
        model.exit_heads.requires_grad_(True)
    if check:
        distributed.check_fits(model, d)
    objective = SortedObjective(model, mode)
    distributed.shard(model, objective, d, compute_dtype, activation_checkpointing, compile)
    objective.to_empty(device=d.device)
    model.init_rope(d.device)
    return model, objective


def load_initial_weights(model, init: str | None, seed: int):
    """--init's weights, or a random init drawn from the seed; an exit's own head that --init does not have
    starts as the shared head."""
    if init:
        layout_args, layout = read_args(init)
        absent = distributed.load_weights(model, iter_state_dict(resolve(init), layout_args, layout), init)
    else:
        g = torch.Generator().manual_seed(seed)
        shapes = [(n, p.shape) for n, p in model.named_parameters() if not n.startswith("exit_heads.")]
        absent = distributed.load_weights(model, ((n, init_weights(n, s, model.args.n_layers, g)) for n, s in shapes),
                                          "random init")
    with torch.no_grad():
        for e, head in model.exit_heads.items():
            if f"exit_heads.{e}.output.weight" in absent:
                distributed.local(head.norm.weight).copy_(distributed.local(model.norm.weight))
                distributed.local(head.output.weight).copy_(distributed.local(model.output.weight))


# --- data: the tokenizer (trained for the built-in tasks, or the one given), the examples

def prepare_data(a, d: Dist, resume_from: str | None):
    """(tokenizer, its path in --out, train examples, held-out examples); rank 0 writes the tokenizer."""
    train_records, val_records = dataset(a.data, a.val_size, a.num_examples, a.pretrain)
    tok_path = os.path.join(a.out, "tokenizer.model")
    init = resolve(a.init) if a.init else None
    if resume_from:
        source = os.path.join(resume_from, "tokenizer.model")
    elif a.tokenizer:
        source = a.tokenizer
    elif init and os.path.exists(os.path.join(init, "tokenizer.model")):
        source = os.path.join(init, "tokenizer.model")
    elif a.data:
        raise DataError("--data needs a tokenizer: pass --tokenizer path/to/tokenizer.model "
                        "(or an --init folder holding one)")
    else:
        source = None
    if d.master:
        if source is None:  # pretraining's tokenizer also knows the instructions the model will be tuned on
            instructions = dataset(None, a.val_size, 2000)[0] if a.pretrain else []
            train_tokenizer(train_records + val_records + instructions, a.vocab_size, tok_path)
        elif os.path.realpath(source) != os.path.realpath(tok_path):
            with open(load_tokenizer(source).path, "rb") as f:  # load_tokenizer: one clear line if unreadable
                atomic_write(tok_path, f.read())
    d.barrier()
    tokenizer = load_tokenizer(tok_path)
    train_ex, truncated, dropped = tokenize(train_records, tokenizer, a.max_seq_len)
    val_ex, _, _ = tokenize(val_records, tokenizer, a.max_seq_len)
    if not train_ex:
        raise DataError("no training example has a response within --max_seq_len")
    if d.master:
        print(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {truncated} truncated and {dropped} "
              f"dropped at max_seq_len {a.max_seq_len}")
    return tokenizer, tok_path, train_ex, val_ex


# --- training

def get_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def clip_gradients(params, max_norm: float):
    """Scale the gradients to a global norm of at most max_norm (0: no clipping); their norm before (a tensor)."""
    norm = nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm  # the norm over every rank's shard


def schedule(n_examples: int, global_batch: int, max_steps: int | None, epochs: float, warmup: float):
    """(steps in all, warmup steps): --max_steps, or --epochs over the data; --warmup in steps or as a fraction."""
    if n_examples < global_batch:
        raise DataError(f"{n_examples} training examples are fewer than one global batch of {global_batch}")
    total = max_steps if max_steps is not None else max(1, int(epochs * (n_examples // global_batch)))
    return total, int(warmup * total) if warmup < 1 else int(warmup)


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


def resume_step(resume_from: str | None, objective, opt, d: Dist, global_batch: int) -> int:
    """The step a run resumes at (0 for a new run), with its weights and AdamW state restored."""
    if not resume_from:
        return 0
    saved = read_json(os.path.join(resume_from, "params.json"))
    model = objective.model
    if saved.get("exit_norm", True) != model.args.exit_norm or saved.get("exit_heads", []) != list(
            map(int, model.exit_heads)):
        raise DataError(f"{resume_from} was trained with other exit heads or exit norm (--separate_heads, "
                        "--no_exit_norm, --mode): resume with the flags it was started with")
    if saved.get("global_batch", global_batch) != global_batch:
        raise DataError(f"{resume_from} was trained with a global batch of {saved['global_batch']} (batch_size x "
                        f"grad_accum x processes), this run has {global_batch}: resume with the same global batch, "
                        "so that every step sees the examples it would have seen")
    distributed.restore_checkpoint(resume_from, objective, opt, d)
    return saved["step"]


def open_log(path: str, step: int, master: bool):
    """A function appending a JSON line to log.jsonl; a resumed log keeps what came up to its checkpoint."""
    if master:
        kept = []
        if step and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)

    def log(entry: dict):
        if master:
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
    return log


def train(a):
    # setup: processes and devices, the data, and where the run starts
    fill_defaults(a)
    d = distributed.setup(torch.cuda.is_available() and a.device != "cpu")
    compute_dtype = distributed.compute_dtype(a.dtype, d.device.type)
    os.makedirs(a.out, exist_ok=True)
    latest = os.path.join(a.out, "latest")
    if a.resume and os.path.lexists(latest) and not os.path.exists(latest):
        raise CheckpointError(f"{latest} names {os.readlink(latest)}, which is missing: the checkpoint was moved "
                              "or deleted")
    resume_from = os.path.realpath(latest) if a.resume and os.path.exists(latest) else None
    tokenizer, tok_path, train_ex, val_ex = prepare_data(a, d, resume_from)

    # the model, sharded, with its weights; the exits the objective sums; AdamW
    args = model_args(a, tokenizer.vocab_size, tok_path)
    exits, loss_exits, loss_weights = objective_exits(a.mode, a.exits, a.exit_weights, args.n_layers)
    heads = own_heads(a.mode, a.separate_heads, exits, args.n_layers)
    model, objective = build_model(args, a.mode, exits, d, compute_dtype, a.activation_checkpointing, a.compile,
                                   heads=heads)
    load_initial_weights(model, a.init, a.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)
    # one process has no FSDP to cast for it: autocast does, if asked
    mixed = compute_dtype != torch.float32 and not d.fsdp
    autocast = torch.autocast(d.device.type, dtype=compute_dtype, enabled=mixed)

    # the schedule, and where a resumed run stands in it
    global_batch = a.batch_size * a.grad_accum * d.world
    total, warmup = schedule(len(train_ex), global_batch, a.max_steps, a.epochs, a.warmup)
    step = resume_step(resume_from, objective, opt, d, global_batch)
    log = open_log(os.path.join(a.out, "log.jsonl"), step, d.master)
    n_params = sum(p.numel() for p in model.parameters())
    d.say(f"model: {args.n_layers} layers, dim {args.dim}, {n_params / 1e6:.1f}M parameters, vocab {args.vocab_size}; "
          f"{'pretraining, ' * a.pretrain}mode {a.mode}, exits {exits} (loss at {loss_exits}"
          f"{', own heads at ' + str(heads) if heads else ''}{', no norm below the last' * (not args.exit_norm)}); "
          f"{total} steps of {global_batch} ({d.world} process"
          f"{'es' * (d.world > 1)}, {d.device}); lr {a.lr:g}, warmup {warmup} steps, cosine to {a.min_lr:g}"
          + (f"; resuming from {resume_from} at step {step}" if step else ""))

    with tqdm(total=total, initial=step, disable=not d.master, dynamic_ncols=True) as pbar:
        while step < total:
            t0 = time.perf_counter()
            # learning rate: warmup, then cosine decay
            lr = get_lr(step, a.lr, a.min_lr, warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr
            # forward and backward on this rank's micro-batches: the loss is a mean over every target token of the
            # global batch, and FSDP averages gradients over ranks, hence the scale
            micro, n_global = step_batches(train_ex, step, a.batch_size, a.grad_accum, a.seed, d.rank, d.world)
            sums = forward_backward(objective, (batch_tensors(b, d.device) for b in micro), loss_exits, loss_weights,
                                    d.world / n_global, autocast)
            n_tokens = sum(len(ids) for batch in micro for ids, _ in batch)
            stats = d.sum(torch.tensor([*sums.tolist(), n_tokens], dtype=torch.float64))
            exit_loss = (stats[:-1] / n_global).tolist()
            # clip, and stop before a non-finite gradient reaches the weights
            norm = clip_gradients(trainable, a.grad_clip).item()
            if not all(math.isfinite(x) for x in exit_loss + [norm]):
                raise DataError(f"non-finite loss or gradient at step {step + 1} (losses {exit_loss}); stopping "
                                f"without saving, the last checkpoint in {a.out} is intact: lower --lr or check "
                                "the data")
            # step
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            # log
            dt = time.perf_counter() - t0
            losses = {str(e): round(x, 4) for e, x in zip(loss_exits, exit_loss)}
            log(dict(step=step, loss=losses, lr=lr, sec_per_step=round(dt, 4),
                     tokens_per_sec=round(stats[-1].item() / dt, 1),
                     peak_mem_gb=round(distributed.peak_memory_gib(d.device), 3)))
            pbar.set_postfix_str(" ".join(f"L{e} {x:.3f}" for e, x in losses.items()))
            pbar.update(1)
            # evaluate every exit on the held-out examples
            if val_ex and (step == total or (a.eval_interval and step % a.eval_interval == 0)):
                val = evaluate(objective, val_ex, exits, a.batch_size, d, autocast)
                log(dict(step=step, val_loss={str(e): round(x, 4) for e, x in zip(exits, val)}))
                if d.master:
                    pbar.write(f"step {step}: val loss " + " ".join(f"L{e} {x:.3f}" for e, x in zip(exits, val)))
            # save: the weights for inference, and every rank's shard of the training state
            if step == total or (a.save_interval and step % a.save_interval == 0):
                distributed.save_checkpoint(a.out, step, objective, opt, d, compute_dtype, tok_path, exits=exits,
                                            mode=a.mode, world_size=d.world, global_batch=global_batch,
                                            train_config=vars(a), **(dict(exit_heads=heads) if heads else {}))
    d.say(f"checkpoint: {latest} -> step_{step:07d}; try: python generate.py --ckpt {a.out} --compare")
    d.close()


# --- the memory plan: one training step, simulated for N GPUs or measured here

def plan_memory(a, simulate: bool, search: bool = True) -> dict:
    """--estimate and --measure_memory (distributed.plan_memory): the peak memory of this trainer's own model
    building, sharding and training step, simulated for --nproc GPUs or measured on this run's processes."""
    fill_defaults(a)
    if not simulate and "RANK" not in os.environ:
        raise DataError("--measure_memory measures the FSDP step of a torchrun run: launch it with "
                        "torchrun --nproc_per_node N sorted_train.py --measure_memory ...")
    d = distributed.fake(a.nproc) if simulate else distributed.setup(torch.cuda.is_available() and a.device != "cpu")
    # a simulation plans for GPUs
    compute_dtype = distributed.compute_dtype(a.dtype, "cuda" if simulate else d.device.type)
    args = model_args(a, a.vocab_size if a.model == "tiny" else None)
    exits, loss_exits, loss_weights = objective_exits(a.mode, a.exits, a.exit_weights, args.n_layers)

    def build():
        """The sharded model's objective, its optimizer, and a training step over a list of micro-batches."""
        heads = own_heads(a.mode, a.separate_heads, exits, args.n_layers)
        model, objective = build_model(args, a.mode, exits, d, compute_dtype, a.activation_checkpointing,
                                       check=not simulate, heads=heads)
        if not simulate:  # real numbers, as a run starts with (no denormals or NaNs to slow the CPU)
            load_initial_weights(model, None, a.seed)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)

        def step(micro):
            forward_backward(objective, micro, loss_exits, loss_weights, 1e-3)  # the loss's scale takes no memory
            clip_gradients(trainable, a.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return objective, opt, step

    title = (f"{args.n_layers} layers, dim {args.dim}, {str(compute_dtype).removeprefix('torch.')} compute, mode "
             f"{a.mode}, exits {loss_exits}, batch {a.batch_size} x {a.max_seq_len} tokens (all targets) x "
             f"{a.grad_accum} micro-batches" + (", activation checkpointing" if a.activation_checkpointing else ""))
    result = distributed.plan_memory(build, d, simulate, a.batch_size, a.max_seq_len, a.grad_accum, a.gpu_memory,
                                     title, search)
    d.close()
    return result


def main(argv=None):
    a = get_args(argv)
    try:
        if a.estimate or a.measure_memory:
            plan_memory(a, simulate=a.estimate)
            if a.measure_memory and not (torch.cuda.is_available() and a.device != "cpu"):  # measured on the CPU
                # On the CPU the measurement ran torch's profiler, and a CUDA build of torch on a machine without
                # a GPU sometimes aborts at interpreter exit after that (a profiler thread destroyed while still
                # joinable: about 1 run in 30, torch 2.14.1+cu130). All is printed and the process group is closed
                # by now, so the process leaves without the teardown.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
        else:
            train(a)
    except (DataError, CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
