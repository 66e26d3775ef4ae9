"""Sample from any depth of a (sorted) LLaMA 2: the first n layers plus the shared norm and head.

  python generate.py --layers 4                    # the depth-4 sub-model of the demo checkpoint in out/
  python generate.py --compare                     # the same prompt at every trained exit, with tokens/s
  python generate.py --ckpt llama-2-13b --tokenizer tokenizer.model --layers 20 --prompt "..."

Decoding uses a static KV cache: the prompt is prefilled in one pass, then one token per step, the same function
for both (gpt-fast's prefill / decode split). Prompts are wrapped in the Stanford Alpaca template (data.py) unless
--raw.
"""
import argparse
import os
import sys
import time
from functools import partial

import torch

from data import DataError, alpaca_prompt
from load_llama import CheckpointError, check_vocab, load_model, load_tokenizer, parse_depths, trained_exits
from model import Transformer, default_exits


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


# --- decoding with the KV cache

def layers_fn(model: Transformer, compile: bool = False):
    """f(x, pos, first, last, pad=None, every=False) -> (hidden states (B, T, dim), logits (B, T or 1, V)): blocks
    first+1..last on x (token ids (B, T) if first is 0, else hidden states) at columns pos.. of the KV cache,
    then the head of depth `last` on every position (every) or on the last one.

    Eager: Transformer.run_layers. Compiled: Transformer.decode_step, whose shapes do not depend on the position,
    so that one graph serves every position: a graph for each range of layers and each chunk length, with
    chunks of several tokens (prompts, verified drafts) right-padded to a power of two (their padding's cache
    entries lie past every query that could read them, and are overwritten before any does), so that a few
    graphs serve every length. On CUDA the graphs are replayed as CUDA graphs ("reduce-overhead"). The model
    keeps its compiled functions: compiling costs once per process.
    """
    def step(x, pos, first, last, pad, every, end):
        """end: where the last real token of x is (a tensor (1,) when compiled, so that padding costs no graph)."""
        if compile:
            h = model.decode_step(x, pos, first, last, pad)
        else:
            h = model.run_layers(model.tok_embeddings(x) if first == 0 else x, pos, first, last, pad)
        return h, model.head(h if every else h.index_select(1, end), last)
    if not compile:
        return lambda x, pos, first, last, pad=None, every=False: step(
            x, pos, first, last, pad, every, torch.tensor([x.size(1) - 1], device=x.device))
    if getattr(model, "compiled_step", None) is None:
        # a graph per range of layers, chunk size and batch size: more than dynamo's default of 8 for one
        # function; the setting's name differs across torch versions
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        cuda = model.output.weight.is_cuda
        model.compiled_step = torch.compile(step, fullgraph=True, dynamic=False,
                                            mode="reduce-overhead" if cuda else None)
    device = model.output.weight.device

    def compiled(x, pos, first, last, pad=None, every=False):
        T, room = x.size(1), model.layers[0].attention.cache.k.size(2) - pos
        size = min(1 << (T - 1).bit_length(), room)  # the next power of two, if the cache has room for it
        if size > T:
            x = torch.cat([x, x[:, -1:].expand(-1, size - T, *x.shape[2:])], dim=1)
        h, logits = model.compiled_step(x, torch.tensor([pos], device=device), first, last, pad, every,
                                        torch.tensor([T - 1], device=device))
        if device.type == "cuda":  # a CUDA graph's next replay overwrites its outputs; drafts keep theirs a while
            h, logits = h.clone(), logits.clone()
        return h[:, :T], logits[:, :T]
    return compiled


