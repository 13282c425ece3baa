"""One token shard, read and validated: fetched (a local file, or a remote URL within a size bound and a
deadline), parsed as a tar, every sample checked, its sha256 compared with meta.json's.

A module of its own because reading one shard is a concept of its own, with its own failure modes
(damaged tars, hostile .npy headers, slow or lying servers), under the streams of igpt_fast.data
(which shards, in which order, on which rank and worker), `igpt-fast verify` and meta.json reading
(remote meta.json is fetched here too). igpt_fast.data re-exports its public names.

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
"""
import ast
import hashlib
import http.client
import io
import math
import os
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from webdataset import tariterators
from webdataset.gopen import gopen

from igpt_fast.errors import DataError

__all__ = ["DataError", "SampleSpec", "ShardCheck", "read_shard", "decode_tokens", "count_samples", "fetch", "is_url",
           "local_path", "FETCH_ATTEMPTS", "FETCH_BACKOFF_S", "FETCH_TIMEOUT_S", "FETCH_DEADLINE_S", "META_MAX_BYTES"]

FETCH_ATTEMPTS = 3  # tries per remote shard or meta.json
FETCH_BACKOFF_S = 0.5  # wait before try k + 1: FETCH_BACKOFF_S * 2 ** (k - 1)
FETCH_TIMEOUT_S = 60.0  # http(s): connect and per-read socket timeout
FETCH_DEADLINE_S = 600.0  # all tries of one remote shard (env IGPT_FAST_SHARD_DEADLINE_S)
META_MAX_BYTES = 64 << 20  # a meta.json larger than this is refused
_READ_BLOCK = 1 << 20


def is_url(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def local_path(url: str) -> str | None:
    """The file path of a local shard (a path or a file:// URL); None for a remote one."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


class _Deadline(Exception):
    """A remote read ran past its shard's deadline."""


def _read_bounded(read, url, max_bytes, deadline, what):
    """Blocks of read(n) up to EOF: DataError past max_bytes, _Deadline past the deadline (monotonic)."""
    blocks: list[bytes] = []
    n = 0
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


def fetch(url: str, max_bytes: int = META_MAX_BYTES, deadline_s: float | None = None,
          what: str | None = None) -> bytes:
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


@dataclass(frozen=True)
class SampleSpec:
    """What every sample must be: tokens uint16 of shape (n_ctx,), each < n_vocab (when known), and a
    label in [0, n_classes) (when known)."""

    n_ctx: int
    n_vocab: int | None = None
    n_classes: int | None = None

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "SampleSpec":
        return cls(meta["n_ctx"], meta.get("n_vocab"), len(meta["class_names"]) if meta.get("class_names") else None)


@dataclass(frozen=True)
class ShardCheck:
    """What each shard file must be, from meta.json: `files` {name: {"bytes", "sha256"}} (every split's),
    else at most `max_bytes`; remote shards read within `deadline_s` (see the module docstring)."""

    max_bytes: int
    deadline_s: float = FETCH_DEADLINE_S
    files: dict = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "ShardCheck":
        splits = meta.get("splits") or {}
        files = {name: entry for s in splits.values() for name, entry in (s.get("files") or {}).items()}
        per_shard = max((-(-s["samples"] // s["shards"]) for s in splits.values()
                         if s.get("samples") and s.get("shards")), default=10_000)
        default = max(2 * per_shard * (2 * meta.get("n_ctx", 4096) + 4096), 16 << 20)
        return cls(_env_number("IGPT_FAST_SHARD_MAX_BYTES", int, default), _deadline_s(), files)

    def expect(self, url: str) -> tuple[int, str, str | None]:
        """(max bytes, what that bound is in words, sha256 or None) of the shard at url."""
        entry = self.files.get(url.rstrip("/").rsplit("/", 1)[-1]) or {}
        if entry.get("bytes") is not None:
            return entry["bytes"], f"the {entry['bytes']} bytes meta.json lists", entry.get("sha256")
        return self.max_bytes, f"{self.max_bytes} bytes (IGPT_FAST_SHARD_MAX_BYTES)", entry.get("sha256")


_NPY_HEADER_LENGTH = {1: "<H", 2: "<I", 3: "<I"}  # .npy format version -> header length field


def decode_tokens(data: bytes) -> np.ndarray:
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
        order: Literal["C", "F"] = "F" if header["fortran_order"] else "C"
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
    samples: list[dict[str, Any]] = []
    seen: set[str] = set()
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
    path = local_path(url)
    if path is None:
        return fetch(url, max_bytes, check.deadline_s, what)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DataError(f"shard {url} is {size} bytes, more than {what}")
            return f.read(max_bytes + 1)
    except OSError as e:
        raise DataError(f"cannot read shard {url}: {e.strerror or e}") from None


def read_shard(url: str, spec: SampleSpec, check: ShardCheck | None = None) -> list[tuple[np.ndarray, int]]:
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


def count_samples(url: str, spec: SampleSpec, check: ShardCheck) -> int:
    """Samples in a shard: from its tar headers for a local uncompressed tar, else by reading it."""
    path = local_path(url)
    if path is not None:
        try:
            with open(path, "rb") as f:
                if f.read(2) != b"\x1f\x8b":
                    f.seek(0)
                    return len(_tar_samples(f, url))
        except OSError as e:
            raise DataError(f"cannot read shard {url}: {e.strerror or e}") from None
    return len(read_shard(url, spec, check))
