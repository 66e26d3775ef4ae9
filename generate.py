"""Sample from any depth of a (sorted) LLaMA 2: the first n layers, then the shared norm and head.

  python generate.py --layers 4                    # the depth-4 sub-model of the demo checkpoint in out/
  python generate.py --compare                     # the same prompt at every trained exit, with tokens/s
  python generate.py --ckpt llama-2-13b --tokenizer tokenizer.model --layers 20 --prompt "..."

generate_plain() is the plain loop: the prompt in one pass that fills the KV cache, then one token a pass.
generate() runs it, or hands over to the fast decoders (batched, compiled, self-speculative, early exit) of the
layer in decoding/, which the command line reaches with --num_samples, --compile, --draft_layers, --early_exit.
"""
import argparse
import sys
import time

import torch

from checkpoints import CheckpointError, trained_exits
from data import DataError, alpaca_prompt
from flags import FlagError, device_and_dtype, parse_depths
from load_llama import load_model
from model import Transformer
from sampling import logits_to_probs, sample  # noqa: F401 (importable from here, as before)
from tokenizer import check_vocab, load_tokenizer


@torch.no_grad()
def generate_plain(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, layers: int | None = None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   eos_id: int | None = None, seed: int | None = None, on_token=None) -> list[int]:
    """The new token ids (without the EOS that stopped them) of the depth-`layers` sub-model (default: all layers);
    on_token(id) sees each as it comes."""
    depth = layers or model.args.n_layers
    assert 1 <= depth <= model.args.n_layers, f"layers={depth} outside 1..{model.args.n_layers}"
    T = len(prompt_ids)
    if not 0 < T < model.args.max_seq_len:
        raise ValueError(f"the prompt is {T} tokens; it must be 1..{model.args.max_seq_len - 1} (max_seq_len)")
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - T)
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    model.setup_cache(1, T + max_new_tokens)  # every position this decode can reach
    out, x, pos = [], torch.tensor([prompt_ids], device=device), 0
    try:
        while len(out) < max_new_tokens:
            # forward(exits=[depth]) stops before the head, so that the head runs on the last position alone
            h = model(x, start_pos=pos, exits=[depth])[0][:, -1]  # (1, dim)
            logits = model.head(h, depth)  # (1, vocab): the shared norm and head, at this depth
            pos += x.size(1)  # the keys and values of x are in the cache now
            token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
            if token.item() == eos_id:
                break
            out.append(token.item())
            if on_token:
                on_token(out[-1])
            x = token.view(1, 1)
        return out
    finally:
        model.drop_cache()


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, layers: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None, on_token=None, compile: bool = False,
             draft_layers: int | None = None, num_speculations: int = 8, draft_confidence: float = 0.5,
             early_exit: float | list[float] | None = None, exits: list[int] | None = None,
             stats: dict | None = None) -> list[int]:
    """generate_plain's tokens; or, given compile, draft_layers (self-speculative decoding drafting with the first
    draft_layers layers) or early_exit (at the first of `exits` confident enough), decoding/'s generate_fast's."""
    if compile or draft_layers or early_exit is not None:
        from decoding import generate_fast
        return generate_fast(model, prompt_ids, max_new_tokens, layers=layers, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, seed=seed, on_token=on_token, compile=compile,
                             draft_layers=draft_layers, num_speculations=num_speculations,
                             draft_confidence=draft_confidence, early_exit=early_exit, exits=exits, stats=stats)
    return generate_plain(model, prompt_ids, max_new_tokens, layers=layers, temperature=temperature, top_k=top_k,
                          top_p=top_p, eos_id=eos_id, seed=seed, on_token=on_token)


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    """Several prompts of any lengths decoded together at one depth (decoding/batch.py); generate's arguments, and
    on_token(row, id)."""
    from decoding.batch import generate_batch
    return generate_batch(model, prompts, max_new_tokens, **kw)


# --- command line

