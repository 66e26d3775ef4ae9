"""Self-speculative decoding and early exit: lossless, exact, reproducible."""
import json
import os

import pytest
import torch

from conftest import random_model, run_main, tiny_args
from data import alpaca_prompt
from generate import generate, generate_batch
from sampling import logits_to_probs
from load_llama import load_model, load_tokenizer
from test_train import FAST


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny SoFT model trained for a few seconds on the built-in tasks, so that drafts are often accepted."""
    out = str(tmp_path_factory.mktemp("spec") / "out")
    rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "150", "--lr", "5e-3", "--out", out)
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def trained(trained_dir):
    return load_model(trained_dir)


@pytest.fixture(scope="module")
def task_prompt(trained_dir):
    tok = load_tokenizer(trained_dir)
    return tok.encode(alpaca_prompt("Count from the first number to the second.", "12 to 19"))


PROMPT = [1, 17, 42, 99, 7, 250, 3]


@pytest.mark.parametrize("K,N", [(1, 1), (1, 4), (2, 3), (3, 6)])
def test_greedy_speculation_equals_plain_decoding_on_a_random_model(K, N):
    model = random_model(tiny_args(n_layers=4))
    stats = {}
    out = generate(model, PROMPT, 30, draft_layers=K, num_speculations=N, draft_confidence=0.0, stats=stats)
    assert out == generate(model, PROMPT, 30)
    assert stats["drafted"] > 0 and stats["acceptance"] < 0.5  # a random draft is mostly rejected, often at once


@pytest.mark.parametrize("K,N,confidence", [(1, 2, 0.0), (2, 4, 0.0), (3, 8, 0.0), (2, 8, 0.3), (3, 8, 0.5)])
def test_greedy_speculation_equals_plain_decoding_on_a_trained_model(trained, task_prompt, K, N, confidence):
    stats = {}  # no EOS: 40 tokens whatever the answer's length, so that many drafts are checked
    out = generate(trained, task_prompt, 40, draft_layers=K, num_speculations=N, draft_confidence=confidence,
                   stats=stats)
    assert out == generate(trained, task_prompt, 40)
    assert len(out) == 40 and stats["accepted"] > 0


def test_speculation_near_max_seq_len():
    model = random_model(tiny_args(n_layers=4, max_seq_len=40))
    for T in (30, 37, 39):  # drafts must shrink to fit the cache
        prompt = list(range(1, T + 1))
        plain = generate(model, prompt, 20)
        assert len(plain) == 40 - T
        assert generate(model, prompt, 20, draft_layers=2, num_speculations=5, draft_confidence=0.0) == plain


def test_every_mode_returns_nothing_for_max_new_tokens_0_and_one_token_for_1():
    model = random_model(tiny_args(n_layers=4))
    first = generate(model, PROMPT, 1)
    for kw in ({}, dict(draft_layers=2, draft_confidence=0.0), dict(early_exit=1.01, exits=[2, 4])):
        assert generate(model, PROMPT, 0, **kw) == []
        assert generate(model, PROMPT, 1, **kw) == first and len(first) == 1


def test_drafts_stop_at_eos():
    """A draft that proposes EOS goes straight to verification (with a confidence test, which syncs each draft): no
    layer ever runs a position after it, nor the last token that max_new_tokens allows. Layers 3 and 4 add nothing
    here (zero output projections), so the 2-layer draft agrees with the full model."""
    model = random_model(tiny_args(n_layers=4))
    with torch.no_grad():
        for layer in model.layers[2:]:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
    plain = generate(model, PROMPT, 30)
    eos = plain[6]
    seen = []
    run_layers = model.run_layers

    def spy(h, start_pos, first, last, positions=None, mask=None):
        seen.append(int(start_pos.max()) + h.size(1))
        return run_layers(h, start_pos, first, last, positions, mask)
    model.run_layers = spy
    stats = {}
    out = generate(model, PROMPT, 30, draft_layers=2, num_speculations=8, draft_confidence=1e-9, eos_id=eos,
                   stats=stats)
    assert out == plain[:plain.index(eos)] and stats["acceptance"] == 1.0
    assert max(seen) == len(PROMPT) + len(out)  # positions 0..T+len(out)-1: the prompt and the answer, not the EOS
    # without the confidence test (no host sync a draft) drafts may run past the EOS: wasted, never output
    assert generate(model, PROMPT, 30, draft_layers=2, draft_confidence=0.0, eos_id=eos) == out
    seen.clear()  # nor past max_new_tokens: the last token is never fed
    assert generate(model, PROMPT, 5, draft_layers=2, num_speculations=8, draft_confidence=0.0) == plain[:5]
    assert max(seen) == len(PROMPT) + 4


# --- batched self-speculation: rows at columns of their own in one cache

g = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 1, 13, 9)]


@pytest.mark.parametrize("K,N,confidence", [(1, 3, 0.0), (2, 8, 0.0), (3, 4, 0.3)])
def test_batched_speculation_gives_every_row_its_full_depth_tokens_alone(K, N, confidence):
    """Prompts of different lengths on a random model (drafts mostly rejected, each row at its own column), with
    no EOS and with one that stops the rows at different steps."""
    model = random_model(tiny_args(n_layers=4))
    alone = [generate(model, p, 20) for p in PROMPTS]
    stats = {}
    assert generate_batch(model, PROMPTS, 20, draft_layers=K, num_speculations=N, draft_confidence=confidence,
                          stats=stats) == alone
    assert stats["drafted"] > 0
    eos = alone[2][3]
    alone = [generate(model, p, 20, eos_id=eos) for p in PROMPTS]
    assert len(alone[2]) == 3 and len({len(r) for r in alone}) > 1  # the rows stop at different steps
    assert generate_batch(model, PROMPTS, 20, eos_id=eos, draft_layers=K, num_speculations=N,
                          draft_confidence=confidence) == alone


def test_batched_speculation_on_a_trained_model_lets_each_row_keep_its_own_drafts(trained, trained_dir,
                                                                                  task_prompt):
    """A task prompt (drafts accepted) beside random ones (rejected), with and without the tokenizer's EOS: every
    row is what it gets alone, and the rows kept different numbers of drafts, so they moved to different columns."""
    prompts = [task_prompt, PROMPTS[0], task_prompt[3:], PROMPTS[2]]
    for eos in (None, load_tokenizer(trained_dir).eos_id):
        alone = [generate(trained, p, 30, eos_id=eos) for p in prompts]
        assert generate_batch(trained, prompts, 30, eos_id=eos, draft_layers=2, draft_confidence=0.0) == alone
    stats = {}
    generate_batch(trained, prompts, 30, draft_layers=2, draft_confidence=0.0, stats=stats)
    # rows kept different numbers of drafts (so they stood at different columns), several tokens a cycle
    assert len(set(stats["accepted_by_row"])) > 1 and stats["cycles"] < 25, stats


def exact_marginals(model, prompt: list[int], n: int, eos: int | None) -> list[torch.Tensor]:
    """The distribution of each of the first n new tokens, summed over every path to it; decoding stops at an EOS,
    so eos's entry is the chance that there is no token at that place (an EOS came at or before it)."""
    paths, marginals = {(): 1.0}, []
    with torch.no_grad():
        for _ in range(n):
            m, longer = torch.zeros(model.args.vocab_size), {}
            for path, w in paths.items():
                p = logits_to_probs(model(torch.tensor([prompt + list(path)]))[0, -1])
                for t in range(model.args.vocab_size):
                    if t != eos:
                        longer[path + (t,)] = w * p[t]
                        m[t] += w * p[t]
            if eos is not None:
                m[eos] = 1 - m.sum()
            marginals.append(m)
            paths = longer
    return marginals


