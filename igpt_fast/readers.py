"""Source detection and readers: what images a source path holds, their labels and splits (no decoding).

References: torchvision ImageFolder (class = first-level subfolder, sorted names); the CIFAR "python"
batch layout (a pickled dict of uint8 data (N, 3072) in R, G, B planes and labels); the IDX format
(big-endian header, magic 0x00000803 for uint8 (N, H, W)); webdataset's key convention (key = name up
to the first dot).

Each source path is detected from what it is, never from flags:
- folder tree of images: ImageFolder convention, class = first-level subfolder (sorted names; the union
  over all folder sources, so a class folder that is empty or unreadable keeps its index); a folder of
  images without subfolders is unlabelled. A folder whose subfolders are all split names (train, val,
  valid, validation, test) holds one tree per split.
- CIFAR-10/100 "python" folders (`batches.meta` + `data_batch_*` + `test_batch`, or `meta` + `train` +
  `test`), read with a restricted unpickler that admits only plain containers, bytes, numbers and numpy
  arrays (CIFAR-100 uses the fine labels).
- MNIST-family IDX files (`*-images-idx3-ubyte[.gz]`, labels from the matching `*-labels-idx1-ubyte`),
  or a folder of them.
- uncompressed `.tar` files / WebDatasets: samples grouped by key, the first member with an image
  extension is the image, `cls` (an integer) the label; a folder holding only `.tar` files is a WebDataset.
  Only regular members are read: links, devices and fifos, and members larger than MAX_MEMBER_BYTES
  (env IGPT_FAST_MAX_MEMBER_BYTES; a `cls` larger than 64 bytes) are skipped from their headers alone,
  never read, and listed with the reason.
- a single image file.
Split: CIFAR and IDX files carry their own (`test_batch`, `t10k-*` are test). Any other source whose
name starts with `test` / `t10k` is test, `val` / `valid` / `validation` is val, anything else train.

A listing also records every file it read with its size and mtime (`Listing.files`), so a resumed
tokenize can tell that a source changed under it.
"""
import gzip
import importlib
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from .errors import TokenizeError

__all__ = [
    "TokenizeError", "SPLITS", "IMAGE_EXTS", "IMAGE_ERRORS", "MAX_MEMBER_BYTES", "Item", "Listing", "list_sources",
    "read_cifar_batch", "read_idx", "restricted_loads",
]

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff")
# What PIL raises on corrupt, truncated, zero-byte or non-image input (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
MAX_MEMBER_BYTES = 256 << 20  # larger tar members are skipped unread (env IGPT_FAST_MAX_MEMBER_BYTES)
_MAX_CLS_BYTES = 64
_SPLIT_DIRS = ("train", "val", "valid", "validation", "test")
_SPLIT_PREFIXES = (("test", "test"), ("t10k", "test"), ("validation", "val"), ("valid", "val"),
                   ("val", "val"), ("train", "train"))


class Item(NamedTuple):
    """One image of a source: where it is, its label and its split."""

    source: int  # position of the source on the command line
    index: int  # position in that source's sorted listing
    name: str  # for messages: a path, "archive.tar:member" or "file[i]"
    ref: tuple  # how to read it: ("file", path) | ("tar", path, offset, size) | ("array", j, i)
    label: object  # class id (int) or None; a class folder's name while a folder is being listed
    split: str

    @property
    def key(self):
        """The shard key: unique, dot-free and traceable to the source and listing position."""
        return f"{self.source:03d}_{self.index:09d}"


class Listing:
    """What listing one source found: items and skipped files per split, class names, arrays, files."""

    def __init__(self, index, path, fmt):
        self.index, self.path, self.format = index, path, fmt
        self.items = {s: [] for s in SPLITS}  # split -> [Item]
        self.skipped = {s: [] for s in SPLITS}  # split -> [{"file", "reason"}]
        self.class_names = None  # fixed names (CIFAR) if any
        self.class_dirs = set()  # first-level class folders of a folder source, empty or not
        self.arrays = []  # ("array", j, i) refs index into these
        self.array_files = []
        self.files = []  # [name relative to the source, size, mtime_ns] of every file read
        self.count = 0
        self._root = path if os.path.isdir(path) else os.path.dirname(path)

    def add(self, split, label, ref, name):
        self.items[split].append(Item(self.index, self.count, name, ref, label, split))
        self.count += 1

    def stat(self, path):
        """Record a file this listing read (for change detection)."""
        rel = path[len(self._root) + 1:] if path.startswith(self._root + os.sep) else path
        try:
            st = os.stat(path)
        except OSError:  # a dangling link or a file gone since the folder was read: reading it will fail
            self.files.append([rel, -1, -1])
            return
        self.files.append([rel, st.st_size, st.st_mtime_ns])

    def array(self, ref):
        """The image an ("array", j, i) ref points at."""
        return self.arrays[ref[1]][ref[2]]


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles (str -> latin-1 bytes)
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, bytes, strings, numbers and numpy arrays; any other global is refused."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is forbidden in a dataset pickle")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module != "numpy":  # numpy >= 2 moved numpy.core to numpy._core
            module = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"
        return getattr(importlib.import_module(module), name)