class Printer:  # streams decoded text: sentencepiece joins pieces, so it prints what the whole text gained
    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int):
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        print(text[len(self.shown):], end="", flush=True)
        self.shown = text


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from any depth of a sorted LLaMA 2.")
    p.add_argument("--ckpt", default="out",
                   help="checkpoint folder: ours (default: the trainer's out/), Meta's or HF's")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one in the checkpoint folder)")
    p.add_argument("--prompt", default="Sort the digits in increasing order.", help="the instruction")
    p.add_argument("--input", default="7 2 9 4 1", help="Alpaca's optional input field ('' for none)")
    p.add_argument("--raw", action="store_true", help="send --prompt as it is, without the Alpaca template")
    p.add_argument("--layers", type=int, default=None, help="depth of the sub-model (default: all layers)")
    p.add_argument("--compare", nargs="?", const="exits", default=None, metavar="K1,K2,...",
                   help="sample at each trained exit (or at these depths), one after another")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    g = p.add_argument_group("fast decoding (decoding/)")
    g.add_argument("--num_samples", type=int, default=1, help="samples of each depth (more than 1: decoded together)")
    g.add_argument("--draft_layers", type=int, default=None, metavar="K",
                   help="self-speculative decoding: the first K layers draft, the full model verifies")
    g.add_argument("--num_speculations", type=int, default=8, metavar="N", help="most tokens per draft")
    g.add_argument("--draft_confidence", type=float, default=0.5,
                   help="a draft stops where its top probability falls below this (0: always N tokens)")
    g.add_argument("--early_exit", default=None, metavar="THRESHOLD[,...]",
                   help="each token leaves at the first trained exit whose top probability reaches THRESHOLD: one "
                        "value, or one per exit below the last (e.g. 0.95,0.9,0.8,0.7)")
    g.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd graphs, one for every position (CUDA graphs on a GPU); "
                        "not with --early_exit")
    return p.parse_args(argv)


def main(argv=None):
    a = get_args(argv)
    try:
        if a.max_new_tokens < 1 or a.num_samples < 1 or a.temperature < 0:
            raise FlagError("--max_new_tokens and --num_samples must be at least 1, --temperature at least 0")
        if a.top_p is not None and not 0 < a.top_p <= 1:
            raise FlagError(f"--top_p {a.top_p}: must be in (0, 1]")
        if a.top_k is not None and a.top_k < 1:
            raise FlagError(f"--top_k {a.top_k}: must be at least 1")
        device, dtype = device_and_dtype(a.device, a.dtype)
        model = load_model(a.ckpt, device=device, dtype=dtype)
        tokenizer = load_tokenizer(a.tokenizer or a.ckpt)
        check_vocab(model, tokenizer, a.ckpt)
        n = model.args.n_layers
        depths = [n if a.layers is None else a.layers] if a.compare is None else \
            trained_exits(a.ckpt, n) if a.compare == "exits" else parse_depths(a.compare, n, "--compare")
        if not 1 <= depths[0] <= n:
            raise FlagError(f"--layers {a.layers}: depth {depths[0]} is outside 1..{n} (the model has {n} layers)")
        text = a.prompt if a.raw else alpaca_prompt(a.prompt, a.input)
        prompt_ids = tokenizer.encode(text, bos=True)
        if len(prompt_ids) >= model.args.max_seq_len:
            raise DataError(f"the prompt is {len(prompt_ids)} tokens but the model's max_seq_len is "
                            f"{model.args.max_seq_len}")
        decode, label, fast, stats = generate_plain, None, {}, {}
        if a.compile or a.num_samples > 1 or a.draft_layers is not None or a.early_exit is not None:
            from decoding import cli  # the fast decoders take their flags from here
            decode, label, fast = cli.fast_decoder(n, trained_exits(a.ckpt, n), a.compile, a.draft_layers,
                                                   a.num_speculations, a.draft_confidence, a.early_exit,
                                                   a.layers is not None or a.compare is not None, stats)
    except (CheckpointError, DataError, FlagError) as e:
        sys.exit(f"error: {e}")

    print(text, end="" if a.raw else "\n")
    settings = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_id=tokenizer.eos_id)
    if a.num_samples > 1 and (label is None or a.draft_layers):  # the samples of each depth as one batch
        return cli.sample_together(model, tokenizer, prompt_ids, depths, a.num_samples, a.max_new_tokens, a.seed,
                                   a.compile, settings, fast)
    for depth in depths:
        # untimed first: the first decode of a process pays once for what later ones reuse, so that the first depth's
        # tokens/s compare with the others'; with --compile, each depth's first decode compiles its graphs
        if a.compile or depth == depths[0]:
            t0 = time.perf_counter()
            decode(model, prompt_ids, a.max_new_tokens if a.compile else 4, layers=depth, **settings)
            if a.compile:
                print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
        for i in range(a.num_samples):
            print(f"--- {label or f'layers {depth}/{n}'}" + (f", sample {i + 1}" if a.num_samples > 1 else ""))
            printer, t0 = Printer(tokenizer), time.perf_counter()
            ids = decode(model, prompt_ids, a.max_new_tokens, layers=depth, seed=a.seed + i, on_token=printer,
                         **settings)
            dt = time.perf_counter() - t0
            extra = (f", {stats['acceptance']:.0%} of drafts accepted" if "acceptance" in stats else "") + \
                    (f", mean exit depth {stats['mean_exit_depth']:.2f}" if "mean_exit_depth" in stats else "")
            print(f"\n[{len(ids)} tokens in {dt:.2f} s: {len(ids) / dt:.1f} tokens/s{extra}]")


if __name__ == "__main__":
    main()
