"""The analysis metrics, the SFT+ICT baseline, and analysis of any checkpoint layout, on tiny models."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from analyze import cosine, kl_divergence
from conftest import assert_close, assert_one_line_error, random_model, run_main, tiny_args
from tasks import exact_match
from test_train import FAST


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise():
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits).abs().max() < 1e-6  # KL(p || p) = 0
    assert kl_divergence(logits, logits + 3.0).abs().max() < 1e-6  # the same distribution, shifted logits
    other = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))
    kl = kl_divergence(logits, other)
    assert (kl > 0).all()
    p, q = torch.softmax(logits, -1), torch.softmax(other, -1)
    assert_close(kl, (p * (p / q).log()).sum(-1), 1e-5, "KL by hand")


def test_cosine_of_identical_states_is_one():
    h = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    assert_close(cosine(h, h), torch.ones(4), 1e-6, "cos(h, h)")
    assert_close(cosine(h, -h), -torch.ones(4), 1e-6, "cos(h, -h)")
    assert_close(cosine(h, 2.5 * h), torch.ones(4), 1e-6, "scale-invariant")


def test_exact_match_on_known_answers():
    assert exact_match("1 2 4 7 9", "1 2 4 7 9")
    assert exact_match(" odd\n", "odd")
    assert not exact_match("1 2 4 7", "1 2 4 7 9")
    assert not exact_match("even", "odd")


def test_ict_tunes_each_exit_head_and_leaves_the_trunk(tmp_path):
    sft = str(tmp_path / "sft")
    rc, _, err = run_main("sorted_train.py", *FAST, "--mode", "sft", "--max_steps", "3", "--out", sft)
    assert rc == 0, err
    ict = str(tmp_path / "ict")
    rc, _, err = run_main("sorted_train.py", *FAST, "--mode", "ict", "--init", sft, "--exits", "2,3,4",
                            "--max_steps", "3", "--lr", "1e-2", "--out", ict)
    assert rc == 0, err
    before = load_file(os.path.join(sft, "latest", "model.safetensors"))
    after = load_file(os.path.join(ict, "latest", "model.safetensors"))
    for name, t in before.items():  # every trunk weight, the shared norm and head included, as SFT left it
        assert torch.equal(after[name], t), f"{name} changed"
    for e in (2, 3, 4):  # each exit's own head started from the shared one and has moved
        for part in ("norm", "output"):
            assert not torch.equal(after[f"exit_heads.{e}.{part}.weight"], before[f"{part}.weight"]), (e, part)
    assert json.load(open(os.path.join(ict, "latest", "params.json")))["exit_heads"] == [2, 3, 4]

    # generate.py and analyze.py read the heads; the per-exit figures are consistent
    rc, out, err = run_main("generate.py", "--ckpt", ict, "--layers", "2", "--max_new_tokens", "4")
    assert rc == 0, err
    rc, out, err = run_main("analyze.py", "--ckpt", ict, "--vs", sft, "--num_examples", "12",
                              "--json", str(tmp_path / "a.json"))
    assert rc == 0, err
    results = json.load(open(tmp_path / "a.json"))
    assert [r["mode"] for r in results] == ["ict", "sft"]
    last = results[0]["exits"][-1]
    assert last["exit"] == 4 and last["top1_agreement"] == 1.0 and abs(last["kl_last_exit"]) < 1e-6
    assert abs(last["cosine_to_last"] - 1) < 1e-5
    for row in results[0]["exits"]:
        assert 0 <= row["accuracy"] <= 1 and row["val_loss"] > 0


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_analyze_reads_hugging_face_and_meta_folders(tmp_path, tokenizer_path, layout):
    from checkpoints import save_model
    from load_llama import export
    from tasks import builtin_records
    from test_load import write_meta
    model = random_model(tiny_args(max_seq_len=160))
    if layout == "hf":
        ours = str(tmp_path / "ours")
        save_model(model.state_dict(), model.args, ours, tokenizer_path)
        export(ours, str(tmp_path / "model"))
    else:
        write_meta(model, str(tmp_path / "model"), 2)
    ckpt = str(tmp_path / "model")
    rc, _, err = run_main("analyze.py", "--ckpt", ckpt, "--tokenizer", tokenizer_path)
    assert_one_line_error(rc, err, "--data")  # no held-out split of ours to fall back on
    data = tmp_path / "alpaca.json"  # an Alpaca file: references, but nothing to check answers against
    json.dump([{k: r[k] for k in ("instruction", "input", "output")} for r in builtin_records(10, seed=3)],
              open(data, "w"))
    rc, out, err = run_main("analyze.py", "--ckpt", ckpt, "--tokenizer", tokenizer_path, "--data", str(data),
                            "--exits", "1,3", "--batch_size", "4", "--dtype", "float32", "--json",
                            str(tmp_path / "a.json"))
    assert rc == 0, err
    result = json.load(open(tmp_path / "a.json"))[0]
    assert [r["exit"] for r in result["exits"]] == [1, 3, 4] and result["n_examples"] == 10
    for r in result["exits"]:
        assert "accuracy" not in r and r["val_loss"] > 0 and 0 <= r["top1_agreement"] <= 1
    last = result["exits"][-1]
    assert last["top1_agreement"] == 1.0 and abs(last["kl_last_exit"]) < 1e-5
    # the figures are those of the same weights in our layout
    ours = str(tmp_path / "ours_again")
    save_model(model.state_dict(), model.args, ours, tokenizer_path)
    rc, _, err = run_main("analyze.py", "--ckpt", ours, "--data", str(data), "--exits", "1,3", "--json",
                          str(tmp_path / "b.json"))
    assert rc == 0, err
    mine = json.load(open(tmp_path / "b.json"))[0]
    tol = 2e-2 if layout == "meta" else 1e-4  # Meta's files hold bfloat16
    for a, b in zip(result["exits"], mine["exits"]):
        assert abs(a["val_loss"] - b["val_loss"]) <= tol * b["val_loss"], (a, b)
