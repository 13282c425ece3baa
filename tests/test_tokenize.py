"""Tokenizer tests: HF ImageGPT parity on real photos, the colour and resize rules, the bad-file zoo,
kill -9 resume and resume over a changed source, converted-input counts, progress output, CLI errors.
The readers' formats (IDX, CIFAR, tars, folders) are tested in test_readers.py.

References: transformers `ImageGPTImageProcessor` (the PIL backend is the one installed without
torchvision); the IDX format (big-endian header, magic 0x00000803 for uint8 (N, H, W)).
"""
import errno
import gzip
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sources import lut_cache, one_line_error, png_bytes, random_palette, read_shards, tree  # noqa: F401

from igpt_fast.cli import cli
from igpt_fast.errors import OutputError
from igpt_fast.palette import Palette
from igpt_fast.tokenize import (
    TokenizeError, read_idx, resize_image, sample_pixels, to_rgb, tokenize_dataset, tokenize_images,
)

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel"]


@pytest.fixture(scope="module")
def palette():
    return random_palette()


@pytest.fixture(scope="module")
def palette_path(palette, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pal") / "palette.npy")
    palette.save(path)
    return path


def _photos():
    import skimage.data

    return [Image.fromarray(getattr(skimage.data, name)()) for name in PHOTOS]


@pytest.mark.parametrize("n_px", [32, 48])
def test_squash_matches_hf_imagegpt_on_real_photos(palette, n_px):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil
    photos = _photos()
    assert len({p.size for p in photos}) > 3  # squares, landscapes, portraits
    hf = ImageGPTImageProcessorPil(clusters=palette.centers, size={"height": n_px, "width": n_px})
    expected = np.stack(hf(photos, return_tensors="np")["input_ids"])  # (B, n_ctx)
    ids = tokenize_images(photos, palette, n_px=n_px)
    assert ids.dtype == np.uint16 and ids.shape == (len(photos), n_px * n_px)
    np.testing.assert_array_equal(ids, expected)
    ids_from_arrays = tokenize_images([np.asarray(p) for p in photos], palette, n_px=n_px)
    np.testing.assert_array_equal(ids_from_arrays, expected)
    np.testing.assert_array_equal(tokenize_images(photos, palette, n_px=n_px, workers=3), expected)


def test_arrays_of_n_px_skip_resize_with_identical_ids(palette):
    batch = np.stack([np.asarray(p.resize((32, 32), Image.BILINEAR)) for p in _photos()])  # (B, 32, 32, 3)
    fast = tokenize_images(batch, palette, n_px=32)
    via_pil = tokenize_images([Image.fromarray(a) for a in batch], palette, n_px=32)
    np.testing.assert_array_equal(fast, via_pil)
    np.testing.assert_array_equal(fast, palette.quantize(batch).reshape(len(batch), -1))


def test_colour_conversions():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    c, a = rgba[..., :3].astype(int), rgba[..., 3:].astype(int)
    expected = (c * a + 255 * (255 - a) + 127) // 255
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))), expected)
    np.testing.assert_array_equal(np.asarray(to_rgb(rgba)), expected)
    assert (np.asarray(to_rgb(np.zeros((2, 2, 4), np.uint8))) == 255).all()  # transparent -> white

    grey = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(grey, "L"))), np.repeat(grey[..., None], 3, -1))
    np.testing.assert_array_equal(np.asarray(to_rgb(grey)), np.repeat(grey[..., None], 3, -1))

    la = Image.fromarray(np.stack([grey, np.full_like(grey, 0)], -1), "LA")
    assert (np.asarray(to_rgb(la)) == 255).all()

    p = Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    np.testing.assert_array_equal(np.asarray(to_rgb(p)), np.asarray(p.convert("RGB")))
    p.info["transparency"] = int(np.asarray(p)[0, 0])
    out = np.asarray(to_rgb(p))
    assert (out[0, 0] == 255).all() and (out[np.asarray(p) != np.asarray(p)[0, 0]] ==
                                         np.asarray(p.convert("RGB"))[np.asarray(p) != np.asarray(p)[0, 0]]).all()

    cmyk = Image.fromarray(rgba, "CMYK")
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))
    assert to_rgb(cmyk).mode == "RGB"

    v16 = np.array([[0, 128, 129, 385], [65535, 65407, 257 * 100, 257 * 100 + 128]], dtype=np.uint16)
    e8 = np.floor(v16 / 257 + 0.5).astype(np.uint8)  # nearest 8-bit value: 128 -> 0, 129 -> 1, 65535 -> 255
    assert e8.tolist() == [[0, 0, 1, 1], [255, 255, 100, 100]]
    np.testing.assert_array_equal(np.asarray(to_rgb(v16))[..., 0], e8)
    png16 = Image.open(io.BytesIO(png_bytes(Image.fromarray(v16))))  # a real 16-bit greyscale PNG
    assert png16.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(to_rgb(png16)), np.repeat(e8[..., None], 3, -1))


