"""The fast decoding layer: what generate.generate hands over to when asked for more than the plain loop.

  step.py         one step through a range of layers, eager or through compiled graphs over a static KV cache
  batch.py        several prompts decoded together (generate_batch), left-padded, each row masked
  speculative.py  self-speculative decoding, one prompt or a batch: the first K layers draft, the full model
                  verifies, each row of a batch at its own column of one cache
  early_exit.py   each token leaves at the first exit confident enough
  cli.py          generate.py's flags for them
"""
from functools import partial

import torch

from decoding.batch import generate_batch
from decoding.early_exit import exit_early
from decoding.step import open_cache
from model import Transformer, default_exits
from sampling import sample


@torch.no_grad()
def generate_fast(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, layers=None, temperature=0.0,
                  top_k=None, top_p=None, eos_id=None, seed=None, on_token=None, compile=False, draft_layers=None,
                  num_speculations=8, draft_confidence=0.5, early_exit=None, exits=None, stats=None) -> list[int]:
    """generate.generate, decoded one of three ways: compiled plain decoding or self-speculative decoding (both
    through batch.py, one row; speculative.py: the first draft_layers layers draft up to num_speculations
    tokens a cycle, fewer where their top probability drops below draft_confidence; compiled or not) or early exit
    (each token leaves at the first of `exits` whose top probability reaches early_exit: one threshold, or one per
    exit below the last; eager). stats, if given, receives the drafts' acceptance or the exit depths."""
    n = model.args.n_layers
    T = len(prompt_ids)
    if not 0 < T < model.args.max_seq_len:
        raise ValueError(f"the prompt is {T} tokens; it must be 1..{model.args.max_seq_len - 1} (max_seq_len)")
    if draft_layers or early_exit is None:  # one row of a batch: self-speculative, or plain (compiled)
        return generate_batch(model, [prompt_ids], max_new_tokens, layers=None if draft_layers else layers,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed,
                              on_token=on_token and (lambda _, token: on_token(token)), compile=compile,
                              draft_layers=draft_layers, num_speculations=num_speculations,
                              draft_confidence=draft_confidence, stats=stats)[0]
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - T)
    if max_new_tokens < 1:
        return []
    device = model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    prompt = torch.tensor([prompt_ids], device=device)
    size = T + max_new_tokens  # at most max_seq_len; the cache never holds more than the output can reach
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

    open_cache(model, 1, size, static=False)  # early exit stays eager
    try:
        exits = sorted(set(exits or default_exits(n)) | {n})
        thresholds = list(early_exit) if isinstance(early_exit, (list, tuple)) else [early_exit] * len(exits[:-1])
        assert len(thresholds) == len(exits) - 1, f"{len(thresholds)} thresholds for the exits {exits[:-1]}"
        exit_early(model, prompt, exits, dict(zip(exits, thresholds)), pick, emit, size, stats)
        return out
    finally:
        model.drop_cache()
