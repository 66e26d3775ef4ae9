"""The network against Hugging Face transformers' LlamaForCausalLM, an independent implementation."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import assert_close, random_model, tiny_args
from generate import generate
from load_llama import hf_config, hf_state_dict


def to_hf(model, layers=None) -> LlamaForCausalLM:
    """The same weights in transformers' LLaMA (renamed, q/k rows permuted to HF's rope layout)."""
    layers = layers or model.args.n_layers
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(model.args, layers))).eval()
    hf.load_state_dict(hf_state_dict(model, layers), strict=True)
    return hf


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["full-attention", "grouped-2", "multi-query"])
def test_logits_at_every_depth_match_transformers(n_kv_heads):
    model = random_model(tiny_args(n_kv_heads=n_kv_heads))
    hf = to_hf(model)
    tokens = torch.randint(0, model.args.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        for k in range(1, model.args.n_layers + 1):
            # HF's hidden state after layer k through HF's own final norm and head
            ref = hf.lm_head(hf.model.norm(out.hidden_states[k])) if k < model.args.n_layers else out.logits
            assert_close(model(tokens, n_layers=k), ref, 1e-4, f"logits at depth {k}")


def test_exits_return_the_hidden_states_of_each_depth():
    model = random_model(tiny_args())
    tokens = torch.randint(0, model.args.vocab_size, (1, 10))
    with torch.no_grad():
        hidden = model(tokens, exits=[1, 3, 4])
        for k, h in zip([1, 3, 4], hidden):
            assert_close(model.head(h), model(tokens, n_layers=k), 1e-6, f"exit {k}")


def test_a_shallow_depth_runs_only_its_blocks():
    model = random_model(tiny_args(n_layers=6))
    calls = []
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    model(torch.zeros(1, 4, dtype=torch.long), n_layers=2)
    assert calls == [0, 1]
    calls.clear()
    model(torch.zeros(1, 4, dtype=torch.long), exits=[2, 4])
    assert calls == [0, 1, 2, 3]


@pytest.mark.parametrize("depth", [2, 4])
def test_greedy_continuation_matches_transformers_generate(depth):
    model = random_model(tiny_args(n_layers=4))
    prompt = [1, 17, 42, 99, 7, 250]
    hf = to_hf(model, depth)  # transformers' own model of the first `depth` layers
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                      pad_token_id=0, min_new_tokens=20)[0, len(prompt):].tolist()
    ours = generate(model, prompt, 20, layers=depth)
    assert ours == ref


def test_kv_cache_decoding_equals_the_full_forward():
    # in float64, where the two paths agree to ~1e-15 on any build: in float32 their different matmul shapes
    # differ by 1e-5 or so depending on the kernels a torch build picks, while a wrong position or mask is off by O(1)
    model = random_model(tiny_args(n_kv_heads=2)).double()
    tokens = torch.randint(0, model.args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1)
        steps = [model(tokens[:, :10], start_pos=0)]  # prefill
        steps += [model(tokens[:, t:t + 1], start_pos=t) for t in range(10, 24)]  # one token at a time
        steps += [model(tokens[:, 24:], start_pos=24)]  # a chunk on top of the cache, as a verifier does
        model.drop_cache()
    assert_close(torch.cat(steps, dim=1), full, 1e-12, "cached logits")


def test_generate_stops_at_eos_and_reproduces_with_a_seed():
    model = random_model(tiny_args())
    prompt = [1, 5, 6, 7]
    greedy = generate(model, prompt, 10)
    assert len(greedy) == 10
    stopped = generate(model, prompt, 10, eos_id=greedy[3])
    assert stopped == greedy[:greedy.index(greedy[3])]
    a = generate(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    b = generate(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    c = generate(model, prompt, 15, temperature=1.0, top_k=50, top_p=0.9, seed=8)
    assert a == b and a != c


def test_temperature_divides_the_logits():
    from sampling import logits_to_probs
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    for t in (0.5, 2.0):
        assert torch.allclose(logits_to_probs(logits, t), torch.softmax(logits / t, -1)), t


def test_top_k_and_top_p_filter_the_distribution():
    from sampling import logits_to_probs
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    p = logits_to_probs(logits, 1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and abs(p.sum().item() - 1) < 1e-6
    full = torch.softmax(logits, -1)[0]
    p = logits_to_probs(logits, 1.0, top_p=0.8)
    # the smallest set of most likely tokens whose mass reaches 0.8
    keep = int((full.cumsum(0) < 0.8).sum()) + 1
    assert (p[0, :keep] > 0).all() and (p[0, keep:] == 0).all()
