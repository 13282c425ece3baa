"""Progress display and console formatting (igpt_fast.progress): the one formatter by metric kind, plain
lines off a terminal (every IGPT_FAST_PROGRESS_SECONDS, always a final line with the total) and a tqdm bar
on one, and `igpt-fast train` run with its output piped to a file: step/total, lr, ETA, the warmup warning."""
import io
import math

import pytest

from igpt_fast.progress import Progress, ProgressError, duration, fmt, interval, line, metric, rate
from sources import run_piped


@pytest.mark.parametrize("name,value,text", [
    ("val_n", 80.0, "80"), ("step", 150, "150"), ("n_test", 64.0, "64"), ("skipped_shards", 2, "2"),
    ("val_acc", 0.1875, "18.75%"), ("train_acc", 1.0, "100.00%"), ("acc", 0.5, "50.00%"), ("mfu", 0.3123, "31.2%"),
    ("lr", 0.00030000000000000003, "0.0003"), ("lr", 0.0028512345, "0.00285"), ("min_lr", 1e-5, "1e-05"),
    ("loss", 3.21, "3.2100"), ("clf_loss", 1.09861228, "1.0986"), ("val_loss", 2.0, "2.0000"),
    ("eta", 785.0, "13m05s"), ("eta", 4.23, "4.2 s"), ("elapsed", 7384.0, "2h03m"), ("seconds", 0.4213, "0.42 s"),
    ("eta", 42.4, "42 s"), ("ms_per_step", 45.123, "45.1"), ("tok_per_s", 123456.0, "1.23e5"),
    ("tok_per_s", 850.4, "850"), ("grad_norm", 0.123456, "0.1235"), ("mfu", None, "-"), ("eta", math.inf, "-"),
    ("loss", float("nan"), "nan"), ("best_step", 20, "20"),
])
def test_fmt_by_kind(name, value, text):
    assert fmt(name, value) == text


def test_metric_line_and_helpers():
    assert metric("ms_per_step", 45.12) == "45.1 ms/step" and metric("tok_per_s", 1.2e5) == "1.2e5 tok/s"
    assert metric("val_acc", 0.1875) == "val_acc 18.75%" and metric("mfu", None) == "mfu -"
    assert line("step 150/1000", loss=3.21, lr=3e-3, ms_per_step=45.1, tok_per_s=1.2e5, mfu=None, eta=785) == (
        "step 150/1000 | loss 3.2100 | lr 0.003 | 45.1 ms/step | 1.2e5 tok/s | mfu - | eta 13m05s")
    assert line(val_acc=0.5, val_n=8.0) == "val_acc 50.00% | val_n 8"
    assert rate(1.0e-5) == "1e-5" and rate(12.34) == "12.3"
    assert duration(60.2) == "1m00s" and duration(3599.6) == "1h00m"


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("IGPT_FAST_PROGRESS_SECONDS", raising=False)
    assert interval() == 20.0
    monkeypatch.setenv("IGPT_FAST_PROGRESS_SECONDS", "2.5")
    assert interval() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("IGPT_FAST_PROGRESS_SECONDS", bad)
        with pytest.raises(ProgressError, match="IGPT_FAST_PROGRESS_SECONDS"):
            interval()


def test_plain_lines_off_a_terminal_with_a_final_line(monkeypatch):
    out = io.StringIO()
    with Progress(10, "work", unit="images", every_s=0, file=out) as bar:
        for _ in range(5):
            bar.update(2, loss=1.5, val_acc=0.25)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 6  # one per update (every_s 0) and the final one
    assert lines[0].startswith("work: 2/10 images (20%) | ") and "| eta " in lines[0]
    assert lines[0].endswith("| loss 1.5000 | val_acc 25.00%")
    assert lines[-1].startswith("work: 10/10 images (100%) | ") and "eta" not in lines[-1]

    quiet = io.StringIO()
    with Progress(None, "count", unit="px", every_s=3600, file=quiet) as bar:
        bar.update(7)
    assert quiet.getvalue().startswith("count: 7 px | ") and quiet.getvalue().count("\n") == 1  # only the final line

    silent = io.StringIO()
    with Progress(3, "off", enabled=False, every_s=0, file=silent) as bar:
        bar.update(3)
    assert silent.getvalue() == ""


def test_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with Progress(4, "sample", unit="px", every_s=0, file=term) as bar:
        for _ in range(4):
            bar.update(1, loss=2.0)
    text = term.getvalue()
    assert "\r" in text and text.count("\n") == 1 and "4/4" in text and "loss 2.0000" in text




def test_cli_train_lines_in_a_log_file(data_dir, tmp_path):
    code, text = run_piped(tmp_path, "train", "--data", data_dir, "--out", tmp_path / "run", "--preset", "tiny",
                           "--n-layer", 1,
                           "--n-head", 2, "--n-embd", 16, "--steps", 6, "--batch-size", 4, "--log-every", 2,
                           "--eval-every", 0, "--eval-batches", 1)
    assert code == 0, text
    assert "\r" not in text
    warning = [ln for ln in text.splitlines() if ln.startswith("warning: warmup_steps")]
    assert warning == ["warning: warmup_steps 100 >= steps 6: the learning rate only ramps up to 0.00018 (peak --lr "
                       "0.003) and never decays; lower --warmup-steps"]
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    steps = [ln for ln in lines if " | loss " in ln]
    assert lines[-1].startswith("step 6/6 | val_loss ")  # the final evaluation
    assert [ln.split(" | ")[0] for ln in steps] == ["step 2/6", "step 4/6", "step 6/6"]
    parts = steps[0].split(" | ")
    assert parts[2] == "lr 6e-05" and parts[3].endswith(" ms/step") and parts[4].endswith(" tok/s")
    assert parts[5] == "mfu -" and parts[6].startswith("eta ")
    assert "done | step 6 | val_loss " in text and f"{tmp_path / 'run' / 'ckpt.pt'}" in text


def test_no_final_line_when_the_work_fails_before_it_starts():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(4, "sample", unit="px", every_s=3600, file=out):
            raise RuntimeError("refused")
    assert out.getvalue() == ""
    with pytest.raises(RuntimeError):
        with Progress(4, "sample", unit="px", every_s=3600, file=out) as bar:
            bar.update(1)
            raise RuntimeError("stopped")
    assert out.getvalue().startswith("sample: 1/4 px (25%) | ")  # how far it got
