"""One run folder, one writer: a second `train` into a folder another run holds fails in one line naming
the holder (RUN/.lock, runlog.RunLock); a lock left by a killed run (an unlocked file) is taken over
with a note; the lock goes on every exit. torchrun workers exit when their launcher is killed. Output
folders that cannot be written (a parent that is a file, a read-only place) are one-line usage errors
of every verb, before any work."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from igpt_fast.cli import cli
from igpt_fast.errors import OutputError
from igpt_fast.runlog import LOCK_NAME, RunInUse, RunLock, read_log
from igpt_fast.train import TrainError, train
from test_train import ARCH, model_config, tcfg
from sources import one_line_error

QUIET = dict(print_fn=lambda *a: None)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LONG = [*ARCH, "--steps", "100000", "--batch-size", "4", "--log-every", "1", "--eval-every", "0",
        "--ckpt-every", "0", "--warmup-steps", "2"]


def wait_for_rows(run, proc, timeout=120):
    """Wait until the running `proc` has logged a step to RUN/log.jsonl."""
    deadline = time.time() + timeout
    while not [r for r in read_log(os.path.join(run, "log.jsonl")) if "loss" in r]:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no step logged"
        time.sleep(0.2)


def test_second_train_into_a_held_folder_fails_naming_the_holder(data_dir, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "igpt_fast.cli", "train", "--data", data_dir, "--out", str(run),
                              *LONG],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_rows(run, first)
        res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), *ARCH, "--steps", "1",
                                       "--seed", "1"])
        line = one_line_error(res)
        assert res.exit_code == 1
        assert f"pid {first.pid} on {socket.gethostname()}" in line and str(run) in line, line
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0  # the holder's, untouched
        with pytest.raises(RunInUse, match=f"pid {first.pid}"):  # the library: train and finetune alike
            train(model_config(), tcfg(data_dir, run, steps=1), **QUIET)
        assert all(r.get("step", 0) >= 1 for r in read_log(run / "log.jsonl"))
    finally:
        first.kill()
        first.wait()
    train(model_config(), tcfg(data_dir, run, steps=1, eval_every=0), overwrite=True, **QUIET)  # a killed run's lock
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_stale_lock_of_a_dead_run_is_taken_over(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "elsewhere", "started": "yesterday"}))
    said = []
    train(model_config(), tcfg(data_dir, run, steps=1, eval_every=0), print_fn=said.append)
    assert any("pid 999999999 on elsewhere" in s and "taking it over" in s for s in said), said
    assert not (run / LOCK_NAME).exists()


def test_lock_is_released_when_setup_fails(data_dir, tmp_path):
    run = tmp_path / "run"
    train(model_config(), tcfg(data_dir, run, steps=1, eval_every=0), **QUIET)
    with pytest.raises(TrainError, match="already holds a"):
        train(model_config(), tcfg(data_dir, run, steps=1, eval_every=0), **QUIET)
    assert not (run / LOCK_NAME).exists()
    with RunLock(run):  # free again; a second holder in the same process is refused too
        with pytest.raises(RunInUse, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()
    assert not (run / LOCK_NAME).exists()


def test_unwritable_run_folder_is_one_output_error(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="file/run"):
        train(model_config(), tcfg(data_dir, tmp_path / "file" / "run", steps=1), **QUIET)


def verb_args(data_dir, tmp_path, out):
    """Every verb with an output option, its --out given first (so it is checked before the others)."""
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    pal = tmp_path / "palette.npy"
    pal.write_bytes(b"")
    return {"palette": ["palette", "--out", out, str(src)],
            "tokenize": ["tokenize", "--out", out, str(src), "--palette", str(pal)],
            "train": ["train", "--out", out, data_dir],
            "export": ["export", "--out", out, str(tmp_path)],
            "convert": ["convert", "--out", out, str(tmp_path)],
            "demo": ["demo", "--out", out],
            "probe": ["probe", "--out", out, str(tmp_path), "--data", data_dir],
            "finetune": ["finetune", "--out", out, str(tmp_path), "--data", data_dir],
            "sample": ["sample", "--out", out, str(tmp_path)]}


def test_every_output_option_refuses_a_path_under_a_file(data_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "out")
    for verb, args in verb_args(data_dir, tmp_path, out).items():
        res = CliRunner().invoke(cli, args)
        line = one_line_error(res)
        assert res.exit_code == 2 and "'--out'" in line and "is not a folder" in line, (verb, res.output)


def test_every_output_option_refuses_a_read_only_place(data_dir, tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # a read-only mount (root ignores chmod, so it is simulated)
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    for verb, args in verb_args(data_dir, tmp_path, str(tmp_path / "ro" / "out")).items():
        res = CliRunner().invoke(cli, args)
        line = one_line_error(res)
        assert res.exit_code == 2 and "read-only file system" in line, (verb, res.output)
    assert os.listdir(tmp_path / "ro") == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process parents from /proc")
def test_torchrun_workers_exit_when_their_launcher_is_killed(data_dir, tmp_path):
    run = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "igpt_fast.cli", "train", "--data", data_dir, "--out", str(run), *LONG],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers = []
    try:
        wait_for_rows(run, launcher, timeout=240)
        workers = children(launcher.pid)
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 20
        while any(alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in workers), "workers outlived their launcher"
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait()
    with RunLock(run):  # the workers are gone, and so is their hold on the folder
        pass


def _stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()  # state, ppid, ...
    except OSError:
        return None


def children(pid):
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(p) or [0, 0])[1] == str(pid)]


def alive(pid):
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"