def assert_tokens_follow(outs: list[list[int]], exact: list[torch.Tensor], eos: int | None, most_tv: float):
    """The 2nd, 3rd, ... tokens of the samples outs against their exact distributions (exact_marginals' from the
    second on): the total variation of each under most_tv."""
    counts = torch.zeros(len(exact), len(exact[0]))
    for out in outs:
        assert eos not in out
        for i in range(len(exact)):
            counts[i, out[i + 1] if len(out) > i + 1 else eos] += 1
    for i, (c, e) in enumerate(zip(counts, exact)):
        tv = 0.5 * (c / c.sum() - e).abs().sum().item()
        assert tv < most_tv, f"total variation {tv:.3f} between speculative samples and the model's token {i + 2}"


SHARP = dict(n_layers=3, vocab_size=6, dim=32, n_heads=2, n_kv_heads=1)  # a model whose 1-layer draft often misses


@pytest.mark.parametrize("eos", [None, 5])
def test_speculative_sampling_keeps_the_full_models_distribution(eos):
    """Every row of a batch of one prompt is one sample of 4 new tokens: the first comes from the prompt's pass, the
    next cycle drafts the second and third with one layer and verifies them with three, and where both are kept the
    fourth is the verifier's own. Their distributions, exact from the model, against 3000 rows. With an EOS,
    outcome 5 stands for "no token here", so drafts that end in an accepted EOS are covered."""
    model = random_model(tiny_args(**SHARP), seed=3)
    prompt = [1, 4, 2]
    exact = exact_marginals(model, prompt, 4, eos)[1:]
    assert eos is None or all(0.1 < e[eos] < 0.9 for e in exact)  # the test needs both outcomes to be common
    outs, stats = [], {}
    for s in range(6):
        outs += generate_batch(model, [prompt] * 500, 4, temperature=1.0, draft_layers=1, num_speculations=3,
                               seed=s, eos_id=eos, draft_confidence=0.0, stats=stats)
        assert stats["drafted"] > 800 and 0 < stats["acceptance"] < 1, stats  # two drafts a live row, some missed
    assert_tokens_follow(outs, exact, eos, 0.04)
    # the 1-layer draft's own distribution is far from the full model's: a sampler that kept every draft would fail
    with torch.no_grad():
        h = model.run_layers(model.tok_embeddings(torch.tensor([prompt])), 0, 0, 1)
        q1 = logits_to_probs(model.head(h[0, -1], 1))
        p1 = logits_to_probs(model(torch.tensor([prompt]))[0, -1])
    assert 0.5 * (q1 - p1).abs().sum() > 0.1


