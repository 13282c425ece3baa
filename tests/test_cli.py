"""The command line's one vocabulary: shards are `--data DIR` on every verb that reads them, worker
processes `--workers`, every verb that runs a model takes `--device`; the previous release's spellings
(`train DATA_DIR`, `verify DATA_DIR`, `--num-workers`, `sample RUN --images a.png`) still work, hidden,
each with a one-line note on stderr. `train --config RUN/config.json` repeats a run bit for bit, flags
overriding the file; `--tensorboard` writes log.jsonl's scalars as event files; an IDX labels file given
to tokenize says how labels are paired with their images."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from igpt_fast.cli import cli
from igpt_fast.errors import TrainError
from igpt_fast.palette import Palette
from igpt_fast.readers import TokenizeError, list_sources
from igpt_fast.train import RunOptions, run_device

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--batch-size", "4", "--eval-every", "0",
        "--eval-batches", "1", "--log-every", "1"]
MODEL_VERBS = {"train", "finetune", "probe", "sample", "demo"}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def notes(text):
    return [ln for ln in text.splitlines() if ln.startswith("note: ")]


def params(command):
    return {p.name: p for p in command.params}


def test_every_verb_speaks_one_vocabulary():
    verbs = {**cli.commands}
    assert MODEL_VERBS <= set(verbs)
    for name, command in verbs.items():
        visible = {opt for p in command.params if not getattr(p, "hidden", False) for opt in p.opts}
        assert "--num-workers" not in visible and "--images" not in visible, name
        ps = params(command)
        if "impl" in ps or name in MODEL_VERBS:  # runs a model
            assert "--device" in ps["device"].opts, name
        if "workers" in ps:
            assert ps["workers"].opts == ["--workers"], name
        if "data_dir" in ps:  # reads token shards
            assert ps["data_dir"].opts == ["--data"], name
    for name in ("train", "verify", "probe", "finetune", "sample"):
        assert "data_dir" in params(verbs[name]), name
    for name in ("train", "finetune", "palette", "tokenize", "demo"):
        assert "workers" in params(verbs[name]), name
    for name in ("train", "verify"):  # the old positional DATA_DIR is left out of the usage line
        assert "DATA_DIR" not in invoke(name, "--help").output


def test_top_level_help_names_every_verb_in_one_line():
    lines = {ln.split()[0]: ln for ln in invoke("--help").output.splitlines() if ln.startswith("  ")}
    assert lines["tokenize"].split(None, 1)[1] == "Quantize images (folders, CIFAR, IDX, tars) into token shards."
    assert lines["train"].split(None, 1)[1] == "Pretrain an Image GPT on the token shards in --data DIR."


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A 3-step tiny run trained with --data and non-default training flags."""
    out = tmp_path_factory.mktemp("runs") / "first"
    res = invoke("train", "--data", data_dir, "--out", out, *TINY, "--steps", 3, "--lr", "1e-3", "--warmup-steps", 1,
                 "--seed", 3, "--grad-clip", "0.5")
    assert res.exit_code == 0, res.output
    assert notes(res.stderr) == []
    return out