def open_cache(model: Transformer, batch_size: int, size: int, compile: bool):
    """Give the layers a KV cache for one decode: of `size` columns, or, compiled, of the next power of two (at
    most max_seq_len), the same one from one call to the next while its shape stays (the graphs are specialised
    to it, and CUDA graphs to its memory); model.drop_cache() takes it off again, so that no other forward writes
    to it. A compiled step attends over its whole cache: sized to the decode rather than to max_seq_len, a short
    decode does not pay for the columns it never reaches, and a few sizes serve every decode."""
    if not compile:
        return model.setup_cache(batch_size, size)
    columns = min(1 << (size - 1).bit_length(), model.args.max_seq_len)
    kept = getattr(model, "static_cache", None)
    if kept is None or kept[0].k.shape[::2] != (batch_size, columns):
        model.setup_cache(batch_size, columns)
        model.static_cache = [layer.attention.cache for layer in model.layers]
    for layer, cache in zip(model.layers, model.static_cache):
        layer.attention.cache = cache


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, layers: int | None = None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   eos_id: int | None = None, seed: int | None = None, on_token=None,
                   compile: bool = False) -> list[list[int]]:
    """The new token ids of each prompt (without the EOS that stopped it), all decoded together by the
    depth-`layers` sub-model (default: all layers).

    The prompts are left-padded to the longest; each row has positions of its own from 0 and a mask that hides
    its padding (Transformer.run_layers, decode_step), and stops at its own EOS, while the batch runs on until
    every row has stopped. At most max_seq_len minus the longest prompt new tokens. on_token(row, id) sees tokens
    as they come. compile: through the compiled graphs of layers_fn.
    """
    n = model.args.n_layers
    depth = layers or n
    assert 1 <= depth <= n, f"layers={depth} outside 1..{n}"
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1 or max(lengths) >= model.args.max_seq_len:
        raise ValueError(f"prompts of {min(lengths, default=0)}..{max(lengths, default=0)} tokens; each must be "
                         f"1..{model.args.max_seq_len - 1} (max_seq_len)")
    T = max(lengths)
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - T)
    out = [[] for _ in prompts]
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    pad = torch.tensor([T - k for k in lengths], device=device)
    pad = pad if pad.any() else None  # prompts of one length need no mask: the plain causal path
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T), padding first
    live = set(range(len(prompts)))  # the rows still decoding
    layers = layers_fn(model, compile)
    open_cache(model, len(prompts), T + max_new_tokens, compile)
    try:
        logits = layers(tokens, 0, 0, depth, pad)[1][:, -1]
        for col in range(T, T + max_new_tokens):
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            for b, t in enumerate(token.tolist()):
                if b in live and t == eos_id:
                    live.remove(b)
                elif b in live:
                    out[b].append(t)
                    if on_token:
                        on_token(b, t)
            if not live or col == T + max_new_tokens - 1:
                break
            logits = layers(token[:, None], col, 0, depth, pad)[1][:, -1]
        return out
    finally:
        model.drop_cache()


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, layers: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, seed: int | None = None, on_token=None,
             draft_layers: int | None = None, num_speculations: int = 8, draft_confidence: float = 0.5,
             early_exit: float | list[float] | None = None, exits: list[int] | None = None,
             stats: dict | None = None, compile: bool = False) -> list[int]:
    """New token ids (without the EOS that stopped them), one of three ways:

    plain: the depth-`layers` sub-model (default: all layers), prefill then one token per step (generate_batch);
    draft_layers=K: lossless self-speculative decoding, the first K layers drafting up to num_speculations tokens
        (fewer where their top probability drops below draft_confidence);
    early_exit=threshold: each token leaves at the first of `exits` whose top probability reaches it (one
        threshold for all, or one per exit below the last: the paper's 0.95, 0.95, 0.9, ... for 13B).
    on_token(id) is called as tokens are produced; `stats`, if given, receives acceptance or exit depths.
    compile: plain and self-speculative decoding through compiled graphs (layers_fn); early exit ignores it and
        stays eager.
    """
    n = model.args.n_layers
    depth = layers or n
    assert 1 <= depth <= n, f"layers={depth} outside 1..{n}"
    T = len(prompt_ids)
    if not 0 < T < model.args.max_seq_len:
        raise ValueError(f"the prompt is {T} tokens; it must be 1..{model.args.max_seq_len - 1} (max_seq_len)")
    if not (draft_layers or early_exit is not None):
        return generate_batch(model, [prompt_ids], max_new_tokens, layers=depth, temperature=temperature, top_k=top_k,
                              top_p=top_p, eos_id=eos_id, seed=seed,
                              on_token=on_token and (lambda _, token: on_token(token)), compile=compile)[0]
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - T)
    if max_new_tokens < 1:
        return []
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    pick = partial(sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    out = []

    def emit(token: int) -> bool:
        """Record a token; True when decoding should stop."""
        if token == eos_id:
            return True
        out.append(token)
        if on_token:
            on_token(token)
        return len(out) >= max_new_tokens

    prompt = torch.tensor([prompt_ids], device=device)
    size = T + max_new_tokens  # at most max_seq_len; the cache never holds more than the output can reach
    compile = compile and bool(draft_layers)
    open_cache(model, 1, size, compile)
    try:
        if draft_layers:
            assert 1 <= draft_layers < n, f"draft_layers={draft_layers} outside 1..{n - 1}"
            speculate(model, prompt, draft_layers, num_speculations, draft_confidence, pick, emit, size,
                      eos_id, stats, (temperature, top_k, top_p, generator), layers_fn(model, compile))
        else:
            exits = sorted(set(exits or default_exits(n)) | {n})
            thresholds = list(early_exit) if isinstance(early_exit, (list, tuple)) else [early_exit] * len(exits[:-1])
            assert len(thresholds) == len(exits) - 1, f"{len(thresholds)} thresholds for the exits {exits[:-1]}"
            exit_early(model, prompt, exits, dict(zip(exits, thresholds)), pick, emit, size, stats)
        return out
    finally:
        model.drop_cache()


def speculate(model, prompt, K, N, confidence, pick, emit, end, eos_id, stats, sampling, layers):
    """Self-speculative decoding: layers 1..K draft up to N tokens, layers K+1..L verify from their hidden states.

    The verifier never recomputes the first K layers: it starts from the hidden states the draft left after
    layer K, and the draft's KV entries for layers 1..K are the model's own. Rejected positions need no undo:
    their cache entries lie past the accepted length, are never read, and are overwritten by the next draft.
    A draft stops early where its own top probability falls below `confidence` (a token it would probably get
    wrong costs K layers and buys nothing), at EOS, and where decoding would end anyway (position `end`).
    Where to stop depends only on the draft, so the output is unchanged.
    """
    L = model.args.n_layers
    temperature, top_k, top_p, generator = sampling
    token = pick(layers(prompt, 0, 0, L)[1][:, -1])
    pos = prompt.size(1)  # position of `token`, which no layer has seen yet
    drafted = accepted = 0
    if emit(token.item()):
        return
    while True:
        hidden, drafts, q = [], [], []
        x = token
        limit = min(N, end - 2 - pos)  # a cycle adds its drafts and one more token, all before position `end`
        for i in range(limit + 1):
            h, draft_logits = layers(x.view(1, 1), pos + i, 0, K)  # (1, 1, dim), (1, 1, V)
            hidden.append(h)  # the verifier continues from here, for x and for every draft before it
            if i == limit:
                break
            probs = logits_to_probs(draft_logits[0, -1], temperature or 1.0, top_k, top_p)
            if probs.max() < confidence:  # the draft is unsure: let the full model take the next token itself
                break
            if temperature == 0.0:
                x = probs.argmax(-1, keepdim=True)
            else:
                q.append(probs)
                x = torch.multinomial(probs, 1, generator=generator)
            drafts.append(x.item())
            if drafts[-1] == eos_id:  # nothing follows an accepted EOS: it needs no hidden state of its own
                break
        n = len(drafts)
        logits = layers(torch.cat(hidden, dim=1), pos, K, L, every=True)[1][0]  # (n+1, V) (n after EOS) at once
        if temperature == 0.0:
            target = logits.argmax(-1).tolist()
            k = 0  # drafts accepted
            while k < n and drafts[k] == target[k]:
                k += 1
            # then the full model's correction, or its bonus token when every draft was accepted (none after EOS)
            new = drafts[:k] + target[k:k + 1]
        else:  # speculative sampling (Leviathan et al. 2023): the output follows the full model's distribution
            p = logits_to_probs(logits, temperature, top_k, top_p)
            k = 0  # accept draft d with probability min(1, p(d) / q(d)): u * q(d) < p(d) for u uniform in [0, 1)
            while k < n and torch.rand(1, generator=generator, device=p.device).item() * q[k][drafts[k]] < \
                    p[k, drafts[k]]:
                k += 1
            new = drafts[:k]
            if k < n:  # rejected: sample from what the full model wants beyond what the draft offered
                residual = (p[k] - q[k]).clamp(min=0)
                residual = residual if residual.sum() > 0 else p[k]
                new.append(torch.multinomial(residual / residual.sum(), 1, generator=generator).item())
            elif k < p.size(0):
                new.append(torch.multinomial(p[k], 1, generator=generator).item())
        drafted, accepted = drafted + n, accepted + k
        if stats is not None:
            stats.update(drafted=drafted, accepted=accepted, acceptance=accepted / max(drafted, 1))
        for t in new:
            if emit(t):
                return
        token = torch.tensor([new[-1]], device=prompt.device)
        pos += len(new)


def exit_early(model, prompt, exits, thresholds: dict, pick, emit, size, stats):
    """Confidence-based early exit with exact KV entries for the layers a token skipped: a token leaves at the
    first exit e whose top probability reaches thresholds[e].

    A token that leaves at exit e has no keys and values in layers above e. They are computed, from the hidden
    state it really had at e, the first time a later token goes deeper than e, batched with that token.
    depth[p] (how many layers position p has been through) never increases along the sequence, so the
    positions to catch up always form one run just before the current token.
    """
    L = model.args.n_layers
    T = prompt.size(1)
    if T > 1:
        model.run_layers(model.tok_embeddings(prompt[:, :-1]), 0, 0, L)  # the prompt but its last token, all layers
    depth = [L] * (T - 1) + [0] * (size - T + 1)
    saved = torch.empty(1, size, model.args.dim, dtype=model.output.weight.dtype, device=prompt.device)
    token, pos, depths = prompt[0, -1:], T - 1, []  # the last prompt token exits early like any other
    while True:
        h, prev = model.tok_embeddings(token.view(1, 1)), 0
        for e in exits:
            m = pos
            while m > 0 and depth[m - 1] < e:  # earlier positions that stopped at `prev` and lack layers prev+1..e
                m -= 1
            x = model.run_layers(torch.cat([saved[:, m:pos], h], dim=1), m, prev, e)
            saved[:, m:pos], depth[m:pos] = x[:, :-1], [e] * (pos - m)
            h = x[:, -1:]
            logits = model.head(h[:, -1], e)
            if e == L or torch.softmax(logits.float(), -1).max() >= thresholds[e]:
                break
            prev = e
        saved[:, pos], depth[pos] = h[:, 0], e
        depths.append(e)
        if stats is not None:
            stats.update(mean_exit_depth=sum(depths) / len(depths), exit_depths=list(depths))
        token = pick(logits)
        pos += 1
        if emit(token.item()) or pos >= size:
            return


# --- command line

class Printer:
    """Streams decoded text: sentencepiece joins pieces, so print what the whole decode gained."""

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
    p.add_argument("--draft_layers", type=int, default=None, metavar="K",
                   help="self-speculative decoding: the first K layers draft, the full model verifies")
    p.add_argument("--num_speculations", type=int, default=8, metavar="N", help="most tokens per draft")
    p.add_argument("--draft_confidence", type=float, default=0.5,
                   help="a draft stops where its top probability falls below this (0: always N tokens)")
    p.add_argument("--early_exit", default=None, metavar="THRESHOLD[,...]",
                   help="each token leaves at the first trained exit whose top probability reaches THRESHOLD: one "
                        "value, or one per exit below the last (e.g. 0.95,0.9,0.8,0.7)")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd graphs, one for every position (CUDA graphs on a GPU); "
                        "not with --early_exit")
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on CUDA, float32 elsewhere")
    return p.parse_args(argv)


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