def restricted_loads(data):
    """Unpickle CIFAR-style bytes safely (encoding="bytes", as the Python 2 batches need)."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _get(d, key):
    """dict lookup accepting both bytes keys (Python 2 pickles) and str keys."""
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def read_cifar_batch(path, label_key="labels"):
    """A CIFAR python batch file -> (uint8 (N, 32, 32, 3), int64 (N,) labels)."""
    with open(path, "rb") as f:
        d = restricted_loads(f.read())
    if not isinstance(d, dict):
        raise TokenizeError(f"{path}: not a CIFAR batch (a {type(d).__name__}, not a dict)")
    try:
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, label_key), dtype=np.int64)
    except KeyError as e:
        raise TokenizeError(f"{path}: not a CIFAR batch (no {e} entry)") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise TokenizeError(f"{path}: CIFAR data must be uint8 (N, 3072) with N labels, got "
                            f"{data.dtype} {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3): planes R, G, B


def _open_maybe_gz(path):
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path):
    """An IDX file (raw or .gz) of uint8 -> ndarray with its dims (images (N, H, W), labels (N,))."""
    with _open_maybe_gz(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise TokenizeError(f"{path}: not an IDX file (bad magic)")
    if data[2] != 0x08:
        raise TokenizeError(f"{path}: IDX element type 0x{data[2]:02x} is not supported (only uint8)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise TokenizeError(f"{path}: IDX holds {body.size} bytes, its header says {dims}")
    return body.reshape(dims)


def _split_of(name):
    name = os.path.basename(os.path.normpath(name)).lower()
    for prefix, split in _SPLIT_PREFIXES:
        if name.startswith(prefix):
            return split
    return "train"


def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def _list_image_tree(lst, root, split):
    """ImageFolder listing of `root` into lst.items[split]; files beside class folders are skipped."""
    entries = _visible(os.listdir(root))
    dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    for name in entries:
        full = os.path.join(root, name)
        if os.path.isdir(full):
            continue
        lst.stat(full)
        if dirs:
            lst.skipped[split].append({"file": full, "reason": "not inside a class folder"})
        else:
            lst.add(split, None, ("file", full), full)

    def unreadable(err):
        lst.skipped[split].append({"file": err.filename, "reason": f"unreadable folder ({type(err).__name__}: "
                                                                    f"{err.strerror or err})"})

    for cls in dirs:
        lst.class_dirs.add(cls)
        lst.files.append([os.path.join(root, cls)[len(lst._root) + 1:] + "/", 0, 0])  # a class, even if empty
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), onerror=unreadable):
            dirnames[:] = _visible(dirnames)
            for name in _visible(filenames):
                full = os.path.join(dirpath, name)
                lst.stat(full)
                lst.add(split, cls, ("file", full), full)


def _list_folder(lst, path):
    entries = _visible(os.listdir(path))
    dirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    if dirs and all(d.lower() in _SPLIT_DIRS for d in dirs):
        for d in dirs:
            _list_image_tree(lst, os.path.join(path, d), _split_of(d))
        return
    _list_image_tree(lst, path, _split_of(path))


def _add_arrays(lst, split, file, images, labels):
    j = len(lst.arrays)
    lst.arrays.append(images)
    lst.array_files.append(file)
    for i, label in enumerate(labels):
        lst.add(split, label, ("array", j, i), f"{file}[{i}]")


def _list_cifar(lst, path):
    if os.path.exists(os.path.join(path, "batches.meta")):
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
        parts = [(f, "train") for f in _visible(os.listdir(path)) if f.startswith("data_batch")]
        parts.append(("test_batch", "test"))
    else:
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
        parts = [("train", "train"), ("test", "test")]
    try:
        lst.stat(os.path.join(path, meta_file))
        with open(os.path.join(path, meta_file), "rb") as f:
            names = _get(restricted_loads(f.read()), names_key)
        lst.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as e:
        raise TokenizeError(f"{os.path.join(path, meta_file)}: unreadable CIFAR meta ({e})") from None
    for name, split in parts:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        lst.stat(file)
        try:
            data, labels = read_cifar_batch(file, label_key)
        except (pickle.UnpicklingError, EOFError, OSError, TokenizeError, TypeError, ValueError) as e:
            lst.skipped[split].append({"file": file, "reason": str(e)})
            continue
        _add_arrays(lst, split, file, data, labels.tolist())


def _is_idx_images(name):
    return "idx3" in name.lower()


def _idx_header(path):
    """(ndim, first dim) of a uint8 IDX file (raw or .gz) from its header; None for any other file."""
    try:
        with _open_maybe_gz(path) as f:
            head = f.read(8)
    except (OSError, EOFError):
        return None
    if len(head) < 8 or head[:3] != b"\0\0\x08" or not head[3]:
        return None
    return head[3], struct.unpack(">I", head[4:8])[0]


def _idx_labels_given(path, n):
    """The error for an IDX labels file given as a source: how tokenize pairs labels with their images."""
    name = os.path.basename(path)
    images = os.path.join(os.path.dirname(path), name.replace("labels-idx1", "images-idx3")
                          .replace("labels.idx1", "images.idx3"))
    if images != path and os.path.exists(images):
        return TokenizeError(f"{path} is the labels file ({n} labels) of {images}: pass only the images file, "
                             "tokenize reads its labels from this file")
    return TokenizeError(f"{path} is an IDX labels file ({n} labels), not images: tokenize reads the labels of "
                         "X-images-idx3-ubyte[.gz] from X-labels-idx1-ubyte[.gz] beside it; name the pair so and "
                         "pass only the images file (or their folder)")


def _list_idx_file(lst, file):
    name = os.path.basename(file)
    split = "test" if name.lower().startswith(("t10k", "test")) else _split_of(name)
    lst.stat(file)
    try:
        images = read_idx(file)
        if images.ndim != 3:
            raise TokenizeError(f"{file}: IDX images must be (N, H, W), got {images.shape}")
    except (OSError, EOFError, struct.error, TokenizeError) as e:
        lst.skipped[split].append({"file": file, "reason": str(e)})
        return
    labels = [None] * len(images)
    label_file = os.path.join(os.path.dirname(file), name.replace("images-idx3", "labels-idx1")
                              .replace("images.idx3", "labels.idx1"))
    if label_file != file and os.path.exists(label_file):
        lst.stat(label_file)
        try:
            y = read_idx(label_file)
        except (OSError, EOFError, struct.error, TokenizeError) as e:
            raise TokenizeError(f"{label_file}: unreadable labels ({e})") from None
        if y.shape != (len(images),):
            raise TokenizeError(f"{label_file}: {y.shape} labels for {len(images)} images")
        labels = y.astype(np.int64).tolist()
    _add_arrays(lst, split, file, images, labels)


def max_member_bytes():
    """The size above which a tar member is skipped unread: $IGPT_FAST_MAX_MEMBER_BYTES, else MAX_MEMBER_BYTES."""
    value = os.environ.get("IGPT_FAST_MAX_MEMBER_BYTES")
    if not value:
        return MAX_MEMBER_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise TokenizeError(f"IGPT_FAST_MAX_MEMBER_BYTES={value!r} is not a positive number of bytes")
    return limit


def _unread(member, limit, what="a member may hold (IGPT_FAST_MAX_MEMBER_BYTES)"):
    """Why a tar member is skipped without reading it, or None for a regular member that may be read."""
    if member.issym():
        return f"symbolic link to {member.linkname} (not followed)"
    if member.islnk():
        return f"hard link to {member.linkname} (not followed)"
    if member.ischr() or member.isblk():
        return f"{'character' if member.ischr() else 'block'} device"
    if member.isfifo():
        return "fifo"
    if not member.isfile():
        return f"tar member of type {member.type!r}"
    if member.size > limit:
        return f"{member.size} bytes, more than the {limit} bytes {what}"
    return None


def _list_tar(lst, path):
    split = _split_of(path)
    lst.stat(path)
    samples = {}  # key -> {"image": member, "cls": bytes, "unread": True when a member was skipped}
    limit = max_member_bytes()
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.isdir():
                    continue
                d, base = os.path.split(m.name)
                key, dot, ext = base.partition(".")
                s = samples.setdefault(os.path.join(d, key), {})
                ext = ext.lower()
                reason = _unread(m, _MAX_CLS_BYTES, "a cls label may hold") if ext == "cls" else _unread(m, limit)
                if reason is not None:
                    lst.skipped[split].append({"file": f"{path}:{m.name}", "reason": reason})
                    s["unread"] = True
                elif ext == "cls":
                    s["cls"] = tf.extractfile(m).read()
                elif "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS and "image" not in s:
                    s["image"] = m
    except (tarfile.TarError, OSError, EOFError) as e:
        lst.skipped[split].append({"file": path, "reason": f"unreadable tar: {e}"})
    for key, s in samples.items():
        where = f"{path}:{key}"
        if "image" not in s:
            if not s.get("unread"):  # else its skipped member is listed already
                lst.skipped[split].append({"file": where, "reason": "no image member in sample"})
            continue
        label = None
        if "cls" in s:
            try:
                label = int(s["cls"].strip())
            except ValueError:
                lst.skipped[split].append({"file": where, "reason": f"cls {s['cls'][:20]!r} is not an integer"})
                continue
        m = s["image"]
        lst.add(split, label, ("tar", path, m.offset_data, m.size), f"{path}:{m.name}")


def _list_source(index, path):
    """Detect what `path` is and list it (no decoding)."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise TokenizeError(f"source not found: {path}")
    if os.path.isdir(path):
        try:
            files = _visible(os.listdir(path))
        except OSError as e:
            raise TokenizeError(f"source {path} cannot be read ({e.strerror or e})") from None
        if "batches.meta" in files or ("meta" in files and "train" in files):
            lst = Listing(index, path, "cifar")
            _list_cifar(lst, path)
        elif files and all(_is_idx_images(f) or "idx1" in f.lower() for f in files):
            lst = Listing(index, path, "idx")
            for f in files:
                if _is_idx_images(f):
                    _list_idx_file(lst, os.path.join(path, f))
        elif files and all(f.lower().endswith(".tar") for f in files):
            lst = Listing(index, path, "webdataset")
            for f in files:
                _list_tar(lst, os.path.join(path, f))
        else:
            lst = Listing(index, path, "folder")
            _list_folder(lst, path)
        return lst
    name = os.path.basename(path).lower()
    if _is_idx_images(name):
        lst = Listing(index, path, "idx")
        _list_idx_file(lst, path)
    elif name.endswith(".tar"):
        lst = Listing(index, path, "webdataset")
        _list_tar(lst, path)
    elif name.endswith(IMAGE_EXTS):
        lst = Listing(index, path, "image")
        lst.stat(path)
        lst.add(_split_of(path), None, ("file", path), path)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise TokenizeError(f"{path}: compressed tar archives are not supported; decompress it to a .tar "
                            "(or extract it) first")
    elif (idx := _idx_header(path)) is not None and idx[0] == 1:
        raise _idx_labels_given(path, idx[1])
    elif idx is not None:  # IDX images under another name (unlabelled: no X-labels-idx1 name to pair with)
        lst = Listing(index, path, "idx")
        _list_idx_file(lst, path)
    else:
        raise TokenizeError(f"{path}: unknown format (expected an image folder, a CIFAR python folder, "
                            "an IDX file, a .tar WebDataset or an image file)")
    return lst


def list_sources(sources):
    """List sources -> (listings, class_names or None); item labels become class ids (or None).

    Folder sources name their classes after their first-level class folders, empty ones included, so
    a class keeps its id whether or not its folder holds images.
    """
    listings = [_list_source(i, p) for i, p in enumerate(sources)]
    folder_names = sorted(set().union(*[lst.class_dirs for lst in listings if lst.format == "folder"]))
    fixed = [lst.class_names for lst in listings if lst.class_names is not None]
    if folder_names:
        fixed.append(folder_names)
    for names in fixed[1:]:
        if names != fixed[0]:
            raise TokenizeError(f"sources disagree on class names ({fixed[0][:4]}... vs {names[:4]}...); "
                                "tokenize them into separate folders")
    class_names = fixed[0] if fixed else None
    lookup = {n: i for i, n in enumerate(folder_names)}
    for lst in listings:
        if lst.format == "folder":
            for split, items in lst.items.items():
                lst.items[split] = [it if it.label is None else it._replace(label=lookup[it.label]) for it in items]
    return listings, class_names
