"""scripts/gpu_check.py's own machinery, in seconds: a run is killed with every process it started, and the readings
the checks compare see what they must. The checks themselves, each shown to fail on the defect it names, take
minutes on a CPU: `python scripts/gpu_check.py --cpu --gpus 2 --inject DEFECT` (outputs in docs/scaling.md)."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, random_model, run_main, tiny_args

sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.dont_write_bytecode = True  # no scripts/__pycache__: test_style reads every file in scripts/
import gpu_check  # noqa: E402
sys.dont_write_bytecode = False


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped by its new parent
    except FileNotFoundError:
        return True


def test_a_run_is_killed_with_the_processes_it_started_in_sessions_of_their_own(tmp_path):
    """torchrun starts each worker in a session of its own: killing torchrun's process group (the old timeout) left
    the workers alive, holding the GPUs."""
    pid_file = tmp_path / "worker"
    launcher = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open({str(pid_file)!r}, "w").write(str(worker.pid))
time.sleep(120)"""], start_new_session=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the launcher did not start its worker"
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    assert os.getpgid(worker) != os.getpgid(launcher.pid)  # as torchrun's workers are
    gpu_check.kill(launcher)
    assert launcher.returncode == -9
    while not gone(worker):
        assert time.monotonic() < deadline, "the worker outlived its launcher"
        time.sleep(0.1)


def test_the_readings_see_a_gradient_scale_and_a_step_logged_twice(tmp_path):
    """A constant scale of the gradient leaves every loss as it was (AdamW ignores it): the gradient norm shows it.
    A resume from the wrong step logs a step twice."""
    one = {s: dict(loss={"2": 3.0 - s / 10, "4": 2.5 - s / 10}, grad_norm=1.5) for s in (1, 2)}
    scaled = {s: dict(line, grad_norm=2 * line["grad_norm"]) for s, line in one.items()}
    assert gpu_check.gaps(scaled, one, [1, 2]) == (0.0, 1.0)
    with pytest.raises(gpu_check.RunFailed, match=r"steps \[3\] are not logged"):
        gpu_check.gaps(scaled, one, [1, 2, 3])
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(dict(line, step=s)) + "\n" for s, line in
                                                [(1, one[1]), (2, one[2]), (2, one[2])]))
    with pytest.raises(gpu_check.RunFailed, match="logs step 2 twice"):
        gpu_check.read_log(str(tmp_path))


def test_decoded_reads_what_generate_prints_at_each_depth(tmp_path, tokenizer_path):
    from checkpoints import save_model
    model = random_model(tiny_args(max_seq_len=128))
    save_model(model.state_dict(), model.args, str(tmp_path), tokenizer_path)
    rc, out, err = run_main("generate.py", "--ckpt", tmp_path, "--compare", "2,4", "--max_new_tokens", "12",
                            "--device", "cpu")
    assert rc == 0, err
    texts = gpu_check.decoded(out)
    assert list(texts) == ["2/4", "4/4"], out
    for depth, (text, n, speed) in texts.items():
        assert n == 12 and speed > 0 and text.strip(), (depth, text, n)
    assert texts["2/4"][0] != texts["4/4"][0]  # two depths of a sharp random model say different things


def test_the_harness_puts_in_a_defect_and_reports_what_dynamo_did(tmp_path):
    """HARNESS runs a script as python would, after its defect; each process reports graphs and graph breaks."""
    script = tmp_path / "step.py"
    script.write_text("""
import torch
from scale.fused_ce import SortedObjective
from model import ModelArgs, Transformer
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16,
                              max_seq_len=16))
model.layers[0].compile()
loss, _ = SortedObjective(model)(torch.randint(0, 64, (1, 8)), torch.arange(8), torch.randint(0, 64, (8,)), [2],
                                 [1.0], 0.5)
print("loss", loss.item())
""")
    harness = tmp_path / "harness.py"
    harness.write_text(gpu_check.HARNESS.format(root=ROOT))

    def run(inject: str) -> tuple[float, dict]:
        env = {**os.environ, "GPU_CHECK_INJECT": inject, "GPU_CHECK_REPORT": str(tmp_path / (inject or "none")),
               "GPU_CHECK_HANG_AT": "0", "GPU_CHECK_PROFILE_AT": "0", "GPU_CHECK_BACKEND": "eager"}
        p = subprocess.run([sys.executable, str(harness), str(script)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        with open(tmp_path / f"{inject or 'none'}.0.json") as f:
            return float(p.stdout.split("loss")[1]), json.load(f)

    plain, report = run("")
    assert report["breaks"] == 0 and report["graphs"] == 1, report
    doubled, report = run("grad_scale")
    assert doubled == pytest.approx(2 * plain, rel=1e-6)
    _, report = run("graph_break")
    assert report["breaks"] > 0, report
