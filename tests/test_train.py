"""The SoFT trainer: the loss by hand, masking, FSDP across processes, exact resume, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import (ROOT, assert_close, assert_one_line_error, assert_usual_permissions, random_model, run_main,
                      run_script, tiny_args)
from data import batch_tensors, collate
from flags import FlagError
from scale.fused_ce import LinearCrossEntropy, SortedObjective, linear_cross_entropy
from soft import sorted_loss
from sorted_train import get_lr

# a small, fast configuration of the trainer on the built-in tasks
FAST = ["--dim", "64", "--n_layers", "4", "--n_heads", "4", "--n_kv_heads", "2", "--num_examples", "600",
        "--val_size", "32", "--vocab_size", "400", "--batch_size", "8", "--eval_interval", "0", "--warmup", "2"]


def test_summed_loss_is_the_sum_of_exit_cross_entropies_through_the_shared_head():
    model = random_model(tiny_args(n_layers=4)).train()
    exits, weights = [2, 3, 4], [0.5, 1.0, 2.0]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 400, (3, 12), generator=g)
    labels = torch.randint(0, 400, (3, 12), generator=g)
    labels[:, :5] = -100  # the prompt
    labels[2, 9:] = -100  # padding
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    loss, per_exit = sorted_loss(model, tokens, positions, labels.view(-1)[positions], exits, weights, scale=0.1)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    # by hand: full logits at each depth through model.norm and model.output, CE on the response tokens
    ref_terms = []
    for e in exits:
        logits = model.output(model.norm(model(tokens, exits=[e])[0]))
        ref_terms.append(F.cross_entropy(logits.view(-1, 400), labels.view(-1), ignore_index=-100, reduction="sum"))
    ref = 0.1 * sum(w * t for w, t in zip(weights, ref_terms))
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    assert_close(loss.detach(), ref.detach(), 1e-6, "summed loss")
    assert_close(per_exit, torch.stack(ref_terms).detach(), 1e-6, "per-exit loss")
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert_close(a, b, 1e-5, f"gradient of {name}")


@pytest.mark.parametrize("variant", ["shared head", "a head per exit", "no exit norm"])
def test_the_fused_loss_gives_the_plain_loss_and_its_gradients(variant):
    """scale/fused_ce.py against soft.py: the same loss, per-exit sums and gradients, whatever head an exit reads."""
    kw = {"shared head": {}, "a head per exit": dict(heads=[2, 3]), "no exit norm": dict(exit_norm=False)}[variant]
    model = random_model(tiny_args(n_layers=4), **kw).train()
    g = torch.Generator().manual_seed(2)
    for p in model.parameters():  # the heads of their own are not copies of the shared one
        p.data.add_(0.01 * torch.randn(p.shape, generator=g))
    tokens = torch.randint(0, 400, (3, 12), generator=g)
    positions = torch.tensor([4, 5, 9, 10, 11, 17, 30, 33, 35])
    targets = torch.randint(0, 400, (9,), generator=g)
    params = list(model.parameters())
    results = []
    for loss_fn in (lambda *b: sorted_loss(model, *b), SortedObjective(model)):
        loss, per_exit = loss_fn(tokens, positions, targets, [2, 3, 4], [0.5, 1.0, 2.0], 0.1)
        results.append((loss.detach(), per_exit, torch.autograd.grad(loss, params)))
    (plain, plain_ce, plain_grads), (fused, fused_ce, fused_grads) = results
    assert_close(fused, plain, 1e-6, "loss")
    assert_close(fused_ce, plain_ce, 1e-6, "per-exit losses")
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, plain_grads):
        assert_close(a, b, 1e-5, f"gradient of {name}")


def test_chunked_cross_entropy_matches_autograd_across_chunks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (300,), generator=g)
    rw = torch.rand(300, generator=g)
    loss, ce = LinearCrossEntropy.apply(x, w, y, rw, 7)  # 43 chunks
    gx, gw = torch.autograd.grad(3.0 * loss, [x, w])
    ref = (F.cross_entropy(x @ w.T, y, reduction="none") * rw).sum()
    rgx, rgw = torch.autograd.grad(3.0 * ref, [x, w])
    assert_close(loss.detach(), ref.detach(), 1e-6, "loss")
    assert_close(gx, rgx, 1e-5, "dx")
    assert_close(gw, rgw, 1e-5, "dW")
    with torch.no_grad():  # the evaluation path
        assert_close(linear_cross_entropy(x, w, y, rw)[0], ref.detach(), 1e-6, "no-grad loss")


def test_prompt_and_padding_carry_no_loss():
    # (ids, n_prompt): the first n_prompt ids are the prompt
    tokens, labels = collate([([1, 10, 11, 12, 20, 21, 2], 4), ([1, 13, 22, 2], 2)], "cpu")
    assert tokens.tolist() == [[1, 10, 11, 12, 20, 21], [1, 13, 22, 0, 0, 0]]
    # position i predicts token i+1; only response tokens (and their EOS) are targets
    assert labels.tolist() == [[-100, -100, -100, 20, 21, 2], [-100, 22, 2, -100, -100, -100]]
    # the trainer hands the objective those targets and their positions in the flattened (B*T) batch
    _, positions, targets = batch_tensors([([1, 10, 11, 12, 20, 21, 2], 4), ([1, 13, 22, 2], 2)], "cpu")
    assert positions.tolist() == [3, 4, 5, 7, 8] and targets.tolist() == [20, 21, 2, 22, 2]


def read_log(out):
    return [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]


def final_weights(out):
    return load_file(os.path.join(out, "latest", "model.safetensors"))


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    args = FAST + ["--max_steps", "40", "--save_interval", "3", "--eval_interval", "10"]
    full = str(tmp_path / "full")
    rc, _, err = run_main("sorted_train.py", *args, "--out", full)
    assert rc == 0, err

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, "sorted_train.py", *args, "--out", cut], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not os.path.exists(os.path.join(cut, "latest")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # as a crash or a preempted node would
    proc.wait()
    rc, out, err = run_main("sorted_train.py", *args, "--out", cut, "--resume")
    assert rc == 0, err
    resumed_at = int(out.split("at step ")[1].split()[0])
    assert resumed_at < 40, "the run finished before it could be stopped"
    a, b = final_weights(full), final_weights(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {resumed_at}"
    # every step's learning rate is get_lr's (warmup 2 in FAST, lr 3e-3 and min_lr lr / 10 by default)
    assert [l["lr"] for l in read_log(full) if "lr" in l] == [get_lr(s, 3e-3, 3e-3 / 10, 2, 40) for s in range(40)]
    # the log too continues as if nothing happened (timings aside)
    losses_full = [l.get("loss", l.get("val_loss")) for l in read_log(full)]
    losses_cut = [l.get("loss", l.get("val_loss")) for l in read_log(cut)]
    assert losses_full == losses_cut


def test_the_learning_rate_warms_up_linearly_then_decays_by_a_cosine():
    lr, min_lr, warmup, total = 1.0, 0.1, 4, 20
    assert [get_lr(s, lr, min_lr, warmup, total) for s in range(warmup + 1)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    decay = [get_lr(s, lr, min_lr, warmup, total) for s in range(warmup, total + 1)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert abs(get_lr(12, lr, min_lr, warmup, total) - 0.55) < 1e-12  # half way: half way down
    assert abs(decay[-1] - min_lr) < 1e-12 and decay[-2] - min_lr < 0.01  # the last step's rate is just above


def test_a_resume_cuts_the_log_back_to_its_checkpoint_and_a_line_cut_short_does_not_stop_it(tmp_path):
    out = str(tmp_path / "o")
    rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "2", "--out", out)
    assert rc == 0, err
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # logged after the checkpoint at step 2, then a crash
        f.write('{"step": 3, "loss": {"4": 99.0}}\n{"step": 4, "loss": {"4": 1.')  # the last while writing
    rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "3", "--out", out, "--resume")
    assert rc == 0, err
    steps = [line for line in read_log(out) if "loss" in line]
    assert [line["step"] for line in steps] == [1, 2, 3] and steps[-1]["loss"]["4"] != 99.0


def test_default_demo_lowers_the_loss_at_every_exit(tmp_path):
    """The built-in demo with its default model and exits, shortened: every exit learns."""
    out = str(tmp_path / "demo")
    rc, stdout, err = run_main("sorted_train.py", "--max_steps", "40", "--num_examples", "2000",
                                 "--eval_interval", "20",
                                 "--save_interval", "0", "--out", out)
    assert rc == 0, err
    log = read_log(out)
    first = log[0]["loss"]
    final_val = [l for l in log if "val_loss" in l][-1]["val_loss"]
    assert set(first) == set(final_val) and len(first) > 1
    for e in first:
        assert final_val[e] < 0.6 * first[e], f"exit {e}: {first[e]:.3f} -> {final_val[e]:.3f}"
    assert_usual_permissions(os.path.join(out, "latest"))
    # the checkpoint loads and generates at a shallow exit
    rc, stdout, err = run_main("generate.py", "--ckpt", out, "--layers", min(first, key=int), "--max_new_tokens", "5")
    assert rc == 0, err


# --- bad input

def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("content,needle", [
    (None, "no such file"),
    ('[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c", "output": }]',
     "not valid JSON at line 2"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', "record 2 lacks a string field 'output'"),
    ("[]", "empty"),
])
def test_bad_data(tmp_path, tokenizer_path, content, needle):
    data = str(tmp_path / "data.json") if content is None else write(tmp_path / "data.json", content)
    rc, _, err = run_main("sorted_train.py", *FAST, "--data", data, "--tokenizer", tokenizer_path,
                            "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)


@pytest.mark.parametrize("exits,needle", [("0,4", "outside 1..4"), ("2,9", "outside 1..4"), ("3,2", "increasing"),
                                           ("a,b", "comma-separated")])
def test_bad_exits(tmp_path, exits, needle):
    rc, _, err = run_main("sorted_train.py", *FAST, "--exits", exits, "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, needle)


def test_float16_is_refused_with_the_flag_to_use(tmp_path):
    """float16 would need loss scaling, which the trainer does not do: one line, naming what to pass instead."""
    rc, _, err = run_main("sorted_train.py", *FAST, "--dtype", "float16", "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "--dtype float16", "--dtype float32")


def test_init_vocabulary_must_match_the_tokenizer(tmp_path, tokenizer_path):
    from checkpoints import save_model
    model = random_model(tiny_args(vocab_size=512))
    save_model(model.state_dict(), model.args, str(tmp_path / "init"))
    rc, _, err = run_main("sorted_train.py", *FAST, "--init", str(tmp_path / "init"), "--tokenizer", tokenizer_path,
                            "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "vocabulary of 512", "400")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = str(tmp_path / "o")
    rc, _, err = run_main("sorted_train.py", *FAST, "--lr", "1e30", "--warmup", "0", "--max_steps", "20",
                            "--save_interval", "1", "--out", out)
    assert_one_line_error(rc, err, "non-finite")
    step = int(os.path.basename(os.path.realpath(os.path.join(out, "latest"))).split("_")[1])
    rc, _, err = run_main("generate.py", "--ckpt", out, "--max_new_tokens", "2")
    assert "Traceback" not in err and step >= 1


def test_fine_tunes_from_meta_layout(tmp_path, tokenizer_path):
    """--init with Meta's params.json (vocab_size -1) and two model-parallel shards."""
    from test_load import write_meta
    write_meta(random_model(tiny_args(n_layers=4)), tmp_path / "meta", 2)
    out = str(tmp_path / "o")
    rc, stdout, err = run_main("sorted_train.py", *FAST, "--init", str(tmp_path / "meta"),
                                 "--tokenizer", tokenizer_path, "--max_steps", "2", "--out", out)
    assert rc == 0, err
    assert "4 layers, dim 64" in stdout
    # a pretrained model gets fine-tuning's learning rate, not the demo's 3e-3 (FAST sets --warmup 2)
    assert "lr 2e-05, warmup 2 steps, cosine to 0" in stdout