def device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype checked: bfloat16 on CUDA and float32 elsewhere unless --dtype says."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DataError(f"--device {device}: not a device name (cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {device}: CUDA is not available here")
    return dev, getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))


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
        if a.compare is not None:
            depths = trained_exits(a.ckpt, n) if a.compare == "exits" else parse_depths(a.compare, n, "--compare")
        else:
            depths = parse_depths(str(a.layers), n, "--layers") if a.layers is not None else [n]
        text = a.prompt if a.raw else alpaca_prompt(a.prompt, a.input)
        prompt_ids = tokenizer.encode(text, bos=True)
        if len(prompt_ids) >= model.args.max_seq_len:
            raise DataError(f"the prompt is {len(prompt_ids)} tokens but the model's max_seq_len is "
                            f"{model.args.max_seq_len}")
        speed, label = {}, None  # a faster way to decode with the full model, and how to name it
        if a.draft_layers is not None:
            if not 1 <= a.draft_layers < n or a.num_speculations < 1:
                raise DataError(f"--draft_layers {a.draft_layers}: must be within 1..{n - 1}, --num_speculations "
                                "at least 1")
            if a.compare is not None or a.layers is not None or a.early_exit is not None:
                raise DataError("--draft_layers decodes with the full model: drop --layers, --compare and "
                                "--early_exit")
            speed = dict(draft_layers=a.draft_layers, num_speculations=a.num_speculations,
                         draft_confidence=a.draft_confidence)
            label = f"self-speculative: layers 1..{a.draft_layers} draft {a.num_speculations} tokens, {n} layers verify"
        elif a.early_exit is not None:
            if a.compare is not None or a.layers is not None:
                raise DataError("--early_exit picks the depth of each token: drop --layers and --compare")
            if a.compile:
                raise DataError("--early_exit decodes eagerly: drop --compile")
            exits = trained_exits(a.ckpt, n)
            speed = dict(early_exit=parse_thresholds(a.early_exit, [e for e in exits if e < n]), exits=exits)
            label = f"early exit at top probability >= {a.early_exit}, exits {exits}"
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")

    print(text, end="" if a.raw else "\n")
    if a.num_samples > 1 and not speed:  # the samples of a depth decoded together, as one batch
        for depth in depths:
            if a.compile:  # the first decode compiles its graphs: time it apart
                t0 = time.perf_counter()
                generate_batch(model, [prompt_ids] * a.num_samples, a.max_new_tokens, layers=depth, compile=True)
                print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
            t0 = time.perf_counter()
            samples = generate_batch(model, [prompt_ids] * a.num_samples, a.max_new_tokens, layers=depth,
                                     temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                                     eos_id=tokenizer.eos_id, seed=a.seed, compile=a.compile)
            dt = time.perf_counter() - t0
            for i, ids in enumerate(samples):
                print(f"--- layers {depth}/{n}, sample {i + 1}\n{tokenizer.decode(ids)}")
            n_tokens = sum(len(ids) for ids in samples)
            print(f"[{a.num_samples} samples decoded together, {n_tokens} tokens in {dt:.2f} s: "
                  f"{n_tokens / dt:.1f} tokens/s]")
        return
    for depth in depths:
        for i in range(a.num_samples):
            print(f"--- {label or f'layers {depth}/{n}'}" + (f", sample {i + 1}" if a.num_samples > 1 else ""))
            printer, stats = Printer(tokenizer), {}
            decode = partial(generate, model, prompt_ids, a.max_new_tokens, layers=depth, temperature=a.temperature,
                             top_k=a.top_k, top_p=a.top_p, eos_id=tokenizer.eos_id, seed=a.seed + i, **speed)
            if a.compile and i == 0:  # the first decode at a depth compiles its graphs: time it apart
                t0 = time.perf_counter()
                decode(compile=True)
                print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
            t0 = time.perf_counter()
            ids = decode(on_token=printer, stats=stats, compile=a.compile)
            dt = time.perf_counter() - t0
            extra = (f", {stats['acceptance']:.0%} of drafts accepted" if "acceptance" in stats else "") + \
                    (f", mean exit depth {stats['mean_exit_depth']:.2f}" if "mean_exit_depth" in stats else "")
            print(f"\n[{len(ids)} tokens in {dt:.2f} s: {len(ids) / dt:.1f} tokens/s{extra}]")


if __name__ == "__main__":
    main()
