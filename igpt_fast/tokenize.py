"""Images -> iGPT token sequences, written as WebDataset shards.

References: Chen et al. 2020, section 3.1 (images resized to n_px, each pixel replaced by its nearest
palette colour, raster order); transformers `ImageGPTImageProcessor` (PIL bilinear squash resize);
webdataset `writer.py` (TarWriter / ShardWriter) and its key convention (key = name up to the first dot).
What a source holds (folders, CIFAR, IDX, tars), its labels and splits: igpt_fast.readers.
`val_fraction` carves val from train (before shuffling within splits); a source's own test is kept.

Images are brought to uint8 RGB at n_px by igpt_fast.images (colour rule, resize modes); every image
that is not plain 8-bit RGB is counted by kind in meta.json `converted`.

Output (`tokenize_dataset`): DIR/{split}-%06d.tar written with webdataset's ShardWriter (integer mtime
0, uid/gid 0, mode 0444, USTAR: byte-reproducible), `shard_size` samples per shard; each sample has
`__key__` = "{source:03d}_{index:09d}" (`Item.key`: source position on the command line, item position
in that source's sorted listing: unique, dot-free, traceable), `tokens.npy` (uint16, n_ctx) and `cls`
when the label is known. DIR/palette.npy makes the folder self-contained; DIR/meta.json is written last
(`write_meta`); per split it lists every shard file's size and sha256 (`files`, hashed as the shard is
written; data.py checks them on every read, `igpt-fast verify` on demand) and the skipped files with
their reasons (the first SKIPPED_LISTED; `skipped_count` counts them all). A split whose every image
was refused is an error, not an empty split. A class with no image keeps its id and is listed in
meta.json `empty_classes` (with a warning).

Resume and atomicity: every file is written through igpt_fast.atomic (a temp name beside it, then a
rename; a full disk or a read-only place is one OutputError line naming the file and the free space). A
shard's temp file stays open while it fills; when full, a progress record
DIR/.tokenize/{split}-%06d.json (items consumed, samples written, skipped and converted so far, the
shard's size and sha256) is written atomically, then the shard is renamed. A rerun with the same
settings keeps the longest prefix of shards that have both the tar and its record and continues from
there; because listing, shuffling and sharding are all deterministic, the result is byte-identical to an
uninterrupted run. DIR/.tokenize/config.json holds the settings and DIR/.tokenize/listing.json.gz every
source file's name, size and mtime: a rerun with other settings or over a changed source (files added,
deleted or modified) is refused with the reason, unless `restart` (CLI `--restart`) first clears what an
earlier tokenize left in DIR.

Progress (stderr, igpt_fast.progress): a tqdm bar on a terminal; otherwise (logs, CI) a plain line every
IGPT_FAST_PROGRESS_SECONDS seconds (default 20) and one at the end.
"""
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from .atomic import atomic_path, output_error, write_text
from .progress import Progress
from .images import (  # noqa: F401  (to_rgb, resize_image and the readers' names: public names kept here)
    RESIZE_MODES, array_kind, fast_batch, prepare, prepare_batch, resize_image, to_rgb, to_rgb_kind,
)
from .readers import (  # noqa: F401
    IMAGE_ERRORS, IMAGE_EXTS, SPLITS, Item, TokenizeError, list_sources, read_cifar_batch, read_idx,
    restricted_loads,
)

__all__ = [
    "RESIZE_MODES", "TokenizeError", "Tokenized", "to_rgb", "resize_image", "tokenize_images", "list_sources",
    "sample_pixels", "tokenize_dataset", "write_meta", "read_cifar_batch", "read_idx", "restricted_loads", "Item",
    "IMAGE_EXTS", "SPLITS",
]

VERSION = 1
CHUNK = 256  # items per worker task
FULL_TABLE_PIXELS = 1 << 22  # a run quantizing this many pixels fills the palette's whole table first
SKIPPED_LISTED = 1000  # skipped files listed per split in meta.json (all are counted: skipped_count)
if TYPE_CHECKING:
    from .palette import Palette

_SHARD_NAME = re.compile(r"(?:train|val|test)-\d{6}\.tar")


