"""How the long verbs report themselves: the progress display and the formatting of every console number.

One concept, used by every verb (tokenize, palette sampling, probe, sample, train, finetune): a person
watching a terminal, or reading a log file the next morning, sees the same numbers written the same way.

- `Progress(total, desc, unit)`: on a terminal (the stream, stderr by default, is a tty) a tqdm bar;
  anywhere else (a log file, a pipe, CI) plain lines, no carriage returns, at most one every
  `interval()` seconds (IGPT_FAST_PROGRESS_SECONDS, default 20; 0 prints every update), and always a
  final line when it closes:
  `features train: 640/1000 images (64%) | 120 images/s | 5.3 s elapsed | eta 3.0 s | loss 2.1234`.
- `fmt(name, value)`: a value formatted by the kind its name says: counts as integers (`val_n 80`),
  accuracies and MFU in % (`val_acc 18.75%`), learning rates in 3 significant digits (`lr 0.0003`),
  losses with 4 decimals (`clf_loss 1.0986`), durations in s / min / h (`eta 12m05s`), rates in 3
  significant digits (`1.2e5`), None as `-`.
- `metric(name, value)` is one `name value` segment (`45.1 ms/step` and `1.2e5 tok/s` carry their
  unit instead of their name) and `line(head, **metrics)` joins segments with ` | `, the layout of
  every log line: `step 150/1000 | loss 3.2100 | lr 0.00285 | 45.1 ms/step | 1.2e5 tok/s | mfu - | eta 12m05s`.
"""
import math
import os
import sys
import time

from igpt_fast.errors import ProgressError

__all__ = ["ProgressError", "ENV", "DEFAULT_SECONDS", "interval", "duration", "rate", "fmt", "metric", "line",
           "Progress"]

ENV = "IGPT_FAST_PROGRESS_SECONDS"
DEFAULT_SECONDS = 20.0
COUNTS = ("step", "steps", "samples", "skipped_shards", "epoch")  # integers whatever their type
UNITS = {"ms_per_step": "ms/step", "tok_per_s": "tok/s", "px_per_s": "px/s", "img_per_s": "img/s"}


def interval():
    """Seconds between plain progress lines: IGPT_FAST_PROGRESS_SECONDS, default DEFAULT_SECONDS."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ProgressError(f"{ENV}={text!r}: give the seconds between progress lines as a number >= 0")
    return seconds


def duration(seconds):
    """Seconds in a unit a person reads at a glance: '0.42 s', '4.2 s', '42 s', '13m05s', '2h03m'."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds)) // 60
    if minutes < 60:
        return f"{minutes}m{int(round(seconds)) % 60:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def rate(value):
    """A throughput in 3 significant digits, exponents written short: 850, 12.3, 1.23e5."""
    text = f"{value:.3g}"
    return text.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def _kind(name):
    if name in UNITS:
        return "unit"
    if name == "mfu" or name.endswith("acc") or "_acc_" in name or name.startswith("acc_"):
        return "percent"
    if name == "lr" or name.endswith("_lr"):
        return "lr"
    if name == "loss" or name.endswith("_loss"):
        return "loss"
    if name in COUNTS or name.endswith("_n") or name.startswith("n_"):
        return "count"
    if name in ("eta", "elapsed", "seconds") or name.endswith("_s") or name.endswith("_seconds"):
        return "time"
    return "number"


def fmt(name, value):
    """value formatted by the kind of metric `name` is (see the module docstring)."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    value = float(value) if not isinstance(value, int) else value
    kind = _kind(name)
    if kind == "time":
        return duration(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "count" or (isinstance(value, int) and kind == "number"):
        return str(int(round(value)))
    if kind == "percent":
        return f"{100 * value:.{1 if name == 'mfu' else 2}f}%"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "unit":
        return f"{value:.1f}" if name.startswith("ms") else rate(value)
    return f"{value:.4g}"


def metric(name, value):
    """One segment of a console line: 'name value', or 'value unit' for the metrics in UNITS."""
    if name in UNITS:
        return f"{fmt(name, value)} {UNITS[name]}"
    return f"{name} {fmt(name, value)}"


def line(head=None, **metrics):
    """'head | name value | ...': every console line of the verbs is built here."""
    return " | ".join(([head] if head else []) + [metric(k, v) for k, v in metrics.items()])


class Progress:
    """One display of a long loop (see the module docstring): update(n, **metrics) after each piece of
    work, close() (or leave the `with` block) at the end. total None: no percentage or ETA. enabled
    False shows nothing. every_s: seconds between plain lines (default `interval()`). file: the stream,
    sys.stderr (looked up when the display is made) by default."""

    def __init__(self, total, desc, unit="it", enabled=True, every_s=None, file=None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.file = file if file is not None else sys.stderr
        self.every_s = interval() if every_s is None else every_s
        self.done, self.metrics, self.bar, self.closed = 0, {}, None, False
        if enabled and self.file.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, dynamic_ncols=True)
        self.t0 = self.last = time.monotonic()

    def describe(self, desc):
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description_str(desc)

    def update(self, n=1, **metrics):
        self.done += n
        self.metrics.update(metrics)
        if self.bar is not None:
            if metrics:
                self.bar.set_postfix_str(line(**self.metrics), refresh=False)
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line(final=False)

    def text(self, final=False):
        """The plain line of the display as it stands."""
        elapsed = time.monotonic() - self.t0
        speed = self.done / elapsed if elapsed > 0 else float("nan")
        head = f"{self.desc}: {self.done}"
        if self.total:
            head += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            head += f" {self.unit}"
        parts = [head, f"{rate(speed)} {self.unit}/s" if math.isfinite(speed) else None,
                 f"{duration(elapsed)} elapsed"]
        if not final and self.total:
            parts.append(f"eta {duration((self.total - self.done) / speed) if speed > 0 else '-'}")
        return line(" | ".join(p for p in parts if p), **self.metrics)

    def _line(self, final):
        self.last = time.monotonic()
        print(self.text(final), file=self.file, flush=True)

    def close(self, failed=False):
        """End the display: the bar closes, or the final line is printed (not when `failed` before any work:
        the error says enough)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and not (failed and self.done == 0):
            self._line(final=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)
