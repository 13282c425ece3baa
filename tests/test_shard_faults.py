"""Corrupt and short shards: every fault is one DataError naming the shard (and the sample key),
raised before a batch of the bad shard reaches a model; on_bad_shard="skip" leaves a bad train shard
out, warns once, counts it, and keeps the order a function of (seed, rank, step) across a resume;
evaluation never skips and checks what it read against meta.json."""
import io
import json
import os
import re
import shutil
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner

from igpt_fast.cli import cli
from igpt_fast.data import DataError, eval_loader, read_shard, SampleSpec, train_loader
from igpt_fast.palette import Palette
from shards import write_meta, write_split

N_PX, N_VOCAB = 4, 16
N_CTX = N_PX * N_PX
CLASSES = [f"c{i}" for i in range(10)]


def _tokens(i):
    """Sample i (< 256): tokens carrying i in their first two positions, label i % 10."""
    tokens = np.full(N_CTX, 5, dtype=np.uint16)
    tokens[0], tokens[1] = i % N_VOCAB, i // N_VOCAB
    return tokens, i % 10


def _ids(batches):
    return [int(t[0]) + N_VOCAB * int(t[1]) for tokens, _ in batches for t in tokens]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """train: 60 samples in 6 shards of 10 (shard k holds ids 10k..10k+9); val: 40 in 4 shards."""
    root = tmp_path_factory.mktemp("clean")
    splits = {split: write_split(str(root), split, (_tokens(i) for i in range(n)), 10)
              for split, n in (("train", 60), ("val", 40))}
    write_meta(str(root), Palette(np.random.default_rng(0).uniform(-1, 1, (N_VOCAB, 3))), N_PX, splits, CLASSES)
    return root


@pytest.fixture
def data(clean, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean, root)
    return root


