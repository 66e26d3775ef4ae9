"""Sorted Fine-Tuning (SoFT, arXiv 2309.08968) of LLaMA 2: one pass, a loss at every exit, one backward.

  python sorted_train.py                                  # the tiny demo on the built-in tasks, CPU, minutes
  torchrun --nproc_per_node 8 sorted_train.py --init llama-2-13b --tokenizer tokenizer.model --data alpaca.json

Top to bottom: configuration, model, data, the loop. One process trains a plain model on its device; under
torchrun the scale layer (scale/) shards it across the processes with FSDP2.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

from checkpoints import CheckpointError, resume, resume_point, save_checkpoint
from data import DataError, batch_tensors, dataset, n_targets, step_batches, tokenize
from flags import FlagError, parse_depths
from load_llama import load_initial_weights, new_model, read_args
from model import PRESETS, ModelArgs, default_exits
from one_process import OneProcess
from soft import sorted_loss
from tokenizer import copy_tokenizer, load_tokenizer, train_tokenizer


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sorted fine-tuning (SoFT) of LLaMA 2.")
    g = p.add_argument_group("model")
    g.add_argument("--init", default=None, help="start from these weights (Meta, Hugging Face or our layout)")
    g.add_argument("--model", default="tiny", choices=list(PRESETS), help="random init of this shape (no --init)")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads"):
        g.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="Alpaca JSON or JSONL (default: the built-in tasks)")
    g.add_argument("--tokenizer", default=None, help="tokenizer.model (default: --init's, or one trained here)")
    g.add_argument("--vocab_size", type=int, default=512, help="of the tokenizer trained for the built-in tasks")
    g.add_argument("--max_seq_len", type=int, default=256, help="longer examples are truncated (and counted)")
    g.add_argument("--val_size", type=int, default=256, help="examples held out for validation")
    g.add_argument("--num_examples", type=int, default=32000, help="built-in examples (--pretrain: documents)")
    g.add_argument("--pretrain", action="store_true", help="on the built-in corpus: a loss at every position")
    g = p.add_argument_group("objective")
    g.add_argument("--mode", default="sorted", choices=["sorted", "sft", "ict"], help="SoFT, SFT, or SFT+ICT")
    g.add_argument("--exits", default=None, help="comma-separated depths, e.g. 12,16,...,40 (default: evenly spaced)")
    g.add_argument("--exit_weights", default=None, help="comma-separated loss weights, one per exit (default: all 1)")
    g.add_argument("--separate_heads", action="store_true", help="a head of its own for each exit below the last")
    g.add_argument("--no_exit_norm", action="store_true", help="exits below the last skip the final RMSNorm")
    g = p.add_argument_group("optimisation (defaults: the demo's; with --init, fine-tuning's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; with --init 2e-5)")
    g.add_argument("--min_lr", type=float, default=None, help="end of the cosine decay (default lr/10; with --init 0)")
    g.add_argument("--warmup", type=float, default=None, help="steps, or a fraction of all if < 1 (default 30; 0.03)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--beta2", type=float, default=None, help="AdamW's beta2 (default 0.95; with --init 0.999)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--batch_size", type=int, default=32, help="examples per micro-batch per process")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches a step (global batch: batch x accum x N)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=None, help="overrides --epochs")
    g.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="checkpoints and log.jsonl go here")
    g.add_argument("--eval_interval", type=int, default=100, help="steps between validations (0: at the end)")
    g.add_argument("--save_interval", type=int, default=200, help="steps between checkpoints (0: at the end)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out if there is one")
    g = p.add_argument_group("system (scale/: what makes it fit and go fast)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 where the GPU has it")
    g.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--fused_ce", action="store_true", help="the loss in chunks, never whole logits (so under torchrun)")
    g.add_argument("--hsdp", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="torchrun: shard over groups of N processes (default: a node's), replicate across them")
    g.add_argument("--timeout", type=float, default=10, help="torchrun: minutes a collective may wait, then stop")
    g.add_argument("--estimate", action="store_true", help="no training: one step of --nproc GPUs, simulated")
    g.add_argument("--nproc", type=int, default=8, help="--estimate: processes (GPUs) of the simulated run")
    g.add_argument("--gpu_memory", type=float, default=80, help="--estimate: GB per GPU, as vendors print it")
    g.add_argument("--measure_memory", action="store_true", help="no training: under torchrun, that step measured")
    return p.parse_args(argv)


def check_flags(a):
    """Refuse flags that cannot work; the optimisation defaults: the demo's, or with --init fine-tuning's (the
    paper's lr 2e-5, Alpaca's warmup and decay to 0, AdamW's own beta2: the demo's 3e-3 would wreck a real model)."""
    for flag, demo, tuned in (("lr", 3e-3, 2e-5), ("warmup", 30, 0.03), ("beta2", 0.95, 0.999)):
        setattr(a, flag, getattr(a, flag) if getattr(a, flag) is not None else tuned if a.init else demo)
    a.min_lr = a.min_lr if a.min_lr is not None else 0.0 if a.init else a.lr / 10
    for flag in ("batch_size", "grad_accum", "max_seq_len", "vocab_size", "nproc"):
        if getattr(a, flag) < 1:
            raise FlagError(f"--{flag} must be at least 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise FlagError("--device cuda: no CUDA device is available")
    if a.mode == "ict" and not a.init and not (a.estimate or a.measure_memory):
        raise FlagError("--mode ict tunes exit heads on a trained model: pass --init with an SFT checkpoint")
    if a.separate_heads and a.mode != "sorted":
        raise FlagError(f"--separate_heads trains a head per exit with the summed loss of --mode sorted, not {a.mode}")
    if a.pretrain and a.data:
        raise FlagError("--pretrain trains on the built-in corpus; it takes no --data")
    if a.dtype == "float16":
        raise FlagError("--dtype float16 needs loss scaling, which this trainer does not do: use --dtype float32 on a "
                        "GPU without bfloat16 (the paper's V100s), bfloat16 on one with it")
    if a.dtype == "bfloat16" and a.device != "cpu" and torch.cuda.is_available() and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        raise FlagError("--dtype bfloat16: this GPU has no bfloat16; use --dtype float32")


def parse_weights(text: str, n: int) -> list[float]:
    """--exit_weights: n comma-separated numbers."""
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise FlagError(f"--exit_weights {text!r}: expected comma-separated numbers")
    if len(weights) != n:
        raise FlagError(f"--exit_weights has {len(weights)} values for {n} exits")
    return weights


# --- the model and the exits its loss is taken at

def model_args(a, vocab_size: int | None) -> ModelArgs:
    """The shape to train: --init's, or the preset with its overrides and the tokenizer's vocabulary."""
    overrides = {k: getattr(a, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads") if getattr(a, k)}
    args = read_args(a.init)[0] if a.init else ModelArgs(**{**PRESETS[a.model], **overrides})
    if a.init and vocab_size and args.vocab_size != vocab_size:
        raise CheckpointError(f"--init {a.init} has a vocabulary of {args.vocab_size} but the tokenizer has "
                              f"{vocab_size}: pass the matching --tokenizer")
    args.vocab_size, args.max_seq_len = vocab_size or args.vocab_size, max(args.max_seq_len, a.max_seq_len)
    if args.dim % args.n_heads or args.n_heads % args.n_kv_heads:
        raise FlagError(f"--dim {args.dim}, --n_heads {args.n_heads}, --n_kv_heads {args.n_kv_heads}: "
                        "dim must divide into heads and heads into kv heads")
    return args


def objective(a, n_layers: int):
    """(the exits trained and recorded, the exits the loss is taken at, their weights w_e, the exits that read
    through a head of their own): SoFT sums every exit, SFT takes the last layer only; SFT+ICT gives every exit a
    head, --separate_heads those below the last (variants/exit_heads.py)."""
    exits = default_exits(n_layers) if a.exits is None else parse_depths(a.exits, n_layers, "--exits", True)
    weights = [1.0] * len(exits) if a.exit_weights is None else parse_weights(a.exit_weights, len(exits))
    heads = []  # the shared norm and head for every exit
    if a.mode == "ict":
        heads = exits
    elif a.separate_heads:
        heads = [e for e in exits if e < n_layers]
    if a.mode == "sft":
        return exits, [n_layers], [1.0], heads
    return exits, exits, weights, heads


def build(a, run, vocab_size: int | None, resume_from: str | None = None, real: bool = True):
    """(the model with its first weights, the fused loss or None, AdamW, (exits, loss exits, loss weights, own
    heads)) for train() and the memory plan; real=False: a simulated run, with no weights and no device to fit;
    resume_from: no first weights, that checkpoint's replace them."""
    args = model_args(a, vocab_size)
    exits, loss_exits, loss_weights, heads = objective(a, args.n_layers)
    if real:  # refuse, before taking any memory, a model that cannot fit (scale/fit.py)
        from scale.fit import check_fits
        check_fits(args, len(heads), a.mode == "ict", run.shard_size, run.device)
    model = run.build(lambda: new_model(args, heads, not a.no_exit_norm, frozen_trunk=a.mode == "ict"))
    if real and not resume_from:
        load_initial_weights(model, a.init, a.seed, run.put)
        run.barrier()  # under torchrun: processes done loading minutes apart wait on the I/O group's long timeout
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay)
    return model, run.fused_loss(model, a.fused_ce), opt, (exits, loss_exits, loss_weights, heads)


