"""SIGTERM (preemption, torchrun's shutdown) and Ctrl-C stop a training run cleanly: the current step
finishes, a checkpoint of it is written, one line names it, the process exits 143 / 130, and
`--resume auto` continues from that step. Under torchrun every rank stops after the same step (they
agree through the step's loss all-reduce) and the workers print no traceback (torchrun itself still
prints the SignalException it raises after shutting its workers down: that is torch's launcher)."""
import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from igpt_fast.checkpoint import load_checkpoint
from igpt_fast.cli import cli
from igpt_fast.runlog import LOCK_NAME, read_log
from test_run_lock import ENV, LONG, wait_for_rows


def logged_steps(run):
    return [r["step"] for r in read_log(os.path.join(run, "log.jsonl")) if "loss" in r]


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_step_says_where_and_resumes(data_dir, tmp_path, signum, code):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "igpt_fast.cli", "train", "--data", data_dir, "--out", str(run),
                             *LONG],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(run, proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "Aborted" not in err, err
    step = load_checkpoint(run / "ckpt.pt")["step"]
    assert step == logged_steps(run)[-1] >= 1  # the stopped step is logged and saved
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(run / "ckpt.pt") in lines[0] and f"step {step}" in lines[0], err
    assert signal.Signals(signum).name in lines[0] and "--resume auto" in lines[0]
    assert not (run / LOCK_NAME).exists()

    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), "--resume", "auto", "--steps",
                                   str(step + 2)])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["start_step"] == step
    assert logged_steps(run) == list(range(1, step + 3))
    assert load_checkpoint(run / "ckpt.pt")["step"] == step + 2


def test_torchrun_sigterm_stops_every_rank_after_the_same_step(data_dir, tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "igpt_fast.cli", "train", "--data", data_dir, "--out", str(run), *LONG],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(run, launcher, timeout=240)
        launcher.send_signal(signal.SIGTERM)
        out, _ = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    ckpt = load_checkpoint(run / "ckpt.pt")
    step = ckpt["step"]
    assert step == logged_steps(run)[-1] >= 1 and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert ckpt["data_step"] == step  # each rank took exactly `step` micro-batches: all stopped together
    assert out.count(f"stopped by SIGTERM after step {step}") == 1, out[-4000:]  # rank 0 says it once
    # the workers print no traceback; torchrun's own SignalException traceback (torch's launcher) may follow
    assert out.count("Traceback") == out.count(f"SignalException: Process {launcher.pid} got signal"), out[-4000:]
    assert not (run / LOCK_NAME).exists()
