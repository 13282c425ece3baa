"""Shard streaming: exactly-once evaluation across ranks x workers, deterministic resumable training
stream, shard specs (dir, glob, brace, file://, pipe:), and clear errors."""
import json
import os

import numpy as np
import pytest
import torch

from igpt_fast.data import DataError, eval_loader, read_meta, shard_urls, train_loader
from igpt_fast.palette import Palette
from shards import write_meta, write_split

N_CTX = 16


def _tokens(i):
    """Sample i: tokens carrying i in their first two positions, label i % 10."""
    tokens = np.full(N_CTX, 7, dtype=np.uint16)
    tokens[0], tokens[1] = i % 512, i // 512
    return tokens, i % 10


def _sample_id(tokens):
    return int(tokens[0]) + 512 * int(tokens[1])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train: 103 samples in 6 shards of <= 18; val: 40 samples in 4 shards; sample i has id i."""
    root = tmp_path_factory.mktemp("shards")
    splits = {}
    for split, n, per in (("train", 103, 18), ("val", 40, 10)):
        splits[split] = write_split(str(root), split, (_tokens(i) for i in range(n)), per)
    write_meta(str(root), Palette(np.random.default_rng(0).uniform(-1, 1, (512, 3))), 4, splits)
    return root


def _ids(batches):
    return [_sample_id(t) for tokens, _ in batches for t in tokens]


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2)])
def test_eval_each_sample_exactly_once(shards, world_size, num_workers):
    seen = []
    for rank in range(world_size):
        for tokens, labels in eval_loader(shards, "val", 3, rank, world_size, num_workers):
            assert tokens.dtype == torch.int64 and tokens.shape[1] == N_CTX
            ids = [_sample_id(t) for t in tokens]
            assert labels.tolist() == [i % 10 for i in ids]
            seen += ids
    assert sorted(seen) == list(range(40))


@pytest.mark.parametrize("world_size,num_workers", [(2, 3), (3, 2), (5, 1), (6, 0)])
def test_eval_more_readers_than_shards(shards, world_size, num_workers):
    """4 val shards: ranks beyond the shard count read nothing, a rank runs at most as many workers as
    it has shards, and every sample is still read exactly once."""
    seen = []
    for rank in range(world_size):
        loader = eval_loader(shards, "val", 4, rank=rank, world_size=world_size, num_workers=num_workers)
        if rank >= 4:
            assert list(loader) == []
        seen += _ids(loader)
    assert sorted(seen) == list(range(40))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_stream_is_deterministic_and_endless(shards):
    a = _take(train_loader(shards, 8, seed=3), 30)  # 240 samples > 103: the stream resamples
    b = _take(train_loader(shards, 8, seed=3), 30)
    assert _ids(a) == _ids(b)
    assert set(_ids(a)) <= set(range(103)) and len(set(_ids(a))) > 60
    c = _take(train_loader(shards, 8, seed=4), 30)
    assert _ids(a) != _ids(c)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_resume_continues_the_same_stream(shards, num_workers):
    full = _take(train_loader(shards, 5, seed=1, num_workers=num_workers), 12)
    resumed = _take(train_loader(shards, 5, seed=1, num_workers=num_workers, start_step=7), 5)
    assert _ids(resumed) == _ids(full[7:])
    for (t1, y1), (t2, y2) in zip(resumed, full[7:]):
        assert torch.equal(t1, t2) and torch.equal(y1, y2)


def test_iter_draws_its_seed_at_once(shards):
    """iter() on a loader makes the DataLoader iterator (which draws from torch's RNG) right away, as a
    plain DataLoader does: the training loop restores a checkpoint's RNG state after iter()."""
    for loader in (train_loader(shards, 4), eval_loader(shards, "val", 4)):
        before = torch.get_rng_state()
        iter(loader)
        assert not torch.equal(torch.get_rng_state(), before)


def test_train_ranks_differ(shards):
    r0 = _ids(_take(train_loader(shards, 8, seed=0, rank=0, world_size=2), 5))
    r1 = _ids(_take(train_loader(shards, 8, seed=0, rank=1, world_size=2), 5))
    assert r0 != r1


def test_shard_specs(shards):
    by_dir = shard_urls(shards, "val")
    assert len(by_dir) == 4 and by_dir == sorted(by_dir)
    assert shard_urls(str(shards / "val-*.tar")) == by_dir
    assert shard_urls(str(shards / "val-{000000..000003}.tar")) == by_dir
    spec = "pipe:cat " + str(shards / "val-{000000..000003}.tar")
    urls = shard_urls(spec)
    assert urls == [f"pipe:cat {u}" for u in by_dir]
    seen = _ids(eval_loader(spec, "val", 16, meta=shards / "meta.json"))
    assert sorted(seen) == list(range(40))
    file_urls = "file://" + str(shards / "val-{000000..000003}.tar")
    assert read_meta(file_urls)["n_ctx"] == N_CTX
    assert sorted(_ids(eval_loader(file_urls, "val", 16))) == list(range(40))


def test_errors(tmp_path, shards):
    with pytest.raises(DataError, match="meta.json not found"):
        read_meta(tmp_path)
    with pytest.raises(DataError, match="no shards found for split 'test'"):
        shard_urls(shards, "test")
    with pytest.raises(DataError, match="pass meta="):
        read_meta("pipe:cat x.tar")
    with pytest.raises(DataError, match="rank 2 is outside"):
        train_loader(shards, 4, rank=2, world_size=2)
    (tmp_path / "meta.json").write_text(json.dumps({"n_ctx": N_CTX + 1}))
    os.symlink(shards / "val-000000.tar", tmp_path / "val-000000.tar")
    with pytest.raises(DataError, match="n_ctx=17"):
        next(iter(eval_loader(tmp_path, "val", 4)))
