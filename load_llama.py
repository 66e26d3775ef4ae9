"""Weights and tokenizer in and out. load_model(path) reads three layouts:
  meta  params.json + consolidated.NN.pth (model-parallel shards merged along the dims Meta split)
  hf    config.json + *.safetensors (or sharded, with their index; or pytorch_model*.bin); q/k rows un-permuted
  ours  params.json + model.safetensors under Meta's names, as sorted_train.py writes it (or a folder whose `latest`
        link names one)
It never unpickles more than plain tensors (torch.load(weights_only=True)). A sub-model exported for Hugging Face:
  python load_llama.py export SRC DST --layers K
"""
import argparse
import dataclasses
import glob
import json
import os
import pickle
import shutil
import sys

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data import atomic_write
from model import ModelArgs, Transformer, default_exits, init_weights


class CheckpointError(Exception):  # something about the user's files is wrong: one line, and the script exits
    pass


# --- the tokenizer

class Tokenizer:  # LLaMA's sentencepiece tokenizer (tokenizer.model)
    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable sentencepiece tokenizer ({str(e).splitlines()[0]})")
        self.vocab_size, self.bos_id, self.eos_id = self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.model file, or a folder holding one."""
    path = os.path.join(resolve(path), "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such tokenizer file (pass --tokenizer path/to/tokenizer.model)")
    return Tokenizer(path)


def copy_tokenizer(source: str | None, init: str | None, path: str):
    """The tokenizer.model at source (a file, or a checkpoint folder holding one), else beside the weights `init`,
    copied to path."""
    beside = os.path.join(resolve(init), "tokenizer.model") if init else None
    source = source or (beside if beside and os.path.exists(beside) else None)
    if source is None:
        raise CheckpointError("--data needs a tokenizer: pass --tokenizer path/to/tokenizer.model (or an --init folder "
                              "holding one)")
    tokenizer = load_tokenizer(source)  # one clear line if it is not one
    if os.path.realpath(tokenizer.path) != os.path.realpath(path):
        with open(tokenizer.path, "rb") as f:
            atomic_write(path, f.read())


def check_vocab(model: Transformer, tokenizer: Tokenizer, where: str = "the checkpoint"):
    if model.args.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"{tokenizer.path} has {tokenizer.vocab_size} tokens but {where} has "
                              f"{model.args.vocab_size}: pass the tokenizer the model was trained with")


def parse_depths(text: str, n_layers: int, flag: str, increasing: bool = False) -> list[int]:
    """Comma-separated depths (layer counts) of a model of n_layers, each within 1..n_layers."""
    try:
        depths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CheckpointError(f"{flag} {text!r}: expected comma-separated layer counts such as 4,8")
    if not depths:
        raise CheckpointError(f"{flag} {text!r}: expected at least one layer count")
    for d in depths:
        if not 1 <= d <= n_layers:
            raise CheckpointError(f"{flag} {text}: depth {d} is outside 1..{n_layers} (the model has {n_layers} "
                                  "layers)")
    if increasing and any(x >= y for x, y in zip(depths, depths[1:])):
        raise CheckpointError(f"{flag} {text}: depths must be strictly increasing")
    return depths


def parse_weights(text: str, n: int) -> list[float]:
    """--exit_weights: n comma-separated numbers."""
    try:
        weights = [float(x) for x in text.split(",")]
    except ValueError:
        raise CheckpointError(f"--exit_weights {text!r}: expected comma-separated numbers")
    if len(weights) != n:
        raise CheckpointError(f"--exit_weights has {len(weights)} values for {n} exits")
    return weights


def trained_exits(ckpt: str, n_layers: int) -> list[int]:
    """The exits recorded in our params.json, else the default evenly spaced set."""
    params = os.path.join(resolve(ckpt), "params.json")
    exits = read_json(params).get("exits") if os.path.exists(params) else None
    return list(exits) if exits else default_exits(n_layers)


# --- reading a checkpoint folder

def resolve(path: str) -> str:
    """Follow a training folder's `latest` link to the checkpoint it names."""
    latest = os.path.join(path, "latest")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "params.json")) and os.path.exists(latest):
        return os.path.join(path, os.readlink(latest))  # through the path as given: each node its own mount of it
    return path