def _rewrite(path, edit):
    """Rewrite a tar through edit(key, ext, bytes) -> bytes (None drops the member); a well-formed tar."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member, value in members:
            key, ext = member.name.split(".", 1)
            value = edit(key, ext, value)
            if value is not None:
                member.size = len(value)
                tar.addfile(member, io.BytesIO(value))
    path.write_bytes(out.getvalue())


def _npy(array):
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _fault(kind, path, key):
    """Damage sample `key` of the shard at path (or the whole tar) the way `kind` says."""
    def edit_tokens(change):
        _rewrite(path, lambda k, e, v: change(v) if (k, e) == (key, "tokens.npy") else v)

    if kind == "truncated mid-member":
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2 + 700])
    elif kind == "truncated at a member boundary":
        with tarfile.open(path) as tar:
            cut = [m.offset for m in tar][6]  # the pax header of sample 3's first member
        path.write_bytes(path.read_bytes()[:cut])
    elif kind == "damaged header block":
        data = bytearray(path.read_bytes())
        with tarfile.open(path) as tar:
            offset = [m.offset for m in tar][4]
        data[offset + 100] ^= 0xFF  # sample 2's first header: its checksum fails, tarfile stops there silently
        path.write_bytes(bytes(data))
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "damaged npy magic":
        edit_tokens(lambda v: b"\x93NUMPX" + v[6:])
    elif kind == "damaged npy header":
        edit_tokens(lambda v: v[:10] + b"{'descr': '<u2', 'fortran_order': False, 'shape': (16,}" + v[64:])
    elif kind == "short npy data":
        edit_tokens(lambda v: v[:-4])
    elif kind == "pickled object array":
        edit_tokens(lambda v: _npy(np.array([{"x": 1}], dtype=object)))
    elif kind == "no tokens.npy":
        _rewrite(path, lambda k, e, v: None if (k, e) == (key, "tokens.npy") else v)
    elif kind == "token >= n_vocab":
        edit_tokens(lambda v: _npy(np.full(N_CTX, N_VOCAB, dtype=np.uint16)))
    elif kind == "flipped token bytes":
        edit_tokens(lambda v: v[:-3] + bytes([v[-3] ^ 0xF0]) + v[-2:])
    elif kind == "wrong length":
        edit_tokens(lambda v: _npy(np.zeros(N_CTX - 1, dtype=np.uint16)))
    elif kind == "wrong dtype":
        edit_tokens(lambda v: _npy(np.zeros(N_CTX, dtype=np.int64)))
    elif kind == "label not an integer":
        _rewrite(path, lambda k, e, v: b"cat" if (k, e) == (key, "cls") else v)
    elif kind == "label outside the classes":
        _rewrite(path, lambda k, e, v: b"12" if (k, e) == (key, "cls") else v)
    elif kind == "key twice":
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        with tarfile.open(path, "a") as tar:
            tar.addfile(members[0][0], io.BytesIO(members[0][1]))
    else:
        raise AssertionError(kind)


FAULTS = {  # kind -> what the DataError says (after naming the shard)
    "truncated mid-member": r"is truncated or damaged (inside|\(tarfile)",
    "truncated at a member boundary": r"is truncated or damaged at byte \d+ \(after 3 samples\)",
    "damaged header block": r"is truncated or damaged at byte \d+ \(after 2 samples\)",
    "empty file": r"is truncated or damaged \(tarfile: empty file\)",
    "damaged npy magic": r"sample {key} of shard {url}: tokens.npy does not start with the .npy magic",
    "damaged npy header": r"sample {key} of shard {url}: tokens.npy is damaged: its header .* does not parse",
    "short npy data": r"sample {key} of shard {url}: tokens.npy is damaged: 28 bytes of array data where its "
                      r"header announces 32",
    "pickled object array": r"sample {key} of shard {url}: tokens.npy holds Python objects \(a pickle\)",
    "no tokens.npy": r"sample {key} of shard {url} has no tokens.npy \(its fields: cls\)",
    "token >= n_vocab": r"sample {key} of shard {url}: token 16 at position 0 is not below n_vocab=16",
    "flipped token bytes": r"sample {key} of shard {url}: token \d+ at position 14 is not below n_vocab=16",
    "wrong length": r"sample {key} of shard {url} has 15 tokens, meta.json says n_ctx=16",
    "wrong dtype": r"sample {key} of shard {url}: tokens.npy is int64, not uint16",
    "label not an integer": r"sample {key} of shard {url}: cls b'cat' is not an integer",
    "label outside the classes": r"sample {key} of shard {url}: label 12 is outside the 10 classes",
    "key twice": r"shard {url}: sample {first} appears twice",
}


@pytest.mark.parametrize("kind", FAULTS)
def test_each_fault_is_one_data_error_before_the_bad_batch(data, kind):
    """val-000001.tar (ids 10..19) damaged at sample val00013: evaluation yields the 10 samples of
    val-000000 in two batches, then raises the shard's DataError; nothing of val-000001 comes out."""
    url = str(data / "val-000001.tar")
    _fault(kind, data / "val-000001.tar", "val00013")
    pattern = FAULTS[kind].format(key="val00013", url=re.escape(url), first="val00010")
    seen = []
    with pytest.raises(DataError) as err:
        for batch in eval_loader(data, "val", 5):
            seen += _ids([batch])
    assert seen == list(range(10))
    assert url in str(err.value) and re.search(pattern, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=re.escape(url)):
        read_shard(url, SampleSpec(N_CTX, N_VOCAB, len(CLASSES)))


