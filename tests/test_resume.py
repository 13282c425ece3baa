"""What `train` does with a run folder that already holds a run: refuse, overwrite on request, or
resume with the user's explicit training flags (architecture flags must match); divergence keeps the
last good checkpoint and a resume with a lower LR trains on; the checkpoint of a step is written
before its evaluation; log.jsonl is cut back to the checkpoint on resume and survives a half-written
line; non-finite numbers are usage errors."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from igpt_fast.checkpoint import load_checkpoint
from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig
from igpt_fast.runlog import RunLogError, read_log
from igpt_fast.train import Objective, TrainConfig, TrainError, lr_at, train
from shards import N_PX, N_VOCAB

ARCH = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32"]


def run_cli(data_dir, *args):
    return CliRunner().invoke(cli, ["train", "--data", str(data_dir), *map(str, args)])


def base(data_dir, run, *extra):
    return run_cli(data_dir, "--out", run, *ARCH, "--batch-size", 4, "--lr", "1e-2", "--warmup-steps", 1,
                   "--log-every", 1, "--eval-every", 0, "--eval-batches", 1, *extra)


def steps_logged(run):
    return [r["step"] for r in read_log(os.path.join(run, "log.jsonl")) if "loss" in r]


def test_existing_run_is_refused_unless_resume_or_overwrite(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 2).exit_code == 0
    res = base(data_dir, run, "--steps", 2)
    assert res.exit_code == 1 and "--resume auto" in res.output and "--overwrite" in res.output
    assert res.output.count("\n") == 1  # one line, no traceback
    assert steps_logged(run) == [1, 2]
    res = base(data_dir, run, "--steps", 3, "--overwrite")
    assert res.exit_code == 0, res.output
    assert steps_logged(run) == [1, 2, 3]  # a new run: the old log is gone, not appended to
    assert base(data_dir, run, "--steps", 3, "--resume", "auto", "--overwrite").exit_code == 2


def test_resume_architecture_flags_must_match(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 2).exit_code == 0
    res = run_cli(data_dir, "--out", run, "--n-layer", 3, "--resume", "auto", "--steps", 3)
    assert res.exit_code == 1 and "n_layer 3 (checkpoint 2)" in res.output
    res = run_cli(data_dir, "--out", run, "--preset", "igpt-s", "--resume", "auto", "--steps", 3)
    assert res.exit_code == 1 and "n_px" not in res.output  # the image side comes from the data
    for field in ("n_layer 24 (checkpoint 2)", "n_head 8 (checkpoint 2)", "n_embd 512 (checkpoint 32)"):
        assert field in res.output
    res = run_cli(data_dir, "--out", run, "--objective", "bert", "--resume", "auto", "--steps", 3)
    assert res.exit_code == 1 and "objective 'bert' (checkpoint 'ar')" in res.output
    # the preset's default (tiny: 4 layers, 128 wide) is not an explicit flag: the checkpoint's architecture wins
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 3)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(run)["model_config"]["n_layer"] == 2


def test_resume_training_flags_override_and_schedule_continues(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 4, "--ckpt-every", 2).exit_code == 0
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 8, "--lr", "5e-3", "--batch-size", 2,
                  "--log-every", 1)
    assert res.exit_code == 0, res.output
    changed = next(line for line in res.output.splitlines() if line.startswith("changed on resume: "))
    assert set(changed[len("changed on resume: "):].split(", ")) == {
        "steps 4 -> 8", "lr 0.01 -> 0.005", "batch_size 4 -> 2"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["warmup_steps"] == 1  # kept from the checkpoint
    schedule = TrainConfig(data_dir="", out_dir="", steps=8, lr=5e-3, warmup_steps=1)
    rows = {r["step"]: r for r in read_log(run / "log.jsonl") if "loss" in r}
    assert sorted(rows) == list(range(1, 9))
    for step in range(5, 9):  # the cosine of the new horizon, continued from the saved step
        assert rows[step]["lr"] == pytest.approx(lr_at(schedule, step - 1), rel=1e-5)  # log.jsonl keeps 6 digits
    assert rows[4]["lr"] == pytest.approx(lr_at(TrainConfig(data_dir="", out_dir="", steps=4, lr=1e-2,
                                                            warmup_steps=1), 3))
    # a resume without training flags keeps the checkpoint's values, not the CLI defaults (lr 3e-3)
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 9, "--log-every", 1)
    assert res.exit_code == 0 and "lr " not in res.output.split("changed on resume: ")[1].splitlines()[0]
    assert load_checkpoint(run)["train_config"]["lr"] == 5e-3
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--seed", 3)
    assert res.exit_code == 1 and "seed 3 differs" in res.output


def test_divergence_keeps_last_good_checkpoint_and_resume_with_lower_lr_trains_on(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 6, "--ckpt-every", 3).exit_code == 0
    good = load_checkpoint(run)
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 30, "--lr", "1e4", "--ckpt-every", 1)
    assert res.exit_code == 1 and "stopped before updating the weights" in res.output
    assert "Lower --lr" in res.output
    after = load_checkpoint(run)
    rows = [r for r in read_log(run / "log.jsonl") if "loss" in r]
    # no checkpoint ever holds a state whose loss blew up: its step's logged loss is near the good run's
    assert after["step"] >= 6 and rows[after["step"] - 1]["loss"] < 2 * rows[5]["loss"]
    assert all(np.isfinite(v.float().numpy()).all() for v in after["model"].values())
    assert after["step"] < 30
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", after["step"] + 4, "--lr", "1e-3")
    assert res.exit_code == 0, res.output
    final = load_checkpoint(run)
    assert final["step"] == after["step"] + 4
    assert read_log(run / "log.jsonl")[-1]["val_loss"] < good["recent_losses"][0]  # trained on, below ln(16)


def test_checkpoint_is_written_before_the_evaluation_of_its_step(data_dir, tmp_path):
    def failing_eval(run):
        raise OSError("val shards unreachable")

    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(tmp_path), steps=6, batch_size=4, eval_every=3, ckpt_every=3)
    with pytest.raises(OSError, match="unreachable"):
        train(cfg, tcfg, objective=Objective(evaluate=failing_eval), print_fn=lambda *a: None)
    assert load_checkpoint(tmp_path)["step"] == 3


def test_log_is_cut_back_on_resume_and_a_half_written_line_is_tolerated(data_dir, tmp_path):
    run = tmp_path / "run"

    class Killed(Exception):
        pass

    def killed_after_step_5(line):
        if line.startswith("step 5/8 | loss"):
            raise Killed

    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=1, n_head=2, n_embd=16)
    tcfg = TrainConfig(data_dir=data_dir, out_dir=str(run), steps=8, batch_size=4, log_every=1, eval_every=0,
                       ckpt_every=2)
    with pytest.raises(Killed):
        train(cfg, tcfg, print_fn=killed_after_step_5)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 2.7')  # killed mid-write
    assert steps_logged(run) == [1, 2, 3, 4, 5]  # the broken last line is skipped
    train(cfg, tcfg, resume="auto", print_fn=lambda *a: None)
    assert steps_logged(run) == list(range(1, 9))  # rows past the checkpoint (step 4) were dropped first
    assert (run / "loss.png").stat().st_size > 1000
    with open(run / "log.jsonl", "a") as f:
        f.write("not json\n{}\n")
    with pytest.raises(RunLogError, match="line 10 is not JSON"):  # damage before the last line is an error
        read_log(run / "log.jsonl")


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--min-lr", "-inf"),
                                        ("--grad-clip", "nan"), ("--weight-decay", "-1")])
def test_non_finite_numbers_are_usage_errors(data_dir, tmp_path, flag, value):
    res = run_cli(data_dir, "--out", tmp_path / "r", *ARCH, flag, value)
    assert res.exit_code == 2 and flag in res.output
    assert not (tmp_path / "r").exists()
    with pytest.raises(TrainError, match="finite"):
        TrainConfig(data_dir="d", out_dir="o", lr=float("nan"))


def test_resume_auto_finds_the_checkpoint_a_killed_save_left(data_dir, tmp_path):
    """A save killed between its renames left ckpt.prev.pt and a complete ckpt.pt.tmp, no ckpt.pt: before,
    --resume auto found nothing, trained a new run from step 0 and later replaced ckpt.prev.pt."""
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 4, "--ckpt-every", 2).exit_code == 0
    os.replace(run / "ckpt.pt", run / "ckpt.pt.tmp")
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 6)  # no architecture flags: the run's
    assert res.exit_code == 0, res.output
    assert "ckpt.pt.tmp (step 4) is the newest complete checkpoint" in res.output
    assert json.loads((run / "config.json").read_text())["start_step"] == 4
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert load_checkpoint(run)["step"] == 6 and load_checkpoint(run / "ckpt.prev.pt")["step"] == 4
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == ["ckpt.prev.pt", "ckpt.pt"]
    # a temp file the kill cut short is not taken: the previous checkpoint is
    os.replace(run / "ckpt.pt", run / "ckpt.pt.tmp.123.0")
    data = (run / "ckpt.pt.tmp.123.0").read_bytes()
    (run / "ckpt.pt.tmp.123.0").write_bytes(data[: len(data) // 2])
    res = run_cli(data_dir, "--out", run, "--resume", "auto", "--steps", 7)
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["start_step"] == 4
    assert steps_logged(run) == list(range(1, 8))
    assert sorted(n for n in os.listdir(run) if n.startswith("ckpt")) == ["ckpt.prev.pt", "ckpt.pt"]


def test_a_folder_holding_a_run_is_never_started_fresh_silently(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 2).exit_code == 0
    data = (run / "ckpt.pt").read_bytes()
    (run / "ckpt.pt").write_bytes(data[:100])
    res = base(data_dir, run, "--steps", 4, "--resume", "auto")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "holds ckpt.pt, config.json, log.jsonl but no complete checkpoint" in res.output
    assert "--overwrite" in res.output and (run / "ckpt.pt").read_bytes() == data[:100]  # left as it was
    os.remove(run / "ckpt.pt")  # killed before its first checkpoint: a log and a config
    res = base(data_dir, run, "--steps", 4)
    assert res.exit_code == 1 and "already holds a run (config.json, log.jsonl)" in res.output
    assert base(data_dir, run, "--steps", 2, "--overwrite").exit_code == 0
    assert steps_logged(run) == [1, 2]
    assert base(data_dir, tmp_path / "new", "--steps", 1, "--resume", "auto").exit_code == 0  # an empty folder: fresh


def test_resuming_a_weights_only_file_says_what_it_is(data_dir, tmp_path):
    run = tmp_path / "run"
    assert base(data_dir, run, "--steps", 2).exit_code == 0
    res = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "model.pt")])
    assert res.exit_code == 0, res.output
    res = base(data_dir, tmp_path / "again", "--steps", 4, "--resume", tmp_path / "model.pt")
    assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
    assert "holds model weights only" in res.output and str(run / "ckpt.pt") in res.output
    assert "model=model_from_checkpoint" in res.output
