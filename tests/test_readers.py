"""Readers (igpt_fast.readers) on real or faithfully built files: IDX (real Fashion-MNIST), CIFAR-10/100
python batches, the restricted unpickler against a malicious pickle, tar WebDatasets, image folders;
items as named tuples, the file record that resume checks, empty or unreadable class folders keeping
their ids, and the module standing without the tokenizer. The formats are read through tokenize and
the shards compared with the images.

References: the CIFAR "python" batch layout (dict of data uint8 (N, 3072) in R, G, B planes, labels);
the IDX format (big-endian header, magic 0x00000803 for uint8 (N, H, W)); webdataset's key convention.
"""
import errno
import gzip
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sources import (  # noqa: F401  (lut_cache: autouse fixture)
    lut_cache, one_line_error, png_bytes, py2_pickle, random_palette, read_shards, tar_add, write_cifar10,
)

from igpt_fast.cli import cli
from igpt_fast.errors import IGPTError
from igpt_fast.palette import Palette
from igpt_fast.readers import Item, TokenizeError, list_sources, read_idx, restricted_loads
from igpt_fast.tokenize import tokenize_dataset, tokenize_images


@pytest.fixture(scope="module")
def palette():
    return random_palette()


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(path)


def test_items_are_named_and_the_listing_records_every_file(tmp_path):
    root = tmp_path / "data"
    _png(root / "train" / "b" / "1.png")
    _png(root / "train" / "a" / "deep" / "2.png")
    _png(root / "test" / "a" / "3.png")
    _png(root / "train" / "stray.png")
    listings, class_names = list_sources([str(root)])
    (lst,) = listings
    assert class_names == ["a", "b"] and lst.format == "folder"
    train = lst.items["train"]
    assert all(isinstance(it, Item) for it in train)
    assert [(it.name[len(str(root)) + 1:], it.label, it.split, it.key) for it in train] == [
        ("train/a/deep/2.png", 0, "train", "000_000000001"), ("train/b/1.png", 1, "train", "000_000000002")]
    assert lst.items["test"][0].key == "000_000000000"  # listing order: split folders sorted, test first
    assert train[0].ref == ("file", str(root / "train" / "a" / "deep" / "2.png")) and train[0].source == 0
    assert [f[0] for f in lst.files] == ["test/a/", "test/a/3.png", "train/stray.png", "train/a/",
                                         "train/a/deep/2.png", "train/b/", "train/b/1.png"]
    assert all(size > 0 and mtime > 0 for name, size, mtime in lst.files if not name.endswith("/"))
    assert lst.skipped["train"] == [{"file": str(root / "train" / "stray.png"), "reason": "not inside a class folder"}]


