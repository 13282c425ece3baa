"""Source listing (igpt_fast.readers): items as named tuples, the file record that resume checks, class
folders that are empty or unreadable keeping their ids, and the module standing on its own.

The readers' formats end to end (IDX, CIFAR, tars, folders, the restricted unpickler) are tested through
tokenize in test_tokenize.py.
"""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from igpt_fast.errors import IGPTError
from igpt_fast.palette import Palette
from igpt_fast.readers import Item, TokenizeError, list_sources


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

    from igpt_fast.tokenize import tokenize_dataset

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
