"""Bad input to the scripts: one clear line and a non-zero exit, never a traceback."""
import json
import os
import shutil

import pytest
import torch

from conftest import assert_one_line_error, random_model, run_main, tiny_args
from checkpoints import save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer_path):
    """A tiny checkpoint in our layout with the tiny tokenizer beside it."""
    folder = str(tmp_path_factory.mktemp("ckpt") / "ours")
    model = random_model(tiny_args(max_seq_len=160))
    save_model(model.state_dict(), model.args, folder, tokenizer_path, exits=[2, 3, 4])
    return folder


def test_generate_streams_at_a_depth_and_compares_exits(ckpt):
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--layers", "2", "--max_new_tokens", "5")
    assert rc == 0, err
    assert "layers 2/4" in out and "tokens/s" in out
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--compare", "--max_new_tokens", "3")
    assert rc == 0, err
    assert "layers 2/4" in out and "layers 4/4" in out  # the exits recorded in params.json


def test_samples_are_decoded_together(ckpt):
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--layers", "3", "--temperature", "1.0",
                            "--num_samples", "3", "--max_new_tokens", "5")
    assert rc == 0, err
    assert "sample 3" in out and "3 samples decoded together" in out
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--temperature", "1.0", "--num_samples", "3",
                            "--max_new_tokens", "5", "--draft_layers", "2")  # one batch, self-speculatively
    assert rc == 0, err
    assert "self-speculative" in out and "3 samples decoded together" in out and "drafts accepted" in out


def test_generate_speculative_and_early_exit_flags(ckpt):
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--draft_layers", "2", "--num_speculations", "3",
                              "--max_new_tokens", "6")
    assert rc == 0, err
    assert "drafts accepted" in out
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--early_exit", "0.5", "--max_new_tokens", "6")
    assert rc == 0, err
    assert "mean exit depth" in out
    rc, out, err = run_main("generate.py", "--ckpt", ckpt, "--early_exit", "0.9,0.6", "--max_new_tokens", "6")
    assert rc == 0, err  # a threshold per exit below the last (2 and 3)
    assert "mean exit depth" in out and ">= 0.9,0.6" in out
    rc, _, err = run_main("generate.py", "--ckpt", ckpt, "--early_exit", "0.9,0.6,0.5")
    assert_one_line_error(rc, err, "--early_exit", "3 thresholds", "[2, 3]")
    rc, _, err = run_main("generate.py", "--ckpt", ckpt, "--draft_layers", "4")
    assert_one_line_error(rc, err, "--draft_layers 4", "1..3")


def test_missing_checkpoint(tmp_path):
    rc, _, err = run_main("generate.py", "--ckpt", str(tmp_path / "nope"))
    assert_one_line_error(rc, err, "no such checkpoint")


def test_params_without_required_fields(tmp_path, ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    params = json.load(open(bad / "params.json"))
    del params["n_heads"]
    json.dump(params, open(bad / "params.json", "w"))
    rc, _, err = run_main("generate.py", "--ckpt", str(bad))
    assert_one_line_error(rc, err, "params.json", "n_heads")


def test_config_json_without_required_fields(tmp_path):
    (tmp_path / "hf").mkdir()
    json.dump({"model_type": "llama", "hidden_size": 64}, open(tmp_path / "hf" / "config.json", "w"))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "hf" / "model.safetensors"))
    rc, _, err = run_main("generate.py", "--ckpt", str(tmp_path / "hf"))
    assert_one_line_error(rc, err, "config.json", "num_hidden_layers")


def test_unreadable_weights(tmp_path, ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    rc, _, err = run_main("generate.py", "--ckpt", str(bad))
    assert_one_line_error(rc, err, "model.safetensors")


@pytest.mark.parametrize("layers", ["0", "5"])
def test_layers_outside_the_model(ckpt, layers):
    rc, _, err = run_main("generate.py", "--ckpt", ckpt, "--layers", layers)
    assert_one_line_error(rc, err, "outside 1..4")


def test_tokenizer_vocabulary_mismatch(tmp_path):
    model = random_model(tiny_args(vocab_size=512))
    save_model(model.state_dict(), model.args, str(tmp_path / "m"))
    from tasks import builtin_records
    from tokenizer import train_tokenizer
    train_tokenizer(builtin_records(2000, seed=0), 400, str(tmp_path / "tok.model"))
    rc, _, err = run_main("generate.py", "--ckpt", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok.model"))
    assert_one_line_error(rc, err, "400 tokens", "512")


def test_prompt_longer_than_max_seq_len(ckpt):
    rc, _, err = run_main("generate.py", "--ckpt", ckpt, "--raw", "--prompt", "a b c d e f g h " * 30)
    assert_one_line_error(rc, err, "max_seq_len")


@pytest.mark.parametrize("flags,needle", [(["--temperature", "1", "--top_k", "0"], "--top_k"),
                                          (["--top_p", "1.5"], "--top_p"), (["--device", "gpu9"], "--device")])
def test_bad_sampling_flags(ckpt, flags, needle):
    rc, _, err = run_main("generate.py", "--ckpt", ckpt, *flags)
    assert_one_line_error(rc, err, needle)


def test_export_rejects_depth_outside_the_model(ckpt, tmp_path):
    rc, _, err = run_main("load_llama.py", "export", ckpt, str(tmp_path / "x"), "--layers", "9")
    assert_one_line_error(rc, err, "--layers 9")


def test_pth_that_would_run_code(tmp_path):
    (tmp_path / "meta").mkdir()
    json.dump({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1}, open(tmp_path / "meta" / "params.json", "w"))
    torch.save({"x": torch.zeros(1), "y": Exploit()}, tmp_path / "meta" / "consolidated.00.pth")
    rc, _, err = run_main("generate.py", "--ckpt", str(tmp_path / "meta"))
    assert_one_line_error(rc, err, "refused")
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exploited"))


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))
