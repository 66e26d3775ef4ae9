"""A training run's checkpoints on disk: out/step_NNNNNNN/ holds model.safetensors (Meta's names), params.json and
tokenizer.model, which load_llama.py reads, and the training state; each is written under a temporary name, then
published atomically, out/latest naming the current one. Where a resumed run starts, and what it restores.
"""
import dataclasses
import json
import os
import shutil
from typing import NoReturn

from safetensors.torch import save_file

from flags import FlagError
from model import ModelArgs, default_exits


class CheckpointError(Exception):  # something about the user's files is wrong: one line, and the script exits
    pass


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {'not valid JSON' if isinstance(e, json.JSONDecodeError) else 'cannot read'} "
                              f"({e})")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def resolve(path: str) -> str:
    """Follow a training folder's `latest` link to the checkpoint it names (or take `latest` itself, where a copy
    that followed links made it a folder)."""
    latest = os.path.join(path, "latest")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "params.json")) and os.path.exists(latest):
        if not os.path.islink(latest):
            return latest
        return os.path.join(path, os.readlink(latest))  # through the path as given: each node its own mount of it
    return path


def trained_exits(ckpt: str, n_layers: int) -> list[int]:
    """The exits recorded in our params.json, else the default evenly spaced set."""
    params = os.path.join(resolve(ckpt), "params.json")
    exits = read_json(params).get("exits") if os.path.exists(params) else None
    return list(exits) if exits else default_exits(n_layers)


# --- writing one checkpoint

def save_weights(state: dict, folder: str):
    """model.safetensors: the tensors under Meta's names."""
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    umask = os.umask(0)  # safetensors writes its file for its owner alone (0600): give it what every file gets
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_params(args: ModelArgs, folder: str, tokenizer_path: str | None = None, **extra):
    """params.json (Meta's fields, and what the trainer adds: exits, its configuration), tokenizer.model beside."""
    with open(os.path.join(folder, "params.json"), "w") as f:
        json.dump({**dataclasses.asdict(args), **extra}, f, indent=2)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(folder, "tokenizer.model"))


def save_model(state: dict, args: ModelArgs, folder: str, tokenizer_path: str | None = None, **extra):
    """A checkpoint in our layout: model.safetensors (Meta's names), params.json, tokenizer.model."""
    os.makedirs(folder, exist_ok=True)
    save_weights(state, folder)
    save_params(args, folder, tokenizer_path, **extra)


def atomic_write(path: str, data: bytes):
    """Write to a temporary name, flush it to disk, then rename: a reader sees the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- a run's checkpoints: named, published, resumed

def new_checkpoint(out: str, step: int) -> str:
    """The name of step's checkpoint in the training folder out, and its temporary folder out/.tmp_NAME, made. A run
    started anew that wrote this step before gets a name of its own: the old stays whole until `latest` leaves it."""
    name = f"step_{step:07d}"
    while os.path.lexists(os.path.join(out, name)):
        name += "+"
    for stale in [f for f in os.listdir(out) if f.startswith(".tmp_step_")]:  # left by a run killed while saving
        shutil.rmtree(os.path.join(out, stale), ignore_errors=True)
    os.makedirs(os.path.join(out, ".tmp_" + name))
    return name


def sync(path: str):
    """Flush a file, or a folder's list of entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def publish(out: str, tmp: str, name: str):
    """Make the checkpoint written into out/tmp the current one, out/name: its files flushed to disk, renamed, then
    the link out/latest switched to it in one atomic rename; the checkpoints before it deleted."""
    for f in os.listdir(tmp) + [""]:
        sync(os.path.join(tmp, f))
    os.rename(tmp, os.path.join(out, name))
    link = os.path.join(out, "latest")
    if os.path.lexists(link + ".tmp"):  # left by a run killed at this very line
        os.remove(link + ".tmp")
    os.symlink(name, link + ".tmp")
    sync(out)
    os.replace(link + ".tmp", link)  # the switch
    sync(out)
    for old in [f for f in os.listdir(out) if f.startswith("step_") and f != name]:
        shutil.rmtree(os.path.join(out, old), ignore_errors=True)


def save_checkpoint(out: str, step: int, run, model, opt, tokenizer_path: str, **params):
    """out/step_NNNNNNN/: what load_model reads, and the training state; written under a temporary name, then
    published (a crash at any point leaves the previous one current). run: one_process.OneProcess, or scale/'s
    Sharded, where every process writes its part and rank 0 names and publishes."""
    name = run.decide(lambda: new_checkpoint(out, step))  # rank 0's view of the folder, whatever the others see
    tmp = os.path.join(out, ".tmp_" + name)
    run.save(tmp, model, opt)
    if run.master:
        save_params(model.args, tmp, tokenizer_path, step=step, **params)
        publish(out, tmp, name)
    run.barrier()


def resume_point(latest: str, resume: bool) -> str | None:
    """The training folder of the link `latest` made; the checkpoint it names to resume from (None: a new run)."""
    os.makedirs(os.path.dirname(latest), exist_ok=True)
    if resume and os.path.lexists(latest) and not os.path.exists(latest):
        raise CheckpointError(f"{latest} names {os.readlink(latest)}, which is missing: moved or deleted?")
    if os.path.isdir(latest) and not os.path.islink(latest):  # a new checkpoint could not replace it
        refuse_copied_latest(latest)
    return resolve(os.path.dirname(latest)) if resume and os.path.exists(latest) else None


def refuse_copied_latest(latest: str) -> NoReturn:
    """A training folder copied with its links followed has a folder `latest`: say how to make it the link again."""
    step = read_json(os.path.join(latest, "params.json")).get("step")
    if not isinstance(step, int):
        raise CheckpointError(f"{latest} is a folder, not the link the trainer makes, and its params.json names "
                              "no step: move it away, or train in another --out")
    out, name = os.path.dirname(latest), f"step_{step:07d}"
    fix = f"rm -r {latest}" if os.path.isdir(os.path.join(out, name)) else f"mv {latest} {os.path.join(out, name)}"
    raise CheckpointError(f"{latest} is a folder, not the link the trainer makes (copied with links followed?): "
                          f"to train or resume here, make it one: {fix} && ln -s {name} {latest}")


def resume(folder: str, run, model, opt, flags: dict, global_batch: int, log: str) -> int:
    """The step a run resumes at, with its weights and AdamW state restored and its log cut back to that step."""
    def check(saved):  # rank 0 checks: every process gets its verdict
        if {k: saved.get("train_config", {}).get(k, v) for k, v in flags.items()} != flags:
            raise FlagError(f"{folder} was trained with another objective (--mode, --exits, --exit_weights, "
                            "--separate_heads, --no_exit_norm): resume with the flags it was started with")
        if saved.get("global_batch", global_batch) != global_batch:
            raise FlagError(f"{folder} was trained with a global batch of {saved['global_batch']} (batch_size x "
                            f"grad_accum x processes), this run has {global_batch}: resume with the same global "
                            "batch, so that every step sees the examples it would have seen")
        return saved["step"]
    step = run.decide(lambda: check(read_json(os.path.join(folder, "params.json"))))
    run.restore(folder, model, opt)
    if run.master and os.path.exists(log):
        kept = []
        with open(log) as f:
            for line in f:
                if not line.endswith("\n") or json.loads(line)["step"] > step:  # cut short by a crash, or after
                    break
                kept.append(line)
        with open(log, "w") as f:
            f.writelines(kept)
    return step
