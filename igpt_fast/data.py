"""Streaming token shards for training (endless, resumable) and evaluation (each sample exactly once).

Shards are WebDataset tars `{split}-%06d.tar` holding `tokens.npy` (uint16, n_ctx) and `cls` per
sample, next to `meta.json` (written by igpt_fast.tokenize). References: webdataset's
ResampledShards / split_by_node / split_by_worker, whose ideas this module follows with explicit,
seeded state so that a resumed run sees the same batches.

Reading a shard (`read_shard`). A shard is read whole into memory (shards are small: ~10 MB) and
validated whole before any of its samples is used: a plain (or gzipped) tar that ends with its
end-of-archive block (Python's tarfile stops silently at a damaged header or at a cut on a member
boundary, so the block is checked), every file member a `KEY.EXT` field, no key twice, at least one
sample, and every sample `tokens.npy` uint16 of shape (n_ctx,) with every token < n_vocab, and an
integer `cls` (in [0, len(class_names)) when meta.json names the classes). Anything else is one
DataError naming the shard and the sample key, raised before a batch of that shard reaches a model.
Then the shard's sha256 is compared with the one meta.json lists for its file name (`files` of each
split, written by tokenize): a shard changed after tokenize, even one that still parses (a flipped
token bit), is a DataError naming the shard. This runs on every read (hashing costs a few percent of
reading); meta.json written before shard digests has none, and such shards are checked as above only.

Bounds (`ShardCheck`, from meta.json). A shard may hold at most the size meta.json lists for it; for a
shard meta.json does not list, at most $IGPT_FAST_SHARD_MAX_BYTES, else twice what the largest split's
samples per shard need (2 * n_ctx + 4 KiB of tar and .npy headers a sample, at least 16 MiB); a
gzipped shard decompresses to at most that much too. A larger local file is refused from its size; a
remote one as soon as its Content-Length, or the bytes it sends, pass the bound (never read whole,
never retried). Local shards (paths, file://) are read once. Remote shards (http(s):// with urllib,
`pipe:` and other schemes with webdataset's gopen) get FETCH_ATTEMPTS tries with exponential backoff
(FETCH_BACKOFF_S, 2x, ...), a FETCH_TIMEOUT_S socket timeout, and one deadline per shard over all its
tries ($IGPT_FAST_SHARD_DEADLINE_S, else FETCH_DEADLINE_S; checked between reads of at most 1 MiB,
each waiting at most FETCH_TIMEOUT_S, so a server that trickles bytes is cut off); a transfer cut
short (fewer bytes than Content-Length) is retried from the start of the shard and its partial bytes
are dropped; an HTTP 4xx other than 408/429 is not retried. The last failure becomes a DataError
naming the URL and the last error.

Training stream. Each rank splits its batches over `num_workers` DataLoader workers round-robin:
step t of rank r comes from the virtual stream v = t % W of that rank, as its (t // W)-th batch.
Stream (seed, r, v) is a sequence of rounds; round j draws `mix` shards with replacement (resampled
shards) from an RNG seeded with (seed, r, v, j), reads them, and shuffles their union with the same
RNG. Batches are consecutive runs of that sample sequence. So the batch of step t is a function of
(seed, rank, t, world_size, num_workers) alone, and `start_step` resumes it exactly: whole rounds
before the resume point are skipped from shard sample counts (from tar headers, without decoding).

Bad training shards. on_bad_shard="error" (the default) raises the reader's DataError. With "skip",
a bad shard contributes no sample: it is left out of its round (and of every later round that draws
it), a warning line names it and the reason once per process, and the loader counts it
(`TrainLoader.skipped`, shown in log.jsonl as `skipped_shards`). Because a shard is validated whole
before its round is shuffled, a resumed run skips it the same way: in "skip" mode the rounds before
the resume point are counted by reading (validating) their shards, each distinct shard once, so
the order stays a function of (seed, rank, step). That holds for shards whose bytes are bad; a
remote shard that failed for the network and reads fine after a resume changes the order from there.
A run whose every shard is bad stops with a DataError.

Evaluation stream. Shards are dealt to the ranks (shard i to rank i mod world_size), then each rank's
shards to its DataLoader workers the same way; each reader reads its shards in order: every sample
exactly once across ranks and workers. Evaluation never skips: a bad shard raises. Missing samples
are an error too: (1) every shard is checked whole as above, on every rank and worker; (2) for a
directory, the number of `{split}-*.tar` files must be meta.json's shard count of the split; (3) with
one process (world_size 1, any num_workers) reading the whole split (a directory, or as many shards
as meta.json lists), the samples read when the loop ends (not stopped early) must be meta.json's
sample count of the split.

Sources: a tokenized directory (`DIR`, shards found as DIR/{split}-*.tar) or any shard spec
webdataset understands -- a local path, a glob, a brace pattern `train-{000000..000009}.tar`, or URLs
(`http://`, `pipe:`) -- with meta.json beside the first shard or given with `meta=`.

`verify_data` (CLI `igpt-fast verify DIR`) reads every shard of every split once, as above, and reports
per split the bad shards and the samples against meta.json.

Checks: `check_data` compares meta.json with a model's config (n_px, n_vocab) and a checkpoint's
palette; `load_data_palette` reads DIR/palette.npy and checks it against meta.json. A command reads
meta.json once (`read_meta`) and passes it down (`meta=` everywhere).
"""
import ast
import glob
import hashlib
import http.client
import io
import json
import math
import os
import struct
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen

