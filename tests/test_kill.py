"""A run survives kill -9 at any moment: a crash injected at every file operation of a checkpoint save
(single file and sharded) leaves a complete checkpoint that `recover_checkpoint` finds; and random
kill -9 over a few hundred steps of a tiny model, resumed each time with `--resume auto`, ends bitwise
equal to an uninterrupted run with a log.jsonl free of duplicate steps (one process, and torchrun
--parallel fsdp with 2 CPU ranks on gloo)."""
import dataclasses
import os
import random
import shutil
import signal
import time

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from igpt_fast import atomic
from igpt_fast.checkpoint import latest_checkpoint, load_checkpoint, recover_checkpoint
from igpt_fast.distributed import cleanup_distributed
from igpt_fast.model import GPTConfig
from igpt_fast.runlog import read_log
from igpt_fast.train import RunOptions, TrainConfig, save, start, train
from shards import N_PX, N_VOCAB

FLAGS = ["--n-px", N_PX, "--n-layer", 1, "--n-head", 2, "--n-embd", 16, "--batch-size", 2, "--lr", "1e-2",
         "--warmup-steps", 5, "--log-every", 1, "--eval-every", 0, "--eval-batches", 1]


class Killed(BaseException):
    """The process died here (nothing after it runs, no cleanup)."""


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_crash_at_any_file_operation_of_a_save_leaves_a_complete_checkpoint(data_dir, tmp_path, monkeypatch,
                                                                             one_thread, parallel):
    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path / "base"), steps=2, batch_size=2, ckpt_every=1,
                       eval_every=0, eval_batches=1)
    quiet = lambda *a: None  # noqa: E731
    try:
        train(cfg, tcfg, RunOptions(parallel=parallel), print_fn=quiet)  # checkpoints at steps 1 and 2
        run = start(cfg, dataclasses.replace(tcfg, steps=3), RunOptions(parallel=parallel), resume="auto",
                    print_fn=quiet)
        run.step = 3  # the save interrupted below writes step 3
        monkeypatch.setattr(atomic, "_remove", lambda path: None)  # a killed process cleans nothing up
        real = {name: getattr(os, name) for name in ("replace", "rename", "link", "remove", "unlink", "rmdir")}
        real_rmtree = shutil.rmtree
        outcomes = []
        for n in range(60):
            folder = tmp_path / f"crash{n}"
            shutil.copytree(tmp_path / "base", folder)
            run.tcfg = dataclasses.replace(run.tcfg, out_dir=str(folder))
            calls = [0]

            def crashing(fn):
                def op(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == n + 1:
                        raise Killed
                    return fn(*args, **kwargs)
                return op

            for name, fn in real.items():
                monkeypatch.setattr(os, name, crashing(fn))
            monkeypatch.setattr(shutil, "rmtree", crashing(real_rmtree))
            try:
                save(run)
                finished = True
            except (Killed, CheckpointException):
                finished = False
            finally:
                for name, fn in real.items():
                    monkeypatch.setattr(os, name, fn)
                monkeypatch.setattr(shutil, "rmtree", real_rmtree)
            path, _ = recover_checkpoint(str(folder))
            assert path is not None, (n, sorted(os.listdir(folder)))
            step = load_checkpoint(path)["step"]
            assert step in (2, 3), (n, step)
            assert step == 3 or not finished
            names = {x for x in os.listdir(folder) if x.startswith("ckpt")}
            kind = "ckpt.dcp" if parallel == "fsdp" else "ckpt.pt"
            prev_name = kind.replace("ckpt.", "ckpt.prev.")
            assert kind in names and names <= {kind, prev_name}, (n, names)
            if prev_name in names:
                prev = load_checkpoint(folder / prev_name)["step"]
                assert prev == step - 1 or (prev == step == 2), (n, step, prev)
            outcomes.append(step)
            if finished:
                break
        assert outcomes[-1] == 3 and len(outcomes) >= 3, outcomes  # (a crash before the temp is complete: test_resume)
    finally:
        cleanup_distributed()


def _train_process(args, env, out):
    """A forkserver child: `igpt-fast train ARGS` with env (one BLAS thread; RANK etc. for a 2-rank run)."""
    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from igpt_fast.cli import cli
    cli([str(a) for a in args], prog_name="igpt-fast")


_CONTEXT = []


def launch(args, ranks, out):
    """Start `igpt-fast train ARGS` as `ranks` processes (a gloo group on localhost, as torchrun would set it
    up, when ranks > 1), forked from a server that imported torch once: a launch costs no import."""
    import multiprocessing
    import socket

    if not _CONTEXT:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed.checkpoint", "igpt_fast.cli", "igpt_fast.train",
                                    "igpt_fast.data", "test_kill"])
        _CONTEXT.append(ctx)
    env = {"OMP_NUM_THREADS": "1"}
    if ranks > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    procs = [_CONTEXT[0].Process(target=_train_process, args=(args, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}, out))
             for r in range(ranks)]
    for proc in procs:
        proc.start()
    return procs