def tokenize_images(images: Sequence[Image.Image | np.ndarray] | np.ndarray,
                    palette: "Palette | str | os.PathLike[str]", n_px: int = 32, resize: str = "squash",
                    workers: int = 1) -> npt.NDArray[np.uint16]:
    """PIL images or uint8 arrays -> uint16 (B, n_ctx) token ids, raster order.

    `images`: a list of PIL images / arrays (H, W[, C]), or one array batch (B, H, W) (grey) or
    (B, H, W, C); a single image goes in a list. A uint8 array
    (B, n_px, n_px, 3) is quantized directly. `palette`: a Palette or a path to palette.npy.
    `workers` > 1 converts and resizes a list in that many threads (PIL's resampling releases the
    GIL); quantisation is one lookup-table gather for the whole batch. The CLI's worker processes run
    `prepare` on each image and quantize the same way.
    """
    palette = _as_palette(palette)
    if workers > 1 and not isinstance(images, (np.ndarray, Image.Image)) and len(images) >= 2 * workers:
        from concurrent.futures import ThreadPoolExecutor

        step = -(-len(images) // workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = pool.map(prepare_batch, [images[s:s + step] for s in range(0, len(images), step)],
                             [n_px] * workers, [resize] * workers)
            batch = np.concatenate(list(parts))  # (B, n_px, n_px, 3)
    else:
        batch = prepare_batch(images, n_px, resize)  # (B, n_px, n_px, 3)
    return palette.quantize(batch).reshape(len(batch), n_px * n_px)


def _as_palette(palette: "Palette | str | os.PathLike[str]") -> "Palette":
    from .palette import Palette

    return palette if isinstance(palette, Palette) else Palette.load(palette)


def _load(entry, n_px, resize):
    """One payload entry -> (uint8 (n_px, n_px, 3), kind); raises one of IMAGE_ERRORS on a bad file."""
    kind = entry[0]
    if kind == "array":
        return prepare(entry[1], n_px, resize)
    if kind == "file":
        src = entry[1]
    else:  # ("tar", path, offset, size)
        with open(entry[1], "rb") as f:
            f.seek(entry[2])
            data = f.read(entry[3])
        if len(data) != entry[3]:
            raise OSError("tar member is truncated")
        src = io.BytesIO(data)
    with Image.open(src) as im:
        im.load()
        rgb, converted = to_rgb_kind(im)
        return resize_image(rgb, n_px, resize), converted


def _describe(err):
    reason = f"{type(err).__name__}: {err}".strip()
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _load_chunk(task):
    """Worker: (n_px, resize, entries) -> (uint8 (m, n_px, n_px, 3) of the good ones, {pos: reason},
    {pos: converted kind})."""
    n_px, resize, entries = task
    arrays = [e[1] for e in entries if e[0] == "array"]
    if arrays and len(arrays) == len(entries) and len({(a.shape, a.dtype) for a in arrays}) == 1:
        fast = fast_batch(np.stack(arrays), n_px, resize)
        if fast is not None:
            kind = array_kind(arrays[0])
            return fast, {}, ({pos: kind for pos in range(len(arrays))} if kind else {})
    images, bad, kinds = [], {}, {}
    for pos, entry in enumerate(entries):
        try:
            image, kind = _load(entry, n_px, resize)
        except IMAGE_ERRORS as e:
            bad[pos] = _describe(e)
            continue
        images.append(image)
        if kind:
            kinds[pos] = kind
    out = np.stack(images) if images else np.empty((0, n_px, n_px, 3), dtype=np.uint8)
    return out, bad, kinds