from igpt_fast.errors import IGPTError

__all__ = ["DataError", "DataMismatchError", "META_VERSION", "read_meta", "check_data", "load_data_palette",
           "shard_urls", "train_loader", "eval_loader", "decode_tokens", "read_shard", "SampleSpec", "ShardCheck",
           "verify_data", "ON_BAD_SHARD"]

META_VERSION = 1
ON_BAD_SHARD = ("error", "skip")
FETCH_ATTEMPTS = 3  # tries per remote shard or meta.json
FETCH_BACKOFF_S = 0.5  # wait before try k + 1: FETCH_BACKOFF_S * 2 ** (k - 1)
FETCH_TIMEOUT_S = 60.0  # http(s): connect and per-read socket timeout
FETCH_DEADLINE_S = 600.0  # all tries of one remote shard (env IGPT_FAST_SHARD_DEADLINE_S)
META_MAX_BYTES = 64 << 20  # a meta.json larger than this is refused
_READ_BLOCK = 1 << 20


class DataError(IGPTError, ValueError):
    """A dataset that cannot be read as asked: missing meta.json, no shards, a corrupt shard."""


class DataMismatchError(DataError):
    """Data (meta.json / palette) that does not fit the model or checkpoint."""


def _is_url(s):
    return "://" in s or s.startswith("pipe:")


def _local_path(url):
    """The file path of a local shard (a path or a file:// URL); None for a remote one."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if _is_url(url) else url


def _meta_location(data, meta):
    if meta is not None:
        return os.fspath(meta)
    data = os.fspath(data)
    if os.path.isdir(data):
        return os.path.join(data, "meta.json")
    first = next(iter(braceexpand(data)))
    if first.startswith("pipe:"):
        raise DataError(f"cannot find meta.json for {data!r}: pass meta=PATH")
    return first.rsplit("/", 1)[0] + "/meta.json" if "/" in first else "meta.json"


class _Deadline(Exception):
    """A remote read ran past its shard's deadline."""


def _read_bounded(read, url, max_bytes, deadline, what):
    """Blocks of read(n) up to EOF: DataError past max_bytes, _Deadline past the deadline (monotonic)."""
    blocks, n = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _Deadline(n)
        block = read(_READ_BLOCK)
        if not block:
            return b"".join(blocks)
        n += len(block)
        if n > max_bytes:
            raise DataError(f"cannot read {url}: it sends more than {what}")
        blocks.append(block)


def _fetch_once(url, max_bytes, deadline, what):
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Deadline(0)
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=min(FETCH_TIMEOUT_S, left)) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise DataError(f"cannot read {url}: its Content-Length {length} is more than {what}")
            data = _read_bounded(response.read1, url, max_bytes, deadline, what)
            if length.isdigit() and len(data) < int(length):
                raise http.client.IncompleteRead(data, int(length) - len(data))
            return data
    with gopen(url, "rb") as f:  # pipe: and other schemes; a failed command raises on close
        return _read_bounded(getattr(f, "read1", f.read), url, max_bytes, deadline, what)


