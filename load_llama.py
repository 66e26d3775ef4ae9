"""LLaMA 2's weights into a model, and a sub-model out. load_model(path) reads three layouts:
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

from checkpoints import CheckpointError, read_json, resolve, save_weights
from model import ModelArgs, Transformer, fresh_weights
from tokenizer import Tokenizer, load_tokenizer  # noqa: F401 (importable from here, as before)


# --- reading a checkpoint folder

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
    """The weights of the checkpoint folder `init`, or a fresh model's (model.fresh_weights) drawn from the seed; an
    exit's own head that `init` lacks starts as the shared head. put(param, tensor) writes a whole tensor into a
    parameter (under torchrun: a process its shard of it)."""
    if init:
        tensors = iter_state_dict(resolve(init), *read_args(init))
    else:
        tensors = ((n, t) for n, t in fresh_weights(model, seed) if not n.startswith("exit_heads."))
    absent = copy_weights(model, tensors, init or "a fresh model", put)
    if absent:  # only exits' own heads can be absent (variants/exit_heads.py): init lacks them, or a fresh model
        model.heads_from_shared(absent)


# --- writing: a sub-model for Hugging Face

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
