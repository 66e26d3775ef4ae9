"""Sample from any depth of a (sorted) LLaMA 2: the first n layers, then the shared norm and head.

  python generate.py --layers 4                    # the depth-4 sub-model of the demo checkpoint in out/
  python generate.py --compare                     # the same prompt at every trained exit, with tokens/s
  python generate.py --ckpt llama-2-13b --tokenizer tokenizer.model --layers 20 --prompt "..."

generate() is the plain loop: the prompt in one pass that fills the KV cache, then one token a pass. The fast
decoders (batched, compiled, self-speculative, early exit) are the layer in decoding/.
"""
import argparse
import sys
import time

import torch

from data import DataError, alpaca_prompt
from load_llama import CheckpointError, check_vocab, load_model, load_tokenizer, parse_depths, trained_exits
from model import Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, layers: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None, on_token=None, compile: bool = False,
             draft_layers: int | None = None, num_speculations: int = 8, draft_confidence: float = 0.5,
             early_exit: float | list[float] | None = None, exits: list[int] | None = None,
             stats: dict | None = None) -> list[int]:
    """The new token ids (without the EOS that stopped them) of the depth-`layers` sub-model (default: all layers);
    on_token(id) sees each as it comes. The rest is decoding/generate_fast's: compiled graphs, self-speculative
    decoding drafting with the first draft_layers layers, early exit at the first of `exits` confident enough."""
    if compile or draft_layers or early_exit is not None:
        from decoding import generate_fast
        return generate_fast(model, prompt_ids, max_new_tokens, layers=layers, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_id=eos_id, seed=seed, on_token=on_token, compile=compile,
                             draft_layers=draft_layers, num_speculations=num_speculations,
                             draft_confidence=draft_confidence, early_exit=early_exit, exits=exits, stats=stats)
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
            logits = model(x, start_pos=pos, n_layers=depth)[:, -1]  # (1, vocab), the last position's
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


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    """Several prompts of any lengths decoded together at one depth (decoding/batch.py); generate's arguments, and
    on_token(row, id)."""
    from decoding.batch import generate_batch
    return generate_batch(model, prompts, max_new_tokens, **kw)


# --- sampling: pure functions of the logits

def logits_to_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Next-token distribution (..., vocab) after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token once the tokens more likely than it already cover top_p (the first one always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits, temperature: float = 0.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (..., vocab); temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs.view(-1, probs.size(-1)), 1, generator=generator).view(probs.shape[:-1])


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
    p.add_argument("--num_samples", type=int, default=1, help="samples of each depth (more than 1: decoded together)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    g = p.add_argument_group("fast decoding (decoding/)")
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


def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype checked: bfloat16 on CUDA and float32 elsewhere unless --dtype says."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DataError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here")
    return dev, getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))