def start(device: str, dtype: str, activation_checkpointing: bool, compile: bool, hsdp: int | None = None,
          timeout: float = 10, fake_world: int | None = None):
    """This process's place in the run: alone, or one of torchrun's (scale/; fake_world: rank 0 of a simulated
    run). --dtype auto is bfloat16 on a GPU that has it, float32 elsewhere (the paper's V100s have none)."""
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:  # each process on its own GPU before anything touches one; where a process sees one GPU, that one
        local, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if visible > 1 and local >= visible:
            raise FlagError(f"LOCAL_RANK {local}: this node shows {visible} GPUs; --nproc_per_node is at most that")
        torch.cuda.set_device(local if visible > 1 else 0)
        torch.set_float32_matmul_precision("high")  # float32 matmuls in TF32: nothing that matters is lost
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)  # emulated bfloat16 is slow, not bfloat16
    dtype = getattr(torch, dtype) if dtype != "auto" else torch.bfloat16 if bf16 else torch.float32
    if "RANK" in os.environ or fake_world:
        from scale.fsdp import Sharded
        shard_size = hsdp or int(os.environ.get("LOCAL_WORLD_SIZE", 8)) if hsdp is not None else None
        return Sharded(cuda, dtype, activation_checkpointing, compile, fake_world, shard_size, timeout)
    return OneProcess(torch.device("cuda" if cuda else "cpu"), dtype, activation_checkpointing, compile)