def test_resize_modes():
    rng = np.random.default_rng(2)
    digit = Image.fromarray(rng.integers(1, 256, (28, 28), dtype=np.uint8)).convert("RGB")
    padded = resize_image(digit, 32, "pad")
    np.testing.assert_array_equal(padded[2:30, 2:30], np.asarray(digit))
    assert padded[:2].max() == 0 and padded[30:].max() == 0 and padded[:, :2].max() == 0

    wide = np.zeros((40, 100, 3), dtype=np.uint8)
    wide[:, :, 1] = 200  # green centre square ...
    wide[:, :25] = wide[:, 75:] = (255, 0, 255)  # ... between magenta bars wider than the filter support
    crop = resize_image(Image.fromarray(wide), 16, "center-crop")
    assert crop.shape == (16, 16, 3) and (crop == (0, 200, 0)).all()
    squash = resize_image(Image.fromarray(wide), 16, "squash")
    assert (squash == (255, 0, 255)).all(-1).any()
    shrunk = resize_image(Image.fromarray(wide), 20, "pad")  # 100x40 -> 20x8, rows 6..13
    assert shrunk[:6].max() == 0 and shrunk[14:].max() == 0 and (shrunk[6:14].max(-1) > 0).all()
    square = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    np.testing.assert_array_equal(resize_image(square, 16, "center-crop"), resize_image(square, 16, "squash"))


def _bad_zoo(root):
    rng = np.random.default_rng(7)
    root.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"good{i}.png")
    png = (root / "good0.png").read_bytes()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (root / "zero.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notes.txt").write_text("not an image\n")
    return {"zero.png", "corrupt.jpg", "truncated.png", "truncated.jpg", "notes.txt"}


def test_bad_files_are_skipped_and_listed(tmp_path, palette):
    bad = _bad_zoo(tmp_path / "zoo")
    meta = tokenize_dataset([str(tmp_path / "zoo")], palette, str(tmp_path / "out"), n_px=8, workers=2,
                            shard_size=2, progress=False)
    split = meta["splits"]["train"]
    assert split["samples"] == 3 and split["shards"] == 2
    assert {os.path.basename(s["file"]) for s in split["skipped"]} == bad
    assert all(s["reason"] for s in split["skipped"])

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for name in bad:
        shutil.copy(tmp_path / "zoo" / name, only_bad / name)
    with pytest.raises(TokenizeError, match="no image could be tokenized"):
        tokenize_dataset([str(only_bad)], palette, str(tmp_path / "out2"), n_px=8, workers=1, progress=False)


def test_sample_pixels(tmp_path):
    root = tmp_path / "data"
    for split, colour in (("train", 10), ("test", 200)):
        (root / split / "c").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((10, 10, 3), colour + i, np.uint8)).save(root / split / "c" / f"{i}.png")
    px = sample_pixels([str(root)], n_px=4, max_pixels=50, seed=1)
    assert px.shape == (50, 3) and px.dtype == np.uint8
    assert set(np.unique(px)) <= {10, 11, 12, 13, 14}  # test split excluded
    np.testing.assert_array_equal(px, sample_pixels([str(root)], n_px=4, max_pixels=50, seed=1))
    assert sample_pixels([str(root)], n_px=4, max_pixels=10_000).shape == (80, 3)


