"""Shared fixtures: tiny random models, a tiny tokenizer, a comparison helper that reports the max difference,
and ways to run the scripts: in this process (fast, for most) or in one of their own (for signals, torchrun)."""
import contextlib
import importlib
import io
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from load_llama import new_model  # noqa: E402
from model import ModelArgs, Transformer, init_weights  # noqa: E402


def assert_close(actual, expected, rtol=1e-4, what="tensors"):
    """Relative error max|a - e| / max|e| within rtol; the message shows the numbers."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def tiny_args(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=400, multiple_of=32, max_seq_len=64)
    return ModelArgs(**{**base, **kw})


def random_model(args: ModelArgs, seed: int = 0, heads=(), exit_norm: bool = True) -> Transformer:
    """A model with random weights; norms perturbed away from 1 so that they are really tested. heads, exit_norm:
    the variant of variants/exit_heads.py."""
    g = torch.Generator().manual_seed(seed)
    model = new_model(args, heads, exit_norm)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_weights(name, p.shape, args.n_layers, g) * 5)  # larger weights: sharper, less tied logits
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 400-token sentencepiece model trained on the built-in tasks."""
    from tasks import builtin_records
    from tokenizer import train_tokenizer
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(builtin_records(3000, seed=0), 400, path)
    return path


def run_main(script: str, *args):
    """A script's main(argv) run in this process, as `python script args` would run it: (exit code, stdout,
    stderr). An exception main lets through fails the test, as a traceback would."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:  # sys.exit("message") prints the message and exits with 1
            code = e.code if isinstance(e.code, int) or e.code is None else print(e.code, file=sys.stderr) or 1
    return code or 0, out.getvalue(), err.getvalue()


def run_script(*args, timeout=120):
    """Run one of the project's scripts in a process of its own; (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, stderr, *needles):
    assert rc != 0, "expected a non-zero exit"
    assert "Traceback" not in stderr, stderr
    # the progress bar may have drawn itself on stderr before the failure
    bar = ("it/s", "s/it")  # a progress bar's rate, in either direction
    lines = [l for l in stderr.strip().splitlines() if l.strip() and not (any(b in l for b in bar) and "|" in l)]
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage:")), stderr
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]!r}"


@pytest.fixture
def rank0_of_one(monkeypatch):
    """The environment torchrun gives the only process of a run: sorted_train.py takes the scale layer's path (a
    gloo process group of one) in this process. The group is ended afterwards, however the run ended."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def assert_usual_permissions(folder):
    """Every file and folder under folder has the permissions the user's umask gives any new one (checkpoints on a
    shared cluster are read by teammates)."""
    umask = os.umask(0)
    os.umask(umask)
    odd = []
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            path = os.path.join(root, name)
            want = (0o777 if os.path.isdir(path) else 0o666) & ~umask
            if os.stat(path).st_mode & 0o777 != want:
                odd.append(f"{os.path.relpath(path, folder)} {oct(os.stat(path).st_mode & 0o777)}")
    assert not odd, f"permissions other than the umask's {oct(0o666 & ~umask)}: {odd}"
