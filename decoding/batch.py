"""Batched decoding: several prompts of any lengths decoded together at one depth.

The prompts are left-padded to the longest; each row has positions of its own from 0 and a mask that hides its
padding (step.padding_masks), and stops at its own EOS while the batch runs on until every row has stopped. Its
greedy rows are token for token what generate.generate gives each prompt alone.
"""
import torch

from decoding.speculative import speculate
from decoding.step import layers_fn, open_cache
from model import Transformer
from sampling import sample


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, layers: int | None = None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   eos_id: int | None = None, seed: int | None = None, on_token=None, compile: bool = False,
                   draft_layers: int | None = None, num_speculations: int = 8, draft_confidence: float = 0.5,
                   stats: dict | None = None) -> list[list[int]]:
    """The new token ids of each prompt (without the EOS that stopped it), all decoded together by the
    depth-`layers` sub-model (default: all layers). At most max_seq_len minus the longest prompt new tokens.
    on_token(row, id) sees tokens as they come. compile: through the compiled graphs of step.layers_fn.
    draft_layers: the full model, self-speculatively (speculative.py), each row accepting drafts of its own;
    stats receives the acceptance."""
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
    if draft_layers:
        assert 1 <= draft_layers < n and depth == n, f"draft_layers={draft_layers} outside 1..{n - 1}, or layers<{n}"
        open_cache(model, len(prompts), T + max_new_tokens, static=True)  # rows at columns of their own
        try:
            return speculate(model, tokens, pad, layers, K=draft_layers, N=num_speculations,
                             confidence=draft_confidence, max_new=max_new_tokens, eos_id=eos_id,
                             sampling=(temperature, top_k, top_p, generator), on_token=on_token, stats=stats)
        finally:
            model.drop_cache()
    open_cache(model, len(prompts), T + max_new_tokens, static=compile)
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