def kill_loop(args, run, ranks, steps, kills, seed, logs):
    """Launch `igpt-fast train ARGS --resume auto` into run again and again and kill -9 every process of it
    once it has a checkpoint and has logged a new step, `kills` times (alternately at a random moment and
    as a save has begun); then let it finish."""
    rnd = random.Random(seed)
    log = os.path.join(run, "log.jsonl")
    for i in range(kills + 1):
        out = os.path.join(logs, f"launch{i}.txt")
        before = len(read_log(log)) if os.path.exists(log) else 0
        procs = launch([*args, "--out", run, "--resume", "auto"], ranks, out)
        if i < kills:
            deadline = time.monotonic() + 120
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                if latest_checkpoint(run) and os.path.exists(log) and len(read_log(log)) > before:
                    break
                time.sleep(0.01)
            if i % 2:  # at a random moment
                time.sleep(rnd.uniform(0, 0.3))
            else:  # as soon as a save has started (its temp checkpoint exists): the moments a save is exposed
                while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                    if any(".tmp" in name for name in os.listdir(run)):
                        break
                    time.sleep(0.0005)
                time.sleep(rnd.uniform(0, 0.002))
            for proc in procs:
                if proc.pid is not None and proc.exitcode is None:
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in procs:
            proc.join(timeout=300)
        codes = [p.exitcode for p in procs]
        if i == kills or codes == [0] * ranks:
            assert codes == [0] * ranks, open(out).read()[-3000:]
            break
    rows = [r for r in read_log(log) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no step twice, none missing
    return i


def assert_same_run(a, b):
    ka, kb = load_checkpoint(a), load_checkpoint(b)
    assert (ka["step"], ka["data_step"], ka["samples_seen"]) == (kb["step"], kb["data_step"], kb["samples_seen"])
    for name, v in ka["model"].items():
        assert torch.equal(v, kb["model"][name]), name
    la, lb = read_log(os.path.join(a, "log.jsonl")), read_log(os.path.join(b, "log.jsonl"))
    loss = lambda rows: [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]  # noqa: E731
    assert loss(la) == loss(lb)


@pytest.mark.parametrize("parallel,ranks,steps,ckpt_every,kills", [("ddp", 1, 200, 5, 4), ("fsdp", 2, 120, 4, 3)])
def test_random_kill_9_resumes_bitwise(data_dir, tmp_path, parallel, ranks, steps, ckpt_every, kills):
    args = ["train", "--data", data_dir, *FLAGS, "--steps", steps, "--ckpt-every", ckpt_every, "--parallel", parallel]
    ref = launch([*args, "--out", tmp_path / "ref"], ranks, tmp_path / "ref.txt")
    launches = kill_loop(args, str(tmp_path / "run"), ranks, steps, kills, seed=ranks, logs=tmp_path)
    for proc in ref:
        proc.join(timeout=300)
    assert [p.exitcode for p in ref] == [0] * ranks, open(tmp_path / "ref.txt").read()[-3000:]
    assert launches >= 2  # killed at least twice before finishing
    assert_same_run(tmp_path / "run", tmp_path / "ref")