def test_one_row_whose_drafts_stop_when_unsure_keeps_the_distribution():
    """generate() decodes one row, and its draft stops where the draft is unsure (a batch's only once every row is;
    at 0.7 this draft stops about half the time): 1000 samples of the same 4 tokens, with an EOS."""
    model = random_model(tiny_args(**SHARP), seed=3)
    prompt, outs, drafted = [1, 4, 2], [], {0.7: 0, 0.0: 0}
    for s in range(1000):
        for confidence in (0.7, 0.0) if s < 100 else (0.7,):  # the first 100 also drafting every time, to compare
            stats = {}
            out = generate(model, prompt, 4, temperature=1.0, draft_layers=1, num_speculations=3, seed=s, eos_id=5,
                           draft_confidence=confidence, stats=stats)
            drafted[confidence] += stats.get("drafted", 0) if s < 100 else 0
            if confidence == 0.7:
                outs.append(out)
    assert 0 < drafted[0.7] < 0.7 * drafted[0.0], drafted  # drafts ran, and often stopped when unsure
    # 1000 samples: total variations of about 0.02 where the sampler is right, 0.10 where its residual is p
    assert_tokens_follow(outs, exact_marginals(model, prompt, 4, 5)[1:], 5, 0.06)


def test_sampling_is_reproducible_with_a_seed(trained, task_prompt):
    prompt = task_prompt
    for kw in (dict(draft_layers=2, num_speculations=3), dict(early_exit=0.5, exits=[2, 3, 4]), {}):
        a = generate(trained, prompt, 20, temperature=1.0, top_p=0.95, seed=11, **kw)
        assert a == generate(trained, prompt, 20, temperature=1.0, top_p=0.95, seed=11, **kw)
        assert a != generate(trained, prompt, 20, temperature=1.0, top_p=0.95, seed=12, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_early_exit_extremes(seed):
    model = random_model(tiny_args(n_layers=4), seed=seed)
    assert generate(model, PROMPT, 25, early_exit=0.0, exits=[2, 3, 4]) == generate(model, PROMPT, 25, layers=2)
    assert generate(model, PROMPT, 25, early_exit=1.01, exits=[2, 3, 4]) == generate(model, PROMPT, 25)


@torch.no_grad()
def reference_early_exit(model, prompt, n, exits, threshold):
    """Early exit by brute force: every step recomputes every layer of the whole sequence, no cache. threshold:
    one for all exits, or a list with one per exit below the last."""
    thresholds = threshold if isinstance(threshold, list) else [threshold] * (len(exits) - 1)
    seq, depths = list(prompt), []
    for _ in range(n):
        hidden = model(torch.tensor([seq]), exits=exits)
        for e, h, t in zip(exits, hidden, thresholds + [None]):
            logits = model.head(h[0, -1], e)
            if e == exits[-1] or torch.softmax(logits, -1).max() >= t:
                break
        seq.append(int(logits.argmax()))
        depths.append(e)
    return seq[len(prompt):], depths


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7, [0.9, 0.4], [0.3, 0.95]])
def test_early_exit_computes_skipped_layers_exactly(trained, task_prompt, threshold):
    exits = [2, 3, 4]
    stats = {}
    out = generate(trained, task_prompt, 30, early_exit=threshold, exits=exits, stats=stats)
    ref, depths = reference_early_exit(trained, task_prompt, 30, exits, threshold)
    assert out == ref
    assert stats["exit_depths"] == depths
    assert len(set(depths)) > 1, f"exit depths {depths}: the test needs tokens leaving at different exits"


