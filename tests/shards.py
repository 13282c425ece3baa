"""Test helper: write a tokenized dataset the way igpt_fast.tokenize lays it out (shards of
`tokens.npy` + `cls`, palette.npy, meta.json), from tokens the test makes, so model-side tests need
no images. `write_dataset` writes the tiny learnable dataset most model-side tests train on (the
`data_dir` fixture of tests/conftest.py); `write_split` and `write_meta` are its parts."""
import os

import numpy as np
import webdataset as wds

from igpt_fast import tokenize
from igpt_fast.palette import Palette

N_PX, N_VOCAB = 4, 16  # the tiny dataset: 4x4 images of 16 colours
SPLITS = (("train", 64, 16), ("val", 20, 8), ("test", 16, 8))  # (split, samples, per shard): val 8 + 8 + 4


def row_samples(n, rng):
    """Learnable images of 3 classes: row r of a label-l image is colour (offset + l * r) mod n_vocab."""
    for i in range(n):
        offset, label = rng.integers(0, 4), i % 3
        rows = (offset + label * np.arange(N_PX))[:, None] + np.zeros(N_PX, dtype=np.int64)  # (n_px, n_px)
        yield (rows % N_VOCAB).reshape(-1), label  # (n_ctx,)


def ramp_samples(n, rng):
    """Images of 3 classes along the raster order: pixel p of a label-l image is colour (offset + l * p) mod n_vocab."""
    for i in range(n):
        yield (rng.integers(0, 4) + (i % 3) * np.arange(N_PX * N_PX)) % N_VOCAB, i % 3  # (n_ctx,)


def write_dataset(out, samples=row_samples, splits=SPLITS, class_names=("a", "b", "c"), seed=0):
    """A tokenized dataset in out (n_px N_PX, a random N_VOCAB-colour palette): each (split, n, per_shard)
    of `splits` holds samples(n, rng) in shards of per_shard. Returns out."""
    out = os.fspath(out)
    rng = np.random.default_rng(seed)
    palette = Palette(rng.uniform(-1, 1, (N_VOCAB, 3)).astype(np.float32))
    written = {split: write_split(out, split, samples(n, rng), per_shard) for split, n, per_shard in splits}
    write_meta(out, palette, N_PX, written, list(class_names) if class_names else None)
    return out


def write_split(out, split, samples, per_shard):
    """samples: (tokens uint16 (n_ctx,), label) pairs -> out/{split}-%06d.tar; returns meta's entry."""
    n = 0
    with wds.ShardWriter(os.path.join(out, f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for tokens, label in samples:
            sink.write({"__key__": f"{split}{n:05d}", "tokens.npy": np.asarray(tokens, dtype=np.uint16),
                        "cls": int(label)})
            n += 1
    return {"samples": n, "shards": -(-n // per_shard), "skipped": []}


def write_meta(out, palette, n_px, splits, class_names=None):
    """palette.npy and meta.json (the library's writer: shard sizes and sha256 from the files) for the
    splits written by write_split."""
    palette.save(os.path.join(out, "palette.npy"))
    return tokenize.write_meta(out, palette, n_px, splits, class_names, source=["synthetic"])
