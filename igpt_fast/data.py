"""Streaming token shards for training (endless, resumable) and evaluation (each sample exactly once).

Shards are WebDataset tars `{split}-%06d.tar` holding `tokens.npy` (uint16, n_ctx) and `cls` per
sample, next to `meta.json` (written by igpt_fast.tokenize). References: webdataset's
ResampledShards / split_by_node / split_by_worker, whose ideas this module follows with explicit,
seeded state so that a resumed run sees the same batches.

Training stream. Each rank splits its batches over `num_workers` DataLoader workers round-robin:
step t of rank r comes from the virtual stream v = t % W of that rank, as its (t // W)-th batch.
Stream (seed, r, v) is a sequence of rounds; round j draws `mix` shards with replacement (resampled
shards) from an RNG seeded with (seed, r, v, j), reads them, and shuffles their union with the same
RNG. Batches are consecutive runs of that sample sequence. So the batch of step t is a function of
(seed, rank, t, world_size, num_workers) alone, and `start_step` resumes it exactly: whole rounds
before the resume point are skipped from shard sample counts, without decoding.

Evaluation stream. Shards are dealt to the ranks (shard i to rank i mod world_size), then each rank's
shards to its DataLoader workers the same way; each reader reads its shards in order: every sample
exactly once across ranks and workers.

Sources: a tokenized directory (`DIR`, shards found as DIR/{split}-*.tar) or any shard spec
webdataset understands -- a local path, a glob, a brace pattern `train-{000000..000009}.tar`, or URLs
(`http://`, `pipe:`) -- with meta.json beside the first shard or given with `meta=`.

Checks: `check_data` compares meta.json with a model's config (n_px, n_vocab) and a checkpoint's
palette; `load_data_palette` reads DIR/palette.npy and checks it against meta.json. A command reads
meta.json once (`read_meta`) and passes it down (`meta=` everywhere).
"""
import glob
import io
import json
import os
import tarfile

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import tariterators
from webdataset.gopen import gopen

from igpt_fast.errors import IGPTError

__all__ = ["DataError", "DataMismatchError", "META_VERSION", "read_meta", "check_data", "load_data_palette",
           "shard_urls", "train_loader", "eval_loader", "decode_tokens"]

META_VERSION = 1


class DataError(IGPTError, ValueError):
    """A dataset that cannot be read as asked: missing meta.json, no shards, a corrupt shard."""


class DataMismatchError(DataError):
    """Data (meta.json / palette) that does not fit the model or checkpoint."""


def _is_url(s):
    return "://" in s or s.startswith("pipe:")


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


def read_meta(data, meta=None):
    """meta.json of a tokenized dataset: a directory, a shard spec (meta.json beside it) or meta=PATH."""
    where = _meta_location(data, meta)
    if not _is_url(where) and not os.path.isfile(where):
        raise DataError(f"meta.json not found at {where}; tokenize the images first "
                        "(igpt-fast tokenize SRC --palette palette.npy --out DIR)")
    try:
        with gopen(where, "rb") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {where}: {e}") from None


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