def _describe(e):
    text, name = str(e), type(e).__name__
    return text if text.startswith(name) else f"{name}: {text}"


def _fetch(url, max_bytes=META_MAX_BYTES, deadline_s=None, what=None):
    """The bytes at a remote URL (at most max_bytes, all tries within deadline_s): FETCH_ATTEMPTS tries
    with exponential backoff, each from the start; DataError naming the URL and the last error."""
    deadline_s = _deadline_s() if deadline_s is None else deadline_s
    deadline = time.monotonic() + deadline_s
    what = what or f"{max_bytes} bytes"
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            return _fetch_once(url, max_bytes, deadline, what)
        except _Deadline:
            last = None
        except urllib.error.HTTPError as e:
            e.close()
            last = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code not in (408, 429):
                break
        except urllib.error.URLError as e:
            last = _describe(e.reason) if isinstance(e.reason, OSError) else str(e.reason)
        except (OSError, http.client.HTTPException) as e:
            last = _describe(e)
        wait = FETCH_BACKOFF_S * 2 ** (attempt - 1)
        if last is None or time.monotonic() + (wait if attempt < FETCH_ATTEMPTS else 0) >= deadline:
            raise DataError(f"cannot read {url}: not read within its deadline of {deadline_s:g} s "
                            f"(IGPT_FAST_SHARD_DEADLINE_S; {attempt} of {FETCH_ATTEMPTS} tries"
                            + (f", the last: {last})" if last else ")"))
        if attempt < FETCH_ATTEMPTS:
            time.sleep(wait)
    raise DataError(f"cannot read {url}: {last} ({attempt} of {FETCH_ATTEMPTS} tries)")


def _env_number(name, kind, default):
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = 0
    if not number > 0 or not math.isfinite(number):
        raise DataError(f"{name}={value!r} is not a positive number")
    return number


def _deadline_s():
    return _env_number("IGPT_FAST_SHARD_DEADLINE_S", float, FETCH_DEADLINE_S)


def read_meta(data, meta=None):
    """meta.json of a tokenized dataset: a directory, a shard spec (meta.json beside it) or meta=PATH."""
    where = _meta_location(data, meta)
    path = _local_path(where)
    if path is not None and not os.path.isfile(path):
        raise DataError(f"meta.json not found at {where}; tokenize the images first "
                        "(igpt-fast tokenize SRC --palette palette.npy --out DIR)")
    try:
        if path is None:
            raw = _fetch(where)
        else:
            with open(path, "rb") as f:
                raw = f.read()
        return json.loads(raw)
    except OSError as e:
        raise DataError(f"cannot read {where}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON: {e}") from None


def check_data(meta, model_config, palette_sha256=None, data_dir="DATA_DIR"):
    """Raise DataMismatchError, naming the fix, when the data's meta.json does not fit the model
    (n_px, n_ctx, n_vocab) or a checkpoint's palette (palette_sha256)."""
    c = model_config
    if meta.get("version") != META_VERSION:
        raise DataMismatchError(f"{data_dir}/meta.json has version {meta.get('version')!r}; this igpt-fast reads "
                                f"version {META_VERSION}: re-run `igpt-fast tokenize`")
    if meta["n_px"] != c.n_px or meta["n_ctx"] != c.n_ctx:
        raise DataMismatchError(f"the data in {data_dir} is {meta['n_px']}x{meta['n_px']} but the model is "
                                f"{c.n_px}x{c.n_px}: pass --n-px {meta['n_px']} (fresh runs) or re-tokenize with "
                                f"`igpt-fast tokenize --n-px {c.n_px}`")
    if meta["n_vocab"] != c.n_vocab:
        raise DataMismatchError(f"the data in {data_dir} has {meta['n_vocab']} colours but the model has n_vocab "
                                f"{c.n_vocab}: tokenize with the model's palette (or train a fresh model)")
    if palette_sha256 is not None and meta["palette_sha256"] != palette_sha256:
        raise DataMismatchError(f"the data in {data_dir} was tokenized with palette {meta['palette_sha256'][:12]} "
                                f"but the checkpoint uses {palette_sha256[:12]}: re-tokenize with the checkpoint's "
                                "palette (`igpt-fast tokenize --palette ...`)")


