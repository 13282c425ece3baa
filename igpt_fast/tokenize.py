"""Images -> iGPT token sequences, written as WebDataset shards.

References: Chen et al. 2020, section 3.1 (images resized to n_px, each pixel replaced by its nearest
palette colour, raster order); transformers `ImageGPTImageProcessor` (PIL bilinear squash resize);
webdataset `writer.py` (TarWriter / ShardWriter) and its key convention (key = name up to the first dot).

Readers (each source path is detected from what it is, never from flags):
- folder tree of images: ImageFolder convention, class = first-level subfolder (sorted names; the union
  over all folder sources); a folder of images without subfolders is unlabelled. A folder whose
  subfolders are all split names (train, val, valid, validation, test) holds one tree per split.
- CIFAR-10/100 "python" folders (`batches.meta` + `data_batch_*` + `test_batch`, or `meta` + `train` +
  `test`), read with a restricted unpickler that admits only plain containers, bytes, numbers and numpy
  arrays (CIFAR-100 uses the fine labels).
- MNIST-family IDX files (`*-images-idx3-ubyte[.gz]`, labels from the matching `*-labels-idx1-ubyte`),
  or a folder of them.
- uncompressed `.tar` files / WebDatasets: samples grouped by key, the first member with an image
  extension is the image, `cls` (an integer) the label; a folder holding only `.tar` files is a WebDataset.
- a single image file.
Split: CIFAR and IDX files carry their own (`test_batch`, `t10k-*` are test). Any other source whose
name starts with `test` / `t10k` is test, `val` / `valid` / `validation` is val, anything else train.
`val_fraction` carves val from train (before shuffling within splits); a source's own test is kept.

Colour rule (`to_rgb`), deterministic and documented:
- RGB as is (EXIF orientation and ICC profiles are ignored, like HF); grey, bilevel, palette, YCbCr,
  LAB, HSV and CMYK use PIL's `convert("RGB")` (CMYK naively, without a profile).
- anything with alpha (RGBA, LA, PA, or P/L with a transparency entry) is composited over white:
  `rgb = (c * a + 255 * (255 - a) + 127) // 255`.
- 16-bit (I;16*, and I clipped to [0, 65535]) is scaled to 8 bits by `(v + 128) // 257` (0 -> 0,
  65535 -> 255, nearest); float (F) is clipped to [0, 255] and rounded.

Resize modes (`resize_image`), all PIL bilinear on 8-bit RGB:
- `squash` (default): to n_px x n_px ignoring aspect, byte-identical to HF's processor. Images already
  n_px x n_px are not resampled (PIL's resize returns a copy then, so ids stay identical).
- `center-crop`: the central square (side = the shorter side) resampled to n_px in one step
  (PIL's `box`), i.e. shorter side to n_px, then centre crop, without a second rounding.
- `pad`: an image larger than n_px is shrunk so its longer side is n_px (aspect kept, sides rounded);
  smaller images are not enlarged (28 -> 32 pads 2 pixels on each side); the image is centred on black
  (0, 0, 0), an odd remainder going to the bottom / right.

Output (`tokenize_dataset`): DIR/{split}-%06d.tar written with webdataset's ShardWriter (integer mtime
0, uid/gid 0, mode 0444, USTAR: byte-reproducible), `shard_size` samples per shard; each sample has
`__key__` = "{source:03d}_{index:09d}" (source position on the command line, item position in that
source's sorted listing: unique, dot-free, traceable), `tokens.npy` (uint16, n_ctx) and `cls` when the
label is known. DIR/palette.npy makes the folder self-contained; DIR/meta.json is written last.

Resume and atomicity: each shard is written as `*.tar.tmp`; when full, a progress record
DIR/.tokenize/{split}-%06d.json (items consumed, samples written, skipped so far) is written atomically,
then the shard is renamed. A rerun with the same settings keeps the longest prefix of shards that have
both the tar and its record and continues from there; because listing, shuffling and sharding are all
deterministic, the result is byte-identical to an uninterrupted run. DIR/.tokenize/config.json holds
the settings; a rerun with other settings is refused.
"""
import gzip
import importlib
import json
import math
import os
import pickle
import struct
import sys
import tarfile
import time
import zlib