def test_random_damage_is_a_data_error_or_valid_samples(clean, tmp_path):
    """300 random damages of one shard (bit flips, cuts, overwritten runs): read_shard returns valid
    samples or raises DataError, never another exception."""
    original = (clean / "val-000001.tar").read_bytes()
    spec, path, rng = SampleSpec(N_CTX, N_VOCAB, len(CLASSES)), tmp_path / "x.tar", np.random.default_rng(0)
    errors = 0
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        elif trial % 3 == 1:
            data = data[:rng.integers(len(data))]
        else:
            i, n = rng.integers(len(data)), int(rng.integers(1, 600))
            data[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        try:
            samples = read_shard(str(path), spec)
        except DataError as e:
            assert str(path) in str(e)
            errors += 1
            continue
        assert all(t.dtype == np.uint16 and t.shape == (N_CTX,) and t.max() < N_VOCAB for t, _ in samples)
    assert errors > 150


def test_worker_errors_are_one_line(data):
    _fault("flipped token bytes", data / "val-000002.tar", "val00021")
    with pytest.raises(DataError) as err:
        list(eval_loader(data, "val", 4, num_workers=2))
    assert str(err.value).startswith(f"sample val00021 of shard {data / 'val-000002.tar'}: token")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_stops_before_a_batch_of_the_bad_shard(data, num_workers):
    _fault("token >= n_vocab", data / "train-000002.tar", "train00023")
    seen = []
    with pytest.raises(DataError, match=f"sample train00023 of shard {re.escape(str(data))}/train-000002.tar: token 16"):
        it = iter(train_loader(data, 4, seed=0, num_workers=num_workers))
        for _ in range(200):
            seen += _ids([next(it)])
    assert not set(seen) & set(range(20, 30))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("kind", ["flipped token bytes", "truncated at a member boundary"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_leaves_the_shard_out_and_resumes_the_same(data, kind, num_workers, capfd):
    """A bad shard contributes nothing (validated whole, even when it fails after 3 good samples), is
    warned of once and counted; a resume at step 9 sees the same batches and the same count."""
    _fault(kind, data / "train-000002.tar", "train00023")
    url = str(data / "train-000002.tar")
    full = train_loader(data, 4, seed=1, num_workers=num_workers, on_bad_shard="skip")
    batches = _take(full, 24)
    ids = _ids(batches)
    assert set(ids) <= set(range(60)) - set(range(20, 30)) and len(set(ids)) > 30
    assert list(full.skipped) == [url] and full.skipped_shards == 1
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: skipped bad shard {url} (1 skipped so far): ")
    events = []
    resumed = train_loader(data, 4, seed=1, num_workers=num_workers, on_bad_shard="skip", start_step=9,
                           on_skip=lambda *a: events.append(a))
    assert _ids(_take(resumed, 15)) == ids[9 * 4:]
    assert [e[:1] + e[2:] for e in events] == [(url, 1)] and resumed.skipped_shards == 1


def test_skip_all_bad_is_an_error(data):
    for k in range(6):
        _fault("wrong length", data / f"train-00000{k}.tar", f"train000{k}3")
    with pytest.raises(DataError, match="all 6 shards are bad; the last: sample train000.3 of shard"):
        _take(train_loader(data, 4, on_bad_shard="skip", on_skip=lambda *a: None), 1)
    with pytest.raises(DataError, match="on_bad_shard must be one of"):
        train_loader(data, 4, on_bad_shard="ignore")


def _drop_digests(data):
    """meta.json as written before shard digests: no `files` in any split."""
    meta = json.loads((data / "meta.json").read_text())
    for entry in meta["splits"].values():
        del entry["files"]
    (data / "meta.json").write_text(json.dumps(meta))


def _flip_token_bit(path, key, position):
    """Flip the lowest bit of token `position` of sample `key` in place: a token that stays valid."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(f"{key}.tokens.npy").offset_data + 128 + 2 * position  # .npy header: 128 bytes
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_shard_that_still_parses_fails_its_sha256(data):
    """A flipped token bit (5 -> 4, still below n_vocab): evaluation raises naming the shard, training
    raises (or skips and counts it), `igpt-fast verify` lists it; with a meta.json written before
    shard digests the same shard reads (that is what the digests are for) and verify says so."""
    url = data / "train-000001.tar"
    _flip_token_bit(url, "train00013", 14)
    _flip_token_bit(data / "val-000002.tar", "val00021", 3)
    assert len(read_shard(str(url), SampleSpec(N_CTX, N_VOCAB, len(CLASSES)))) == 10  # no digest given: parses
    sha = rf"shard {re.escape(str(url))} does not match meta.json: its sha256 is [0-9a-f]{{12}}, meta.json lists"
    with pytest.raises(DataError, match=sha):
        _take(train_loader(data, 4, seed=0), 60)
    loader = train_loader(data, 4, seed=0, on_bad_shard="skip", on_skip=lambda *a: None)
    assert not set(_ids(_take(loader, 30))) & set(range(10, 20)) and list(loader.skipped) == [str(url)]
    with pytest.raises(DataError, match=r"val-000002\.tar does not match meta.json"):
        list(eval_loader(data, "val", 8, num_workers=2))

    res = CliRunner().invoke(cli, ["verify", "--data", str(data)])
    assert res.exit_code == 1
    lines = res.output.splitlines()
    assert lines[0] == "train: 6 shards, 50 of 60 samples | 1 bad"
    assert re.fullmatch(r"  bad train-000001\.tar: shard .* does not match meta.json: .*", lines[1])
    assert lines[2] == "val: 4 shards, 30 of 40 samples | 1 bad"
    assert lines[-1] == f"Error: 2 bad shard(s) or split(s) in {data}; see above"

    _drop_digests(data)
    assert len(_ids(eval_loader(data, "val", 8))) == 40
    res = CliRunner().invoke(cli, ["verify", "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[:2] == ["train: 6 shards, 60 of 60 samples | ok | 6 without sha256 in meta.json",
                                           "val: 4 shards, 40 of 40 samples | ok | 4 without sha256 in meta.json"]
    assert "tokenized before shard digests" in res.output


def test_verify_a_clean_folder_and_a_missing_shard(data):
    res = CliRunner().invoke(cli, ["verify", "--data", str(data)])
    assert res.exit_code == 0 and res.output.splitlines() == ["train: 6 shards, 60 of 60 samples | ok",
                                                              "val: 4 shards, 40 of 40 samples | ok"]
    os.remove(data / "val-000003.tar")
    res = CliRunner().invoke(cli, ["verify", "--data", str(data)])
    assert res.exit_code == 1 and "  bad val: meta.json lists 4 'val' shards but" in res.output


def test_eval_compares_its_count_with_meta(data):
    """A well-formed shard with 4 samples fewer (its sha256 no longer matches: meta.json without digests
    here): one process reading the whole split says so; a loop stopped early does not; several ranks
    check per shard only (the total is not known to one)."""
    _drop_digests(data)
    _rewrite(data / "val-000003.tar", lambda k, e, v: None if k in {f"val0003{i}" for i in range(4)} else v)
    with pytest.raises(DataError, match=f"split 'val' of {re.escape(str(data))}: read 36 samples, meta.json says 40"):
        list(eval_loader(data, "val", 8))
    with pytest.raises(DataError, match="read 36 samples, meta.json says 40"):
        list(eval_loader(data, "val", 8, num_workers=2))
    for i, _ in enumerate(eval_loader(data, "val", 8)):
        if i == 2:
            break
    assert sorted(_ids(list(eval_loader(data, "val", 8, rank=0, world_size=2))) +
                  _ids(list(eval_loader(data, "val", 8, rank=1, world_size=2)))) == list(range(30)) + list(range(34, 40))
    spec = str(data / "val-{000000..000001}.tar")  # part of a split: no total to compare with
    assert sorted(_ids(eval_loader(spec, "val", 8))) == list(range(20))


def test_a_missing_shard_file_is_an_error(data):
    os.remove(data / "val-000002.tar")
    with pytest.raises(DataError, match=r"meta.json lists 4 'val' shards but .* holds 3 \(val-\*.tar\)"):
        eval_loader(data, "val", 8, rank=1, world_size=2)
    os.remove(data / "train-000005.tar")
    with pytest.raises(DataError, match="meta.json lists 6 'train' shards but"):
        train_loader(data, 4)


def test_pipe_failure_names_the_url(data, monkeypatch):
    from igpt_fast import shard as shard_mod

    monkeypatch.setattr(shard_mod, "FETCH_BACKOFF_S", 0.0)
    spec = f"pipe:cat {data}/val-00000{{0..4}}.tar"
    with pytest.raises(DataError, match=rf"cannot read pipe:cat {re.escape(str(data))}/val-000004.tar: .*exit 1.*"
                                        r"\(3 of 3 tries\)"):
        list(eval_loader(spec, "val", 8, meta=data / "meta.json"))


def test_cli_train_skips_a_bad_shard_and_logs_the_count(data, tmp_path, one_thread):
    _fault("flipped token bytes", data / "train-000003.tar", "train00033")  # round 0 of seed 0 draws it
    args = ["train", "--data", str(data), "--preset", "tiny", "--n-px", str(N_PX), "--n-layer", "1", "--n-head", "2",
            "--n-embd", "16", "--steps", "6", "--batch-size", "4", "--log-every", "2", "--eval-every", "0",
            "--eval-batches", "0"]
    run = tmp_path / "run"
    res = CliRunner().invoke(cli, args + ["--out", str(run), "--on-bad-shard", "skip"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6] and train_rows[-1]["skipped_shards"] == 1
    assert json.loads((run / "config.json").read_text())["train"]["on_bad_shard"] == "skip"
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "strict")])
    assert res.exit_code == 1 and f"sample train00033 of shard {data / 'train-000003.tar'}: token" in res.output