def test_kill_9_then_rerun_is_byte_identical(tmp_path, palette_path, fashion_mnist):
    images = read_idx(f"{fashion_mnist}/train-images-idx3-ubyte.gz")[:12000]
    labels = read_idx(f"{fashion_mnist}/train-labels-idx1-ubyte.gz")[:12000]
    src = tmp_path / "fm"
    src.mkdir()
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">4I", 0x803, len(images), 28, 28) + images.tobytes())
    with gzip.open(src / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">2I", 0x801, len(labels)) + labels.tobytes())
    (src / "zero-images-idx3-ubyte").write_bytes(b"")  # a bad file, listed in both runs' meta

    def command(out):
        return [sys.executable, "-m", "igpt_fast.cli", "tokenize", str(src), "--palette", palette_path,
                "--out", str(out), "--n-px", "32", "--resize", "pad", "--val-fraction", "0.1",
                "--workers", "2", "--shard-size", "400", "--seed", "3"]

    ref = tmp_path / "ref"
    done = subprocess.run(command(ref), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("tokenized") and done.stdout.count("\n") == 1

    out = tmp_path / "out"
    proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (out / "train-000000.tar").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "meta.json").exists() and (out / "train-000000.tar").exists()
    assert len([f for f in os.listdir(out) if f.endswith(".tar")]) < 27

    again = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    ref_files, out_files = tree(ref), tree(out)
    assert sorted(ref_files) == sorted(out_files)
    assert all(ref_files[name] == out_files[name] for name in ref_files)
    assert sum(name.endswith(".tar") for name in ref_files) == 27 + 3  # 10800 train + 1200 val

    unchanged = subprocess.run(command(out), capture_output=True, text=True, timeout=300)
    assert unchanged.returncode == 0 and unchanged.stdout.startswith("already complete")
    assert tree(out) == ref_files


def test_cli_errors(tmp_path, palette_path):
    runner = CliRunner()
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "a.png")
    out = str(tmp_path / "out")

    line = one_line_error(runner.invoke(cli, ["tokenize", str(tmp_path / "missing"), "--palette", palette_path,
                                               "--out", out]))
    assert "does not exist" in line

    (tmp_path / "data.xyz").write_bytes(b"1234")
    line = one_line_error(runner.invoke(cli, ["tokenize", str(tmp_path / "data.xyz"), "--palette", palette_path,
                                               "--out", out]))
    assert "unknown format" in line

    ok = runner.invoke(cli, ["tokenize", str(folder), "--palette", palette_path, "--out", out, "--n-px", "8",
                             "--workers", "1"])
    assert ok.exit_code == 0, ok.output
    line = one_line_error(runner.invoke(cli, ["tokenize", str(folder), "--palette", palette_path, "--out", out,
                                               "--n-px", "16", "--workers", "1"]))
    assert "n_px=8" in line
    other = str(tmp_path / "other.npy")
    Palette(np.zeros((2, 3), np.float32) + [[0.5], [-0.5]]).save(other)
    line = one_line_error(runner.invoke(cli, ["tokenize", str(folder), "--palette", other, "--out", out,
                                               "--n-px", "8", "--workers", "1"]))
    assert "another palette" in line

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.txt").write_text("no")
    line = one_line_error(runner.invoke(cli, ["tokenize", str(empty), "--palette", palette_path,
                                               "--out", str(tmp_path / "o3"), "--workers", "1"]))
    assert "no image could be tokenized" in line


def _folder(root, n, rng, size=(10, 10)):
    """n random RGB PNGs in root/c0 and root/c1 (alternating)."""
    for i in range(n):
        d = root / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")


def _interrupt_after(monkeypatch, chunks):
    """tokenize_dataset stops (KeyboardInterrupt) while decoding chunk `chunks` + 1 (workers=1, 4 items a chunk)."""
    import igpt_fast.tokenize as tk

    calls = []
    real = tk._load_chunk

    def load_chunk(task):
        calls.append(1)
        if len(calls) > chunks:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(tk, "CHUNK", 4)
    monkeypatch.setattr(tk, "_load_chunk", load_chunk)
    return lambda: monkeypatch.setattr(tk, "_load_chunk", real)