def detect_layout(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder" if not os.path.exists(path) else
                              f"{path}: a checkpoint is a folder (params.json + weights, or config.json + weights)")
    files = set(os.listdir(path))
    if "params.json" in files and "model.safetensors" in files:
        return "ours"
    if "params.json" in files and glob.glob(os.path.join(path, "consolidated.*.pth")):
        return "meta"
    if "config.json" in files and glob.glob(os.path.join(path, "*.safetensors")) + glob.glob(
            os.path.join(path, "pytorch_model*.bin")):
        return "hf"
    raise CheckpointError(f"{path}: found neither params.json with consolidated.*.pth or model.safetensors "
                          "(Meta's layout, ours) nor config.json with *.safetensors (Hugging Face's)")


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


def require(cfg: dict, keys, path: str):
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing required field(s) {', '.join(missing)}")


def args_from_params(params: dict, path: str) -> ModelArgs:
    """ModelArgs from Meta's params.json, or ours, which adds fields of its own."""
    require(params, ["dim", "n_layers", "n_heads"], path)
    if params.get("use_scaled_rope"):
        raise CheckpointError(f"{path}: use_scaled_rope (LLaMA 3.1) is not supported; this is a LLaMA 2 implementation")
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in params.items() if k in fields})


def args_from_hf_config(cfg: dict, path: str) -> ModelArgs:
    require(cfg, ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"], path)
    if cfg.get("model_type", "llama") != "llama":
        raise CheckpointError(f"{path}: model_type is {cfg['model_type']!r}, expected 'llama'")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{path}: rope scaling is not supported; this is a LLaMA 2 implementation")
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim", head_dim) != head_dim:
        raise CheckpointError(f"{path}: head_dim other than hidden_size / num_attention_heads is not supported")
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
        max_seq_len=cfg.get("max_position_embeddings", 4096))


def read_args(path: str) -> tuple[ModelArgs, str]:
    """(the model's shape, the folder's layout)."""
    path = resolve(path)
    layout = detect_layout(path)
    if layout == "hf":
        return args_from_hf_config(read_json(os.path.join(path, "config.json")), path + "/config.json"), layout
    args = args_from_params(read_json(os.path.join(path, "params.json")), path + "/params.json")
    if args.vocab_size == -1:  # Meta's params.json leaves the vocabulary to the weights
        args.vocab_size = meta_vocab_size(path)
    return args, layout


def meta_vocab_size(path: str) -> int:
    shard = torch_load(sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))[0])  # mmap: reads no weights
    if "tok_embeddings.weight" not in shard:
        raise CheckpointError(f"{path}: no tok_embeddings weight found; is this a LLaMA checkpoint?")
    return shard["tok_embeddings.weight"].shape[0]


def torch_load(file: str) -> dict:
    """torch.load that only ever builds tensors: a file whose unpickling would run code is refused."""
    try:
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{file}: refused, unpickling it would need more than plain tensors "
                              f"({str(e).splitlines()[-1][:120]})")
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{file}: cannot read this .pth file ({str(e).splitlines()[0][:160]})")


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map", {})
        return sorted({os.path.join(path, f) for f in weight_map.values()})
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


class Rows:
    """A tensor of a checkpoint, read no further than asked: its shape, and rows(a, b), rows a..b-1 of its first
    dimension (a process of a sharded run reads only its own). rows() reads it whole."""

    def __init__(self, shape, read):
        self.shape, self.read = torch.Size(shape), read

    def rows(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.read(start, self.shape[0] if end is None else end)


def iter_safetensors(files: list[str]):
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    yield name, Rows(part.get_shape(), lambda a, b, part=part: part[a:b])
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})")