def parse_thresholds(text: str, below_last: list[int]) -> float | list[float]:
    """--early_exit: one threshold for every exit, or one for each exit below the last."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise DataError(f"--early_exit {text!r}: expected a number or comma-separated numbers")
    if len(values) == 1:
        return values[0]
    if len(values) != len(below_last):
        raise DataError(f"--early_exit {text}: {len(values)} thresholds, but the exits below the last are "
                        f"{below_last}: give one value or {len(below_last)}")
    return values


def fast_options(a, n: int) -> tuple[dict, str]:
    """(generate's keyword arguments, a label) for --draft_layers or --early_exit: the full model, decoded faster."""
    if a.draft_layers is not None:
        if not 1 <= a.draft_layers < n or a.num_speculations < 1:
            raise DataError(f"--draft_layers {a.draft_layers}: must be within 1..{n - 1}, --num_speculations "
                            "at least 1")
        if a.compare is not None or a.layers is not None or a.early_exit is not None:
            raise DataError("--draft_layers decodes with the full model: drop --layers, --compare and --early_exit")
        return (dict(draft_layers=a.draft_layers, num_speculations=a.num_speculations,
                     draft_confidence=a.draft_confidence),
                f"self-speculative: layers 1..{a.draft_layers} draft {a.num_speculations} tokens, {n} layers verify")
    if a.compare is not None or a.layers is not None:
        raise DataError("--early_exit picks the depth of each token: drop --layers and --compare")
    if a.compile:
        raise DataError("--early_exit decodes eagerly: drop --compile")
    exits = trained_exits(a.ckpt, n)
    return (dict(early_exit=parse_thresholds(a.early_exit, [e for e in exits if e < n]), exits=exits),
            f"early exit at top probability >= {a.early_exit}, exits {exits}")


def sample_together(model, tokenizer, prompt_ids, depths, a):
    """--num_samples N: the N samples of each depth decoded together, as one batch (decoding/batch.py)."""
    n = model.args.n_layers
    for depth in depths:
        if a.compile:  # the first decode compiles its graphs: time it apart
            t0 = time.perf_counter()
            generate_batch(model, [prompt_ids] * a.num_samples, a.max_new_tokens, layers=depth, compile=True)
            print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
        t0 = time.perf_counter()
        samples = generate_batch(model, [prompt_ids] * a.num_samples, a.max_new_tokens, layers=depth,
                                 temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_id=tokenizer.eos_id,
                                 seed=a.seed, compile=a.compile)
        dt = time.perf_counter() - t0
        for i, ids in enumerate(samples):
            print(f"--- layers {depth}/{n}, sample {i + 1}\n{tokenizer.decode(ids)}")
        n_tokens = sum(len(ids) for ids in samples)
        print(f"[{a.num_samples} samples decoded together, {n_tokens} tokens in {dt:.2f} s: {n_tokens / dt:.1f} "
              "tokens/s]")


def main(argv=None):
    a = get_args(argv)
    try:
        if a.max_new_tokens < 1 or a.num_samples < 1 or a.temperature < 0:
            raise DataError("--max_new_tokens and --num_samples must be at least 1, --temperature at least 0")
        if a.top_p is not None and not 0 < a.top_p <= 1:
            raise DataError(f"--top_p {a.top_p}: must be in (0, 1]")
        if a.top_k is not None and a.top_k < 1:
            raise DataError(f"--top_k {a.top_k}: must be at least 1")
        device, dtype = device_and_dtype(a.device, a.dtype)
        model = load_model(a.ckpt, device=device, dtype=dtype)
        tokenizer = load_tokenizer(a.tokenizer or a.ckpt)
        check_vocab(model, tokenizer, a.ckpt)
        n = model.args.n_layers
        depths = [n if a.layers is None else a.layers] if a.compare is None else \
            trained_exits(a.ckpt, n) if a.compare == "exits" else parse_depths(a.compare, n, "--compare")
        if not 1 <= depths[0] <= n:
            raise DataError(f"--layers {a.layers}: depth {depths[0]} is outside 1..{n} (the model has {n} layers)")
        text = a.prompt if a.raw else alpaca_prompt(a.prompt, a.input)
        prompt_ids = tokenizer.encode(text, bos=True)
        if len(prompt_ids) >= model.args.max_seq_len:
            raise DataError(f"the prompt is {len(prompt_ids)} tokens but the model's max_seq_len is "
                            f"{model.args.max_seq_len}")
        fast, label = fast_options(a, n) if a.draft_layers is not None or a.early_exit is not None else ({}, None)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")

    print(text, end="" if a.raw else "\n")
    if a.num_samples > 1 and not fast:
        return sample_together(model, tokenizer, prompt_ids, depths, a)
    settings = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, eos_id=tokenizer.eos_id, **fast)
    for depth in depths:
        # untimed first: the first decode of a process pays once for what later ones reuse, so that the first depth's
        # tokens/s compare with the others'; with --compile, each depth's first decode compiles its graphs
        if a.compile or depth == depths[0]:
            t0 = time.perf_counter()
            generate(model, prompt_ids, a.max_new_tokens if a.compile else 4, layers=depth, compile=a.compile,
                     **settings)
            if a.compile:
                print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
        for i in range(a.num_samples):
            print(f"--- {label or f'layers {depth}/{n}'}" + (f", sample {i + 1}" if a.num_samples > 1 else ""))
            printer, stats, t0 = Printer(tokenizer), {}, time.perf_counter()
            ids = generate(model, prompt_ids, a.max_new_tokens, layers=depth, seed=a.seed + i, on_token=printer,
                           stats=stats, compile=a.compile, **settings)
            dt = time.perf_counter() - t0
            extra = (f", {stats['acceptance']:.0%} of drafts accepted" if "acceptance" in stats else "") + \
                    (f", mean exit depth {stats['mean_exit_depth']:.2f}" if "mean_exit_depth" in stats else "")
            print(f"\n[{len(ids)} tokens in {dt:.2f} s: {len(ids) / dt:.1f} tokens/s{extra}]")


if __name__ == "__main__":
    main()
