"""A run folder's log.jsonl (one JSON object per log or eval step), its loss plot, and its lock.

The training loop appends rows as it goes; `read_log` skips a half-written last line (a run killed
mid-write) and refuses damage anywhere else; `truncate_log` cuts the log back to a checkpoint's
step when a run resumes (atomic rewrite), so each step appears once; `plot_losses` draws loss.png
(a finetuning run's with a loss panel, L_CLF and L_GEN, and an accuracy panel in %).

One writer per run folder: `RunLock` is an advisory lock (`fcntl.flock`) on RUN/.lock, taken by the
process that writes the folder (train and finetune, rank 0 under torchrun) before it reads or writes
anything there, and held to its end. The file names the holder (pid, host, start time, command), so
a second run into the folder fails with `RunInUse` naming it. The lock goes on any exit: the file is
removed on release, and the kernel drops a flock when its process dies, however it dies (kill -9,
power cut on a local disk). So a stale lock -- left by a killed run -- is a file that exists but is
not locked; the next run takes it over and says whose it was. The holder's details are written into
the locked file in place (atomic.py's replace-by-rename would swap the inode under the lock, so a
second process would lock another file). flock works between processes of one machine, and over
NFS where the client maps it to byte-range locks (Linux does since 2.6.12); on Windows there is no
lock (fcntl is missing) and the folder is not guarded.
"""
import datetime
import json
import os
import socket
import sys

from igpt_fast.atomic import output_error, write_text
from igpt_fast.errors import IGPTError, OutputError, RunInUse, RunLogError

__all__ = ["RunLogError", "RunInUse", "LOCK_NAME", "RunLock", "lock_run_folder", "read_log", "write_text_atomic",
           "truncate_log", "plot_losses"]

LOCK_NAME = ".lock"


def _holder(info):
    """'pid P on HOST (started T: COMMAND)' from a lock file's JSON (what is known of it)."""
    try:
        h = json.loads(info)
    except ValueError:
        return "an unknown process"
    text = f"pid {h.get('pid', '?')} on {h.get('host', '?')}"
    if h.get("started"):
        text += f", started {h['started']}"
    return text + (f": {h['command']}" if h.get("command") else "")


class RunLock:
    """The advisory lock of one run folder (see the module docstring). `acquire()` creates the folder if
    needed, then locks RUN/.lock or raises RunInUse naming the holder (OutputError when the folder cannot
    be made or written); `stale` is then the holder description of a lock a dead run left, else None.
    `release()` (or leaving the `with` block) removes and unlocks it. A held lock is refused to a second
    RunLock of the same folder in the same process too."""

    def __init__(self, out_dir):
        self.out_dir = os.fspath(out_dir)
        self.path = os.path.join(self.out_dir, LOCK_NAME)
        self.file = None
        self.stale = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the folder is not guarded
            return self
        if os.path.exists(self.out_dir) and not os.path.isdir(self.out_dir):
            raise OutputError(f"cannot write {self.out_dir}: it is a file, not a folder")
        while True:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                f = open(self.path, "a+")
            except OSError as e:
                raise (output_error(e, self.path) or e) from None
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = _holder(f.read())
                f.close()
                raise RunInUse(f"{self.out_dir} is in use by another run ({holder}); wait for it to end or stop "
                               "it, or write to another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.seek(0)
        previous = f.read()
        self.stale = _holder(previous) if previous.strip() else None
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:500]}) + "\n")
        f.flush()
        self.file = f
        return self

    def release(self):
        if self.file is None:
            return
        try:
            os.remove(self.path)  # removed while still locked: a waiting run then locks a fresh file
        except OSError:
            pass
        self.file.close()  # closing the last descriptor unlocks
        self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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


write_text_atomic = write_text  # the one atomic writer is atomic.write_text; this name stays for its callers


def truncate_log(path, step):
    """Keep the rows of log.jsonl up to `step` (a resumed run re-logs the steps after it)."""
    if os.path.isfile(path):  # rewritten even when no row goes: a half-written last line must not stay
        kept = [r for r in read_log(path) if r.get("step", 0) <= step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(log_path, png_path):
    """RUN/loss.png from log.jsonl. Pretraining: train and val loss (nats per pixel). Finetuning (rows with
    clf_loss or val_acc): two panels, the losses L_CLF (nats per image) and L_GEN (nats per pixel, when
    trained with it), and the val accuracy (and the noisier per-batch train accuracy) in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)

    def series(key, scale=1.0):
        return [(r["step"], scale * r[key]) for r in rows if r.get(key) is not None]

    finetune = any("clf_loss" in r or "val_acc" in r for r in rows)
    if not finetune:
        fig, ax = plt.subplots(figsize=(6, 4))
        curves = [(ax, series("loss"), "-", "train"), (ax, series("val_loss"), "o-", "val")]
    else:
        fig, (ax, acc) = plt.subplots(1, 2, figsize=(11, 4))
        curves = [(ax, series("clf_loss"), "-", "L_CLF, train (nats / image)"),
                  (ax, series("gen_loss"), "-", "L_GEN, train (nats / pixel)"),
                  (acc, series("train_acc", 100), "-", "train (per batch)"),
                  (acc, series("val_acc", 100), "o-", "val")]
    for axis, points, style, label in curves:
        if points:
            axis.plot(*zip(*points), style, label=label, alpha=0.5 if label == "train (per batch)" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)" if finetune else "loss (nats / pixel)")
    axes = [ax]
    if finetune:
        ax.set_title("losses")
        acc.set_xlabel("step")
        acc.set_ylabel("accuracy (%)")
        acc.set_title("classification accuracy")
        axes.append(acc)
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def lock_run_folder(out_dir, rank, world_size, say=print):
    """RunLock of RUN taken by rank 0 before anything reads or writes the folder; under torchrun the other
    ranks get its outcome, so every rank fails alike when the folder is in use. The lock (None off rank 0);
    a stale lock taken over is said in one line."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(out_dir).acquire()
        except IGPTError as e:
            error = e
    if world_size > 1:
        import torch.distributed as dist

        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if error is None and message[0] is not None:
            error = RunInUse(message[0])
    if error is not None:
        raise error
    if lock is not None and lock.stale:
        say(f"note: {lock.path} was left by {lock.stale}, which ended without releasing it; taking it over")
    return lock