def load_data_palette(data_dir, meta):
    """The Palette in data_dir/palette.npy, checked against meta.json's sha256."""
    from igpt_fast.palette import Palette

    path = os.path.join(os.fspath(data_dir), "palette.npy")
    if not os.path.isfile(path):
        raise DataMismatchError(f"{path} not found; re-run `igpt-fast tokenize` into {data_dir}")
    palette = Palette.load(path)
    if palette.sha256 != meta["palette_sha256"]:
        raise DataMismatchError(f"{path} (sha256 {palette.sha256[:12]}) is not the palette meta.json names "
                                f"({meta['palette_sha256'][:12]}); re-run `igpt-fast tokenize` into {data_dir}")
    return palette


def shard_urls(data, split="train"):
    """Sorted shard list of a split: DIR/{split}-*.tar for a directory, else the expanded spec."""
    data = os.fspath(data)
    if os.path.isdir(data):
        urls = sorted(glob.glob(os.path.join(glob.escape(data), f"{split}-*.tar")))
        where = f"{data}/{split}-*.tar"
    else:
        urls = []
        for part in braceexpand(data):
            if _is_url(part):
                urls.append(part)
            elif glob.has_magic(part):
                urls.extend(sorted(glob.glob(part)))
            elif os.path.isfile(part):
                urls.append(part)
        where = data
    if not urls:
        raise DataError(f"no shards found for split {split!r} at {where}")
    return urls


@dataclass(frozen=True)
class SampleSpec:
    """What every sample must be: tokens uint16 of shape (n_ctx,), each < n_vocab (when known), and a
    label in [0, n_classes) (when known)."""

    n_ctx: int
    n_vocab: int | None = None
    n_classes: int | None = None

    @classmethod
    def from_meta(cls, meta):
        return cls(meta["n_ctx"], meta.get("n_vocab"), len(meta["class_names"]) if meta.get("class_names") else None)


