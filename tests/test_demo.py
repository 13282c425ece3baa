"""`igpt-fast demo` end to end on tiny synthetic Fashion-MNIST-style IDX files (two classes: bright top
half or bright bottom half): every stage runs, the summary names the accuracies and the plots, and a
rerun reuses every stage."""
import gzip
import os
import struct

import numpy as np
from click.testing import CliRunner

from igpt_fast.cli import cli


def write_idx(path, array):
    dims = array.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, len(dims)) + struct.pack(f">{len(dims)}I", *dims))
        f.write(array.astype(np.uint8).tobytes())


def write_fashion(folder, rng):
    for prefix, n in [("train", 240), ("t10k", 60)]:
        labels = rng.integers(0, 2, n)
        images = rng.integers(0, 60, (n, 8, 8))
        for i, y in enumerate(labels):
            images[i, 4 * y:4 * y + 4] += 180  # class 0: bright top half, class 1: bright bottom half
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), labels)


def test_demo_end_to_end_and_reuse(tmp_path):
    src = tmp_path / "fashion"
    src.mkdir()
    write_fashion(str(src), np.random.default_rng(0))
    out = tmp_path / "demo"
    args = ["demo", "--src", str(src), "--out", str(out), "--n-px", "4", "--k", "4", "--steps", "6",
            "--batch-size", "8", "--finetune-steps", "20", "--max-train", "150", "--max-eval", "40", "--workers", "1"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]  # progress bars (stderr) may end a line
    summary = lines[[i for i, ln in enumerate(lines) if ln.startswith("demo summary")][0]:]
    assert "palette 4 colours | n_px 4 (n_ctx 16) | train 216, val 24, test 60" in summary[0]
    assert summary[1].startswith("  linear probe  | best layer ") and "chance 0.5000" in summary[1]
    assert summary[2].startswith("  finetune      | val acc ")
    ft_test_acc = float(summary[2].split("test acc ")[1].split()[0])
    assert ft_test_acc >= 0.8  # the halves are easy: far above chance (0.5)
    paths = [ln.split("| ")[1] for ln in summary[3:]]
    assert len(paths) == 5 and all(os.path.isfile(p) for p in paths), paths

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    for expected in ["reusing the existing palette", "already complete", "reusing " + str(out / "run" / "ckpt.pt"),
                     "reusing the existing probe.json", "already finetuned", "reusing the existing completions",
                     "reusing the existing samples"]:
        assert expected in again.output, expected
    assert [ln for ln in again.output.splitlines() if ln.strip()][-8:] == lines[-8:]
