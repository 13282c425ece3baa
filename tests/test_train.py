"""Training loop tests on tiny shards written here (webdataset.ShardWriter + meta.json + palette.npy):
CLI end to end, bitwise-identical resume, kill -9 during a checkpoint write, NaN stop, data/model
mismatch errors, and a 2-process torchrun (gloo) run checked against hand-averaged gradients."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig, IGPT, PRESETS
from igpt_fast.palette import Palette
from shards import N_PX, N_VOCAB
from igpt_fast.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from igpt_fast.data import DataMismatchError, check_data
from igpt_fast.runlog import read_log
from igpt_fast.train import Objective, TrainConfig, TrainingDiverged, configure_optimizer, lr_at, train
from igpt_fast.stop import TIME_MIN_TIMED, TIME_SKIP

ARCH = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]


def model_config(**kw):
    return GPTConfig(**{**dict(n_px=N_PX, n_vocab=N_VOCAB, n_layer=2, n_head=2, n_embd=32), **kw})


def tcfg(data_dir, out, **kw):
    base = dict(data_dir=data_dir, out_dir=str(out), steps=6, batch_size=4, lr=1e-2, warmup_steps=2, log_every=1,
                eval_every=3, eval_batches=2, ckpt_every=3)
    return TrainConfig(**{**base, **kw})


def losses(run):
    rows = read_log(os.path.join(run, "log.jsonl"))
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [(r["step"], r["val_loss"]) for r in rows
                                                                   if "val_loss" in r]


def test_cli_train_end_to_end(data_dir, tmp_path):
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), *ARCH, "--steps", "8",
                                   "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2", "--log-every", "1",
                                   "--eval-every", "4", "--eval-batches", "0", "--ckpt-every", "4"])
    assert res.exit_code == 0, res.output
    assert '"n_vocab": 16' in res.output  # the resolved config is printed first
    lines = [ln for ln in res.output.splitlines() if re.fullmatch(
        r"step \d/8 \| loss \d+\.\d{4} \| lr [\d.e-]+ \| [\d.]+ ms/step \| [\d.e]+ tok/s \| mfu - \| eta .+", ln)]
    assert len(lines) == 8
    train_losses, val_losses = losses(run)
    assert [s for s, _ in train_losses] == list(range(1, 9))
    assert train_losses[0][1] == pytest.approx(np.log(N_VOCAB), abs=1e-4)  # zero-init head
    assert train_losses[-1][1] < train_losses[0][1] - 0.3
    assert [s for s, _ in val_losses] == [4, 8]
    assert (run / "loss.png").stat().st_size > 1000
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["n_px"] == N_PX and cfg["train"]["steps"] == 8
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert ckpt["step"] == 8 and ckpt["data_step"] == 8 and len(ckpt["rng"]) == 1
    assert ckpt["palette_sha256"] == Palette.load(os.path.join(data_dir, "palette.npy")).sha256
    model = model_from_checkpoint(ckpt).eval()
    tokens = torch.from_numpy(np.arange(16) % 16).view(1, 16)
    _, loss = model(tokens, tokens)
    assert torch.isfinite(loss)
    assert not (run / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("objective,grad_accum", [("bert", 2), ("ar", 1)])
def test_resume_gives_identical_losses(data_dir, tmp_path, objective, grad_accum):
    cfg = model_config(objective=objective, dropout=0.1 if objective == "ar" else 0.0)
    train(cfg, tcfg(data_dir, tmp_path / "straight", grad_accum=grad_accum), print_fn=lambda *a: None)
    first = train(cfg, tcfg(data_dir, tmp_path / "split", steps=3, lr_decay_steps=6, grad_accum=grad_accum),
                  print_fn=lambda *a: None)
    assert first["step"] == 3
    second = train(cfg, tcfg(data_dir, tmp_path / "split", grad_accum=grad_accum), resume="auto",
                   print_fn=lambda *a: None)
    assert second["step"] == 6
    a, va = losses(tmp_path / "straight")
    b, vb = losses(tmp_path / "split")
    assert a == b  # bitwise: same data, RNG (BERT masks, dropout), optimizer and schedule
    assert va == vb
    sa = load_checkpoint(tmp_path / "straight" / "ckpt.pt")["model"]
    sb = load_checkpoint(tmp_path / "split" / "ckpt.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


HARNESS = """
import io, os, sys, time
import torch
import igpt_fast.train as T
from igpt_fast.model import GPTConfig

real_save, calls = torch.save, [0]

def stalling_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 1:
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # half a checkpoint on disk, then "power cut"
    f.flush()
    os.fsync(f.fileno())
    open(sys.argv[3], "w").close()
    time.sleep(600)