# --- data: the tokenizer and the examples

def prepare_data(a, run, resume_from: str | None):
    """(tokenizer, its path in --out, train examples, held-out examples); rank 0 writes the tokenizer."""
    train_records, val_records = dataset(a.data, a.val_size, a.num_examples, a.pretrain)
    tok_path = os.path.join(a.out, "tokenizer.model")
    if resume_from or a.tokenizer or a.init or a.data:
        run.decide(lambda: copy_tokenizer(resume_from or a.tokenizer, a.init, tok_path))
    else:  # the built-in tasks: a tokenizer trained on them (for pretraining, on the instructions too)
        instructions = dataset(None, a.val_size, 2000)[0] if a.pretrain else []
        run.decide(lambda: train_tokenizer(train_records + val_records + instructions, a.vocab_size, tok_path))
    tokenizer = load_tokenizer(tok_path)
    train_ex, truncated, dropped = tokenize(train_records, tokenizer, a.max_seq_len)
    val_ex = tokenize(val_records, tokenizer, a.max_seq_len)[0]
    if not train_ex:
        raise DataError("no training example has a response within --max_seq_len")
    if run.master:
        print(f"data: {len(train_ex)} train / {len(val_ex)} val examples, {truncated} truncated and {dropped} "
              f"dropped at max_seq_len {a.max_seq_len}")
    return tokenizer, tok_path, train_ex, val_ex


# --- the loop's helpers: schedule, evaluation