def test_empty_and_unreadable_class_folders_keep_their_ids(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _png(root / "ant" / "0.png", 10)
    _png(root / "ant" / "1.png", 20)
    (root / "bee").mkdir()
    _png(root / "cat" / "0.png", 30)
    _png(root / "dog" / "0.png", 40)
    real_scandir = os.scandir

    def scandir(path="."):  # the tests run as root, so chmod 000 would not stop them: refuse "cat" here
        if os.path.basename(os.fspath(path)) == "cat":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listings, class_names = list_sources([str(root)])
    assert class_names == ["ant", "bee", "cat", "dog"]
    assert [it.label for it in listings[0].items["train"]] == [0, 0, 3]  # dog keeps id 3
    assert listings[0].skipped["train"] == [{"file": str(root / "cat"),
                                            "reason": "unreadable folder (PermissionError: Permission denied)"}]

    palette = Palette(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
    with pytest.warns(UserWarning, match=r"2 class\(es\) without any image keep their label ids: bee, cat"):
        meta = tokenize_dataset([str(root)], palette, str(tmp_path / "out"), n_px=4, workers=1, progress=False)
    assert meta["class_names"] == ["ant", "bee", "cat", "dog"] and meta["empty_classes"] == ["bee", "cat"]
    assert meta["splits"]["train"]["samples"] == 3 and "unreadable folder" in meta["splits"]["train"]["skipped"][0]["reason"]


def test_errors_are_igpt_errors_and_values_errors(tmp_path):
    with pytest.raises(TokenizeError, match="source not found") as info:
        list_sources([str(tmp_path / "missing")])
    assert isinstance(info.value, IGPTError) and isinstance(info.value, ValueError)


def test_readers_do_not_import_the_tokenizer():
    code = ("import sys, igpt_fast.readers, igpt_fast.images; "
            "assert 'igpt_fast.tokenize' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_idx_reader_on_real_fashion_mnist(tmp_path, palette, fashion_mnist):
    images = read_idx(f"{fashion_mnist}/t10k-images-idx3-ubyte.gz")
    labels = read_idx(f"{fashion_mnist}/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and sorted(set(labels.tolist())) == list(range(10))
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(open(f"{fashion_mnist}/t10k-images-idx3-ubyte.gz", "rb").read()))
    np.testing.assert_array_equal(read_idx(str(raw)), images)

    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"x")
    with pytest.raises(TokenizeError, match="header says"):
        read_idx(str(tmp_path / "bad-images-idx3-ubyte"))

    src = tmp_path / "fm"
    src.mkdir()
    n = 600
    with gzip.open(src / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4I", 0x803, n, 28, 28) + images[:n].tobytes())
    with gzip.open(src / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 0x801, n) + labels[:n].tobytes())
    out = str(tmp_path / "out")
    meta = tokenize_dataset([str(src)], palette, out, n_px=28, workers=1, shard_size=256, progress=False)
    assert meta["splits"]["test"]["samples"] == n and meta["splits"]["test"]["shards"] == 3
    assert list(meta["splits"]) == ["test"] and meta["n_ctx"] == 784
    assert meta["converted"] == {"grey": n} and meta["empty_classes"] == []
    samples = read_shards(out, "test")
    expected = tokenize_images(images[:n], palette, n_px=28)  # grey batch (n, 28, 28)
    for key, (tokens, cls) in samples.items():
        i = int(key.split("_")[1])
        np.testing.assert_array_equal(tokens, expected[i])
        assert cls == labels[i]
    order = [int(k.split("_")[1]) for k in samples]
    assert order != sorted(order)  # shuffled


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_restricted_unpickler_rejects_malicious_globals(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        restricted_loads(data)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        restricted_loads(b"cbuiltins\neval\n(S'1'\ntR.")
    ok = restricted_loads(pickle.dumps({"a": [1, 2.5, b"x", np.arange(3, dtype=np.uint8)]}, protocol=2))
    np.testing.assert_array_equal(ok["a"][3], np.arange(3))

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    root.joinpath("batches.meta").write_bytes(py2_pickle({b"label_names": [b"a"]}))
    root.joinpath("data_batch_1").write_bytes(data)
    hwc = np.full((2, 32, 32, 3), 7, np.uint8)
    root.joinpath("test_batch").write_bytes(py2_pickle({b"data": hwc.reshape(2, 3072), b"labels": [0, 0]}))
    # the only train batch is refused: an error naming it, not a dataset without a train split
    with pytest.raises(TokenizeError, match=r"no image could be tokenized in the train split .*data_batch_1.*forbidden"):
        tokenize_dataset([str(root)], Palette(np.zeros((1, 3), np.float32)), str(tmp_path / "out"), n_px=32,
                         workers=1, progress=False)
    assert not marker.exists() and not (tmp_path / "out" / "meta.json").exists()
    runner = CliRunner()
    pal = str(tmp_path / "pal.npy")
    Palette(np.zeros((1, 3), np.float32)).save(pal)
    line = one_line_error(runner.invoke(cli, ["tokenize", str(root), "--palette", pal, "--out", str(tmp_path / "o"),
                                               "--workers", "1"]))
    assert "train split" in line and "forbidden" in line and not marker.exists()


def test_cifar10_reader_and_splits(tmp_path, palette):
    rng = np.random.default_rng(3)
    names, images = write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (tmp_path / "cifar-10-batches-py/test_batch").read_bytes()
    out = str(tmp_path / "out")
    meta = tokenize_dataset([str(tmp_path / "cifar-10-batches-py")], palette, out, n_px=32, val_fraction=0.2,
                            workers=1, shard_size=16, seed=5, progress=False)
    assert meta["class_names"] == names
    assert {s: m["samples"] for s, m in meta["splits"].items()} == {"train": 56, "val": 14, "test": 25}
    assert meta["splits"]["train"]["shards"] == 4 and meta["source"][0]["format"] == "cifar"
    listings, _ = list_sources([str(tmp_path / "cifar-10-batches-py")])
    by_key = {it.key: it.ref for split in listings[0].items.values() for it in split}
    flat = {("data_batch_1", i): v for i, v in enumerate(zip(*images["data_batch_1"]))}
    flat.update({("data_batch_2", i): v for i, v in enumerate(zip(*images["data_batch_2"]))})
    flat.update({("test_batch", i): v for i, v in enumerate(zip(*images["test_batch"]))})
    files = ["data_batch_1", "data_batch_2", "test_batch"]
    seen = set()
    for split in ("train", "val", "test"):
        for key, (tokens, cls) in read_shards(out, split).items():
            ref = by_key[key]
            hwc, label = flat[(files[ref[1]], ref[2])]
            assert (split == "test") == (files[ref[1]] == "test_batch")
            np.testing.assert_array_equal(tokens, palette.quantize(hwc).reshape(-1))
            assert cls == label
            seen.add(key)
    assert len(seen) == 95
    assert np.load(os.path.join(out, "palette.npy")).tobytes() == palette.centers.tobytes()


def test_cifar100_reader(tmp_path, palette):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(4)
    fine = [b"c%d" % i for i in range(100)]
    root.joinpath("meta").write_bytes(py2_pickle({b"fine_label_names": fine, b"coarse_label_names": fine[:20]}))
    for name, n in [("train", 30), ("test", 10)]:
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        root.joinpath(name).write_bytes(py2_pickle({
            b"data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072), b"fine_labels": list(range(n)),
            b"coarse_labels": [0] * n, b"filenames": [b"x"] * n, b"batch_label": name.encode()}))
    with pytest.warns(UserWarning, match="70 class"):
        meta = tokenize_dataset([str(root)], palette, str(tmp_path / "out"), n_px=16, workers=1, progress=False)
    assert len(meta["class_names"]) == 100 and meta["class_names"][7] == "c7"
    assert meta["empty_classes"] == [f"c{i}" for i in range(30, 100)]  # ids 30..99 have no image but keep their id
    assert meta["splits"]["train"]["samples"] == 30 and meta["splits"]["test"]["samples"] == 10
    assert sorted(c for _, c in read_shards(str(tmp_path / "out"), "test").values()) == list(range(10))


def test_tar_webdataset_reader(tmp_path, palette):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (20 + i, 30 - i, 3), dtype=np.uint8) for i in range(6)]
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tf:
        for i, a in enumerate(arrays):
            ext = "jpg" if i % 2 else "png"
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG" if ext == "jpg" else "PNG")
            tar_add(tf, f"dir/sample{i:03d}.{ext}", buf.getvalue())
            tar_add(tf, f"dir/sample{i:03d}.cls", str(i % 3).encode())
        tar_add(tf, "dir/orphan.cls", b"1")
        tar_add(tf, "dir/badcls.png", png_bytes(Image.fromarray(arrays[0])))
        tar_add(tf, "dir/badcls.cls", b"cat")
    out = str(tmp_path / "out")
    meta = tokenize_dataset([str(path)], palette, out, n_px=16, workers=1, progress=False)
    split = meta["splits"]["train"]
    assert split["samples"] == 6 and meta["class_names"] is None
    assert sorted(s["reason"][:10] for s in split["skipped"]) == ["cls b'cat'", "no image m"]
    decoded = []
    for i, a in enumerate(arrays):
        with tarfile.open(path) as tf:
            data = tf.extractfile(f"dir/sample{i:03d}.{'jpg' if i % 2 else 'png'}").read()
        decoded.append(Image.open(io.BytesIO(data)))
    expected = tokenize_images(decoded, palette, n_px=16)
    got = {tuple(t.tolist()): c for t, c in read_shards(out, "train").values()}
    assert got == {tuple(e.tolist()): i % 3 for i, e in enumerate(expected)}


def test_tar_members_that_are_not_read_are_listed(tmp_path, palette, monkeypatch):
    """Links, devices, fifos and a member larger than the cap (a 1 GiB header over a sparse hole: a few
    KiB on disk) are never read; each is listed in meta.json with its reason, the good samples around
    them are tokenized; the list of skipped files is capped and the count kept."""
    import igpt_fast.readers as readers

    img = png_bytes(Image.fromarray(np.full((5, 5, 3), 40, np.uint8)))
    path = tmp_path / "mixed.tar"
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tf:
            tar_add(tf, "a.png", img)
            for name, kind in (("b.png", tarfile.SYMTYPE), ("c.png", tarfile.LNKTYPE), ("d.png", tarfile.CHRTYPE),
                               ("e.png", tarfile.BLKTYPE), ("f.png", tarfile.FIFOTYPE)):
                ti = tarfile.TarInfo(name)
                ti.type, ti.linkname = kind, "a.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
                tf.addfile(ti)
            big = tarfile.TarInfo("g.png")
            big.size = 1 << 30
            f.write(big.tobuf(tarfile.GNU_FORMAT))
            f.seek(big.size, os.SEEK_CUR)  # a hole: the member's bytes are never written
            tf.offset = f.tell()
            tar_add(tf, "h.png", img)
            tar_add(tf, "h.cls", b"1")
    assert os.stat(path).st_blocks * 512 < 1 << 20
    import igpt_fast.tokenize as tk

    read, real_load = [], tk._load
    monkeypatch.setattr(tk, "_load", lambda entry, *a: read.append(entry[1:]) or real_load(entry, *a))
    meta = tokenize_dataset([str(path)], palette, str(tmp_path / "out"), n_px=4, workers=1, progress=False)
    split = meta["splits"]["train"]
    assert split["samples"] == 2 and split["skipped_count"] == 6
    reasons = {s["file"].rsplit(":", 1)[1]: s["reason"] for s in split["skipped"]}
    assert reasons == {"b.png": "symbolic link to a.png (not followed)", "c.png": "hard link to a.png (not followed)",
                       "d.png": "character device", "e.png": "block device", "f.png": "fifo",
                       "g.png": f"{1 << 30} bytes, more than the {readers.MAX_MEMBER_BYTES} bytes a member may hold "
                                "(IGPT_FAST_MAX_MEMBER_BYTES)"}
    assert [size for _, _, size in read] == [len(img)] * 2  # a.png and h.png only

    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", 10)  # every image is too large now
    monkeypatch.setattr("igpt_fast.tokenize.SKIPPED_LISTED", 4)
    with pytest.raises(TokenizeError, match="no image could be tokenized in the train split .8 refused"):
        tokenize_dataset([str(path)], palette, str(tmp_path / "out2"), n_px=4, workers=1, progress=False)
    monkeypatch.setenv("IGPT_FAST_MAX_MEMBER_BYTES", str(len(img)))
    meta = tokenize_dataset([str(path)], palette, str(tmp_path / "out3"), n_px=4, workers=1, progress=False)
    split = meta["splits"]["train"]
    assert split["samples"] == 2 and split["skipped_count"] == 6 and len(split["skipped"]) == 4


def test_image_folder_reader(tmp_path, palette):
    rng = np.random.default_rng(6)
    root = tmp_path / "data"
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("zebra", "ant"):
            d = root / split / cls / "nested"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)).save(d / f"{i}.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "train" / "stray.png")
    (root / "train" / "zebra" / ".DS_Store").write_bytes(b"\0")
    meta = tokenize_dataset([str(root)], palette, str(tmp_path / "out"), n_px=8, workers=1, progress=False)
    assert meta["class_names"] == ["ant", "zebra"]
    assert meta["splits"]["train"]["samples"] == 8 and meta["splits"]["test"]["samples"] == 4
    assert [s["reason"] for s in meta["splits"]["train"]["skipped"]] == ["not inside a class folder"]
    listings, _ = list_sources([str(root)])
    by_key = {it.key: it.ref[1] for items in listings[0].items.values() for it in items}
    for split in ("train", "test"):
        for key, (tokens, cls) in read_shards(str(tmp_path / "out"), split).items():
            file = by_key[key]
            assert f"/{split}/" in file and ["ant", "zebra"][cls] in file
            np.testing.assert_array_equal(tokens, tokenize_images([Image.open(file)], palette, n_px=8)[0])

    meta2 = tokenize_dataset([str(root / "train"), str(root / "test")], palette, str(tmp_path / "out2"), n_px=8,
                             workers=1, progress=False)
    assert meta2["splits"]["test"]["samples"] == 4 and meta2["class_names"] == ["ant", "zebra"]