def mapped(t: torch.Tensor) -> Rows:
    return Rows(t.shape, lambda a, b: t[a:b])  # a memory-mapped tensor: only the pages of those rows are read


# dims along which Meta's model-parallel shards were cut: ColumnParallelLinear splits the output rows,
# RowParallelLinear and ParallelEmbedding the input columns; norms are replicated
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def iter_meta(path: str):
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    shards = [torch_load(f) for f in files]  # mmap: pages are read only as tensors are used
    for name in shards[0]:
        if name == "rope.freqs":  # Meta ships its rotary table; we compute ours
            continue
        parts = [s[name] for s in shards]
        split = META_SPLIT_DIM.get(name.split(".")[-2])
        if len(parts) == 1 or split is None:
            yield name, mapped(parts[0])
        elif split == 1:  # the rows asked for, from every shard's columns
            shape = (parts[0].shape[0], sum(p.shape[1] for p in parts))
            yield name, Rows(shape, lambda a, b, parts=parts: torch.cat([p[a:b] for p in parts], dim=1))
        else:  # the rows asked for, from the shards that hold them
            starts = [sum(p.shape[0] for p in parts[:i]) for i in range(len(parts))]
            shape = (starts[-1] + parts[-1].shape[0], parts[0].shape[1])
            yield name, Rows(shape, lambda a, b, parts=parts, starts=starts: torch.cat(
                [p[max(a - s, 0):max(b - s, 0)] for p, s in zip(parts, starts)]))


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved rope rows (pairs 2i, 2i+1) -> HF's rows (first half, second half) per head."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def hf_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermuted(t: Rows, n_heads: int) -> Rows:
    """Rows of a q/k weight in Meta's rope layout, from one in HF's: each head's rows are permuted among
    themselves, so rows a..b come from the heads that hold them."""
    head_dim = t.shape[0] // n_heads

    def read(a, b):
        first, last = a // head_dim, -(-b // head_dim)
        if first >= last:
            return t.rows(a, a)
        return hf_unpermute(t.rows(first * head_dim, last * head_dim), last - first)[a - first * head_dim:
                                                                                        b - first * head_dim]
    return Rows(t.shape, read)


# Hugging Face name -> Meta name, inside a block and outside
HF_BLOCK_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                "lm_head.weight": "output.weight"}


def iter_hf(path: str, args: ModelArgs, tied: bool):
    files = safetensors_files(path)
    if files:
        tensors = iter_safetensors(files)
    else:
        bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        tensors = ((name, mapped(t)) for f in bins for name, t in torch_load(f).items())
    for hf_name, t in tensors:
        if hf_name in HF_TOP_NAMES:
            name = HF_TOP_NAMES[hf_name]
        elif hf_name.startswith("model.layers."):
            _, _, i, module, *rest = hf_name.split(".")
            sub = ".".join([module] + rest[:-1])
            if sub not in HF_BLOCK_NAMES:
                continue  # e.g. rotary_emb.inv_freq in older exports
            name = f"layers.{i}.{HF_BLOCK_NAMES[sub]}.{rest[-1]}"
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):
                t = unpermuted(t, args.n_heads if sub == "self_attn.q_proj" else args.n_kv_heads)
        else:
            continue
        yield name, t
        if tied and name == "tok_embeddings.weight":  # our head is a parameter of its own
            yield "output.weight", Rows(t.shape, lambda a, b, t=t: t.rows(a, b).clone())


def iter_state_dict(path: str, args: ModelArgs, layout: str):
    """(name, Rows) pairs with Meta's names, one tensor at a time, whatever the layout."""
    if layout == "meta":
        yield from iter_meta(path)
    elif layout == "hf":
        tied = bool(read_json(os.path.join(path, "config.json")).get("tie_word_embeddings", False))
        yield from iter_hf(path, args, tied)
    else:
        yield from iter_safetensors([os.path.join(path, "model.safetensors")])