import numpy as np
from PIL import Image

__all__ = [
    "RESIZE_MODES", "TokenizeError", "to_rgb", "resize_image", "tokenize_images", "list_sources",
    "sample_pixels", "tokenize_dataset", "read_cifar_batch", "read_idx", "restricted_loads",
]

VERSION = 1
RESIZE_MODES = ("squash", "center-crop", "pad")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff")
SPLITS = ("train", "val", "test")
CHUNK = 256  # items per worker task

# What PIL raises on corrupt, truncated, zero-byte or non-image input (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SPLIT_PREFIXES = (("test", "test"), ("t10k", "test"), ("validation", "val"), ("valid", "val"),
                   ("val", "val"), ("train", "train"))


class TokenizeError(ValueError):
    """A source, setting or output folder that cannot be used (one-line message naming the fix)."""


# ---------------------------------------------------------------------------------------------- colour


def _composite_on_white(rgba):
    """uint8 (H, W, 4) -> uint8 (H, W, 3): alpha over an opaque white background, rounded."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _array_to_rgb(a):
    """uint8/uint16 array (H, W), (H, W, 1|2|3|4) -> uint8 (H, W, 3) by the module's colour rule."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise TokenizeError(f"image arrays must be (H, W) or (H, W, 1|2|3|4), got {a.shape}")
    return _channels_to_rgb(a)


def _channels_to_rgb(a):
    """uint8/uint16/bool (..., C), C in 1..4 (grey, grey+alpha, RGB, RGBA) -> uint8 (..., 3)."""
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise TokenizeError(f"image arrays must be uint8 or uint16, got {a.dtype}")
    if a.shape[-1] not in (1, 2, 3, 4):
        raise TokenizeError(f"image arrays need 1 to 4 channels (grey, grey+alpha, RGB, RGBA), got {a.shape}")
    if a.shape[-1] == 3:
        return a
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 2:
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=-1), a[..., 1:]], axis=-1)  # LA -> RGBA
    return _composite_on_white(a)


def to_rgb(image):
    """PIL image or array -> PIL RGB image, by the colour rule in the module docstring."""
    if not isinstance(image, Image.Image):
        return Image.fromarray(_array_to_rgb(image))
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _ALPHA_MODES or (mode in ("P", "L", "1") and "transparency" in image.info):
        return Image.fromarray(_composite_on_white(np.asarray(image.convert("RGBA"))))
    if mode.startswith("I;16") or mode == "I":
        v = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(_array_to_rgb(v.astype(np.uint16)))
    if mode == "F":
        v = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 255)).astype(np.uint8)
        return Image.fromarray(_array_to_rgb(v))
    return image.convert("RGB")


def _rgb_array(image):
    """PIL RGB image -> uint8 (h, w, 3), read-only; tobytes + frombuffer is ~1.6x faster than asarray."""
    w, h = image.size
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(h, w, 3)


def resize_image(image, n_px, resize="squash"):
    """PIL RGB image -> uint8 (n_px, n_px, 3) by one of RESIZE_MODES (see the module docstring)."""
    w, h = image.size
    if resize == "squash":
        if (w, h) != (n_px, n_px):
            image = image.resize((n_px, n_px), Image.BILINEAR)
        return _rgb_array(image)
    if resize == "center-crop":
        if (w, h) != (n_px, n_px):
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            image = image.resize((n_px, n_px), Image.BILINEAR, box=box)
        return _rgb_array(image)
    if resize == "pad":
        if max(w, h) > n_px:
            scale = n_px / max(w, h)
            w, h = max(1, min(n_px, round(w * scale))), max(1, min(n_px, round(h * scale)))
            image = image.resize((w, h), Image.BILINEAR)
        out = np.zeros((n_px, n_px, 3), dtype=np.uint8)
        top, left = (n_px - h) // 2, (n_px - w) // 2
        out[top:top + h, left:left + w] = _rgb_array(image)
        return out
    raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")


