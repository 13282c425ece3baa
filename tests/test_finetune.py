"""Finetuning tests on tiny label-dependent shards written here: accuracy far above chance (AR with
L_GEN, AR without it, BERT), outputs in RUN/finetune, early stopping, interrupted + resumed runs equal
to a straight run, the early-stopping state rebuilt from log.jsonl, the final scoring on the run's device
(--device), and the CLI (run and errors; `--config OUT/config.json` repeating a run, flags overriding it, and
its bad inputs as one line each)."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from igpt_fast.cli import cli
from igpt_fast.checkpoint import CheckpointError, load_checkpoint
from igpt_fast.finetune import EarlyStopping, FinetuneConfig, finetune as finetune_run, finetune_config
from igpt_fast.model import GPTConfig
from igpt_fast.train import TrainConfig, train
from shards import N_PX, N_VOCAB, write_dataset
from sources import run_piped

N_CLASSES = 3
QUIET = dict(print_fn=lambda *a: None)


def label_samples(n, rng):
    """Class k draws its pixels from colours 5k .. 5k+4 in a class-specific layout (k=0: horizontal
    stripes, 1: vertical stripes, 2: checkerboard), so the label is in the image."""
    yy, xx = np.mgrid[:N_PX, :N_PX]
    patterns = [yy % 2, xx % 2, (yy + xx) % 2]
    for _ in range(n):
        label = int(rng.integers(0, N_CLASSES))
        a, b = 5 * label + rng.choice(5, 2, replace=False)
        yield np.where(patterns[label] == 1, a, b).reshape(-1), label  # (n_ctx,)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shared tiny dataset's layout with label_samples' images, more of them, and no class names."""
    return write_dataset(tmp_path_factory.mktemp("data"), label_samples,
                         (("train", 128, 32), ("val", 64, 32), ("test", 64, 32)), class_names=None)


def finetune(run, data_dir, out_dir=None, gen_weight=1.0, patience=3, max_eval=None, resume=None, print_fn=print,
             **train_kw):
    """finetune with finetune_config's defaults for the training fields given as keywords."""
    tcfg = finetune_config(data_dir, out_dir, **train_kw)
    fcfg = FinetuneConfig(gen_weight=gen_weight, patience=patience, max_eval=max_eval)
    return finetune_run(run, tcfg, fcfg, resume=resume, print_fn=print_fn)


def pretrain(data_dir, run, objective="ar", lr=1e-2):
    cfg = GPTConfig(n_px=N_PX, n_vocab=N_VOCAB, n_layer=2, n_head=2, n_embd=32, objective=objective)
    train(cfg, TrainConfig(data_dir=data_dir, out_dir=str(run), steps=4, batch_size=8, lr=lr, warmup_steps=1,
                           eval_every=0, eval_batches=1, ckpt_every=0), **QUIET)
    return str(run)


@pytest.fixture(scope="module")
def ar_run(data_dir, tmp_path_factory):
    return pretrain(data_dir, tmp_path_factory.mktemp("ar") / "run")


