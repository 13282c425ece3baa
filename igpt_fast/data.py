"""Streaming token shards for training (endless, resumable) and evaluation (each sample exactly once).

Shards are WebDataset tars `{split}-%06d.tar` holding `tokens.npy` (uint16, n_ctx) and `cls` per
sample, next to `meta.json` (written by igpt_fast.tokenize). References: webdataset's
ResampledShards / split_by_node / split_by_worker, whose ideas this module follows with explicit,
seeded state so that a resumed run sees the same batches.

Reading and validating one shard (local or remote, within its size bound and deadline, its sha256
checked against meta.json): igpt_fast.shard, whose names this module re-exports.

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
import glob
import json
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from igpt_fast.errors import DataError, DataMismatchError
from igpt_fast.shard import (SampleSpec, ShardCheck, count_samples, decode_tokens, fetch, is_url,
                             local_path, read_shard)

if TYPE_CHECKING:
    from igpt_fast.model import GPTConfig
    from igpt_fast.palette import Palette

__all__ = ["DataError", "DataMismatchError", "META_VERSION", "read_meta", "check_data", "load_data_palette",
           "shard_urls", "train_loader", "eval_loader", "decode_tokens", "read_shard", "SampleSpec", "ShardCheck",
           "verify_data", "ON_BAD_SHARD"]

META_VERSION = 1
ON_BAD_SHARD = ("error", "skip")
# meta= of the readers: meta.json's dict (read_meta's), its path, or None (found from `data`)
MetaArg = Union[dict[str, Any], str, "os.PathLike[str]", None]


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


def read_meta(data: str | os.PathLike[str], meta: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """meta.json of a tokenized dataset: a directory, a shard spec (meta.json beside it) or meta=PATH."""
    where = _meta_location(data, meta)
    path = local_path(where)
    if path is not None and not os.path.isfile(path):
        raise DataError(f"meta.json not found at {where}; tokenize the images first "
                        "(igpt-fast tokenize SRC --palette palette.npy --out DIR)")
    try:
        if path is None:
            raw = fetch(where)
        else:
            with open(path, "rb") as f:
                raw = f.read()
        return json.loads(raw)
    except OSError as e:
        raise DataError(f"cannot read {where}: {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where} is not JSON: {e}") from None


def check_data(meta: dict[str, Any], model_config: "GPTConfig", palette_sha256: str | None = None,
               data_dir: str | os.PathLike[str] = "DATA_DIR") -> None:
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


def load_data_palette(data_dir: str | os.PathLike[str], meta: dict[str, Any]) -> "Palette":
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


def shard_urls(data: str | os.PathLike[str], split: str = "train") -> list[str]:
    """Sorted shard list of a split: DIR/{split}-*.tar for a directory, else the expanded spec."""
    data = os.fspath(data)
    if os.path.isdir(data):
        urls = sorted(glob.glob(os.path.join(glob.escape(data), f"{split}-*.tar")))
        where = f"{data}/{split}-*.tar"
    else:
        urls = []
        for part in braceexpand(data):
            if is_url(part):
                urls.append(part)
            elif glob.has_magic(part):
                urls.extend(sorted(glob.glob(part)))
            elif os.path.isfile(part):
                urls.append(part)
        where = data
    if not urls:
        raise DataError(f"no shards found for split {split!r} at {where}")
    return urls


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
                self._counts[url] = count_samples(url, self.spec, self.check)
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

    def __init__(self, stream: "TrainStream", num_workers: int = 0,
                 on_skip: Callable[[str, str, int], None] | None = None) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)
        self.skipped: dict[str, str] = {}
        self.on_skip = on_skip or _warn_skipped(stream.rank, stream.world_size)

    @property
    def skipped_shards(self) -> int:
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


def train_loader(data: str | os.PathLike[str], batch_size: int, split: str = "train", seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_step: int = 0, mix: int = 4, meta: MetaArg = None,
                 on_bad_shard: str = "error",
                 on_skip: Callable[[str, str, int], None] | None = None) -> "TrainLoader":
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


def eval_loader(data: str | os.PathLike[str], split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, meta: MetaArg = None) -> "EvalLoader | list[tuple[torch.Tensor, torch.Tensor]]":
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


def verify_data(data: str | os.PathLike[str], meta: MetaArg = None) -> list[SplitReport]:
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