@dataclass(frozen=True)
class ShardCheck:
    """What each shard file must be, from meta.json: `files` {name: {"bytes", "sha256"}} (every split's),
    else at most `max_bytes`; remote shards read within `deadline_s` (see the module docstring)."""

    max_bytes: int
    deadline_s: float = FETCH_DEADLINE_S
    files: dict = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta):
        splits = meta.get("splits") or {}
        files = {name: entry for s in splits.values() for name, entry in (s.get("files") or {}).items()}
        per_shard = max((-(-s["samples"] // s["shards"]) for s in splits.values()
                         if s.get("samples") and s.get("shards")), default=10_000)
        default = max(2 * per_shard * (2 * meta.get("n_ctx", 4096) + 4096), 16 << 20)
        return cls(_env_number("IGPT_FAST_SHARD_MAX_BYTES", int, default), _deadline_s(), files)

    def expect(self, url):
        """(max bytes, what that bound is in words, sha256 or None) of the shard at url."""
        entry = self.files.get(url.rstrip("/").rsplit("/", 1)[-1]) or {}
        if entry.get("bytes") is not None:
            return entry["bytes"], f"the {entry['bytes']} bytes meta.json lists", entry.get("sha256")
        return self.max_bytes, f"{self.max_bytes} bytes (IGPT_FAST_SHARD_MAX_BYTES)", entry.get("sha256")


_NPY_HEADER_LENGTH = {1: "<H", 2: "<I", 3: "<I"}  # .npy format version -> header length field


def decode_tokens(data):
    """tokens.npy bytes -> the array they hold (a copy; never a pickle); DataError saying what is wrong.

    The .npy header is parsed here (ast.literal_eval of its dict, as numpy does) because np.load lets
    a damaged header escape as SyntaxError or tokenize.TokenError, or reads it as a pickle."""
    if not data.startswith(np.lib.format.MAGIC_PREFIX):
        raise DataError(f"tokens.npy does not start with the .npy magic (got {data[:6]!r})")
    major = data[6] if len(data) > 6 else None
    if major not in _NPY_HEADER_LENGTH:
        raise DataError(f"tokens.npy is damaged: unknown .npy version {major}")
    start = 8 + struct.calcsize(_NPY_HEADER_LENGTH[major])
    (length,) = struct.unpack(_NPY_HEADER_LENGTH[major], data[8:start].ljust(start - 8, b"\0"))
    try:
        header = ast.literal_eval(data[start:start + length].decode("utf8" if major == 3 else "latin1"))
        dtype, shape = np.dtype(header["descr"]), tuple(int(n) for n in header["shape"])
        order = "F" if header["fortran_order"] else "C"
    except (ValueError, SyntaxError, TypeError, KeyError, MemoryError, RecursionError) as e:
        raise DataError(f"tokens.npy is damaged: its header {data[start:start + 80]!r} does not parse "
                        f"({type(e).__name__})") from None
    if dtype.hasobject:
        raise DataError("tokens.npy holds Python objects (a pickle), not tokens")
    size = math.prod(shape) * dtype.itemsize
    if len(data) != start + length + size:
        raise DataError(f"tokens.npy is damaged: {len(data) - start - length} bytes of array data where its header "
                        f"announces {size} ({dtype} {shape})")
    return np.frombuffer(data, dtype, offset=start + length).reshape(shape, order=order).copy()


def _check_sample(sample, url, spec):
    """(tokens uint16 (n_ctx,), label or -1) of one raw sample; DataError naming the shard and the key."""
    where = f"sample {sample['__key__']} of shard {url}"
    if "tokens.npy" not in sample:
        fields = ", ".join(sorted(k for k in sample if k != "__key__"))
        raise DataError(f"{where} has no tokens.npy (its fields: {fields})")
    try:
        tokens = decode_tokens(sample["tokens.npy"])
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if tokens.dtype != np.uint16:
        raise DataError(f"{where}: tokens.npy is {tokens.dtype}, not uint16")
    if tokens.shape != (spec.n_ctx,):
        got = f"{tokens.shape[0]} tokens" if tokens.ndim == 1 else f"shape {tokens.shape}"
        raise DataError(f"{where} has {got}, meta.json says n_ctx={spec.n_ctx}")
    if spec.n_vocab is not None and int(tokens.max()) >= spec.n_vocab:
        i = int(tokens.argmax())
        raise DataError(f"{where}: token {tokens[i]} at position {i} is not below n_vocab={spec.n_vocab}")
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"])
        except ValueError:
            raise DataError(f"{where}: cls {sample['cls'][:20]!r} is not an integer") from None
        if spec.n_classes is not None and not 0 <= label < spec.n_classes:
            raise DataError(f"{where}: label {label} is outside the {spec.n_classes} classes of meta.json")
    return tokens, label


def _tar_samples(fileobj, url, data=None):
    """Raw samples ({"__key__", EXT: bytes} in stored order) of a plain tar; with data=None (headers
    only) the field values are None. DataError for a damaged or truncated tar."""
    samples, seen = [], set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = tariterators.base_plus_ext(member.name)
                if key is None:
                    raise DataError(f"shard {url}: member {member.name!r} is not a KEY.EXT sample field")
                if not samples or samples[-1]["__key__"] != key:
                    if key in seen:
                        raise DataError(f"shard {url}: sample {key} appears twice")
                    seen.add(key)
                    samples.append({"__key__": key})
                value = None
                if data is not None:
                    value = data[member.offset_data:member.offset_data + member.size]
                    if len(value) != member.size:
                        raise DataError(f"shard {url} is truncated or damaged inside {member.name}")
                samples[-1][ext] = value
            end = tar.offset  # where the member after the last one read would start
        fileobj.seek(end)
        if fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise DataError(f"shard {url} is truncated or damaged at byte {end} (after {len(samples)} samples): "
                            "no end-of-archive block where its members stop")
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"shard {url} is truncated or damaged (tarfile: {e})") from None
    if not samples:
        raise DataError(f"shard {url} holds no samples")
    return samples


def _gunzip(data, url, max_bytes):
    unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = unzip.decompress(data, max_bytes + 1)
        if len(out) > max_bytes:
            raise DataError(f"shard {url} decompresses to more than {max_bytes} bytes (IGPT_FAST_SHARD_MAX_BYTES)")
        if not unzip.eof:
            raise DataError(f"shard {url} is not a readable gzip stream: it ends before the gzip end")
    except zlib.error as e:
        raise DataError(f"shard {url} is not a readable gzip stream: {e}") from None
    return out