def _prepare(image, n_px, resize):
    """One PIL image or array -> uint8 (n_px, n_px, 3); uint8 RGB arrays already n_px skip PIL."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (n_px, n_px, 3):
        return image
    return resize_image(to_rgb(image), n_px, resize)


def _fast_batch(batch, n_px, resize):
    """Array batch (B, H, W[, C]) needing no resampling -> uint8 (B, n_px, n_px, 3); else None.

    Same result as `_prepare` per image: sizes equal to n_px are never resampled, and `pad` does not
    resample images no larger than n_px.
    """
    if batch.ndim == 3:
        batch = batch[..., None]  # (B, H, W, 1)
    h, w = batch.shape[1:3]
    if (h, w) == (n_px, n_px):
        return _channels_to_rgb(batch)
    if resize == "pad" and h <= n_px and w <= n_px:
        out = np.zeros((len(batch), n_px, n_px, 3), dtype=np.uint8)
        top, left = (n_px - h) // 2, (n_px - w) // 2
        out[:, top:top + h, left:left + w] = _channels_to_rgb(batch)
        return out
    return None


def _prepare_batch(images, n_px, resize):
    """PIL images / arrays (a list, or an array (B, H, W[, C])) -> uint8 (B, n_px, n_px, 3)."""
    if resize not in RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise TokenizeError(f"an image array batch must be (B, H, W) or (B, H, W, C), got {images.shape}; "
                                "pass a single image as a list of one")
        if images.dtype == np.uint8 and images.shape[1:] == (n_px, n_px, 3):
            return images  # the fast path: nothing to convert or resample
        fast = _fast_batch(images, n_px, resize)
        if fast is not None:
            return fast
    out = np.empty((len(images), n_px, n_px, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = _prepare(image, n_px, resize)
    return out


def tokenize_images(images, palette, n_px=32, resize="squash", workers=1):
    """PIL images or uint8 arrays -> uint16 (B, n_ctx) token ids, raster order.

    `images`: a list of PIL images / arrays (H, W[, C]), or one array batch (B, H, W) (grey) or
    (B, H, W, C); a single image goes in a list. A uint8 array
    (B, n_px, n_px, 3) is quantized directly. `palette`: a Palette or a path to palette.npy.
    `workers` > 1 converts and resizes a list in that many threads (PIL's resampling releases the
    GIL); quantisation is one lookup-table gather for the whole batch. The CLI's worker processes run
    `_prepare` on each image and quantize the same way.
    """
    palette = _as_palette(palette)
    if workers > 1 and not isinstance(images, (np.ndarray, Image.Image)) and len(images) >= 2 * workers:
        from concurrent.futures import ThreadPoolExecutor

        step = -(-len(images) // workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = pool.map(_prepare_batch, [images[s:s + step] for s in range(0, len(images), step)],
                             [n_px] * workers, [resize] * workers)
            batch = np.concatenate(list(parts))  # (B, n_px, n_px, 3)
    else:
        batch = _prepare_batch(images, n_px, resize)  # (B, n_px, n_px, 3)
    return palette.quantize(batch).reshape(len(batch), n_px * n_px)


def _as_palette(palette):
    from .palette import Palette

    return palette if isinstance(palette, Palette) else Palette.load(palette)


# ---------------------------------------------------------------------------------------------- readers

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
    import io

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


class _Listing:
    """What listing one source found: items per split, class names, skipped files, arrays."""

    def __init__(self, index, path, fmt):
        self.index, self.path, self.format = index, path, fmt
        self.items = {s: [] for s in SPLITS}  # split -> [(key, label or class name or None, ref)]
        self.skipped = {s: [] for s in SPLITS}
        self.class_names = None  # fixed names (CIFAR) if any
        self.arrays = []  # refs ("array", source, j, i) index into these
        self.count = 0

    def add(self, split, label, ref):
        self.items[split].append((f"{self.index:03d}_{self.count:09d}", label, ref))
        self.count += 1


def _list_image_tree(lst, root, split):
    """ImageFolder listing of `root` into lst.items[split]; files beside class folders are skipped."""
    entries = _visible(os.listdir(root))
    dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    for name in entries:
        full = os.path.join(root, name)
        if os.path.isdir(full):
            continue
        if dirs:
            lst.skipped[split].append({"file": full, "reason": "not inside a class folder"})
        else:
            lst.add(split, None, ("file", full))
    for cls in dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames[:] = _visible(dirnames)
            for name in _visible(filenames):
                lst.add(split, cls, ("file", os.path.join(dirpath, name)))


def _list_folder(lst, path):
    entries = _visible(os.listdir(path))
    dirs = [e for e in entries if os.path.isdir(os.path.join(path, e))]
    if dirs and all(d.lower() in ("train", "val", "valid", "validation", "test") for d in dirs):
        for d in dirs:
            _list_image_tree(lst, os.path.join(path, d), _split_of(d))
        return
    _list_image_tree(lst, path, _split_of(path))


def _list_cifar(lst, path):
    if os.path.exists(os.path.join(path, "batches.meta")):
        meta_file, label_key, names_key = "batches.meta", "labels", "label_names"
        parts = [(f, "train") for f in _visible(os.listdir(path)) if f.startswith("data_batch")]
        parts.append(("test_batch", "test"))
    else:
        meta_file, label_key, names_key = "meta", "fine_labels", "fine_label_names"
        parts = [("train", "train"), ("test", "test")]
    try:
        with open(os.path.join(path, meta_file), "rb") as f:
            names = _get(restricted_loads(f.read()), names_key)
        lst.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as e:
        raise TokenizeError(f"{os.path.join(path, meta_file)}: unreadable CIFAR meta ({e})") from None
    for name, split in parts:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            continue
        try:
            data, labels = read_cifar_batch(file, label_key)
        except (pickle.UnpicklingError, EOFError, OSError, TokenizeError, TypeError, ValueError) as e:
            lst.skipped[split].append({"file": file, "reason": str(e)})
            continue
        j = len(lst.arrays)
        lst.arrays.append(data)
        for i, label in enumerate(labels.tolist()):
            lst.add(split, label, ("array", lst.index, j, i))


def _is_idx_images(name):
    return "idx3" in name.lower()


def _list_idx_file(lst, file):
    name = os.path.basename(file)
    split = "test" if name.lower().startswith(("t10k", "test")) else _split_of(name)
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
        try:
            y = read_idx(label_file)
        except (OSError, EOFError, struct.error, TokenizeError) as e:
            raise TokenizeError(f"{label_file}: unreadable labels ({e})") from None
        if y.shape != (len(images),):
            raise TokenizeError(f"{label_file}: {y.shape} labels for {len(images)} images")
        labels = y.astype(np.int64).tolist()
    j = len(lst.arrays)
    lst.arrays.append(images)
    for i, label in enumerate(labels):
        lst.add(split, label, ("array", lst.index, j, i))


def _list_tar(lst, path):
    split = _split_of(path)
    samples = {}  # key -> {"image": member, "cls": bytes}
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                key, dot, ext = base.partition(".")
                s = samples.setdefault(os.path.join(d, key), {})
                ext = ext.lower()
                if ext == "cls":
                    s["cls"] = tf.extractfile(m).read()
                elif "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS and "image" not in s:
                    s["image"] = m
    except (tarfile.TarError, OSError, EOFError) as e:
        lst.skipped[split].append({"file": path, "reason": f"unreadable tar: {e}"})
    for key, s in samples.items():
        where = f"{path}:{key}"
        if "image" not in s:
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
        lst.add(split, label, ("tar", path, m.offset_data, m.size, m.name))


def _list_source(index, path):
    """Detect what `path` is and list it (no decoding)."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise TokenizeError(f"source not found: {path}")
    if os.path.isdir(path):
        files = _visible(os.listdir(path))
        if "batches.meta" in files or ("meta" in files and "train" in files):
            lst = _Listing(index, path, "cifar")
            _list_cifar(lst, path)
        elif files and all(_is_idx_images(f) or "idx1" in f.lower() for f in files):
            lst = _Listing(index, path, "idx")
            for f in files:
                if _is_idx_images(f):
                    _list_idx_file(lst, os.path.join(path, f))
        elif files and all(f.lower().endswith(".tar") for f in files):
            lst = _Listing(index, path, "webdataset")
            for f in files:
                _list_tar(lst, os.path.join(path, f))
        else:
            lst = _Listing(index, path, "folder")
            _list_folder(lst, path)
        return lst
    name = os.path.basename(path).lower()
    if _is_idx_images(name):
        lst = _Listing(index, path, "idx")
        _list_idx_file(lst, path)
    elif name.endswith(".tar"):
        lst = _Listing(index, path, "webdataset")
        _list_tar(lst, path)
    elif name.endswith(IMAGE_EXTS):
        lst = _Listing(index, path, "image")
        lst.add(_split_of(path), None, ("file", path))
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise TokenizeError(f"{path}: compressed tar archives are not supported; decompress it to a .tar "
                            "(or extract it) first")
    else:
        raise TokenizeError(f"{path}: unknown format (expected an image folder, a CIFAR python folder, "
                            "an IDX file, a .tar WebDataset or an image file)")
    return lst


