"""The paper's setting in miniature and its open questions: the pretraining corpus and loss, exits read without
the final norm, a head per exit trained jointly."""
import json
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_close, assert_one_line_error, random_model, run_main, tiny_args
from data import batch_tensors, tokenize
from tasks import corpus
from load_llama import load_model, load_tokenizer
from soft import sorted_loss
from test_train import FAST


def test_corpus_is_the_same_for_a_seed_and_states_true_facts():
    assert corpus(40, seed=7) == corpus(40, seed=7)
    assert corpus(40, seed=7) != corpus(40, seed=8)
    docs = corpus(300, seed=0)
    assert all(list(d) == ["text"] and len(d["text"].split("\n")) == 6 for d in docs)
    lines = [line for d in docs for line in d["text"].split("\n")]
    kinds = {"In the alphabet,": 0, "The number": 0, "The last letter": 0, "The largest": 0, "The digits": 0,
             "Counting from": 0, "The alphabet from": 0}
    for line in lines:
        kind = next(k for k in kinds if line.startswith(k))
        kinds[kind] += 1
        if kind == "The digits":
            m = re.fullmatch(r"The digits ([\d ]+) in increasing order are ([\d ]+)\.", line)
            assert sorted(m[1].split()) == m[2].split(), line
        elif kind == "The number":
            m = re.fullmatch(r"The number (\d+) is (even|odd)\.", line)
            assert (int(m[1]) % 2 == 0) == (m[2] == "even"), line
        elif kind == "Counting from":
            m = re.fullmatch(r"Counting from (\d+) to (\d+): ([\d ]+)\.", line)
            assert m[3].split() == [str(i) for i in range(int(m[1]), int(m[2]) + 1)], line
    assert all(n > 0 for n in kinds.values()), kinds


def test_pretraining_loss_is_the_next_token_loss_over_every_position(tokenizer_path):
    tok = load_tokenizer(tokenizer_path)
    examples, _, _ = tokenize(corpus(3, seed=1), tok, 64)
    assert all(n_prompt == 1 for _, n_prompt in examples)  # only BOS is not predicted
    model = random_model(tiny_args(vocab_size=tok.vocab_size))
    tokens, positions, targets = batch_tensors(examples, "cpu")
    assert targets.numel() == sum(len(ids) - 1 for ids, _ in examples)
    _, per_exit = sorted_loss(model, tokens, positions, targets, [4], [1.0], 1.0)
    # by hand: each document alone, every token after the first predicted from the ones before it
    ref = sum(F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="sum")
              for ids, _ in examples)
    assert_close(per_exit[0], ref.detach(), 1e-5, "pretraining loss")


def test_exits_without_the_final_norm_read_the_shared_head_directly():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 400, (2, 10), generator=g)
    positions = torch.arange(20)
    targets = torch.randint(0, 400, (20,), generator=g)
    for exit_norm in (True, False):
        model = random_model(tiny_args(), exit_norm=exit_norm)
        h2, h4 = model(tokens, exits=[2, 4])
        below = model.output(model.norm(h2)) if exit_norm else model.output(h2)
        assert_close(model.head(h2, 2), below.detach(), 1e-6, "the head of exit 2")
        assert_close(model(tokens, n_layers=2), below.detach(), 1e-5, "the depth-2 model")
        assert_close(model.head(h4, 4), model.output(model.norm(h4)).detach(), 1e-6, "the last layer keeps its norm")
        _, per_exit = sorted_loss(model, tokens, positions, targets, [2, 4], [1.0, 1.0], 1.0)
        ref = F.cross_entropy(below.flatten(0, 1), targets, reduction="sum")
        assert_close(per_exit[0], ref.detach(), 1e-5, "the objective at exit 2")
    assert not torch.allclose(model.output(h2), model.output(model.norm(h2)))  # the norm does change the logits