def test_old_spellings_still_work_with_a_note(data_dir, run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IGPT_FAST_PROGRESS_SECONDS": "0"}
    old = tmp_path / "old"
    proc = subprocess.run([sys.executable, "-m", "igpt_fast.cli", "train", str(data_dir), "--out", str(old), *TINY,
                           "--steps", "1", "--num-workers", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(notes(proc.stderr)) == [
        "note: --num-workers is deprecated and goes in the next release; use --workers",
        "note: `igpt-fast train DATA_DIR` is deprecated and goes in the next release; use "
        "`igpt-fast train --data DATA_DIR`"]
    assert not notes(proc.stdout) and proc.stdout.splitlines()[-1].startswith("done | step 1 |")
    with open(old / "config.json") as f:
        train = json.load(f)["train"]
    assert train["num_workers"] == 1 and train["data_dir"] == str(data_dir)

    res = invoke("verify", data_dir)
    assert res.exit_code == 0 and res.stdout.startswith("train: ")
    assert notes(res.stderr) == ["note: `igpt-fast verify DATA_DIR` is deprecated and goes in the next release; use "
                                 "`igpt-fast verify --data DATA_DIR`"]

    from PIL import Image
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(png)
    res = invoke("sample", run, "--images", png, "--samples-per-image", 1, "--out", tmp_path / "s", "--rows", 1)
    assert res.exit_code == 0, res.output
    assert notes(res.stderr) == ["note: --images is not needed and goes in the next release: image files after RUN "
                                 "are completed (igpt-fast sample RUN a.png b.png)"]
    assert os.path.isfile(tmp_path / "s" / "completions.png")


def test_old_and_new_spelling_together_is_a_usage_error(data_dir, tmp_path):
    res = invoke("train", data_dir, "--data", data_dir, "--out", tmp_path / "r", *TINY, "--steps", 1)
    assert res.exit_code == 2 and "give `igpt-fast train --data DATA_DIR` only" in res.output
    res = invoke("train", "--data", data_dir, "--out", tmp_path / "r", "--workers", 0, "--num-workers", 0)
    assert res.exit_code == 2 and "--num-workers and --workers are the same setting" in res.output
    res = invoke("train", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "Missing option '--data'" in res.output
    res = invoke("verify")
    assert res.exit_code == 2 and "Missing option '--data'" in res.output


def test_device_on_train(data_dir, tmp_path):
    res = invoke("train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--steps", 1, "--device", "cpu")
    assert res.exit_code == 0, res.output
    with open(tmp_path / "r" / "config.json") as f:
        assert json.load(f)["device"] == "cpu"
    if not torch.cuda.is_available():
        res = invoke("train", "--data", data_dir, "--out", tmp_path / "r2", "--device", "cuda")
        assert res.exit_code == 2 and "CUDA is not available here; use --device cpu" in res.output


def test_run_device_in_a_process_group(monkeypatch):
    assert run_device(RunOptions(), torch.device("cpu")) == torch.device("cpu")
    assert run_device(RunOptions(device="cuda:1"), torch.device("cpu")) == torch.device("cuda:1")  # one process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    assert run_device(RunOptions(device="cuda"), torch.device("cuda:3")) == torch.device("cuda:3")  # the local rank's
    with pytest.raises(TrainError, match="leave out --device"):
        run_device(RunOptions(device="cpu"), torch.device("cuda:0"))
    with pytest.raises(TrainError, match="leave out --device"):
        run_device(RunOptions(device="cuda:1"), torch.device("cuda:0"))


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_config_repeats_a_run_bit_for_bit(run, tmp_path):
    again = tmp_path / "again"
    res = invoke("train", "--config", run / "config.json", "--out", again)
    assert res.exit_code == 0, res.output
    first, second = _weights(run / "ckpt.pt"), _weights(again / "ckpt.pt")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    with open(run / "config.json") as f:
        a = json.load(f)
    with open(again / "config.json") as f:
        b = json.load(f)
    assert a["train"].pop("out_dir") != b["train"].pop("out_dir")
    assert a == b
    assert a["train"]["lr"] == 1e-3 and a["train"]["seed"] == 3 and a["model"]["n_embd"] == 16


def test_flags_override_the_config_and_yaml_reads_the_same(run, tmp_path):
    yaml = pytest.importorskip("yaml")
    with open(run / "config.json") as f:
        cfg = json.load(f)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = invoke("train", "--config", path, "--out", tmp_path / "other", "--lr", "2e-3", "--steps", 2)
    assert res.exit_code == 0, res.output
    with open(tmp_path / "other" / "config.json") as f:
        other = json.load(f)
    assert other["train"]["lr"] == 2e-3 and other["train"]["steps"] == 2
    assert {k: v for k, v in other["train"].items() if k not in ("lr", "steps", "out_dir")} == \
        {k: v for k, v in cfg["train"].items() if k not in ("lr", "steps", "out_dir")}
    assert other["model"] == cfg["model"]


def test_config_errors_are_one_line(run, tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": 3}))
    res = invoke("train", "--config", bad)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"Error: --config {bad}: not a run's config (no 'model' and 'train' sections); pass the config.json that "
        "`igpt-fast train` wrote into its run folder"]
    for cfg, message in (({"model": {}, "train": {"steps": [3]}}, "--steps [3] is not an integer"),
                         ({"model": {}, "train": {}, "compiled": True}, "unknown setting 'compiled'")):
        bad.write_text(json.dumps(cfg))
        res = invoke("train", "--config", bad)
        assert res.exit_code == 1 and res.output.strip().splitlines() == [f"Error: --config {bad}: {message}"]
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML not installed
    path = tmp_path / "run.yml"
    path.write_text("model: {}\ntrain: {}\n")
    res = invoke("train", "--config", path)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "PyYAML" in res.output


def test_tensorboard_writes_the_logged_scalars(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    res = invoke("train", "--data", data_dir, "--out", out, *TINY, "--steps", 3, "--tensorboard")
    assert res.exit_code == 0, res.output
    assert any(name.startswith("events.out.tfevents.") for name in os.listdir(out / "tb"))
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    with open(out / "log.jsonl") as f:
        rows = [json.loads(ln) for ln in f]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    assert {"loss", "lr", "ms_per_step", "tok_per_s", "val_loss"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_is_one_line(data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    res = invoke("train", "--data", data_dir, "--out", tmp_path / "r", *TINY, "--steps", 1, "--tensorboard")
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        "Error: TensorBoard logging (--tensorboard) needs the tensorboard package: pip install tensorboard"]
    assert not os.path.exists(tmp_path / "r")


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_an_idx_labels_file_given_as_images_says_how_labels_pair(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 4, 4)), np.arange(6) % 3
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "images.idx.gz", images)
    _write_idx(tmp_path / "labels.idx.gz", labels)
    Palette(rng.uniform(-1, 1, (4, 3)).astype(np.float32)).save(tmp_path / "palette.npy")

    res = invoke("tokenize", tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz",
                 "--palette", tmp_path / "palette.npy", "--out", tmp_path / "data", "--n-px", 4)
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"Error: {tmp_path}/train-labels-idx1-ubyte.gz is the labels file (6 labels) of "
        f"{tmp_path}/train-images-idx3-ubyte.gz: pass only the images file, tokenize reads its labels from this file"]
    with pytest.raises(TokenizeError, match="labels.idx.gz is an IDX labels file .6 labels., not images: tokenize "
                                            "reads the labels of X-images-idx3-ubyte"):
        list_sources([str(tmp_path / "images.idx.gz"), str(tmp_path / "labels.idx.gz")])
    (listing,), _ = list_sources([str(tmp_path / "images.idx.gz")])  # IDX images under any name
    assert listing.format == "idx" and len(listing.items["train"]) == 6
    (listing,), _ = list_sources([str(tmp_path / "train-images-idx3-ubyte.gz")])
    assert [it.label for it in listing.items["train"]] == labels.tolist()