def test_a_model_too_large_for_the_machine_is_refused(tmp_path):
    """7B in float32 with AdamW on one process needs about 100 GiB: one line, before any memory is taken."""
    rc, _, err = run_main("sorted_train.py", "--model", "7B", "--num_examples", "200", "--val_size", "20",
                            "--vocab_size", "400", "--out", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "6.5B parameters need about", "--estimate --nproc N")


def test_a_run_started_anew_in_the_same_folder_never_leaves_latest_dangling(tmp_path):
    """The second run's checkpoint of the same step gets a name of its own; `latest` moves from one whole folder to
    the other, and the first is deleted only then. A `latest` whose folder is gone is refused on --resume."""
    out = str(tmp_path / "o")
    for _ in range(2):
        rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "2", "--save_interval", "0", "--out", out)
        assert rc == 0, err
    assert os.readlink(os.path.join(out, "latest")) == "step_0000002+"
    assert sorted(f for f in os.listdir(out) if f.startswith("step_")) == ["step_0000002+"]
    shutil.rmtree(os.path.join(out, "step_0000002+"))
    rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "2", "--out", out, "--resume")
    assert_one_line_error(rc, err, "latest names step_0000002+, which is missing")


def test_a_training_folder_copied_with_links_followed_samples_exports_and_says_how_to_resume(tmp_path):
    """shutil.copytree, cp -L, rsync -L and stores without links make `latest` a plain folder: sampling and export
    read it as the checkpoint; a resume, whose next checkpoint could not replace it, says in one line how to make
    it a link again, and resumes once it is one."""
    out, copy = str(tmp_path / "o"), str(tmp_path / "copy")
    rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "2", "--out", out)
    assert rc == 0, err
    shutil.copytree(out, copy)  # links followed
    assert not os.path.islink(os.path.join(copy, "latest"))
    rc, _, err = run_main("generate.py", "--ckpt", copy, "--max_new_tokens", "3")
    assert rc == 0, err
    rc, _, err = run_main("load_llama.py", "export", copy, str(tmp_path / "hf"), "--layers", "2")
    assert rc == 0, err
    for resume in (["--resume"], []):  # a new run here too: its first checkpoint could not replace `latest`
        rc, _, err = run_main("sorted_train.py", *FAST, "--max_steps", "3", "--out", copy, *resume)
        assert_one_line_error(rc, err, "is a folder, not the link", "ln -s step_0000002")
    shutil.rmtree(os.path.join(copy, "latest"))  # what the line says to do, step_0000002 being there too
    os.symlink("step_0000002", os.path.join(copy, "latest"))
    rc, out_text, err = run_main("sorted_train.py", *FAST, "--max_steps", "3", "--out", copy, "--resume")
    assert rc == 0 and "at step 2" in out_text, err