def list_sources(sources):
    """List sources -> (listings, class_names or None); labels in the items become int (or None)."""
    listings = [_list_source(i, p) for i, p in enumerate(sources)]
    folder_names = sorted({label for lst in listings if lst.format == "folder"
                           for items in lst.items.values() for _, label, _ in items if label is not None})
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
                lst.items[split] = [(k, None if y is None else lookup[y], r) for k, y, r in items]
    return listings, class_names


# ---------------------------------------------------------------------------------------------- decoding


def _load(entry, n_px, resize):
    """One payload entry -> uint8 (n_px, n_px, 3); raises one of IMAGE_ERRORS on a bad file."""
    kind = entry[0]
    if kind == "array":
        return _prepare(entry[1], n_px, resize)
    if kind == "file":
        src = entry[1]
    else:  # ("tar", path, offset, size)
        import io

        with open(entry[1], "rb") as f:
            f.seek(entry[2])
            data = f.read(entry[3])
        if len(data) != entry[3]:
            raise OSError("tar member is truncated")
        src = io.BytesIO(data)
    with Image.open(src) as im:
        im.load()
        return resize_image(to_rgb(im), n_px, resize)


def _describe(err):
    reason = f"{type(err).__name__}: {err}".strip()
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _load_chunk(task):
    """Worker: (n_px, resize, entries) -> (uint8 (m, n_px, n_px, 3) of the good ones, {pos: reason})."""
    n_px, resize, entries = task
    arrays = [e[1] for e in entries if e[0] == "array"]
    if arrays and len(arrays) == len(entries) and len({(a.shape, a.dtype) for a in arrays}) == 1:
        fast = _fast_batch(np.stack(arrays), n_px, resize)
        if fast is not None:
            return fast, {}
    images, bad = [], {}
    for pos, entry in enumerate(entries):
        try:
            images.append(_load(entry, n_px, resize))
        except IMAGE_ERRORS as e:
            bad[pos] = _describe(e)
    out = np.stack(images) if images else np.empty((0, n_px, n_px, 3), dtype=np.uint8)
    return out, bad