def test_separate_heads_take_the_intermediate_exits_and_the_shared_head_only_the_last():
    model = random_model(tiny_args(), heads=[2, 3]).train()
    g = torch.Generator().manual_seed(1)
    for p in model.exit_heads.parameters():
        p.data.normal_(0, 0.1, generator=g)
    tokens = torch.randint(0, 400, (2, 10), generator=g)
    positions, targets = torch.arange(20), torch.randint(0, 400, (20,), generator=g)
    loss, per_exit = sorted_loss(model, tokens, positions, targets, [2, 3, 4], [1.0, 1.0, 1.0], 1.0)
    loss.backward()
    for e in (2, 3):
        head = model.exit_heads[str(e)]
        assert head.output.weight.grad.abs().sum() > 0 and head.norm.weight.grad.abs().sum() > 0, e
        h = model(tokens, exits=[e])[0].flatten(0, 1)
        assert_close(per_exit[e - 2], F.cross_entropy(head(h), targets, reduction="sum").detach(), 1e-5, f"exit {e}")
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0  # the trunk is trained too
    shared = [model.output.weight.grad.clone(), model.norm.weight.grad.clone()]
    model.zero_grad()
    last, _ = sorted_loss(model, tokens, positions, targets, [4], [1.0], 1.0)
    last.backward()
    assert_close(shared[0], model.output.weight.grad, 1e-6, "shared head's gradient: the last exit's alone")
    assert_close(shared[1], model.norm.weight.grad, 1e-6, "shared norm's gradient: the last exit's alone")


def test_pretrain_then_fine_tune_with_a_head_per_exit_and_without_the_exit_norm(tmp_path):
    base = str(tmp_path / "base")
    rc, out, err = run_main("sorted_train.py", *FAST, "--pretrain", "--num_examples", "64", "--mode", "sft",
                            "--max_steps", "2", "--out", base)
    assert rc == 0, err
    assert "pretraining" in out
    config = json.load(open(os.path.join(base, "latest", "params.json")))["train_config"]
    assert config["pretrain"] is True

    heads = str(tmp_path / "heads")
    rc, out, err = run_main("sorted_train.py", *FAST, "--init", base, "--separate_heads", "--max_steps", "2",
                            "--out", heads)
    assert rc == 0, err
    params = json.load(open(os.path.join(heads, "latest", "params.json")))
    assert params["exits"] == [2, 3, 4] and params["exit_heads"] == [2, 3]
    before, after = load_file(os.path.join(base, "latest", "model.safetensors")), load_model(heads)
    for e in (2, 3):  # each head started as the shared one and has been trained
        assert not torch.equal(after.exit_heads[str(e)].output.weight, before["output.weight"])
    rc, _, err = run_main("generate.py", "--ckpt", heads, "--layers", "2", "--max_new_tokens", "3")
    assert rc == 0, err
    again = str(tmp_path / "again")  # tuning on from there keeps the trained heads (lr 0: nothing moves)
    rc, _, err = run_main("sorted_train.py", *FAST, "--init", heads, "--separate_heads", "--max_steps", "1",
                          "--lr", "0", "--out", again)
    assert rc == 0, err
    assert torch.equal(load_model(again).exit_heads["2"].output.weight, after.exit_heads["2"].output.weight)
    rc, _, err = run_main("sorted_train.py", *FAST, "--init", base, "--max_steps", "3", "--resume", "--out", heads)
    assert_one_line_error(rc, err, "--separate_heads")  # resumed without the flag it was started with

    no_norm = str(tmp_path / "no_norm")
    rc, out, err = run_main("sorted_train.py", *FAST, "--init", base, "--no_exit_norm", "--max_steps", "2",
                            "--out", no_norm)
    assert rc == 0, err
    assert "no norm below the last" in out
    assert load_model(no_norm).exit_norm is False
    rc, _, err = run_main("load_llama.py", "export", no_norm, str(tmp_path / "hf"), "--layers", "2")
    assert_one_line_error(rc, err, "without the final norm")
    rc, _, err = run_main("analyze.py", "--ckpt", no_norm, "--vs", heads, "--num_examples", "6",
                          "--json", str(tmp_path / "a.json"))
    assert rc == 0, err
    results = json.load(open(tmp_path / "a.json"))
    assert results[1]["n_params"] > results[0]["n_params"]  # two more heads
    for row in results[0]["exits"]:
        assert len(row["kl_by_position"]) == len(results[0]["answers_at_position"]) > 0
        assert row["exit"] != 4 or max(abs(x) for x in row["kl_by_position"]) < 1e-5


def test_flags_that_do_not_go_together(tmp_path):
    rc, _, err = run_main("sorted_train.py", *FAST, "--mode", "sft", "--separate_heads", "--out", str(tmp_path))
    assert_one_line_error(rc, err, "--separate_heads")
    rc, _, err = run_main("sorted_train.py", *FAST, "--pretrain", "--data", "x.json", "--out", str(tmp_path))
    assert_one_line_error(rc, err, "--pretrain")
