"""The fast decoders' side of generate.py's command line: --compile, --num_samples, --draft_layers and --early_exit
checked and turned into a decode function, and the samples of each depth decoded together as one batch."""
import time
from functools import partial

from decoding import generate_fast
from decoding.batch import generate_batch
from flags import FlagError


def parse_thresholds(text: str, below_last: list[int]) -> float | list[float]:
    """--early_exit: one threshold for every exit, or one for each exit below the last."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise FlagError(f"--early_exit {text!r}: expected a number or comma-separated numbers")
    if len(values) == 1:
        return values[0]
    if len(values) != len(below_last):
        raise FlagError(f"--early_exit {text}: {len(values)} thresholds, but the exits below the last are "
                        f"{below_last}: give one value or {len(below_last)}")
    return values


def fast_decoder(n: int, exits: list[int], compile: bool, draft_layers: int | None, num_speculations: int,
                 draft_confidence: float, early_exit: str | None, depth_chosen: bool, stats: dict):
    """(a function with generate.generate_plain's arguments that decodes through generate_fast, a label for
    --draft_layers and --early_exit, else None, the fast keywords: sample_together's `draft`); stats receives the
    drafts' acceptance or the exit depths of each decode."""
    fast, label = {}, None
    if draft_layers is not None:
        if not 1 <= draft_layers < n or num_speculations < 1:
            raise FlagError(f"--draft_layers {draft_layers}: must be within 1..{n - 1}, --num_speculations at least 1")
        if depth_chosen or early_exit is not None:
            raise FlagError("--draft_layers decodes with the full model: drop --layers, --compare and --early_exit")
        fast = dict(draft_layers=draft_layers, num_speculations=num_speculations, draft_confidence=draft_confidence)
        label = f"self-speculative: layers 1..{draft_layers} draft {num_speculations} tokens, {n} layers verify"
    elif early_exit is not None:
        if depth_chosen:
            raise FlagError("--early_exit picks the depth of each token: drop --layers and --compare")
        if compile:
            raise FlagError("--early_exit decodes eagerly: drop --compile")
        fast = dict(early_exit=parse_thresholds(early_exit, [e for e in exits if e < n]), exits=exits)
        label = f"early exit at top probability >= {early_exit}, exits {exits}"
    return partial(generate_fast, compile=compile, stats=stats, **fast), label, fast


def sample_together(model, tokenizer, prompt_ids: list[int], depths: list[int], num_samples: int,
                    max_new_tokens: int, seed: int, compile: bool, settings: dict, draft: dict | None = None):
    """--num_samples N: the N samples of each depth decoded together, as one batch (batch.py); settings: the
    sampling's temperature, top_k, top_p, eos_id; draft: --draft_layers and its settings, to decode the batch
    self-speculatively."""
    n, draft, stats = model.args.n_layers, draft or {}, {}
    for depth in depths:
        if compile:  # the first decode compiles its graphs: time it apart
            t0 = time.perf_counter()
            generate_batch(model, [prompt_ids] * num_samples, max_new_tokens, layers=depth, compile=True, **draft)
            print(f"[compiled: the first decode took {time.perf_counter() - t0:.1f} s]")
        t0 = time.perf_counter()
        samples = generate_batch(model, [prompt_ids] * num_samples, max_new_tokens, layers=depth, seed=seed,
                                 compile=compile, stats=stats, **draft, **settings)
        dt = time.perf_counter() - t0
        label = (f"self-speculative: layers 1..{draft['draft_layers']} draft, {n} layers verify" if draft else
                 f"layers {depth}/{n}")
        for i, ids in enumerate(samples):
            print(f"--- {label}, sample {i + 1}\n{tokenizer.decode(ids)}")
        n_tokens = sum(len(ids) for ids in samples)
        extra = f", {stats['acceptance']:.0%} of drafts accepted" if "acceptance" in stats else ""
        print(f"[{num_samples} samples decoded together, {n_tokens} tokens in {dt:.2f} s: {n_tokens / dt:.1f} "
              f"tokens/s{extra}]")
