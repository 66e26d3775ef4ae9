"""Batched decoding: prompts of different lengths decoded together, each row as if it were alone."""
import pytest
import torch

from conftest import assert_close, random_model, tiny_args
from decoding.step import padding_masks
from generate import generate, generate_batch
from test_model import to_hf

g = torch.Generator().manual_seed(5)
PROMPTS = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (6, 1, 13, 9)]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_greedy_rows_are_what_batch_one_gives_at_every_depth(depth):
    model = random_model(tiny_args(n_layers=4))
    alone = [generate(model, p, 12, layers=depth) for p in PROMPTS]
    assert generate_batch(model, PROMPTS, 12, layers=depth) == alone
    # each row stops at its own EOS: take one that the third row produces early, the others later or never
    eos = alone[2][3]
    alone = [generate(model, p, 12, layers=depth, eos_id=eos) for p in PROMPTS]
    assert len(alone[2]) == 3 and len({len(r) for r in alone}) > 1  # the rows stop at different steps
    assert generate_batch(model, PROMPTS, 12, layers=depth, eos_id=eos) == alone


def test_padding_is_invisible_to_every_row():
    """The logits of a left-padded row are those of the prompt alone, whatever stands in its padding."""
    model = random_model(tiny_args(n_layers=3))
    short, long = PROMPTS[0], PROMPTS[2]
    pad = torch.tensor([len(long) - len(short), 0])
    outs = []
    positions, mask = padding_masks(pad, 0, len(long), "cpu")
    for filler in (0, 7):
        tokens = torch.tensor([[filler] * (len(long) - len(short)) + short, long])
        with torch.no_grad():
            outs.append(model.head(model.run_layers(model.tok_embeddings(tokens), 0, 0, 3, positions, mask)))
    with torch.no_grad():
        alone = model(torch.tensor([short]))[0]
    assert_close(outs[0][0, -len(short):], alone, 1e-5, "the padded row's logits")
    assert_close(outs[1][0, -len(short):], outs[0][0, -len(short):], 1e-6, "with other padding tokens")


@pytest.mark.parametrize("depth", [2, 4])
def test_batched_greedy_matches_transformers_with_left_padding(depth):
    model = random_model(tiny_args(n_layers=4))
    hf = to_hf(model, depth)
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in PROMPTS])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, T:].tolist()
    assert generate_batch(model, PROMPTS, 10, layers=depth) == ref


def test_sampled_rows_differ_and_repeat_with_the_seed():
    model = random_model(tiny_args(n_layers=2))
    same = [PROMPTS[0]] * 4
    a = generate_batch(model, same, 15, temperature=1.0, seed=3)
    assert a == generate_batch(model, same, 15, temperature=1.0, seed=3)
    assert len({tuple(r) for r in a}) > 1  # four samples of one prompt, not one sample four times
