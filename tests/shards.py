"""Test helper: write a tokenized dataset the way igpt_fast.tokenize lays it out (shards of
`tokens.npy` + `cls`, palette.npy, meta.json), from tokens the test makes, so model-side tests need
no images."""
import os

import numpy as np
import webdataset as wds

from igpt_fast import tokenize


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