def rows(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


FAST = dict(steps=30, batch_size=16, lr=1e-2, warmup_steps=3, eval_every=10, eval_batches=0, patience=0, log_every=1)


@pytest.mark.parametrize("objective,gen_weight", [("ar", 1.0), ("ar", 0.0), ("bert", 0.5)])
def test_finetune_beats_chance(data_dir, ar_run, tmp_path, objective, gen_weight):
    run = ar_run if objective == "ar" else pretrain(data_dir, tmp_path / "run", "bert")
    out = str(tmp_path / f"ft-{objective}-{gen_weight}")
    res = finetune(run, data_dir, out_dir=out, gen_weight=gen_weight, **FAST, **QUIET)
    assert res["n_classes"] == N_CLASSES and res["n_val"] == 64 and res["n_test"] == 64
    assert res["val_acc"] >= 0.9 and res["test_acc"] >= 0.9  # chance is 1/3
    assert res["val_acc"] == res["best_val_acc_during_training"]  # the saved best model is what was scored
    assert res["steps_run"] == 30 and not res["stopped_early"]
    for name in ("ckpt.pt", "best.pt", "log.jsonl", "finetune.json", "loss.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    train_rows = [r for r in rows(out) if "loss" in r]
    assert all(("gen_loss" in r) == (gen_weight > 0) for r in train_rows)
    assert all(r["lr"] <= 1e-2 for r in train_rows)
    best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["model_config"]["n_classes"] == N_CLASSES and best["model_config"]["objective"] == objective
    assert best["extra"]["step"] == res["best_step"]


def test_default_out_dir_and_lower_lr(data_dir, ar_run):
    res = finetune(ar_run, data_dir, steps=2, batch_size=8, eval_every=0, eval_batches=1, **QUIET)
    assert os.path.dirname(res["best"]) == os.path.join(os.path.abspath(ar_run), "finetune")
    assert res["lr"] == pytest.approx(1e-3)  # pretraining LR / 10


def test_best_is_scored_on_the_runs_device(data_dir, ar_run, tmp_path, monkeypatch):
    # a machine with a GPU (faked) and a run on --device cpu: the final scoring of best.pt stays on cpu too
    import igpt_fast.finetune as ft
    from igpt_fast.train import RunOptions
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.zeros(16, dtype=torch.uint8))
    devices = []
    real = ft.accuracy

    def accuracy(model, *args, **kw):  # during training and in the final scoring
        devices.append(next(model.parameters()).device)
        return real(model, *args, **kw)

    monkeypatch.setattr(ft, "accuracy", accuracy)
    tcfg = finetune_config(data_dir, str(tmp_path / "ft"), steps=2, batch_size=8, eval_every=0, eval_batches=1)
    res = finetune_run(ar_run, tcfg, FinetuneConfig(max_eval=8), RunOptions(device="cpu"), **QUIET)
    assert res["n_val"] == 8 and res["n_test"] == 8
    assert devices and all(d.type == "cpu" for d in devices)


def test_early_stopping_stops_and_keeps_the_best(data_dir, ar_run, tmp_path):
    # lr ~ 0: the zero-initialised head predicts class 0 for everything, so val accuracy never improves
    out = str(tmp_path / "ft")
    res = finetune(ar_run, data_dir, out_dir=out, steps=100, batch_size=8, lr=1e-12, warmup_steps=0, eval_every=2,
                   eval_batches=2, patience=2, log_every=1, **QUIET)
    assert res["stopped_early"] and res["steps_run"] == 6 and res["best_step"] == 2
    assert [r["step"] for r in rows(out) if "val_acc" in r] == [2, 4, 6]


class Interrupt(Exception):
    pass


def test_resume_gives_identical_results(data_dir, ar_run, tmp_path):
    kw = dict(FAST, steps=12, eval_every=4, patience=2, max_eval=32)
    straight = finetune(ar_run, data_dir, out_dir=str(tmp_path / "straight"), **kw, **QUIET)

    def crash_at_step_6(line):
        if line.startswith("step 6/12 | loss"):
            raise Interrupt  # after the checkpoint of step 4 and the log row of step 6

    with pytest.raises(Interrupt):
        finetune(ar_run, data_dir, out_dir=str(tmp_path / "split"), **kw, print_fn=crash_at_step_6)
    assert not os.path.exists(tmp_path / "split" / "finetune.json")
    resumed = finetune(ar_run, data_dir, out_dir=str(tmp_path / "split"), resume="auto", **kw, **QUIET)
    for key in ("val_acc", "test_acc", "best_step", "steps_run", "best_val_acc_during_training"):
        assert resumed[key] == straight[key], key
    a = {r["step"]: r["loss"] for r in rows(tmp_path / "straight") if "loss" in r}
    b = {r["step"]: r["loss"] for r in rows(tmp_path / "split") if "loss" in r}  # last row of a step wins
    assert a == b and sorted(a) == list(range(1, 13))
    sa = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    sb = load_checkpoint(tmp_path / "split" / "best.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    again = finetune(ar_run, data_dir, out_dir=str(tmp_path / "split"), resume="auto", **kw, **QUIET)
    assert again == resumed  # a finished run is returned, not retrained


def test_early_stopping_state_is_rebuilt_from_the_log(tmp_path):
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, acc in [(2, 0.5), (4, 0.7), (6, 0.6), (8, 0.9), (6, 0.65)]:  # step 6 re-logged after a resume
            f.write(json.dumps({"step": step, "val_acc": acc}) + "\n")
    saved = []

    def save(run, path, extra):
        saved.append(extra)

    class At:  # the one field of train.Run the stopper reads
        def __init__(self, step):
            self.step = step

    stopper = EarlyStopping(str(tmp_path), patience=3, save_fn=save)
    assert not stopper(At(8), {"val_acc": 0.6})  # history: 2, 4, 6 only
    assert (stopper.best_acc, stopper.best_step, stopper.bad) == (0.7, 4, 2)
    assert stopper(At(10), {"val_acc": 0.7})
    assert saved == []
    fresh = EarlyStopping(str(tmp_path), patience=3, resumed=False, save_fn=save)  # a fresh run ignores an old log
    assert not fresh(At(8), {"val_acc": 0.6})
    assert (fresh.best_acc, fresh.best_step, fresh.bad, saved) == (0.6, 8, 0, [{"val_acc": 0.6, "step": 8}])


def test_missing_pretrained_checkpoint(data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="igpt-fast train"):
        finetune(str(tmp_path), data_dir, **QUIET)
    res = CliRunner().invoke(cli, ["finetune", str(tmp_path), "--data", data_dir])
    assert res.exit_code == 1
    assert "ckpt.pt not found" in res.output and "igpt-fast train" in res.output


def test_cli_finetune(data_dir, ar_run, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", ar_run, "--data", data_dir, "--out", str(out), "--steps", "20", "--batch-size", "16",
            "--lr", "1e-2", "--eval-every", "10", "--eval-batches", "0", "--gen-weight", "0.5"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["gen_weight"] == 0.5 and summary["test_acc"] >= 0.9
    assert res.output.strip().splitlines()[-1].startswith("done | val acc ")
    res = CliRunner().invoke(cli, args + ["--resume", "auto"])
    assert res.exit_code == 0 and "already finetuned" in res.output


def test_cli_finetune_lines_in_a_log_file(data_dir, tmp_path):
    """Output piped to a file: step lines carry step/total, the combined loss, clf_loss, gen_loss, train_acc
    in % and lr; eval lines val_acc in % and val_n as a count; the LR (pretraining 3e-3 / 10) is 0.0003 in
    finetune.json and every jsonl lr is rounded; loss.png has two panels; paths print as given."""

    from PIL import Image

    pretrain(data_dir, tmp_path / "run", lr=3e-3)
    code, text = run_piped(tmp_path, "finetune", "run", "--data", data_dir, "--steps", "8", "--batch-size", "16",
                           "--eval-every", "4", "--eval-batches", "1", "--log-every", "4", cwd=tmp_path)
    assert code == 0, text
    assert "\r" not in text
    steps = [ln.split(" | ") for ln in text.splitlines() if ln.startswith("step 4/8 | ") or ln.startswith("step 8/8 | ")]
    train_lines = [p for p in steps if p[1].startswith("loss ")]
    eval_lines = [p for p in steps if p[1].startswith("val_acc ")]
    assert len(train_lines) == 2 and len(eval_lines) == 2, text
    for parts in train_lines:
        names = [p.split()[0] for p in parts[1:6]]
        assert names == ["loss", "clf_loss", "gen_loss", "train_acc", "lr"], parts
        assert parts[4].endswith("%") and len(parts[2].split()[1].split(".")[1]) == 4
    for parts in eval_lines:
        assert parts[1].endswith("%") and parts[2] == "val_n 16", parts
    out = tmp_path / "run" / "finetune"
    assert json.loads((out / "finetune.json").read_text())["lr"] == 0.0003
    for r in rows(str(out)):
        if "lr" in r:
            assert r["lr"] == float(f"{r['lr']:.6g}")
    w, h = Image.open(out / "loss.png").size
    assert w > 2 * h  # two panels side by side: losses, accuracy
    done = text.strip().splitlines()[-1]
    assert done.startswith("done | val acc ") and done.split()[4].endswith("%"), done
    assert done.endswith(f" | {os.path.join('run', 'finetune', 'best.pt')} | "
                         f"{os.path.join('run', 'finetune', 'finetune.json')}")


FT_FLAGS = ["--steps", "4", "--batch-size", "8", "--lr", "5e-3", "--eval-every", "2", "--eval-batches", "1",
            "--gen-weight", "0.5", "--patience", "0", "--max-eval", "16", "--seed", "3", "--log-every", "2"]


def cli_run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def finetuned(data_dir, ar_run, tmp_path_factory):
    """A 4-step CLI finetune of ar_run with non-default flags: its OUT folder."""
    out = tmp_path_factory.mktemp("ft") / "first"
    res = cli_run("finetune", ar_run, "--data", data_dir, "--out", out, *FT_FLAGS)
    assert res.exit_code == 0, res.output
    return out


def test_cli_finetune_config_repeats_a_run(finetuned, ar_run, tmp_path):
    """OUT/config.json records the finetune section; `finetune --config OUT/config.json --out OUT2` repeats
    the run bit for bit: the same settings, the same best model, the same scores."""
    again = tmp_path / "again"
    res = cli_run("finetune", "--config", finetuned / "config.json", "--out", again)
    assert res.exit_code == 0, res.output
    a, b = (json.loads((out / "config.json").read_text()) for out in (finetuned, again))
    assert a["finetune"] == {"run": os.path.join(ar_run, "ckpt.pt"), "gen_weight": 0.5, "patience": 0,
                             "max_eval": 16, "n_classes": None}
    assert a["train"].pop("out_dir") != b["train"].pop("out_dir")
    assert a == b
    assert (a["train"]["steps"], a["train"]["lr"], a["train"]["seed"], a["train"]["eval_every"]) == (4, 5e-3, 3, 2)
    first, second = (torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"]
                     for out in (finetuned, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    ra, rb = (json.loads((out / "finetune.json").read_text()) for out in (finetuned, again))
    assert {k: ra[k] for k in ("val_acc", "test_acc", "n_val", "best_step", "steps_run")} == \
        {k: rb[k] for k in ("val_acc", "test_acc", "n_val", "best_step", "steps_run")}


def test_cli_finetune_flags_override_the_config_and_yaml_reads_the_same(finetuned, tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = json.loads((finetuned / "config.json").read_text())
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = cli_run("finetune", "--config", path, "--out", tmp_path / "other", "--gen-weight", "0", "--steps", "2")
    assert res.exit_code == 0, res.output
    other = json.loads((tmp_path / "other" / "config.json").read_text())
    assert other["finetune"] == {**cfg["finetune"], "gen_weight": 0.0}
    assert other["train"]["steps"] == 2
    assert {k: v for k, v in other["train"].items() if k not in ("steps", "out_dir")} == \
        {k: v for k, v in cfg["train"].items() if k not in ("steps", "out_dir")}
    assert json.loads((tmp_path / "other" / "finetune.json").read_text())["steps_run"] == 2


def test_cli_finetune_config_errors_are_one_line(finetuned, ar_run, tmp_path):
    cfg = json.loads((finetuned / "config.json").read_text())

    def error(verb, config):
        res = cli_run(verb, "--config", config, "--out", tmp_path / "never")
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert not os.path.exists(tmp_path / "never")
        return res.output.strip()

    assert error("finetune", os.path.join(ar_run, "config.json")).startswith(
        f"Error: --config {os.path.join(ar_run, 'config.json')}: not a finetune run's config (no 'finetune' section)")
    assert error("train", finetuned / "config.json").endswith(
        "a finetune run's config (it has a 'finetune' section); pass it to `igpt-fast finetune --config`")
    bad = tmp_path / "bad.json"
    cases = [("finetune", "gen_weigth", 1, "unknown finetune setting 'gen_weigth'"),
             ("train", "stepz", 3, "unknown train setting 'stepz'"),
             (None, "tensorbaord", True, "unknown setting 'tensorbaord'"),
             ("train", "steps", 2.5, "--steps 2.5 is not an integer"),
             ("train", "steps", [4], "--steps [4] is not an integer"),
             ("train", "steps", None, "--steps null is not an integer"),
             ("train", "steps", 0, "--steps 0: 0 is not in the range x>=1."),
             ("finetune", "gen_weight", "abc", "--gen-weight \"abc\": 'abc' is not a number"),
             (None, "tensorboard", "yes", "--tensorboard \"yes\" is not true or false"),
             ("finetune", "run", 5, "RUN 5 is not a string"),
             ("train", "weight_decay", 0.1, "train weight_decay 0.1 cannot be set on the command line (finetune uses "
                                             "0.0); finetune with the library (igpt_fast.finetune)")]
    for section, key, value, message in cases:
        broken = json.loads(json.dumps(cfg))
        (broken if section is None else broken[section])[key] = value
        bad.write_text(json.dumps(broken))
        assert error("finetune", bad) == f"Error: --config {bad}: {message}"


def test_a_finetune_records_its_config_when_it_starts(data_dir, ar_run, tmp_path, monkeypatch):
    """The finetune section is written with the rest of config.json when the run starts, so a run that dies
    in its first step (killed, crashed) can still be repeated with --config."""
    import igpt_fast.train as train_module

    def crash(run, objective, started):
        raise RuntimeError("died in its first step")

    monkeypatch.setattr(train_module, "_loop", crash)
    with pytest.raises(RuntimeError, match="first step"):
        finetune(ar_run, data_dir, out_dir=str(tmp_path / "ft"), steps=1, batch_size=8, eval_batches=1,
                 gen_weight=0.0, **QUIET)
    section = json.loads((tmp_path / "ft" / "config.json").read_text())["finetune"]
    assert section["gen_weight"] == 0.0 and section["run"] == ar_run