def _shard_bytes(url, check):
    """The bytes of a shard as stored, at most check's bound (DataError naming the shard)."""
    max_bytes, what, _ = check.expect(url)
    path = _local_path(url)
    if path is None:
        return _fetch(url, max_bytes, check.deadline_s, what)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DataError(f"shard {url} is {size} bytes, more than {what}")
            return f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"cannot read shard {url}: {e.strerror or e}") from None


def read_shard(url, spec, check=None):
    """Every sample of one shard as (tokens uint16 (n_ctx,), label or -1), in stored order, validated
    whole against spec (a SampleSpec, e.g. SampleSpec.from_meta(meta)) and check (a ShardCheck, e.g.
    ShardCheck.from_meta(meta): the shard's size bound and sha256): a DataError names the shard (and
    the sample key) of the first fault; nothing is returned from a bad shard."""
    check = check or ShardCheck.from_meta({"n_ctx": spec.n_ctx})
    data = _shard_bytes(url, check)
    tar = _gunzip(data, url, check.max_bytes) if data[:2] == b"\x1f\x8b" else data  # a .tar.gz shard
    samples = [_check_sample(s, url, spec) for s in _tar_samples(io.BytesIO(tar), url, tar)]
    _, _, sha256 = check.expect(url)
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise DataError(f"shard {url} does not match meta.json: its sha256 is {got[:12]}, meta.json lists "
                            f"{sha256[:12]} (changed or damaged since tokenize): restore it or re-run "
                            "`igpt-fast tokenize`")
    return samples


def _count_samples(url, spec, check):
    """Samples in a shard: from its tar headers for a local uncompressed tar, else by reading it."""
    path = _local_path(url)
    if path is not None:
        try:
            with open(path, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    f.seek(0)
                    return len(_tar_samples(f, url))
        except OSError as e:
            raise DataError(f"cannot read shard {url}: {e.strerror or e}") from None
    return len(read_shard(url, spec, check))


def _collate(items):
    tokens = torch.from_numpy(np.stack([t for t, _ in items]).astype(np.int64))  # (B, n_ctx)
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)  # (B,)
    return tokens, labels


class _Item(NamedTuple):
    """What a stream sends from its DataLoader worker: a batch, or the DataError that stopped it, and
    the bad shards it left out since the last item."""

    batch: tuple | None
    skipped: tuple = ()
    error: str | None = None