def _payload(by_index, item):
    """An item -> what a worker needs: the array itself, or where the bytes are."""
    if item.ref[0] == "array":
        return ("array", by_index[item.source].array(item.ref))
    return item.ref


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
        """Yields (uint8 (m, n_px, n_px, 3), {pos: reason}, {pos: kind}, chunk length) per CHUNK items."""
        tasks = ((self.n_px, self.resize, [_payload(self.by_index, it) for it in items[s:s + CHUNK]])
                 for s in range(0, len(items), CHUNK))
        results = self.pool.imap(_load_chunk, tasks) if self.pool else map(_load_chunk, tasks)
        for s, (images, bad, kinds) in zip(range(0, len(items), CHUNK), results):
            yield images, bad, kinds, min(CHUNK, len(items) - s)

    def close(self):
        """Stop the workers (every needed result has been consumed, or an error is propagating)."""
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def sample_pixels(sources: Sequence[str | os.PathLike[str]], n_px: int, resize: str = "squash",
                  max_pixels: int = 1_000_000, seed: int = 0, workers: int = 1,
                  progress: bool = True) -> npt.NDArray[np.uint8]:
    """Random pixels of the train/val images of `sources`, resized like tokenize: uint8 (N, 3).

    Picks ceil(max_pixels / n_px^2) random images (test splits excluded), resizes them to n_px and
    returns their pixels, subsampled to max_pixels. Bad files are skipped. Deterministic for a seed.
    progress: a display of the images decoded on stderr (igpt_fast.progress).
    """
    listings, _ = list_sources(sources)
    items = [it for lst in listings for s in ("train", "val") for it in lst.items[s]]
    if not items:
        raise TokenizeError("no train images found in the sources")
    rng = np.random.default_rng(seed)
    n_img = min(len(items), -(-max_pixels // (n_px * n_px)))
    chosen = [items[i] for i in np.sort(rng.choice(len(items), n_img, replace=False))]
    decoder = _Decoder(listings, n_px, resize, workers)
    batches = []
    with Progress(len(chosen), "palette: sample images", unit="images", enabled=progress) as bar:
        try:
            for images, _, _, n in decoder.run(chosen):
                batches.append(images)
                bar.update(n)
        finally:
            decoder.close()
    pixels = np.concatenate(batches).reshape(-1, 3)  # (n_good * n_px * n_px, 3)
    if len(pixels) == 0:
        raise TokenizeError("none of the sampled images could be decoded")
    if len(pixels) > max_pixels:
        pixels = pixels[np.sort(rng.choice(len(pixels), max_pixels, replace=False))]
    return pixels


def _write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Digest:
    """The file a shard's tar stream writes to, hashed (sha256) and counted on the way."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.bytes += len(data)
        return self.f.write(data)

    def entry(self):
        """meta.json's entry of the shard file: {"bytes", "sha256"}."""
        return {"bytes": self.bytes, "sha256": self.sha256.hexdigest()}


class _Abandoned(Exception):
    """Unwinds an open shard's atomic write on an interruption (its temp file is removed)."""


def _capped(entries):
    return entries[:SKIPPED_LISTED]


class _SplitWriter:
    """webdataset ShardWriter over atomic temp files (igpt_fast.atomic), with progress records, sha256 and
    size of each shard, and lazy opening (no empty shards). An error while a shard is open removes its
    temp file; an OSError a user can fix (a full disk, a read-only place) becomes one OutputError line
    naming the shard."""

    def __init__(self, out, split, shard_size, start_shard, state):
        self.out, self.split, self.shard_size = out, split, shard_size
        self.start_shard = start_shard
        self.state = state  # dict: last_pos, samples, skipped [(pos, entry)], converted, files, owned by the caller
        self.writer: Any = None  # a webdataset ShardWriter while a shard is open
        self.open_shard: contextlib.ExitStack[Any] | None = None  # the open shard: its atomic_path and its file
        self.digest: _Digest | None = None
        self.shards = start_shard

    def _open(self, fname):
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(fname))
            self.digest = _Digest(stack.enter_context(open(tmp, "wb")))
            self.open_shard = stack.pop_all()
        return self.digest

    def _finished(self, fname):
        shard = self.start_shard + self.writer_shards_done
        self.writer_shards_done += 1
        last = self.state["last_pos"]
        skipped = [e for p, e in self.state["skipped"] if p <= last]
        assert self.digest is not None and self.open_shard is not None  # _open ran for this shard
        entry = self.digest.entry()
        self.state["files"][os.path.basename(fname)] = entry
        record = {"items_end": last + 1, "samples": self.state["samples"], "skipped": _capped(skipped),
                  "skipped_count": self.state["skipped_unlisted"] + len(skipped),
                  "converted": _converted_counts(self.state, last), "file": entry}
        _write_json(os.path.join(self.out, ".tokenize", f"{self.split}-{shard:06d}.json"), record)
        stack, self.open_shard = self.open_shard, None
        stack.close()  # fsync, rename to fname
        self.shards = shard + 1

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            self.writer = None
            if self.open_shard is not None:
                stack, self.open_shard = self.open_shard, None
                stack.__exit__(type(e), e, e.__traceback__)  # removes the temp file; OutputError when user-fixable
            raise

    def write(self, key, tokens, label):
        import webdataset as wds

        sample = {"__key__": key, "tokens.npy": tokens}
        if label is not None:
            sample["cls"] = int(label)
        if self.writer is None:
            pattern = os.path.join(self.out.replace("%", "%%"), f"{self.split}-%06d.tar")
            self.writer_shards_done = 0
            self.writer = self._call(wds.ShardWriter, pattern, maxcount=self.shard_size, maxsize=float("inf"),
                                     post=self._finished, start_shard=self.start_shard, verbose=0,
                                     opener=self._open, mtime=0, user="igpt-fast", group="igpt-fast", mode=0o444)
        self._call(self.writer.write, sample)

    def close(self):
        if self.writer is not None:
            self._call(self.writer.close)
            self.writer = None

    def abandon(self):
        """On an interruption: the open shard's temp file is removed unfinished and unrecorded."""
        self.writer = None
        if self.open_shard is not None:
            stack, self.open_shard = self.open_shard, None
            stack.__exit__(_Abandoned, _Abandoned(), None)


def _converted_counts(state, last_pos=None):
    """{kind: count} of the converted images up to item position last_pos (all when None), sorted."""
    counts = Counter(state["converted_before"])
    counts.update(k for p, k in state["converted"] if last_pos is None or p <= last_pos)
    return dict(sorted(counts.items()))


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
    fix = "use another --out, --restart (discards what DIR holds)"
    if old.get("n_px") != settings["n_px"]:
        raise TokenizeError(f"{out} holds data tokenized at n_px={old.get('n_px')}, not {settings['n_px']}; "
                            f"{fix} or the same --n-px")
    if old.get("palette_sha256") != settings["palette_sha256"]:
        raise TokenizeError(f"{out} holds data tokenized with another palette (sha256 "
                            f"{str(old.get('palette_sha256'))[:12]}); {fix} or that palette")
    if "seed" in old:
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise TokenizeError(f"{out} holds a run with other settings ({', '.join(diff)}); {fix} or the same "
                                "settings")
    return os.path.exists(meta_path)


def _clear(out):
    """Remove what an earlier tokenize left in `out`: shards, meta.json, .tokenize/ (palette.npy, maybe the
    palette being used, stays until the end of the run overwrites it)."""
    for name in os.listdir(out):
        final = re.sub(r"\.tmp(?:\.\d+\.\d+)?$", "", name)  # an atomic temp name, or an older .tmp one
        if _SHARD_NAME.fullmatch(final) or final == "meta.json":
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, ".tokenize"), ignore_errors=True)