def test_a_resume_does_not_read_the_init_weights_it_would_overwrite(tmp_path, tokenizer_path):
    """--init names the run's first weights; a resumed run takes the checkpoint's instead and never reads --init's
    (at 70B, minutes from a shared filesystem): here they are unreadable, and the resume still works."""
    from checkpoints import save_model
    from model import ModelArgs, Transformer
    init, out = str(tmp_path / "init"), str(tmp_path / "o")
    save_model(Transformer(ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=400)).state_dict(),
               ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=400), init, tokenizer_path)
    rc, _, err = run_main("sorted_train.py", *FAST, "--init", init, "--max_steps", "2", "--out", out)
    assert rc == 0, err
    with open(os.path.join(init, "model.safetensors"), "wb") as f:
        f.write(b"not weights")
    rc, stdout, err = run_main("sorted_train.py", *FAST, "--init", init, "--max_steps", "3", "--out", out, "--resume")
    assert rc == 0 and "at step 2" in stdout, err


def test_the_fit_is_checked_per_shard_group(monkeypatch):
    """Under HSDP a GPU holds 1/shard-size of the model, not 1/world: 13B's 16 bytes a parameter (about 194 GiB)
    fit 20 GiB shards over 16 processes, not over a group of 8."""
    from model import PRESETS, ModelArgs
    from scale import fit
    monkeypatch.setattr(fit.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 20 * 2 ** 30 // 4096)
    args = ModelArgs(**PRESETS["13B"])
    fit.check_fits(args, 0, False, 16, torch.device("cpu"))
    with pytest.raises(FlagError, match="sharded over 8 process"):
        fit.check_fits(args, 0, False, 8, torch.device("cpu"))


def test_an_hsdp_group_that_does_not_divide_the_processes_is_refused():
    rc, _, err = run_script("sorted_train.py", "--estimate", "--nproc", "8", "--hsdp", "3")
    assert_one_line_error(rc, err, "--hsdp 3", "divide the 8 processes")