@pytest.mark.parametrize("heads,exit_norm", [([2, 3], True), ([2], False)])
def test_early_exit_reads_each_exit_through_its_own_head(heads, exit_norm):
    """With heads of their own (and exits below the last without the final norm), each exit's confidence and token
    come from that exit's head, as in the brute-force reference; the shared head would give other tokens."""
    model = random_model(tiny_args(n_layers=4), seed=0, heads=heads, exit_norm=exit_norm)
    stats = {}
    out = generate(model, PROMPT, 25, early_exit=0.5, exits=[2, 3, 4], stats=stats)
    ref, depths = reference_early_exit(model, PROMPT, 25, [2, 3, 4], 0.5)
    assert out == ref and stats["exit_depths"] == depths
    assert len(set(depths)) == 3, f"exit depths {depths}: the test needs tokens leaving at every exit"


def test_bench_decode_runs_every_configuration(trained_dir, tmp_path):
    """bench.py on the trained checkpoint: every configuration runs, the lossless ones match full depth."""
    report = str(tmp_path / "bench.json")
    rc, out, err = run_main("bench.py", "--only", "decode", "--ckpt", trained_dir, "--num_eval", "12",
                              "--num_prompts", "6", "--rounds", "1", "--thresholds", "0.0,1.01", "--json", report,
                              "--cycles", "2")
    assert rc == 0, err
    cycles = json.load(open(report))["cycles"]
    assert [r["K"] for r in cycles] == [2] and cycles[0]["limit"] > 1 and cycles[0]["acceptance"] > 0
    assert abs(cycles[0]["share_draft"] + cycles[0]["share_verify"] + cycles[0]["share_other"] - 1) < 0.01
    rows = {r["name"]: r for r in json.load(open(report))["decode"]}
    n = 4  # layers of the FAST model, trained exits 2, 3, 4
    assert {"depth 2", f"depth {n}", "self-speculative K=3", "early exit 0", "HF generate"} <= set(rows)
    for name in ("self-speculative K=2", "self-speculative K=3", "early exit 1.01", "HF generate"):
        assert rows[name]["identical_to_full"], name
    assert rows["early exit 1.01"]["mean_exit_depth"] == n and rows["early exit 0"]["mean_exit_depth"] < n
    assert all(r["tokens_per_s (long answers)"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows.values())


def test_bench_batch_decodes_the_batch_1_answers_at_every_size(trained_dir, tmp_path):
    """bench.py --only batch on the trained checkpoint: both workloads, every batch size gives batch 1's answers."""
    report = str(tmp_path / "bench.json")
    rc, out, err = run_main("bench.py", "--only", "batch", "--ckpt", trained_dir, "--num_eval", "24",
                            "--batches", "1,3,8", "--rounds", "1", "--json", report, "--draft_layers", "2")
    assert rc == 0, err
    workloads = json.load(open(report))["batch"]
    assert len(workloads) == 2  # the task mix and the long answers
    for rows in workloads.values():
        assert [(r["batch"], r["compiled"], r["draft_layers"]) for r in rows] == \
            [(b, False, k) for k in (None, 2) for b in (1, 3, 8)]
        assert all(r["identical_to_batch_1"] and r["tokens_per_s"] > 0 for r in rows)