def get_lr(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Step `step`'s rate: linear warmup to lr, then cosine decay to min_lr, reached at step `total` (past the last)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def schedule(n_examples: int, global_batch: int, max_steps: int | None, epochs: float, warmup: float):
    """(steps in all, warmup steps): --max_steps, or --epochs over the data; --warmup in steps or as a fraction."""
    if n_examples < global_batch:
        raise DataError(f"{n_examples} training examples are fewer than one global batch of {global_batch}")
    total = max_steps if max_steps is not None else max(1, int(epochs * (n_examples // global_batch)))
    return total, int(warmup * total) if warmup < 1 else int(warmup)


@torch.no_grad()
def evaluate(model, fused, examples, exits: list[int], batch_size: int, run) -> list[float]:
    """Per-exit mean token cross-entropy on the held-out examples, each process taking its share."""
    sums = torch.zeros(len(exits) + 1, dtype=torch.float64)  # per exit, then the token count
    mine = examples[run.rank::run.world]
    for b in range(math.ceil(math.ceil(len(examples) / run.world) / batch_size)):  # as many in every process
        batch = mine[b * batch_size:(b + 1) * batch_size]
        # FSDP needs every process in every forward: one that has run out does one example, unused
        tokens, positions, targets = batch_tensors(batch or examples[:1], run.device)
        with run.autocast:
            _, ce = sorted_loss(model, tokens, positions, targets, exits, [1.0] * len(exits)) if fused is None \
                else fused(tokens, positions, targets, exits, [1.0] * len(exits))
        if batch:
            sums += torch.tensor([*ce.tolist(), sum(n_targets(e) for e in batch)], dtype=torch.float64)
    sums = run.sum(sums)
    return (sums[:-1] / sums[-1]).tolist()


def check_finite(losses: list[float], norm: float, step: int, out: str):
    """Stop the run before a non-finite loss or gradient is applied to the weights."""
    if not all(math.isfinite(x) for x in [*losses, norm]):
        raise DataError(f"non-finite loss or gradient at step {step + 1} (losses {losses}); stopping without saving, "
                        f"the last checkpoint in {out} is intact: lower --lr")


def peak_memory(device) -> dict:
    """GiB at the peak so far: the CUDA allocator's, handed out and held, or on the CPU the resident set's."""
    if device.type == "cuda":
        return dict(peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3),
                    peak_reserved_gb=round(torch.cuda.max_memory_reserved(device) / 2 ** 30, 3))
    return dict(peak_mem_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3))


# --- training

def train(a):
    # run: one_process.OneProcess, or under torchrun scale/fsdp.py's Sharded, which shards the model over processes
    run = start(a.device, a.dtype, a.activation_checkpointing, a.compile, a.hsdp, a.timeout)
    latest, log_path = os.path.join(a.out, "latest"), os.path.join(a.out, "log.jsonl")
    resume_from = run.decide(lambda: resume_point(latest, a.resume))  # under torchrun rank 0's answer, for all
    run.share(a.out)  # under torchrun: proves that every process sees the files rank 0 writes there
    tokenizer, tok_path, train_ex, val_ex = prepare_data(a, run, resume_from)

    # the model with its first weights, the exits its loss sums over, AdamW
    model, fused, opt, (exits, loss_exits, loss_weights, heads) = build(a, run, tokenizer.vocab_size, resume_from)
    trainable = [p for p in model.parameters() if p.requires_grad]

    # the schedule, and where a resumed run stands in it
    global_batch = a.batch_size * a.grad_accum * run.world
    total, warmup = schedule(len(train_ex), global_batch, a.max_steps, a.epochs, a.warmup)
    flags = {k: getattr(a, k) for k in ("mode", "exits", "exit_weights", "separate_heads", "no_exit_norm")}
    step = resume(resume_from, run, model, opt, flags, global_batch, log_path) if resume_from else 0
    record = dict(exits=exits, mode=a.mode, world_size=run.world, global_batch=global_batch, train_config=vars(a),
                  exit_norm=not a.no_exit_norm, **(dict(exit_heads=heads) if heads else {}))  # for params.json
    if run.master:
        print(f"model: {model.args.n_layers} layers, dim {model.args.dim}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {'pretraining, ' * a.pretrain}mode "
              f"{a.mode}, exits {exits}, loss at {loss_exits}{', own heads at ' + str(heads) if heads else ''}"
              f"{', no norm below the last' * a.no_exit_norm}; {total} steps of {global_batch} on {run.world} x "
              f"{run.device}; lr {a.lr:g}, warmup {warmup} steps, cosine to {a.min_lr:g}"
              + (f"; resuming from {resume_from} at step {step}" if step else ""))
        open(log_path, "a" if step else "w").close()

    with tqdm(total=total, initial=step, disable=not run.master, dynamic_ncols=True) as bar:
        while step < total:
            t0 = time.perf_counter()
            lr = get_lr(step, a.lr, a.min_lr, warmup, total)
            for group in opt.param_groups:
                group["lr"] = lr
            # this process's micro-batches, and n_global, the target tokens of the step's whole (global) batch
            micro, n_global = step_batches(train_ex, step, a.batch_size, a.grad_accum, a.seed, run.rank, run.world)
            ce_sums = 0  # per exit, the sum of its token losses
            for i, batch in enumerate(micro):
                run.micro_batch(last=i == len(micro) - 1)  # under HSDP: gradients cross the nodes with the last
                tokens, positions, targets = batch_tensors(batch, run.device)
                # the loss is a mean over the n_global tokens, and FSDP averages the processes' gradients, which
                # divides by the world: each process scales its sum by world / n_global (in one process 1 / n_global)
                scale = run.world / n_global
                with run.autocast:
                    if fused is None:  # soft.py: the SoFT loss, summed over the exits
                        loss, ce = sorted_loss(model, tokens, positions, targets, loss_exits, loss_weights, scale)
                    else:  # its fused twin, which never holds whole logits (scale/fused_ce.py; always under torchrun)
                        loss, ce = fused(tokens, positions, targets, loss_exits, loss_weights, scale)
                loss.backward()
                ce_sums = ce_sums + ce
            n_tokens = sum(len(ids) for b in micro for ids, _ in b)  # this process's, prompts included: for tokens/s
            # the per-exit losses over every process's tokens (run.sum: in one process, this one's)
            sums = run.sum(torch.tensor([*ce_sums.tolist(), n_tokens], dtype=torch.float64))
            losses = {str(e): x for e, x in zip(loss_exits, (sums[:-1] / n_global).tolist())}
            # clip (the norm of all processes' gradients together), and stop before a non-finite one is applied
            norm = nn.utils.clip_grad_norm_(trainable, a.grad_clip if a.grad_clip > 0 else float("inf"))
            norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # sharded, it is a DTensor
            check_finite(list(losses.values()), norm, step, a.out)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0  # then log, evaluate every exit, save
            log = [dict(step=step, loss={e: round(x, 4) for e, x in losses.items()}, lr=lr, grad_norm=round(norm, 4),
                        sec_per_step=round(dt, 4), tokens_per_sec=round(sums[-1].item() / dt, 1),
                        **peak_memory(run.device))]
            bar.set_postfix_str(" ".join(f"L{e} {x:.3f}" for e, x in losses.items()))
            bar.update()
            if val_ex and (step == total or (a.eval_interval and step % a.eval_interval == 0)):
                val = evaluate(model, fused, val_ex, exits, a.batch_size, run)
                log.append(dict(step=step, val_loss={str(e): round(x, 4) for e, x in zip(exits, val)}))
                if run.master:
                    bar.write(f"step {step}: val loss " + " ".join(f"L{e} {x:.3f}" for e, x in zip(exits, val)))
            if run.master:
                with open(log_path, "a") as f:
                    f.writelines(json.dumps(entry) + "\n" for entry in log)
            if step == total or (a.save_interval and step % a.save_interval == 0):
                save_checkpoint(a.out, step, run, model, opt, tok_path, **record)  # checkpoints.py: atomically
    if run.master:
        print(f"checkpoint: {latest} -> step_{step:07d}; try: python generate.py --ckpt {a.out} --compare")
    run.close()  # under torchrun: the process group ends once every process is done


def plan_memory(a, search: bool = True) -> dict:
    """--estimate and --measure_memory: the peak memory of one step of this trainer under torchrun, simulated for
    --nproc GPUs or measured (scale/memory.py)."""
    from scale.memory import plan_run
    return plan_run(lambda dtype, fake_world: start(a.device, dtype, a.activation_checkpointing, False, a.hsdp,
                                                    a.timeout, fake_world),
                    lambda run, real: build(a, run, a.vocab_size if a.model == "tiny" else None, real=real),
                    a.estimate, a.nproc, a.dtype, a.grad_clip, a.batch_size, a.max_seq_len, a.grad_accum,
                    a.gpu_memory, search)


def main(argv=None):
    # on CUDA, memory segments that grow rather than fragment, unless the user chose: before anything allocates
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    a = get_args(argv)
    try:
        check_flags(a)
        if a.estimate or a.measure_memory:
            plan_memory(a)
        else:
            train(a)
    except (DataError, FlagError, CheckpointError, OSError) as e:  # one line; under torchrun from the process met it
        rank = os.environ.get("RANK")
        if not rank or not getattr(e, "decided", False) or rank == "0":  # rank 0's decisions: once, by rank 0
            print(f"{'rank ' + rank + ': ' if rank and not getattr(e, 'decided', False) else ''}error: {e}",
                  file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