def _makedirs(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise output_error(e, path) or e from None


def write_meta(out, palette, n_px, splits, class_names=None, resize="squash", source=(), empty_classes=(),
               converted=None):
    """Write out/meta.json atomically (read by igpt_fast.data.read_meta) and return its content.

    `splits`: {split: {"samples", "shards", "skipped", ...}}; a split without `files` gets the size and
    sha256 of its shards out/{split}-%06d.tar read from disk."""
    splits = {split: {**entry, "files": entry.get("files") or {
        f"{split}-{k:06d}.tar": file_entry(os.path.join(out, f"{split}-{k:06d}.tar")) for k in range(entry["shards"])}}
        for split, entry in splits.items()}
    meta = {"version": VERSION, "n_px": n_px, "n_ctx": n_px * n_px, "n_vocab": palette.k,
            "palette_sha256": palette.sha256, "resize": resize, "class_names": class_names,
            "empty_classes": list(empty_classes), "converted": dict(sorted((converted or {}).items())),
            "source": list(source), "splits": splits}
    _write_json(os.path.join(out, "meta.json"), meta)
    return meta


def _write_listing(path, listing):
    """Gzipped JSON with a zero mtime and no file name in the header: the same listing, the same bytes."""
    data = json.dumps(listing, separators=(",", ":")).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", filename="",
                                                                        mtime=0) as f:
        f.write(data)


def _listing_change(old, new):
    """'' when the sources' files are as `old` recorded them, else what changed, in a few words."""
    for before, now in zip(old, new):
        a = {f[0]: tuple(f[1:]) for f in before["files"]}
        b = {f[0]: tuple(f[1:]) for f in now["files"]}
        changes = [(what, sorted(names)) for what, names in (
            ("added", b.keys() - a.keys()), ("deleted", a.keys() - b.keys()),
            ("modified", [n for n in a.keys() & b.keys() if a[n] != b[n]])) if names]
        if changes:
            said = ", ".join(f"{len(names)} file(s) {what} (e.g. {names[0]})" for what, names in changes)
            return f"source {now['path']} changed since this output was started: {said}"
    return ""