def new_model(args: ModelArgs, heads=(), exit_norm: bool = True, frozen_trunk: bool = False) -> Transformer:
    """A Transformer of this shape on the default device. One whose exits read through heads of their own, or without
    the final norm (the paper's baselines and open questions), is the variant of variants/exit_heads.py."""
    if not heads and exit_norm:
        return Transformer(args)
    from variants.exit_heads import ExitHeadsTransformer
    return ExitHeadsTransformer(args, heads, exit_norm, frozen_trunk)


def load_model(path: str, device="cpu", dtype=None) -> Transformer:
    """A Transformer from any of the three layouts, in the stored dtype unless dtype is given: built on the meta
    device and given the loaded tensors, so that the peak stays near one copy of the weights."""
    path = resolve(path)
    args, layout = read_args(path)
    state = {}
    for name, t in iter_state_dict(path, args, layout):
        t = t.rows()
        state[name] = t.to(device=device, dtype=dtype or t.dtype)
    params = read_json(os.path.join(path, "params.json")) if layout == "ours" else {}
    with torch.device("meta"):
        model = new_model(args, params.get("exit_heads") or [], params.get("exit_norm", True))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise CheckpointError(f"{path}: {mismatch(expected, state)}")
    model.load_state_dict(state, assign=True)
    model.init_rope(device)
    return model.eval()


def mismatch(expected: dict, state: dict) -> str:
    """What a checkpoint's tensors lack, or have too many of, or have in another shape than the model's."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        return f"weights missing for {', '.join(missing[:3])}{' ...' * (len(missing) > 3)}"
    if unexpected:
        return f"weights the model does not have: {', '.join(unexpected[:3])}"
    k = next(k for k in expected if tuple(state[k].shape) != expected[k])
    return f"{k} has shape {tuple(state[k].shape)} but the config implies {expected[k]}"


@torch.no_grad()
def copy_weights(model, tensors, where: str, put) -> list[str]:
    """Copy tensors (name, tensor or Rows), one at a time, with put(param, tensor) (under torchrun: each process its
    shard); the names of the exit heads' that were absent (an SFT checkpoint has no SFT+ICT heads yet)."""
    params = dict(model.named_parameters())
    for name, full in tensors:
        if name not in params:
            raise CheckpointError(f"{where}: unexpected weight {name}")
        if tuple(full.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{where}: {name} has shape {tuple(full.shape)}, the model expects "
                                  f"{tuple(params[name].shape)}")
        put(params.pop(name), full)
    missing = [n for n in params if not n.startswith("exit_heads.")]
    if missing:
        raise CheckpointError(f"{where}: no weights for {', '.join(missing[:3])}")
    return sorted(params)


def load_initial_weights(model, init: str | None, seed: int, put):
    """The weights of the checkpoint folder `init`, or a random init drawn from the seed; an exit's own head that
    `init` lacks starts as the shared head. put(param, tensor) writes a whole tensor into a parameter (under
    torchrun: a process its shard of it)."""
    if init:
        absent = copy_weights(model, iter_state_dict(resolve(init), *read_args(init)), init, put)
    else:
        g = torch.Generator().manual_seed(seed)
        absent = [n for n, _ in model.named_parameters() if n.startswith("exit_heads.")]
        for name, p in model.named_parameters():
            if name not in absent:
                put(p, init_weights(name, p.shape, model.args.n_layers, g))
    with torch.no_grad():
        for e, head in getattr(model, "exit_heads", {}).items():
            if f"exit_heads.{e}.output.weight" in absent:
                head.norm.weight.copy_(model.norm.weight)
                head.output.weight.copy_(model.output.weight)


# --- writing

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


