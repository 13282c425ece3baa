"""Atomic writes: every file igpt-fast writes appears whole under its final name, or not at all.

`atomic_path(path)` yields a temp name beside `path`, unique per process and call
(`PATH.tmp.<pid>.<n>`, so two processes or threads never share one); the caller writes the temp (a
file, or a folder for a DCP checkpoint or an HF export); on success the temp file is fsynced, renamed
over `path` and the folder's entry fsynced, so a crash at any moment leaves the old file or the new
one. On any error the temp is removed and an OSError a user can fix (no space left, read-only
place, a parent that is not a folder, no permission) becomes one `OutputError` line that names the
file (and, when the disk is full, how much space was free there). `write_bytes` / `write_text` are
the one-call forms. Temp names match `is_temp_name`, so folders that list their contents (shard
folders, run folders) can skip them.
"""
import contextlib
import errno
import itertools
import os
import re
import shutil

from igpt_fast.errors import OutputError

__all__ = ["atomic_path", "write_bytes", "write_text", "fsync_dir", "is_temp_name", "output_error"]

_counter = itertools.count()
_TEMP = re.compile(r"\.tmp\.\d+\.\d+$")
_USER_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a parent is not a folder",
                errno.EISDIR: "it is a folder", errno.ENOENT: "its folder does not exist"}


def is_temp_name(name):
    """Whether a file or folder name is an unfinished atomic write of this module."""
    return bool(_TEMP.search(name))


def fsync_dir(folder):
    """Make a rename inside `folder` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path):
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(root)
    elif os.path.exists(path):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def output_error(err, path):
    """An OSError a user can fix, writing `path`, as one OutputError line; None for any other error."""
    if not isinstance(err, OSError) or err.errno not in _USER_ERRNOS:
        return None
    what = _USER_ERRNOS[err.errno]
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = shutil.disk_usage(folder).free
            what += f" ({free / 2**20:.1f} MiB free in {folder})"
        except OSError:
            pass
    return OutputError(f"cannot write {path}: {what}")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path beside `path`; on a clean exit fsync it, rename it over `path` and fsync the
    folder; on an error remove it (an OSError a user can fix is raised as OutputError)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}.{next(_counter)}"
    try:
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))
    except BaseException as err:
        _remove(tmp)
        friendly = output_error(err, path)
        if friendly is not None:
            raise friendly from err
        raise


def write_bytes(path, data):
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path, text, encoding="utf-8"):
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as f:
        f.write(text)