def test_resume_over_a_changed_source_is_refused_and_restart_starts_over(tmp_path, palette, monkeypatch):
    src, out, fresh = tmp_path / "src", str(tmp_path / "out"), str(tmp_path / "fresh")
    _folder(src, 20, np.random.default_rng(8))
    kw = dict(n_px=8, workers=1, shard_size=4, progress=False)
    resume = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset([str(src)], palette, out, **kw)
    resume()
    assert os.path.exists(os.path.join(out, "train-000000.tar")) and not os.path.exists(os.path.join(out, "meta.json"))

    os.remove(src / "c1" / "003.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / "c0" / "new.png")
    with pytest.raises(TokenizeError, match=r"changed .*1 file\(s\) added \(e\.g\. c0/new\.png\), 1 file\(s\) deleted "
                                            r"\(e\.g\. c1/003\.png\).*--restart"):
        tokenize_dataset([str(src)], palette, out, **kw)
    with open(src / "c0" / "000.png", "ab") as f:
        f.write(b"\0")  # a modified file is a change too
    with pytest.raises(TokenizeError, match=r"1 file\(s\) modified \(e\.g\. c0/000\.png\)"):
        tokenize_dataset([str(src)], palette, out, **kw)
    line = one_line_error(CliRunner().invoke(cli, ["tokenize", str(src), "--palette", _save(palette, tmp_path),
                                                    "--out", out, "--n-px", "8", "--shard-size", "4",
                                                    "--workers", "1"]))
    assert "changed" in line and "--restart" in line

    meta = tokenize_dataset([str(src)], palette, out, restart=True, **kw)
    keys = [k for split in meta["splits"] for k in read_shards(out, split)]
    assert meta["splits"]["train"]["samples"] == 20 == len(set(keys)) == len(keys)
    tokenize_dataset([str(src)], palette, fresh, **kw)
    assert tree(out) == tree(fresh)  # the restarted output is the one a first run writes

    again = tokenize_dataset([str(src)], palette, out, **kw)
    assert again.already_complete and again.tokenized == 0 and again == meta
    (src / "c0" / "new.png").unlink()  # a complete output over a changed source is refused as well
    with pytest.raises(TokenizeError, match="1 file.s. deleted"):
        tokenize_dataset([str(src)], palette, out, **kw)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(src / "c0" / "new.png")
    (src / "c2").mkdir()  # a new class folder, even an empty one, changes the classes
    with pytest.raises(TokenizeError, match=r"1 file\(s\) added \(e\.g\. c2/\)"):
        tokenize_dataset([str(src)], palette, out, **kw)
    (src / "c2").rmdir()
    with pytest.raises(TokenizeError, match="other settings .*--restart"):
        tokenize_dataset([str(src)], palette, out, **{**kw, "seed": 1})
    assert tokenize_dataset([str(src)], palette, out, restart=True, **{**kw, "seed": 1})["splits"]["train"]["samples"] == 20


def _save(palette, tmp_path):
    path = str(tmp_path / "palette.npy")
    palette.save(path)
    return path


def test_interrupted_run_resumes_with_the_same_meta(tmp_path, palette, monkeypatch):
    src = tmp_path / "src"
    _folder(src, 14, np.random.default_rng(9))
    Image.fromarray(np.zeros((10, 10, 4), np.uint8), "RGBA").save(src / "c0" / "alpha.png")
    kw = dict(n_px=8, workers=1, shard_size=3, val_fraction=0.2, progress=False)
    resume = _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset([str(src)], palette, str(tmp_path / "out"), **kw)
    resume()
    resumed = tokenize_dataset([str(src)], palette, str(tmp_path / "out"), **kw)
    assert 0 < resumed.tokenized < 15 and resumed.elapsed_s > 0 and not resumed.already_complete
    assert "_elapsed_s" not in resumed and "_tokenized" not in resumed
    whole = tokenize_dataset([str(src)], palette, str(tmp_path / "whole"), **kw)
    assert whole.tokenized == 15 and resumed == whole and resumed["converted"] == {"alpha": 1}
    assert tree(str(tmp_path / "out")) == tree(str(tmp_path / "whole"))


def test_full_disk_and_unwritable_output_are_one_line(tmp_path, palette, monkeypatch):
    """A disk that fills while a shard is written, an --out below a file, a read-only --out: one
    OutputError line naming the file (and the free space), no temp file left; a rerun with space
    completes the output."""
    import igpt_fast.tokenize as tk

    src, out = tmp_path / "src", tmp_path / "out"
    _folder(src, 8, np.random.default_rng(3))
    kw = dict(n_px=8, workers=1, shard_size=3, progress=False)
    real_open = open

    class Full:
        def __init__(self, f, code):
            self.f, self.code = f, code

        def write(self, data):
            raise OSError(self.code, os.strerror(self.code))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(code, after=0):
        opened = []

        def fake(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if ".tar" in os.path.basename(path) and "w" in mode:
                opened.append(path)
                if len(opened) > after:
                    return Full(f, code)
            return f
        return fake

    monkeypatch.setattr(tk, "open", failing_open(errno.ENOSPC, after=1), raising=False)
    with pytest.raises(OutputError, match=rf"cannot write {re.escape(str(out))}/train-000001\.tar: no space left on "
                                          r"device \([\d.]+ MiB free in "):
        tokenize_dataset([str(src)], palette, str(out), **kw)
    assert sorted(os.listdir(out)) == [".tokenize", "train-000000.tar"]
    line = one_line_error(CliRunner().invoke(cli, ["tokenize", str(src), "--palette", _save(palette, tmp_path),
                                                    "--out", str(out), "--n-px", "8", "--shard-size", "3",
                                                    "--workers", "1"]))
    assert "train-000001.tar: no space left on device" in line and "MiB free" in line
    monkeypatch.setattr(tk, "open", failing_open(errno.EROFS), raising=False)
    with pytest.raises(OutputError, match=r"train-000000\.tar: read-only file system"):
        tokenize_dataset([str(src)], palette, str(tmp_path / "ro"), **kw)
    monkeypatch.setattr(tk, "open", real_open, raising=False)
    for folder in (out, tmp_path / "ro"):
        assert tokenize_dataset([str(src)], palette, str(folder), **kw)["splits"]["train"]["samples"] == 8
    assert tree(str(out)) == tree(str(tmp_path / "ro"))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot write .*file/out: a parent is not a folder"):
        tokenize_dataset([str(src)], palette, str(tmp_path / "file" / "out"), **kw)


def test_converted_inputs_are_counted_by_kind(tmp_path, palette):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(10)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(src / "rgb.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA").save(src / f"rgba{i}.png")
    Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16)).save(src / "deep.png")  # 16-bit grey
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(src / "pal.png")
    Image.fromarray(rgb[..., 0]).save(src / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(src / "print.jpg")
    Image.fromarray(rgb[..., 0] > 127).save(src / "bits.png")
    meta = tokenize_dataset([str(src)], palette, str(tmp_path / "out"), n_px=8, workers=1, progress=False)
    assert meta["splits"]["train"]["samples"] == 9
    assert meta["converted"] == {"16-bit": 1, "alpha": 3, "bilevel": 1, "cmyk": 1, "grey": 1, "palette": 1}
    with open(tmp_path / "out" / "meta.json") as f:
        assert json.load(f)["converted"] == meta["converted"]


def test_progress_is_plain_lines_without_a_terminal_and_one_bar_on_one(tmp_path, palette, monkeypatch, capsys):
    import igpt_fast.tokenize as tk

    src = tmp_path / "src"
    _folder(src, 12, np.random.default_rng(11))
    monkeypatch.setattr(tk, "CHUNK", 4)
    tokenize_dataset([str(src)], palette, str(tmp_path / "quiet"), n_px=8, workers=1, val_fraction=0.25)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [err.splitlines()[0]]  # one summary line at the end
    assert err.startswith("tokenize val: 12/12 images (100%) |")

    monkeypatch.setenv("IGPT_FAST_PROGRESS_SECONDS", "0")
    tokenize_dataset([str(src)], palette, str(tmp_path / "lines"), n_px=8, workers=1, val_fraction=0.25)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" |")[0] for line in lines] == [
        "tokenize train: 4/12 images (33%)", "tokenize train: 8/12 images (67%)", "tokenize train: 9/12 images (75%)",
        "tokenize val: 12/12 images (100%)", "tokenize val: 12/12 images (100%)"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    tokenize_dataset([str(src)], palette, str(tmp_path / "bar"), n_px=8, workers=1, val_fraction=0.25)
    renders = [r for r in term.getvalue().split("\r") if r.strip()]
    assert renders and all(r.startswith("tokenize ") for r in renders)  # one bar, described from its first render
    assert term.getvalue().count("\n") == 1 and "12/12" in renders[-1]