def _payload(by_index, ref):
    """An item's ref -> what a worker needs: the array itself, or where the bytes are."""
    if ref[0] == "array":
        return ("array", by_index[ref[1]].arrays[ref[2]][ref[3]])
    return ref[:4]


def _chunks(by_index, items, n_px, resize):
    for s in range(0, len(items), CHUNK):
        yield (n_px, resize, [_payload(by_index, ref) for _, _, ref in items[s:s + CHUNK]])


def _item_name(ref):
    if ref[0] == "file":
        return ref[1]
    if ref[0] == "tar":
        return f"{ref[1]}:{ref[4]}"
    return f"source {ref[1]} array {ref[2]}[{ref[3]}]"


class _Decoder:
    """Runs `_load_chunk` over item lists, in a process pool when workers > 1, in order."""

    def __init__(self, listings, n_px, resize, workers):
        self.by_index = {lst.index: lst for lst in listings}
        self.n_px, self.resize = n_px, resize
        self.pool = None
        if workers > 1:
            import multiprocessing

            self.pool = multiprocessing.get_context("fork" if sys.platform == "linux" else None).Pool(workers)

    def run(self, items):
        """Yields (uint8 (m, n_px, n_px, 3), {pos: reason}, chunk length) per CHUNK items."""
        tasks = _chunks(self.by_index, items, self.n_px, self.resize)
        results = self.pool.imap(_load_chunk, tasks) if self.pool else map(_load_chunk, tasks)
        for s, (images, bad) in zip(range(0, len(items), CHUNK), results):
            yield images, bad, min(CHUNK, len(items) - s)

    def close(self):
        """Stop the workers (every needed result has been consumed, or an error is propagating)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def sample_pixels(sources, n_px, resize="squash", max_pixels=1_000_000, seed=0, workers=1):
    """Random pixels of the train/val images of `sources`, resized like tokenize: uint8 (N, 3).

    Picks ceil(max_pixels / n_px^2) random images (test splits excluded), resizes them to n_px and
    returns their pixels, subsampled to max_pixels. Bad files are skipped. Deterministic for a seed.
    """
    listings, _ = list_sources(sources)
    items = [it for lst in listings for s in ("train", "val") for it in lst.items[s]]
    if not items:
        raise TokenizeError("no train images found in the sources")
    rng = np.random.default_rng(seed)
    n_img = min(len(items), -(-max_pixels // (n_px * n_px)))
    chosen = [items[i] for i in np.sort(rng.choice(len(items), n_img, replace=False))]
    decoder = _Decoder(listings, n_px, resize, workers)
    try:
        batches = [images for images, _, _ in decoder.run(chosen)]
    finally:
        decoder.close()
    pixels = np.concatenate(batches).reshape(-1, 3)  # (n_good * n_px * n_px, 3)
    if len(pixels) == 0:
        raise TokenizeError("none of the sampled images could be decoded")
    if len(pixels) > max_pixels:
        pixels = pixels[np.sort(rng.choice(len(pixels), max_pixels, replace=False))]
    return pixels


# ---------------------------------------------------------------------------------------------- writing


def _write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _SplitWriter:
    """webdataset ShardWriter with temp names, progress records and lazy opening (no empty shards)."""

    def __init__(self, out, split, shard_size, start_shard, state):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.start_shard = start_shard
        self.state = state  # dict: items_end, samples, skipped (cumulative), owned by the caller
        self.writer = None
        self.file = None
        self.shards = start_shard

    def _open(self, fname):
        self.file = open(fname + ".tmp", "wb")
        return self.file

    def _finished(self, fname):
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        shard = self.start_shard + self.writer_shards_done
        self.writer_shards_done += 1
        record = {"items_end": self.state["last_pos"] + 1, "samples": self.state["samples"],
                  "skipped": [e for p, e in self.state["skipped"] if p <= self.state["last_pos"]]}
        _write_json(os.path.join(self.out, ".tokenize", f"{self.split}-{shard:06d}.json"), record)
        os.replace(fname + ".tmp", fname)
        self.shards = shard + 1

    def write(self, key, tokens, label):
        import webdataset as wds

        if self.writer is None:
            pattern = os.path.join(self.out.replace("%", "%%"), f"{self.split}-%06d.tar")
            self.writer_shards_done = 0
            self.writer = wds.ShardWriter(pattern, maxcount=self.shard_size, maxsize=float("inf"),
                                          post=self._finished, start_shard=self.start_shard, verbose=0,
                                          opener=self._open, mtime=0, user="igpt-fast",
                                          group="igpt-fast", mode=0o444)
        sample = {"__key__": key, "tokens.npy": tokens}
        if label is not None:
            sample["cls"] = int(label)
        self.writer.write(sample)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _settings(sources, palette, n_px, resize, val_fraction, shard_size, seed):
    return {"version": VERSION, "sources": [os.path.abspath(s) for s in sources], "n_px": n_px,
            "palette_sha256": palette.sha256, "resize": resize, "val_fraction": val_fraction,
            "shard_size": shard_size, "seed": seed}


def _check_existing(out, settings):
    """Refuse a DIR made with other settings; True when DIR is already complete with these."""
    meta_path = os.path.join(out, "meta.json")
    config_path = os.path.join(out, ".tokenize", "config.json")
    old = None
    if os.path.exists(config_path):
        old = _read_json(config_path)
    elif os.path.exists(meta_path):
        old = _read_json(meta_path)
    if old is None:
        return False
    if old.get("n_px") != settings["n_px"]:
        raise TokenizeError(f"{out} holds data tokenized at n_px={old.get('n_px')}, not {settings['n_px']}; "
                            "use another --out or the same --n-px")
    if old.get("palette_sha256") != settings["palette_sha256"]:
        raise TokenizeError(f"{out} holds data tokenized with another palette (sha256 "
                            f"{str(old.get('palette_sha256'))[:12]}); use another --out or that palette")
    if "seed" in old:
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise TokenizeError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                                "use another --out or the same settings")
    return os.path.exists(meta_path)


def _resume_state(out, split, shard_size):
    """Longest prefix of complete shards (tar + record) -> (start_shard, record or None); clean the rest."""
    k, record = 0, None
    while True:
        tar = os.path.join(out, f"{split}-{k:06d}.tar")
        rec = os.path.join(out, ".tokenize", f"{split}-{k:06d}.json")
        if not (os.path.exists(tar) and os.path.exists(rec)):
            break
        record = _read_json(rec)
        k += 1
    prefix = f"{split}-"
    for name in os.listdir(out):
        number = name[len(prefix):-4]
        if name.startswith(prefix) and (name.endswith(".tar.tmp") or (
                name.endswith(".tar") and number.isdigit() and int(number) >= k)):
            os.remove(os.path.join(out, name))
    return k, record


def _split_items(listings, val_fraction, seed):
    """Items per split: val carved from train (seeded), then every split shuffled (seeded)."""
    splits = {s: [it for lst in listings for it in lst.items[s]] for s in SPLITS}
    if val_fraction > 0 and splits["train"]:
        perm = np.random.default_rng(seed).permutation(len(splits["train"]))
        n_val = int(round(val_fraction * len(perm)))
        train = splits["train"]
        splits["val"] = splits["val"] + [train[i] for i in np.sort(perm[:n_val])]
        splits["train"] = [train[i] for i in np.sort(perm[n_val:])]
    for j, s in enumerate(SPLITS):
        perm = np.random.default_rng([seed, j]).permutation(len(splits[s]))
        splits[s] = [splits[s][i] for i in perm]
    return splits


def tokenize_dataset(sources, palette, out, n_px=32, resize="squash", val_fraction=0.0, workers=1,
                     shard_size=5000, seed=0, progress=True):
    """Tokenize `sources` into WebDataset shards in `out` (see the module docstring); returns meta.

    Resumable: rerunning with the same arguments after an interruption completes the same output.
    """
    from tqdm import tqdm

    if resize not in RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if not 0 <= val_fraction < 1:
        raise TokenizeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    palette = _as_palette(palette)
    settings = _settings(sources, palette, n_px, resize, val_fraction, shard_size, seed)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TokenizeError(f"--out {out} exists and is not a folder")
    os.makedirs(out, exist_ok=True)
    if _check_existing(out, settings):
        return _read_json(os.path.join(out, "meta.json"))
    listings, class_names = list_sources(sources)
    os.makedirs(os.path.join(out, ".tokenize"), exist_ok=True)
    _write_json(os.path.join(out, ".tokenize", "config.json"), settings)
    splits = _split_items(listings, val_fraction, seed)
    listed_skips = {s: [e for lst in listings for e in lst.skipped[s]] for s in SPLITS}

    plans = {}
    for split in SPLITS:
        if not splits[split] and not listed_skips[split]:
            continue
        start_shard, record = _resume_state(out, split, shard_size)
        plans[split] = (start_shard, record)
    remaining = sum(len(splits[s]) - (rec["items_end"] if rec else 0) for s, (_, rec) in plans.items())

    decoder = _Decoder(listings, n_px, resize, workers)
    bar = tqdm(total=remaining, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    split_meta = {}
    try:
        for split, (start_shard, record) in plans.items():
            items = splits[split]
            begin = record["items_end"] if record else 0
            state = {"last_pos": begin - 1, "samples": record["samples"] if record else 0,
                     "skipped": [(-1, e) for e in record["skipped"]] if record else []}
            writer = _SplitWriter(out, split, shard_size, start_shard, state)
            bar.set_description(split)
            pos = begin
            for images, bad, n in decoder.run(items[begin:]):
                tokens = palette.quantize(images).reshape(len(images), n_px * n_px)  # (m, n_ctx) uint16
                good = 0
                for j in range(n):
                    key, label, ref = items[pos]
                    if j in bad:
                        state["skipped"].append((pos, {"file": _item_name(ref), "reason": bad[j]}))
                    else:
                        writer.write(key, tokens[good], label)
                        good += 1
                        state["last_pos"] = pos
                        state["samples"] += 1
                    pos += 1
                bar.update(n)
            writer.close()
            split_meta[split] = {"samples": state["samples"], "shards": writer.shards,
                                 "skipped": listed_skips[split] + [e for _, e in state["skipped"]]}
    finally:
        bar.close()
        decoder.close()
    if sum(m["samples"] for m in split_meta.values()) == 0:
        n_bad = sum(len(m["skipped"]) for m in split_meta.values())
        first = next((m["skipped"][0] for m in split_meta.values() if m["skipped"]), None)
        raise TokenizeError(f"no image could be tokenized ({n_bad} skipped"
                            + (f"; first: {first['file']}: {first['reason']})" if first else ")"))
    meta = {"version": VERSION, "n_px": n_px, "n_ctx": n_px * n_px, "n_vocab": palette.k,
            "palette_sha256": palette.sha256, "resize": resize, "class_names": class_names,
            "source": [{"path": os.path.abspath(lst.path), "format": lst.format, "items": lst.count}
                       for lst in listings],
            "splits": split_meta}
    palette.save(os.path.join(out, "palette.npy"))
    _write_json(os.path.join(out, "meta.json"), meta)
    for name in os.listdir(os.path.join(out, ".tokenize")):
        if name != "config.json":
            os.remove(os.path.join(out, ".tokenize", name))
    meta["_elapsed_s"] = time.perf_counter() - t0
    meta["_tokenized"] = remaining
    return meta