torch.save = stalling_save
cfg = GPTConfig(n_px=4, n_vocab=16, n_layer=2, n_head=2, n_embd=32)
T.train(cfg, T.TrainConfig(data_dir=sys.argv[1], out_dir=sys.argv[2], steps=6, batch_size=4, lr=1e-2,
                           warmup_steps=2, log_every=1, eval_every=0, eval_batches=2, ckpt_every=2))
"""


def test_kill9_during_checkpoint_write_then_resume(data_dir, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "stalled"
    script = tmp_path / "harness.py"
    script.write_text(textwrap.dedent(HARNESS))
    proc = subprocess.Popen([sys.executable, str(script), data_dir, str(run), str(marker)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the harness never reached its second checkpoint"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    (tmp,) = run.glob("ckpt.pt.tmp*")  # the temp name of the killed write (atomic.atomic_path)
    with pytest.raises(CheckpointError, match="not a readable igpt-fast checkpoint"):  # half-written
        load_checkpoint(tmp)
    assert load_checkpoint(run / "ckpt.pt")["step"] == 2  # the previous checkpoint is intact

    cfg = model_config()
    kw = dict(eval_every=0, ckpt_every=2)
    train(cfg, tcfg(data_dir, run, **kw), resume="auto", print_fn=lambda *a: None)
    train(cfg, tcfg(data_dir, tmp_path / "straight", **kw), print_fn=lambda *a: None)
    resumed = dict(losses(run)[0])  # steps 1-4 logged twice (before the kill and after); last wins
    assert list(resumed.values()) == [loss for _, loss in losses(tmp_path / "straight")[0]]


@pytest.mark.parametrize("bad_step,good_step", [(6, 4), (5, 2)])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, bad_step, good_step):
    """A blow-up at step s: if ckpt.pt holds the weights that produced it (saved at s - 1), ckpt.prev.pt
    takes its place, so ckpt.pt is the last good state either way."""
    calls = [0]

    def exploding_loss(model, tokens, labels):
        calls[0] += 1
        _, loss = model(tokens, tokens)
        return (loss * float("nan") if calls[0] == bad_step else loss), {}

    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {bad_step}.*ckpt\.pt \(step {good_step}"):
        train(model_config(), tcfg(data_dir, tmp_path, ckpt_every=2, eval_every=0),
              objective=Objective(loss=exploding_loss), print_fn=lambda *a: None)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == good_step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_data_model_mismatch_errors(data_dir, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "r"), "--n-px", "28",
                              "--steps", "1"])
    assert res.exit_code == 2 and "the image side is the data's, 4" in res.output  # a hidden check of old lines
    assert "--n-px" not in runner.invoke(cli, ["train", "--help"]).output
    res = runner.invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "r"), *ARCH])
    assert res.exit_code == 1 and "meta.json not found" in res.output
    res = runner.invoke(cli, ["train", "--data", data_dir, "--out", str(tmp_path / "r"), *ARCH, "--n-head", "3"])
    assert res.exit_code == 2 and "divisible" in res.output
    meta = json.load(open(os.path.join(data_dir, "meta.json")))
    with pytest.raises(DataMismatchError, match="16 colours but the model has n_vocab 512"):
        check_data(meta, model_config(n_vocab=512))
    with pytest.raises(DataMismatchError, match="palette"):
        check_data(meta, model_config(), palette_sha256="0" * 64)
    # a checkpoint trained on another palette refuses this data
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(data_dir):
        os.symlink(os.path.join(data_dir, name), bad / name)
    os.remove(bad / "palette.npy")
    other = Palette(np.random.default_rng(1).uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32))
    other.save(bad / "palette.npy")
    res = runner.invoke(cli, ["train", str(bad), "--out", str(tmp_path / "r"), *ARCH])
    assert res.exit_code == 1 and "is not the palette meta.json names" in res.output
    os.remove(bad / "meta.json")
    (bad / "meta.json").write_text(json.dumps({**meta, "palette_sha256": other.sha256}))
    run = tmp_path / "run"
    train(model_config(), tcfg(data_dir, run, steps=1, eval_every=0), print_fn=lambda *a: None)
    res = runner.invoke(cli, ["train", str(bad), "--out", str(run), *ARCH, "--resume", "auto"])
    assert res.exit_code == 1 and "re-tokenize with the checkpoint's palette" in res.output


def test_cli_preset_choices_match_presets():
    train_cmd = cli.commands["train"]
    preset = next(p for p in train_cmd.params if p.name == "preset")
    assert set(preset.type.choices) == set(PRESETS)


def test_torchrun_two_processes_gloo(data_dir, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "igpt_fast.cli",
           "train", "--data", data_dir, "--out", str(run), *ARCH, "--steps", "3", "--batch-size", "4", "--lr", "1e-2",
           "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--eval-batches", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 1/3 | loss") == 1  # rank 0 logs alone
    assert proc.stdout.count("done | step 3") == 1 and proc.stdout.count('"world_size": 2') == 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2
    ckpt = load_checkpoint(run / "ckpt.pt")
    assert len(ckpt["rng"]) == 2 and ckpt["world_size"] == 2
    ddp_losses, val = losses(run)
    rows = [json.loads(line) for line in open(run / "log.jsonl") if "tok_per_s" in line]
    assert [r["step"] for r in rows] == [1, 2, 3]

    # the same three steps by hand: rank r's batches, gradients averaged over the two ranks
    from igpt_fast.data import train_loader

    torch.manual_seed(0)
    model = IGPT(model_config())
    opt = configure_optimizer(model, 1e-2)
    schedule = TrainConfig(data_dir="", out_dir="", steps=3, lr=1e-2, warmup_steps=2)
    streams = [iter(train_loader(data_dir, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    expected = []
    for step in range(3):
        batch_losses = []
        for it in streams:
            tokens, _ = next(it)
            _, loss = model(tokens, tokens)
            (loss / 2).backward()
            batch_losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(schedule, step)
        opt.step()
        opt.zero_grad()
        expected.append(sum(batch_losses) / 2)
    assert [loss for _, loss in ddp_losses] == pytest.approx(expected, abs=1e-5)
    assert len(val) == 1  # the final eval, averaged over both ranks
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ckpt["model"][k], v, atol=1e-5, rtol=1e-4)


def test_image_side_defaults_to_the_data(data_dir, tmp_path):
    """Without --n-px the model takes the data's image side, whatever the preset's paper size."""
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), "--n-layer", "1", "--n-head", "2",
                                   "--n-embd", "16", "--steps", "1", "--eval-every", "0", "--eval-batches", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["model"]["n_px"] == N_PX


def test_max_minutes_ends_on_time_with_the_cosine_completed(data_dir, tmp_path):
    """--max-minutes alone (no --steps): the steps are fitted to the budget at the end of warmup, the run ends
    within the budget plus a little slack, its last step is the schedule's last (LR at the cosine floor), and
    its checkpoint records an ordinary N-step run (max_minutes 0), which a resume continues as is."""
    run, budget_s, lr, min_lr = tmp_path / "run", 20.0, 1e-2, 1e-4
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["train", "--data", data_dir, "--out", str(run), *ARCH,
                                   "--max-minutes", str(budget_s / 60), "--batch-size", "4", "--lr", str(lr),
                                   "--min-lr", str(min_lr), "--warmup-steps", "10", "--log-every", "5",
                                   "--eval-every", "0", "--eval-batches", "2", "--ckpt-every", "0",
                                   "--spike-factor", "0"])  # thousands of steps at a high lr: no spike stop
    wall = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    # Never late. How early it ends depends on the machine: the plan is fitted to the step times measured
    # before it, and N never grows, so a neighbour's load during the first steps ends the run early.
    assert wall < budget_s + 5.0, (wall, res.output)
    rows = read_log(str(run / "log.jsonl"))
    plan = next(r for r in rows if "time_plan" in r)
    # planned at the end of warmup (step 10), or earlier once 10% of the budget is spent (a slow machine)
    assert TIME_MIN_TIMED + TIME_SKIP <= plan["step"] <= 10 and plan["time_plan"]["upper_bound"] == 10**9, plan
    # the plan's own arithmetic fills the budget: time spent + steps left x measured step + the final pause
    p = plan["time_plan"]
    planned_end = p["elapsed_s"] + (p["steps"] - plan["step"]) * p["ms_per_step"] / 1e3 + p["save_s"] + p["eval_s"]
    assert 0.8 * budget_s < planned_end + p["plot_s"] <= budget_s, p
    ckpt = load_checkpoint(str(run / "ckpt.pt"), weights=False)
    steps = ckpt["train_config"]["steps"]
    assert ckpt["step"] == steps >= 30 and ckpt["train_config"]["max_minutes"] == 0.0, ckpt["train_config"]
    last = [r for r in rows if "loss" in r][-1]
    assert last["step"] == steps
    assert min_lr <= last["lr"] < min_lr + 0.01 * (lr - min_lr), last  # the final step ran at the cosine floor
    assert lr_at(TrainConfig(**ckpt["train_config"]), steps) == pytest.approx(min_lr)
    assert f"-> {plan['time_plan']['steps']} steps" in res.output
