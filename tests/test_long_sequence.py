"""Long pixel sequences end to end on CPU through the real command line: 64x64 (T = 4096) and
96x96 (T = 9216) images are tokenized with a tiny palette (`igpt-fast tokenize`), then a narrow model
trains for a few steps with activation checkpointing (`igpt-fast train --grad-checkpoint`). The width
is tiny (2 layers, 32 wide, batch 1) so the test checks the long-T path (positions, attention,
checkpointed backward, loss over T pixels, checkpoint) without the cost of a real model.

The memory tools run as a person runs them: benchmarks/bench_memory.py at a tiny size, then
tools/memory_plan.py, whose activation formula must equal the bytes autograd saves, exactly."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from igpt_fast.checkpoint import load_checkpoint, model_from_checkpoint
from igpt_fast.cli import cli
from igpt_fast.palette import Palette

K = 8  # palette colours
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_images(root, n_px, n=3):
    """n smooth synthetic n_px x n_px RGB images in one class folder: the same two-way colour ramp,
    every other one flipped, so every batch has the same colour histogram (a steady loss signal)."""
    folder = root / "images" / "a"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, n_px)
    for i in range(n):
        r, g = np.meshgrid(ramp, ramp[::-1])
        img = np.stack([r, g, np.full_like(r, 128)], axis=-1)[:: 1 - 2 * (i % 2)]  # (n_px, n_px, 3)
        Image.fromarray(img.round().astype(np.uint8)).save(folder / f"{i}.png")
    return root / "images"


@pytest.mark.parametrize("n_px", [64, 96])
def test_long_sequence_trains_with_grad_checkpoint(n_px, tmp_path, one_thread):
    rng = np.random.default_rng(0)
    Palette(rng.uniform(-1, 1, (K, 3)).astype(np.float32)).save(tmp_path / "palette.npy")
    src = write_images(tmp_path, n_px)
    runner = CliRunner()
    res = runner.invoke(cli, ["tokenize", str(src), "--palette", str(tmp_path / "palette.npy"), "--out",
                              str(tmp_path / "data"), "--n-px", str(n_px), "--workers", "1"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["n_ctx"] == n_px * n_px and meta["splits"]["train"]["samples"] == 3

    run = tmp_path / "run"
    res = runner.invoke(cli, ["train", "--data", str(tmp_path / "data"), "--out", str(run), "--n-px", str(n_px),
                              "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "1",
                              "--steps", "3", "--lr", "1e-2", "--warmup-steps", "1", "--log-every", "1",
                              "--eval-every", "0", "--ckpt-every", "0", "--grad-checkpoint"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["grad_checkpoint"] is True
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(np.log(K), abs=1e-4)  # zero-initialised head: uniform over the palette
    assert losses[-1] < losses[0]  # smooth images: the optimizer makes progress in 2 updates

    model = model_from_checkpoint(load_checkpoint(run)).eval()
    assert model.config.n_ctx == n_px * n_px
    tokens = torch.randint(0, K, (1, n_px * n_px))
    with torch.no_grad():
        logits, loss = model(tokens, tokens)
    assert logits.shape == (1, n_px * n_px, K) and torch.isfinite(loss)


def test_memory_plan_formula_equals_saved_bytes(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)

    res = run("benchmarks/bench_memory.py", "--n-px", "8", "--shapes", "2x32x2", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    res = run("tools/memory_plan.py", "--measured", str(tmp_path / "memory.csv"), "--out", str(tmp_path / "plan.md"))
    assert res.returncode == 0, res.stderr
    saved = [line for line in res.stdout.splitlines() if "| saved for backward" in line]
    assert len(saved) == 2, res.stdout  # fp32 and bf16 autocast
    assert all(line.endswith("| 1.000 |") for line in saved), saved
    assert "| igpt-xl | 64 |" in res.stdout and (tmp_path / "plan.md").read_text() == res.stdout