def file_entry(path):
    """meta.json's entry of a shard file: {"bytes": size, "sha256": hex digest}."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _resume_state(out, split):
    """Longest prefix of complete shards (tar + record) -> (start_shard, record or None, {name: file entry});
    clean the rest."""
    k, record, files = 0, None, {}
    while True:
        name = f"{split}-{k:06d}.tar"
        tar = os.path.join(out, name)
        rec = os.path.join(out, ".tokenize", f"{split}-{k:06d}.json")
        if not (os.path.exists(tar) and os.path.exists(rec)):
            break
        record = _read_json(rec)
        files[name] = record.get("file") or file_entry(tar)  # records written before shard digests lack it
        k += 1
    prefix = f"{split}-"
    for name in os.listdir(out):
        number = name[len(prefix):-4]
        if name.startswith(prefix) and (".tar.tmp" in name or (
                name.endswith(".tar") and number.isdigit() and int(number) >= k)):
            os.remove(os.path.join(out, name))
    return k, record, files


def _split_items(listings, val_fraction, seed):
    """Items per split: val carved from train (seeded), then every split shuffled (seeded)."""
    splits = {s: [it for lst in listings for it in lst.items[s]] for s in SPLITS}
    if val_fraction > 0 and splits["train"]:
        perm = np.random.default_rng(seed).permutation(len(splits["train"]))
        n_val = int(round(val_fraction * len(perm)))
        train = splits["train"]
        splits["val"] = splits["val"] + [train[i]._replace(split="val") for i in np.sort(perm[:n_val])]
        splits["train"] = [train[i] for i in np.sort(perm[n_val:])]
    for j, s in enumerate(SPLITS):
        perm = np.random.default_rng([seed, j]).permutation(len(splits[s]))
        splits[s] = [splits[s][i] for i in perm]
    return splits


def _refuse_empty_split(split, skipped):
    first = skipped[0] if skipped else None
    raise TokenizeError(f"no image could be tokenized in the {split} split ({len(skipped)} refused"
                        + (f"; first: {first['file']}: {first['reason']}" if first else "")
                        + "); fix or remove those files, or leave that source out")


class Tokenized(dict):
    """What `tokenize_dataset` returns: meta.json's content (a dict), plus what this call did:
    `tokenized` images in `elapsed_s` seconds, `already_complete` when DIR was complete beforehand."""

    def __init__(self, meta: dict[str, Any], tokenized: int = 0, elapsed_s: float = 0.0,
                 already_complete: bool = False) -> None:
        super().__init__(meta)
        self.tokenized, self.elapsed_s, self.already_complete = tokenized, elapsed_s, already_complete


def tokenize_dataset(sources: Sequence[str | os.PathLike[str]], palette: "Palette | str | os.PathLike[str]",
                     out: str, n_px: int = 32, resize: str = "squash", val_fraction: float = 0.0, workers: int = 1,
                     shard_size: int = 5000, seed: int = 0, progress: bool = True,
                     restart: bool = False) -> Tokenized:
    """Tokenize `sources` into WebDataset shards in `out` (see the module docstring) -> Tokenized (meta).

    Resumable: rerunning with the same arguments after an interruption completes the same output, unless
    the sources changed meanwhile (refused). `restart` first discards whatever an earlier tokenize left
    in `out`.
    """
    if resize not in RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if not 0 <= val_fraction < 1:
        raise TokenizeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    palette = _as_palette(palette)
    settings = _settings(sources, palette, n_px, resize, val_fraction, shard_size, seed)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TokenizeError(f"--out {out} exists and is not a folder")
    _makedirs(out)
    if restart:
        _clear(out)
    complete = _check_existing(out, settings)
    listings, class_names = list_sources(sources)
    listing = [{"path": os.path.abspath(lst.path), "files": lst.files} for lst in listings]
    listing_path = os.path.join(out, ".tokenize", "listing.json.gz")
    if os.path.exists(listing_path):
        with gzip.open(listing_path, "rt", encoding="utf-8") as f:
            change = _listing_change(json.load(f), listing)
        if change:
            raise TokenizeError(f"{change}; rerun with --restart (restart=True) to tokenize it from scratch "
                                f"(what {out} holds is discarded), or restore the source")
    if complete:
        return Tokenized(_read_json(os.path.join(out, "meta.json")), already_complete=True)
    _makedirs(os.path.join(out, ".tokenize"))
    _write_json(os.path.join(out, ".tokenize", "config.json"), settings)
    if not os.path.exists(listing_path):
        _write_listing(listing_path, listing)
    labelled = {it.label for lst in listings for items in lst.items.values() for it in items}
    empty_classes = [name for i, name in enumerate(class_names or []) if i not in labelled]
    if empty_classes:
        warnings.warn(f"{len(empty_classes)} class(es) without any image keep their label ids: "
                      f"{', '.join(empty_classes[:10])}{' ...' if len(empty_classes) > 10 else ''} "
                      "(meta.json empty_classes)", stacklevel=2)
    splits = _split_items(listings, val_fraction, seed)
    listed_skips = {s: [e for lst in listings for e in lst.skipped[s]] for s in SPLITS}

    plans = {}
    for split in SPLITS:
        if not splits[split] and not listed_skips[split]:
            continue
        if not splits[split]:
            _refuse_empty_split(split, listed_skips[split])
        plans[split] = _resume_state(out, split)
    remaining = sum(len(splits[s]) - (rec["items_end"] if rec else 0) for s, (_, rec, _) in plans.items())
    if remaining * n_px * n_px >= FULL_TABLE_PIXELS:
        palette.build_lut()

    decoder = _Decoder(listings, n_px, resize, workers)
    bar = Progress(remaining, f"tokenize {next(iter(plans), '')}", unit="images", enabled=progress and remaining > 0)
    t0 = time.perf_counter()
    split_meta: dict[str, dict[str, Any]] = {}
    converted: Counter[str] = Counter()
    writer: _SplitWriter | None = None
    try:
        for split, (start_shard, record, files) in plans.items():
            items = splits[split]
            record = record or {"items_end": 0, "samples": 0, "skipped": []}
            begin = record["items_end"]
            state = {"last_pos": begin - 1, "samples": record["samples"], "files": files,
                     "skipped": [(-1, e) for e in record["skipped"]],
                     "skipped_unlisted": record.get("skipped_count", len(record["skipped"])) - len(record["skipped"]),
                     "converted_before": record.get("converted", {}), "converted": []}
            writer = _SplitWriter(out, split, shard_size, start_shard, state)
            bar.describe(f"tokenize {split}")
            pos = begin
            for images, bad, kinds, n in decoder.run(items[begin:]):
                tokens = palette.quantize(images).reshape(len(images), n_px * n_px)  # (m, n_ctx) uint16
                good = 0
                for j in range(n):
                    item = items[pos]
                    if j in bad:
                        state["skipped"].append((pos, {"file": item.name, "reason": bad[j]}))
                    else:
                        writer.write(item.key, tokens[good], item.label)
                        good += 1
                        state["last_pos"] = pos
                        state["samples"] += 1
                        if j in kinds:
                            state["converted"].append((pos, kinds[j]))
                    pos += 1
                bar.update(n)
            writer.close()
            skipped = listed_skips[split] + [e for _, e in state["skipped"]]
            if state["samples"] == 0:
                _refuse_empty_split(split, skipped)
            split_meta[split] = {"samples": state["samples"], "shards": writer.shards, "skipped": _capped(skipped),
                                 "skipped_count": len(skipped) + state["skipped_unlisted"], "files": state["files"]}
            converted.update(_converted_counts(state))
    finally:
        if writer is not None:
            writer.abandon()
        bar.close()
        decoder.close()
    palette.save(os.path.join(out, "palette.npy"))
    meta = write_meta(out, palette, n_px, split_meta, class_names, resize, empty_classes=empty_classes,
                      converted=converted, source=[{"path": os.path.abspath(lst.path), "format": lst.format,
                                                    "items": lst.count} for lst in listings])
    for name in os.listdir(os.path.join(out, ".tokenize")):
        if name not in ("config.json", "listing.json.gz"):
            os.remove(os.path.join(out, ".tokenize", name))
    return Tokenized(meta, tokenized=remaining, elapsed_s=time.perf_counter() - t0)
