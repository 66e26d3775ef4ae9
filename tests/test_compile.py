"""Compiled decoding: one graph serves every position, and compiled output is eager output."""
import pytest
import torch
from torch._dynamo.utils import counters

import generate as gen
from conftest import random_model, tiny_args

PROMPT = [1, 17, 42, 99, 7, 250]


@pytest.fixture
def traced_only(monkeypatch):
    """torch.compile with dynamo's graph capture but no code generation: the graphs are what inductor would
    compile, in a fraction of the time. Yields the count of graphs captured."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile(fn, **{**kw, "backend": "eager", "mode": None}))
    torch._dynamo.reset()
    counters.clear()
    yield lambda: counters["stats"]["unique_graphs"]
    torch._dynamo.reset()


def test_one_graph_decodes_every_position_and_gives_the_eager_tokens(traced_only):
    model = random_model(tiny_args(n_layers=4, max_seq_len=64))
    eager = gen.generate(model, PROMPT, 30)
    assert gen.generate(model, PROMPT, 30, compile=True) == eager
    assert traced_only() == 2  # the prompt (6 tokens, padded to 8), and one graph for 29 decoded positions
    assert gen.generate(model, [5, 6, 7, 8, 9], 28, compile=True) == gen.generate(model, [5, 6, 7, 8, 9], 28)
    assert traced_only() == 2  # another prompt of 5..8 tokens, other positions, a cache of 33..64: the same graphs
    assert gen.generate(model, PROMPT, 30, layers=2, compile=True) == gen.generate(model, PROMPT, 30, layers=2)
    assert traced_only() == 4  # graphs per depth
    assert gen.generate(model, PROMPT, 10, compile=True) == eager[:10]
    assert traced_only() == 6  # a decode that reaches 16 columns: a cache of 16, and graphs of its own


def test_compiled_speculation_and_batches_give_the_eager_tokens(traced_only):
    model = random_model(tiny_args(n_layers=4, max_seq_len=64))
    eager = gen.generate(model, PROMPT, 30)
    spec = gen.generate(model, PROMPT, 30, draft_layers=2, num_speculations=4, draft_confidence=0.0, compile=True)
    assert spec == eager
    # the prompt at full depth, the drafts, a verified chunk of 1, 2, 3-4 or 5 tokens (padded to 8)
    assert traced_only() <= 2 + 4
    prompts = [[3, 4, 5], PROMPT, [9] * 11]
    assert gen.generate_batch(model, prompts, 12, compile=True) == gen.generate_batch(model, prompts, 12)


@pytest.mark.parametrize("confidence", [0.0, 0.3])
def test_compiled_batched_speculation_gives_every_row_its_tokens_alone(traced_only, confidence):
    """Rows of different lengths, each at its own column of the static cache, stopping at different EOS."""
    model = random_model(tiny_args(n_layers=4, max_seq_len=64))
    prompts = [[3, 4, 5], PROMPT, [9] * 11, [7]]
    alone = [gen.generate(model, p, 20) for p in prompts]
    eos = alone[0][4]
    stopped = [gen.generate(model, p, 20, eos_id=eos) for p in prompts]
    assert len({len(r) for r in stopped}) > 1
    for eos, want in ((None, alone), (eos, stopped)):
        assert gen.generate_batch(model, prompts, 20, eos_id=eos, draft_layers=2, num_speculations=5,
                                  draft_confidence=confidence, compile=True) == want
    assert traced_only() <= 2 + 4  # the prompt, the drafts, verified chunks padded to 1, 2, 4 or 8 tokens


def test_inductor_compiled_decoding_gives_the_eager_tokens():
    """The real compiler (C++ code on the CPU): the same tokens."""
    torch._dynamo.reset()
    model = random_model(tiny_args(n_layers=2, max_seq_len=48))
    try:
        assert gen.generate(model, PROMPT, 16, compile=True) == gen.generate(model, PROMPT, 16)
        # another batch size and cache size (a cache of its own), then the first again
        prompts = [[3, 4, 5], PROMPT, [9] * 11]
        assert gen.generate_batch(model, prompts, 12, compile=True) == gen.generate_batch(model, prompts, 12)
        assert gen.generate(model, [5, 6], 40, compile=True) == gen.generate(model, [5, 6], 40)
        assert gen.generate(model, PROMPT, 16, compile=True) == gen.generate(model, PROMPT, 16)
        # batched speculation: each row written at columns of its own
        assert gen.generate_batch(model, prompts, 12, compile=True, draft_layers=1, num_speculations=3,
                                  draft_confidence=0.0) == gen.generate_batch(model, prompts, 12)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_runs_every_block_whole_on_batches_of_any_length(traced_only, checkpointing):
    """--compile compiles each block; batches of another length make dynamo recompile with a symbolic length, and
    attention used to break the graph there ('is_causal must be bool, not SymBool'): each block then ran as two
    graphs with attention eager between them, and nothing said so. Now: no graph break, whatever the lengths."""
    from load_llama import load_initial_weights
    from one_process import OneProcess
    from soft import sorted_loss
    run = OneProcess(torch.device("cpu"), torch.float32, activation_checkpointing=checkpointing, compile=True)
    model = run.build(lambda: gen.Transformer(tiny_args(n_layers=3)))
    load_initial_weights(model, None, 0, run.put)
    g = torch.Generator().manual_seed(0)
    for T in (12, 20, 28, 9):  # as the demo's padded batches vary
        tokens = torch.randint(0, 400, (2, T), generator=g)
        loss, _ = sorted_loss(model, tokens, torch.arange(2 * T), torch.randint(0, 400, (2 * T,), generator=g),
                              [2, 3], [1.0, 1.0])
        loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert traced_only() <= 2, traced_only()  # the first length's graph, then one with the length symbolic
