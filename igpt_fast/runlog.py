"""A run folder's log.jsonl (one JSON object per log or eval step) and its loss plot.

The training loop appends rows as it goes; `read_log` skips a half-written last line (a run killed
mid-write) and refuses damage anywhere else; `truncate_log` cuts the log back to a checkpoint's
step when a run resumes (atomic rewrite), so each step appears once; `plot_losses` draws loss.png.
"""
import json
import os

from igpt_fast.errors import IGPTError

__all__ = ["RunLogError", "read_log", "write_text_atomic", "truncate_log", "plot_losses"]


class RunLogError(IGPTError, ValueError):
    """A log.jsonl damaged before its last line."""


def read_log(path):
    """The rows of a log.jsonl; a half-written last line (a run killed mid-write) is skipped."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise RunLogError(f"{path}: line {i + 1} is not JSON; the log is damaged") from None
    return rows


def write_text_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def truncate_log(path, step):
    """Keep the rows of log.jsonl up to `step` (a resumed run re-logs the steps after it)."""
    if os.path.isfile(path):  # rewritten even when no row goes: a half-written last line must not stay
        kept = [r for r in read_log(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(log_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / pixel)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