def decode_tokens(data):
    """tokens.npy bytes -> uint16 array (n_ctx,)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def _samples(url):
    """Raw samples (dicts of bytes) of one shard, in stored order."""
    return tariterators.tarfile_samples([{"url": url}])


def _decode(sample, n_ctx):
    tokens = decode_tokens(sample["tokens.npy"])
    if tokens.shape != (n_ctx,):
        raise DataError(f"sample {sample['__key__']} in {sample['__url__']} has {tokens.shape[0]} tokens, "
                        f"meta.json says n_ctx={n_ctx}")
    label = int(sample["cls"]) if "cls" in sample else -1
    return tokens, label


def _collate(items):
    tokens = torch.from_numpy(np.stack([t for t, _ in items]).astype(np.int64))  # (B, n_ctx)
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)  # (B,)
    return tokens, labels


class _ShardCounts:
    """Samples per shard, from a scan of tar headers (local) or a read (remote); cached."""

    def __init__(self):
        self._counts = {}

    def __call__(self, url):
        if url not in self._counts:
            if _is_url(url):
                self._counts[url] = sum(1 for _ in _samples(url))
            else:
                with tarfile.open(url) as tar:
                    names = [m.name for m in tar if m.isfile()]
                self._counts[url] = len({tariterators.base_plus_ext(n)[0] for n in names} - {None})
        return self._counts[url]


class TrainStream(IterableDataset):
    """Endless, resampled, seeded batches of one rank; see the module docstring for the schedule."""

    def __init__(self, urls, batch_size, n_ctx, seed=0, rank=0, world_size=1, start_step=0, mix=4):
        self.urls, self.batch_size, self.n_ctx = list(urls), batch_size, n_ctx
        self.seed, self.rank, self.world_size, self.start_step = seed, rank, world_size, start_step
        self.mix = max(1, min(mix, len(self.urls)))
        self._count = _ShardCounts()

    def _round(self, stream, j):
        rng = np.random.default_rng([self.seed, self.rank, stream, j])
        return rng, [self.urls[i] for i in rng.integers(0, len(self.urls), self.mix)]

    def samples(self, stream, skip=0):
        """Sample stream `stream` of this rank from position `skip` on (decoded)."""
        j = 0
        while True:
            rng, picked = self._round(stream, j)
            n = sum(self._count(u) for u in picked)
            if n == 0:
                raise DataError(f"shards {picked} hold no samples")
            if skip >= n:
                skip -= n
            else:
                raw = [s for u in picked for s in _samples(u)]
                for i in rng.permutation(len(raw))[skip:]:
                    yield _decode(raw[i], self.n_ctx)
                skip = 0
            j += 1

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        first = self.start_step + worker  # first step this worker serves
        stream = first % n_workers
        it = self.samples(stream, skip=(first // n_workers) * self.batch_size)
        while True:
            yield _collate([next(it) for _ in range(self.batch_size)])


class EvalStream(IterableDataset):
    """Each sample of the shards once across world_size ranks x DataLoader workers."""

    def __init__(self, urls, batch_size, n_ctx, rank=0, world_size=1):
        self.urls, self.batch_size, self.n_ctx = list(urls), batch_size, n_ctx
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        batch = []
        for url in self.urls[self.rank::self.world_size][worker::n_workers]:
            for sample in _samples(url):
                batch.append(_decode(sample, self.n_ctx))
                if len(batch) == self.batch_size:
                    yield _collate(batch)
                    batch = []
        if batch:
            yield _collate(batch)


def _check_rank(rank, world_size):
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world_size {world_size}")


def train_loader(data, batch_size, split="train", seed=0, rank=0, world_size=1, num_workers=0,
                 start_step=0, mix=4, meta=None):
    """Endless DataLoader of (tokens int64 (B, n_ctx), labels int64 (B,), -1 when unknown).

    The batch of step t depends only on (seed, rank, t, world_size, num_workers); start_step=s yields
    the batches of steps s, s+1, ... exactly as an uninterrupted stream would.
    """
    _check_rank(rank, world_size)
    meta = meta if isinstance(meta, dict) else read_meta(data, meta)
    ds = TrainStream(shard_urls(data, split), batch_size, meta["n_ctx"], seed, rank, world_size, start_step, mix)
    return DataLoader(ds, batch_size=None, num_workers=num_workers, persistent_workers=num_workers > 0)


def eval_loader(data, split, batch_size, rank=0, world_size=1, num_workers=0, meta=None):
    """Finite DataLoader over a split: every sample exactly once across ranks and workers.

    Shard i goes to rank i mod world_size, then to that rank's workers in turn. With fewer shards than
    ranks, the ranks beyond the shard count get an empty loader, and each rank runs at most as many
    workers as it has shards: still exactly once. `meta`: the dict of read_meta (read when None)."""
    _check_rank(rank, world_size)
    meta = meta if isinstance(meta, dict) else read_meta(data, meta)
    urls = shard_urls(data, split)
    world_size = min(world_size, len(urls))
    if rank >= world_size:
        return []
    num_workers = min(num_workers, len(urls[rank::world_size]))
    return DataLoader(EvalStream(urls, batch_size, meta["n_ctx"], rank, world_size),
                      batch_size=None, num_workers=num_workers)
