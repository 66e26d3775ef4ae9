"""Weights in and out: Meta's layout (with model-parallel shards), Hugging Face's, ours, and the export."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from conftest import assert_close, random_model, tiny_args
from checkpoints import CheckpointError, save_model
from load_llama import META_SPLIT_DIM, export, load_model, load_tokenizer
from test_model import to_hf

TOKENS = torch.randint(0, 400, (2, 17), generator=torch.Generator().manual_seed(0))


def write_meta(model, folder, n_shards):
    """Meta's release layout: params.json (vocab_size -1) and consolidated.NN.pth, cut as Meta's model parallel cuts."""
    os.makedirs(folder, exist_ok=True)
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, multiple_of=a.multiple_of,
                  norm_eps=a.norm_eps, vocab_size=-1)
    if a.n_kv_heads:
        params["n_kv_heads"] = a.n_kv_heads
    json.dump(params, open(os.path.join(folder, "params.json"), "w"))
    shards = [{"rope.freqs": torch.zeros(a.dim // a.n_heads // 2)} for _ in range(n_shards)]  # an extra key Meta ships
    for name, t in model.state_dict().items():
        dim = META_SPLIT_DIM.get(name.split(".")[-2])
        for s, part in enumerate(t.chunk(n_shards, dim) if dim is not None else [t] * n_shards):
            shards[s][name] = part.clone().to(torch.bfloat16)
    for s, shard in enumerate(shards):
        torch.save(shard, os.path.join(folder, f"consolidated.{s:02d}.pth"))


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_loads_to_the_same_logits(tmp_path, n_shards):
    model = random_model(tiny_args(n_kv_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())  # exactly what Meta's bfloat16 files can hold
    write_meta(model, tmp_path / "meta", n_shards)
    loaded = load_model(str(tmp_path / "meta"), dtype=torch.float32)
    assert loaded.args.vocab_size == model.args.vocab_size
    with torch.no_grad():
        assert_close(loaded(TOKENS), model(TOKENS), 1e-6, "Meta-layout logits")


@pytest.mark.parametrize("shard_size", [None, "100KB"], ids=["one-file", "sharded"])
def test_hf_layout_loads_to_the_same_logits(tmp_path, shard_size):
    model = random_model(tiny_args(n_kv_heads=2))
    hf = to_hf(model)
    hf.save_pretrained(tmp_path / "hf", **({"max_shard_size": shard_size} if shard_size else {}))
    if shard_size:
        assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    loaded = load_model(str(tmp_path / "hf"))
    with torch.no_grad():
        assert_close(loaded(TOKENS), hf(TOKENS).logits, 1e-4, "HF-layout logits")


def test_hf_tied_embeddings(tmp_path):
    model = random_model(tiny_args())
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    hf = to_hf(model)
    hf.config.tie_word_embeddings = True
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["tie_word_embeddings"]
    loaded = load_model(str(tmp_path / "hf"))
    with torch.no_grad():
        assert_close(loaded(TOKENS), model(TOKENS), 1e-5, "tied-embedding logits")
    # and such a checkpoint exports: the shared tensor is written as two
    export(str(tmp_path / "hf"), str(tmp_path / "out"), layers=3)
    exported = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        assert_close(exported(TOKENS).logits, model(TOKENS, n_layers=3), 1e-4, "tied export logits")


def test_our_layout_round_trips(tmp_path):
    model = random_model(tiny_args())
    save_model(model.state_dict(), model.args, str(tmp_path / "ours"), exits=[2, 4])
    loaded = load_model(str(tmp_path / "ours"))
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))


@pytest.mark.parametrize("depth", [2, 4])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, depth, tokenizer_path):
    model = random_model(tiny_args(n_kv_heads=2))
    save_model(model.state_dict(), model.args, str(tmp_path / "ours"), tokenizer_path)
    export(str(tmp_path / "ours"), str(tmp_path / "hf"), layers=depth)
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.num_hidden_layers == depth
    assert os.path.exists(tmp_path / "hf" / "tokenizer.model")
    with torch.no_grad():
        assert_close(hf(TOKENS).logits, model(TOKENS, n_layers=depth), 1e-4, f"exported depth-{depth} logits")


def test_tokenizer_round_trip(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    ids = tok.encode("Reverse the letters.\n\nk d q", bos=True, eos=True)
    assert ids[0] == tok.bos_id == 1 and ids[-1] == tok.eos_id == 2
    assert tok.decode(ids[1:-1]) == "Reverse the letters.\n\nk d q"
    assert tok.vocab_size == 400


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


def test_a_pth_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = random_model(tiny_args())
    write_meta(model, tmp_path / "meta", 1)
    shard = tmp_path / "meta" / "consolidated.00.pth"
    state = torch.load(shard, weights_only=True)
    state["payload"] = Exploit()
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match="refused"):
        load_model(str(tmp_path / "meta"))
    assert not os.path.exists(tmp_path / "exploited")


def test_missing_fields_and_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "m").mkdir()
    json.dump({"dim": 64}, open(tmp_path / "m" / "params.json", "w"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="n_layers, n_heads"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "h").mkdir()
    json.dump({"hidden_size": 64, "num_hidden_layers": 2}, open(tmp_path / "h" / "config.json", "w"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "h" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        load_model(str(tmp_path / "h"))