class TrainStream(IterableDataset):
    """Endless, resampled, seeded batches of one rank; see the module docstring for the schedule."""

    def __init__(self, urls, batch_size, spec, seed=0, rank=0, world_size=1, start_step=0, mix=4,
                 on_bad_shard="error", check=None):
        self.urls, self.batch_size, self.spec, self.check = list(urls), batch_size, spec, check
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        self.mix = max(1, min(mix, len(self.urls)))
        self.on_bad_shard = on_bad_shard
        self._counts, self._bad, self._new_bad = {}, {}, []

    def _round(self, stream, j):
        rng = np.random.default_rng([self.seed, self.rank, stream, j])
        return rng, [self.urls[i] for i in rng.integers(0, len(self.urls), self.mix)]

    def _read(self, url):
        """A shard's validated samples; with on_bad_shard="skip", [] for a bad shard (noted once)."""
        if url in self._bad:
            return []
        try:
            samples = read_shard(url, self.spec, self.check)
        except DataError as e:
            if self.on_bad_shard != "skip":
                raise
            self._bad[url] = str(e)
            self._new_bad.append((url, str(e)))
            samples = []
            if len(self._bad) == len(set(self.urls)):
                raise DataError(f"all {len(self._bad)} shards are bad; the last: {e}") from None
        self._counts[url] = len(samples)
        return samples

    def _count(self, url):
        if url not in self._counts:
            if self.on_bad_shard == "skip":
                self._read(url)  # a bad shard counts 0, as when its round was read
            else:
                self._counts[url] = _count_samples(url, self.spec, self.check)
        return self._counts[url]

    def samples(self, stream, skip=0):
        """Sample stream `stream` of this rank from position `skip` on (decoded)."""
        j = 0
        while True:
            rng, picked = self._round(stream, j)
            n = sum(self._count(u) for u in picked) if skip else 0
            if skip and skip >= n:
                skip -= n
            else:
                shards = {u: self._read(u) for u in dict.fromkeys(picked)}
                raw = [s for u in picked for s in shards[u]]
                for i in rng.permutation(len(raw))[skip:]:
                    yield raw[i]
                skip = 0
            j += 1

    def _take_new_bad(self):
        new, self._new_bad = tuple(self._new_bad), []
        return new

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = self.start_step + worker  # first step this worker serves
        stream = first % n_workers
        it = self.samples(stream, skip=(first // n_workers) * self.batch_size)
        while True:
            try:
                batch = _collate([next(it) for _ in range(self.batch_size)])
            except DataError as e:
                yield _Item(None, self._take_new_bad(), str(e))
                return
            yield _Item(batch, self._take_new_bad())


class EvalStream(IterableDataset):
    """Each sample of the shards once across world_size ranks x DataLoader workers."""

    def __init__(self, urls, batch_size, spec, rank=0, world_size=1, check=None):
        self.urls, self.batch_size, self.spec, self.check = list(urls), batch_size, spec, check
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        batch = []
        for url in self.urls[self.rank::self.world_size][worker::n_workers]:
            try:
                samples = read_shard(url, self.spec, self.check)
            except DataError as e:
                yield _Item(None, error=str(e))
                return
            for sample in samples:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield _Item(_collate(batch))
                    batch = []
        if batch:
            yield _Item(_collate(batch))


class TrainLoader(DataLoader):
    """train_loader's endless DataLoader of (tokens, labels). A reader's DataError is raised here, in
    the consuming process, as one line. `skipped`: {shard: reason} of the bad shards left out with
    on_bad_shard="skip"; `skipped_shards`: their number. on_skip(url, reason, n) is called once per
    bad shard (default: a warning line on stderr)."""

    def __init__(self, stream, num_workers=0, on_skip=None):
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
        self.skipped = {}
        self.on_skip = on_skip or _warn_skipped(stream.rank, stream.world_size)

    @property
    def skipped_shards(self):
        return len(self.skipped)

    def __iter__(self):  # the DataLoader iterator is made now: it draws from torch's RNG (resume order)
        return self._batches(super().__iter__())

    def _batches(self, items):
        for item in items:
            for url, reason in item.skipped:
                if url not in self.skipped:
                    self.skipped[url] = reason
                    self.on_skip(url, reason, len(self.skipped))
            if item.error is not None:
                raise DataError(item.error)
            yield item.batch


def _warn_skipped(rank, world_size):
    prefix = f"rank {rank}: " if world_size > 1 else ""

    def warn(url, reason, n):
        print(f"warning: {prefix}skipped bad shard {url} ({n} skipped so far): {reason}", file=sys.stderr, flush=True)
    return warn


class EvalLoader(DataLoader):
    """eval_loader's finite DataLoader of (tokens, labels). A reader's DataError is raised here as one
    line; when `expected` is set, a loop that runs to the end raises DataError unless it read exactly
    `expected` samples."""

    def __init__(self, stream, num_workers=0, expected=None, what=""):
        super().__init__(stream, batch_size=None, num_workers=num_workers)
        self.expected, self.what = expected, what

    def __iter__(self):  # the DataLoader iterator is made now, as a DataLoader's own __iter__ does
        return self._batches(super().__iter__())

    def _batches(self, items):
        n = 0
        for item in items:
            if item.error is not None:
                raise DataError(item.error)
            n += len(item.batch[1])
            yield item.batch
        if self.expected is not None and n != self.expected:
            raise DataError(f"{self.what}: read {n} samples, meta.json says {self.expected}; shards are missing "
                            "or hold other samples than tokenize wrote: re-run `igpt-fast tokenize`")


def _check_rank(rank, world_size):
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")


def _split_shards(data, split, meta):
    """(urls, whole): the split's shards, and whether they are all of it (meta.json's shard count).
    DataError when a directory holds another number of {split} shards than meta.json lists."""
    urls = shard_urls(data, split)
    listed = meta.get("splits", {}).get(split, {}).get("shards")
    if os.path.isdir(os.fspath(data)) and listed is not None and listed != len(urls):
        raise DataError(f"meta.json lists {listed} {split!r} shards but {os.fspath(data)} holds {len(urls)} "
                        f"({split}-*.tar): a shard is missing or extra; re-run `igpt-fast tokenize`")
    return urls, listed == len(urls)


def train_loader(data, batch_size, split="train", seed=0, rank=0, world_size=1, num_workers=0,
                 start_step=0, mix=4, meta=None, on_bad_shard="error", on_skip=None):
    """Endless TrainLoader of (tokens int64 (B, n_ctx), labels int64 (B,), -1 when unknown).

    The batch of step t depends only on (seed, rank, t, world_size, num_workers); start_step=s yields
    the batches of steps s, s+1, ... exactly as an uninterrupted stream would. on_bad_shard: "error"
    (raise the DataError of a bad shard) or "skip" (leave it out, see the module docstring)."""
    _check_rank(rank, world_size)
    if on_bad_shard not in ON_BAD_SHARD:
        raise DataError(f"on_bad_shard must be one of {ON_BAD_SHARD}, got {on_bad_shard!r}")
    meta = meta if isinstance(meta, dict) else read_meta(data, meta)
    urls, _ = _split_shards(data, split, meta)
    stream = TrainStream(urls, batch_size, SampleSpec.from_meta(meta), seed, rank, world_size, start_step, mix,
                         on_bad_shard, ShardCheck.from_meta(meta))
    return TrainLoader(stream, num_workers, on_skip)


def eval_loader(data, split, batch_size, rank=0, world_size=1, num_workers=0, meta=None):
    """Finite EvalLoader over a split: every sample exactly once across ranks and workers.

    Shard i goes to rank i mod world_size, then to that rank's workers in turn. With fewer shards than
    ranks, the ranks beyond the shard count get an empty loader, and each rank runs at most as many
    workers as it has shards: still exactly once. A bad shard raises DataError; with world_size 1 a
    loop over the whole split that ends with another sample count than meta.json's raises DataError.
    `meta`: the dict of read_meta (read when None)."""
    _check_rank(rank, world_size)
    meta = meta if isinstance(meta, dict) else read_meta(data, meta)
    urls, whole = _split_shards(data, split, meta)
    expected = meta["splits"][split].get("samples") if whole and world_size == 1 else None
    world_size = min(world_size, len(urls))
    if rank >= world_size:
        return []
    num_workers = min(num_workers, len(urls[rank::world_size]))
    stream = EvalStream(urls, batch_size, SampleSpec.from_meta(meta), rank, world_size, ShardCheck.from_meta(meta))
    return EvalLoader(stream, num_workers, expected, f"split {split!r} of {os.fspath(data)}")


class SplitReport(NamedTuple):
    """What verify_data found in one split."""

    split: str
    shards: int  # shard files read
    samples: int  # samples in the good ones
    expected: int | None  # meta.json's sample count
    bad: dict  # {shard: reason}, or {"": reason} for the split as a whole
    unchecked: int  # shards meta.json lists no sha256 for


def verify_data(data, meta=None):
    """Read every shard of every split of a tokenized folder once (structure, samples, size and sha256
    against meta.json) -> [SplitReport]; nothing is raised for a bad shard."""
    meta = meta if isinstance(meta, dict) else read_meta(data, meta)
    spec, check, reports = SampleSpec.from_meta(meta), ShardCheck.from_meta(meta), []
    for split, entry in (meta.get("splits") or {}).items():
        bad, n, urls = {}, 0, []
        try:
            urls, _ = _split_shards(data, split, meta)
        except DataError as e:
            bad[""] = str(e)
        for url in urls:
            try:
                n += len(read_shard(url, spec, check))
            except DataError as e:
                bad[url] = str(e)
        if not bad and entry.get("samples") is not None and n != entry["samples"]:
            bad[""] = f"read {n} samples, meta.json says {entry['samples']}"
        unchecked = sum(check.expect(u)[2] is None for u in urls)
        reports.append(SplitReport(split, len(urls), n, entry.get("samples"), bad, unchecked))
    return reports