def resume_point(latest: str, resume: bool) -> str | None:
    """The training folder of the link `latest` made; the checkpoint it names to resume from (None: a new run)."""
    os.makedirs(os.path.dirname(latest), exist_ok=True)
    if resume and os.path.lexists(latest) and not os.path.exists(latest):
        raise CheckpointError(f"{latest} names {os.readlink(latest)}, which is missing: moved or deleted?")
    return resolve(os.path.dirname(latest)) if resume and os.path.exists(latest) else None


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


def save_model(state: dict, args: ModelArgs, folder: str, tokenizer_path: str | None = None, **extra):
    """A checkpoint in our layout: model.safetensors (Meta's names), params.json, tokenizer.model."""
    os.makedirs(folder, exist_ok=True)
    save_weights(state, folder)
    save_params(args, folder, tokenizer_path, **extra)


def hf_state_dict(model: Transformer, layers: int) -> dict:
    """The depth-`layers` sub-model's weights under Hugging Face's names (q/k rows in HF's rope layout)."""
    args = model.args
    meta_to_hf = {v: k for k, v in HF_BLOCK_NAMES.items()}
    top = {v: k for k, v in HF_TOP_NAMES.items()}
    norm, output = model.exit_head(layers)  # the shared ones, or SFT+ICT's head of that exit
    tensors = {top["norm.weight"]: norm.weight, top["output.weight"]: output.weight,
               top["tok_embeddings.weight"]: model.tok_embeddings.weight}
    for i, block in enumerate(model.layers[:layers]):
        for name, t in block.state_dict().items():  # "attention.wq.weight", "ffn_norm.weight", ...
            sub, leaf = name.rsplit(".", 1)
            if sub == "attention.wq":
                t = hf_permute(t, args.n_heads)
            elif sub == "attention.wk":
                t = hf_permute(t, args.n_kv_heads)
            tensors[f"model.layers.{i}.{meta_to_hf[sub]}.{leaf}"] = t
    return {n: t.detach().contiguous() for n, t in tensors.items()}


def hf_config(args: ModelArgs, layers: int, bos_id: int = 1, eos_id: int = 2, dtype=torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export(src: str, dst: str, layers: int | None = None, dtype=None):
    """Write the depth-`layers` sub-model of src as a Hugging Face LlamaForCausalLM folder."""
    model = load_model(src, dtype=dtype)
    k = layers or model.args.n_layers
    if not 1 <= k <= model.args.n_layers:
        raise CheckpointError(f"--layers {k} is outside 1..{model.args.n_layers}")
    if isinstance(model.exit_head(k)[0], torch.nn.Identity):
        raise CheckpointError(f"{src} reads layer {k} without the final norm (trained with --no_exit_norm), which "
                              "a LLaMA checkpoint cannot express; export the last layer, or a model trained with it")
    os.makedirs(dst, exist_ok=True)
    save_weights(hf_state_dict(model, k), dst)
    tok_file = os.path.join(resolve(src), "tokenizer.model")
    bos, eos = 1, 2
    if os.path.exists(tok_file):
        tok = Tokenizer(tok_file)
        bos, eos = tok.bos_id, tok.eos_id
        shutil.copyfile(tok_file, os.path.join(dst, "tokenizer.model"))
        with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                       "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f, indent=2)
    config = hf_config(model.args, k, bos, eos, model.output.weight.dtype)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config


export_hf = export  # the name it had before


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the depth-K sub-model as a Hugging Face LLaMA checkpoint")
    e.add_argument("src", help="checkpoint folder (Meta, Hugging Face or ours)")
    e.add_argument("dst", help="output folder")
    e.add_argument("--layers", type=int, default=None, help="depth of the sub-model (default: all layers)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: as stored")
    a = p.parse_args(argv)
    try:
        cfg = export(a.src, a.dst, a.layers, getattr(torch, a.dtype) if a.dtype else None)
    except CheckpointError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {a.dst}: LlamaForCausalLM with {cfg['num_hidden_layers']} layers")


if __name__ == "__main__":
    main()
