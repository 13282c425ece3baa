"""Palette: exact quantisation against a float64 brute force, fit determinism and degenerate data,
save/load round trip, the OpenAI/HF layout, malformed files."""
import errno
import os
import shutil
import warnings

import numpy as np
import pytest
import skimage.data
from sources import lut_cache  # noqa: F401  (autouse fixture: tables persist to a temporary folder)

from igpt_fast.errors import OutputError
from igpt_fast.palette import Palette, PaletteError


def brute_force(colours, centers):
    """float64 argmin of sum((x - c)^2) over centres; argmin keeps the lowest index on ties."""
    x = colours.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    c = centers.astype(np.float64)
    return np.concatenate([((x[s:s + 4096, None, :] - c[None]) ** 2).sum(-1).argmin(1)
                           for s in range(0, len(x), 4096)])


def photo_pixels():
    return np.concatenate([im.reshape(-1, 3) for im in
                           (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())])


@pytest.fixture(scope="module")
def fitted():
    return Palette.fit(photo_pixels(), k=512, seed=0)


def probe_colours(n_random=120_000, seed=0):
    """Every combination of corner and cell-boundary channel values, plus uniform random colours."""
    levels = np.array([0, 1, 7, 8, 63, 64, 127, 128, 191, 192, 247, 248, 254, 255], dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    rand = np.random.default_rng(seed).integers(0, 256, (n_random, 3), dtype=np.uint8)
    return np.concatenate([grid, rand])


PALETTES = {
    "fitted": None,
    "uniform-random": np.random.default_rng(1).uniform(-1, 1, (512, 3)).astype(np.float32),
    # duplicates and a grey ramp: exact ties everywhere, the lowest index must win
    "ties": np.concatenate([np.zeros((3, 3)), np.linspace(-1, 1, 9)[:, None].repeat(3, 1),
                            np.zeros((2, 3))]).astype(np.float32),
    "tiny": np.array([[0.1, -0.2, 0.3]], dtype=np.float32),
}


@pytest.mark.parametrize("name", PALETTES)
def test_quantize_equals_brute_force(name, fitted):
    pal = fitted if PALETTES[name] is None else Palette(PALETTES[name])
    colours = probe_colours()
    ids = pal.quantize(colours)
    assert ids.dtype == np.uint16
    np.testing.assert_array_equal(ids, brute_force(colours, pal.centers))
    # warm table, other shapes: same answers
    images = colours[:4096].reshape(4, 32, 32, 3)
    assert pal.quantize(images).shape == (4, 32, 32)
    np.testing.assert_array_equal(pal.quantize(images).reshape(-1), ids[:4096])


def stride_colours(step=97, start=0):
    """Colours start, start + step, ... over the whole cube (173k for step 97)."""
    keys = np.arange(start, 1 << 24, step, dtype=np.uint32)
    return np.stack([keys >> 16, (keys >> 8) & 255, keys & 255], -1).astype(np.uint8)


def test_full_and_persisted_lookup_tables_match_brute_force_on_a_stride(fitted):
    pal = Palette(fitted.centers)
    pal.build_lut()
    colours = stride_colours()
    expected = brute_force(colours, pal.centers)
    np.testing.assert_array_equal(pal.quantize(colours), expected)
    path = pal.lut_path()
    assert os.path.isfile(path) and os.path.getsize(path) == 64 + 2 * (1 << 24)
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]  # written atomically

    again = Palette(fitted.centers)  # what a fresh process sees: the persisted table, memory-mapped
    ids = again.quantize(colours)
    assert again._lut_complete and not again._lut.flags.writeable
    np.testing.assert_array_equal(ids, expected)
    other = stride_colours(1013, 50)
    np.testing.assert_array_equal(again.quantize(other), brute_force(other, pal.centers))


def test_a_persisted_table_is_used_only_for_its_own_palette(fitted, tmp_path):
    mine, theirs = Palette(fitted.centers), Palette(PALETTES["uniform-random"])
    mine.build_lut()
    colours = stride_colours(40009)
    expected = brute_force(colours, theirs.centers)

    shutil.copy(mine.lut_path(), theirs.lut_path())  # another palette's table under this palette's name
    fresh = Palette(theirs.centers)
    np.testing.assert_array_equal(fresh.quantize(colours), expected)
    assert not fresh._lut_complete  # the header names the other palette: ignored, filled lazily instead

    with open(mine.lut_path(), "rb") as f:
        body = f.read()[64:]
    with open(theirs.lut_path(), "wb") as f:  # right header, wrong ids: the spot check catches it
        f.write(theirs._lut_header() + body)
    fresh = Palette(theirs.centers)
    with pytest.warns(UserWarning, match="does not match its palette"):
        ids = fresh.quantize(colours)
    np.testing.assert_array_equal(ids, expected)

    with open(theirs.lut_path(), "wb") as f:  # truncated
        f.write(theirs._lut_header() + body[:1000])
    fresh = Palette(theirs.centers)
    np.testing.assert_array_equal(fresh.quantize(colours), expected)
    assert not fresh._lut_complete
    fresh.build_lut()  # rebuilt and persisted over the bad file
    assert Palette(theirs.centers).quantize(colours[:1]) == expected[:1] and os.path.getsize(theirs.lut_path()) > 1000


def test_unwritable_cache_folder_warns_and_still_quantizes(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("IGPT_FAST_CACHE_DIR", str(tmp_path / "file" / "cache"))
    pal = Palette(PALETTES["ties"])
    with pytest.warns(UserWarning, match="could not persist"):
        pal.build_lut()
    colours = stride_colours(1009)
    np.testing.assert_array_equal(pal.quantize(colours), brute_force(colours, pal.centers))


def test_many_unfilled_cells_in_one_call_fill_the_whole_table(monkeypatch):
    pal = Palette(PALETTES["ties"])
    colours = stride_colours(257)  # touches every 8x8x8 cell
    np.testing.assert_array_equal(pal.quantize(colours), brute_force(colours, pal.centers))
    assert pal._lut_complete and os.path.isfile(pal.lut_path())
    few = Palette(np.array([[0.3, 0.1, -0.5], [0.2, 0.2, 0.2]], dtype=np.float32))  # no table persisted yet
    few.quantize(colours[:100])
    assert not few._lut_complete  # a handful of cells: filled lazily


def test_palette_pickles_without_its_table(fitted):
    import pickle

    pal = Palette(fitted.centers)
    pal.quantize(stride_colours(5003))
    data = pickle.dumps(pal)
    assert len(data) < 100_000
    np.testing.assert_array_equal(pickle.loads(data).quantize(stride_colours(5003)), pal.quantize(stride_colours(5003)))


def test_fit_is_deterministic_sorted_and_distinct(fitted):
    again = Palette.fit(photo_pixels(), k=512, seed=0)
    np.testing.assert_array_equal(fitted.centers, again.centers)
    assert fitted.sha256 == again.sha256
    assert fitted.centers.dtype == np.float32 and fitted.centers.shape == (512, 3)
    assert np.abs(fitted.centers).max() <= 1.0
    assert len(np.unique(fitted.centers, axis=0)) == 512
    luma = fitted.centers @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.all(np.diff(luma) >= 0)
    other = Palette.fit(photo_pixels(), k=512, seed=1)
    assert other.sha256 != fitted.sha256


def test_fit_quality_beats_a_random_palette(fitted):
    px = photo_pixels()[::7]
    x = px.astype(np.float64) / 127.5 - 1

    def sse(pal):
        return ((x - pal.centers[pal.quantize(px)].astype(np.float64)) ** 2).sum()
    assert sse(fitted) < 0.2 * sse(Palette(PALETTES["uniform-random"]))


def test_fewer_distinct_colours_than_k():
    greys = np.random.default_rng(0).integers(0, 256, 50_000).astype(np.uint8)
    pixels = np.repeat(greys[:, None], 3, 1)
    with pytest.warns(UserWarning, match="only 256 distinct colours"):
        pal = Palette.fit(pixels, k=512)
    assert pal.k == 256
    np.testing.assert_array_equal(np.sort(pal.colours()[:, 0]), np.arange(256))
    # every grey maps to itself: lossless
    np.testing.assert_array_equal(pal.dequantize(pal.quantize(pixels[:64].reshape(1, 8, 8, 3)), 8),
                                  pixels[:64].reshape(1, 8, 8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Palette.fit(pixels, k=256).k == 256  # exactly k: no warning


def test_dequantize(fitted):
    ids = np.arange(512, dtype=np.uint16).reshape(2, 16, 16)
    images = fitted.dequantize(ids, 16)
    assert images.dtype == np.uint8 and images.shape == (2, 16, 16, 3)
    expected = np.rint(127.5 * (fitted.centers.astype(np.float64) + 1)).astype(np.uint8)
    np.testing.assert_array_equal(images.reshape(-1, 3), expected)
    with pytest.raises(PaletteError, match="do not form images"):
        fitted.dequantize(ids.reshape(-1)[:100], 16)
    with pytest.raises(PaletteError, match="ids must lie in"):
        Palette(PALETTES["tiny"]).dequantize(np.ones((1, 4), np.uint16), 2)


def test_save_load_round_trip(tmp_path, fitted):
    path = tmp_path / "palette.npy"
    fitted.save(path)
    loaded = Palette.load(path)
    np.testing.assert_array_equal(loaded.centers, fitted.centers)
    assert loaded.sha256 == fitted.sha256
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind
    swatch = tmp_path / "swatch.png"
    fitted.save_swatch(swatch)
    from PIL import Image
    assert Image.open(swatch).size == (32 * 24, 18 + 16 * 24)  # 512 colours: 32 x 16 cells of 24 px, a title band


@pytest.mark.parametrize("k,columns,rows", [(16, 4, 4), (64, 8, 8), (10, 4, 3), (3, 2, 2)])
def test_swatch_is_a_labelled_grid_without_blank_areas(tmp_path, k, columns, rows):
    """The swatch is a near-square grid (no half-blank row of 32 cells for a small k): each cell is its
    colour with its id written on it, the title band over the grid has text, at most the last row is
    part empty."""
    from PIL import Image

    colours = np.random.default_rng(k).integers(0, 256, (k, 3))
    palette = Palette((colours / 127.5 - 1).astype(np.float32))
    palette.save_swatch(tmp_path / "swatch.png")
    picture = np.asarray(Image.open(tmp_path / "swatch.png").convert("RGB"))
    band, cell = 18, picture.shape[1] // columns
    assert picture.shape == (band + rows * cell, columns * cell, 3) and cell >= 24
    assert (picture[:band].min(-1) < 100).sum() > 20  # the title "palette: k = K"
    for i, colour in enumerate(palette.colours()):
        r, c = divmod(i, columns)
        block = picture[band + r * cell:band + (r + 1) * cell, c * cell:(c + 1) * cell].astype(int)
        same = np.all(block == colour, axis=-1)
        assert same.mean() > 0.6 and not same.all(), i  # the colour, and its id written on it
    blank = rows * columns - k
    assert blank < columns  # only part of the last row is empty
    assert np.all(picture[band + (rows - 1) * cell:, (columns - blank) * cell:] == 255)


def test_unwritable_outputs_are_one_output_error(tmp_path, fitted, monkeypatch):
    """A parent that is a file, a read-only place, a full disk: one OutputError naming the file (and the
    free space when the disk is full), nothing left behind."""
    (tmp_path / "file").write_text("not a folder")
    for write in (fitted.save, fitted.save_swatch):
        with pytest.raises(OutputError, match=r"cannot write .*file/x: a parent is not a folder"):
            write(tmp_path / "file" / "x")

    def fail(code):
        def write(*args, **kwargs):
            raise OSError(code, os.strerror(code))
        return write

    monkeypatch.setattr(np, "save", fail(errno.ENOSPC))
    with pytest.raises(OutputError, match=r"cannot write .*palette\.npy: no space left on device "
                                          r"\([\d.]+ MiB free in .*\)$"):
        fitted.save(tmp_path / "palette.npy")
    from PIL import Image

    monkeypatch.setattr(Image.Image, "save", fail(errno.EROFS))
    with pytest.raises(OutputError, match=r"cannot write .*swatch\.png: read-only file system"):
        fitted.save_swatch(tmp_path / "swatch.png")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_openai_layout_loads_unchanged(tmp_path):
    """kmeans_centers.npy: float (512, 3) in [-1, 1], any order; float64 files are accepted as float32."""
    centers = np.random.default_rng(5).uniform(-1, 1, (512, 3))
    np.save(tmp_path / "kmeans_centers.npy", centers)
    pal = Palette.load(tmp_path / "kmeans_centers.npy")
    np.testing.assert_array_equal(pal.centers, centers.astype(np.float32))  # never reordered


@pytest.mark.parametrize("content,match", [
    (np.zeros((512, 4), np.float32), r"shape \(k, 3\)"),
    (np.zeros((512,), np.float32), r"shape \(k, 3\)"),
    (np.zeros((512, 3), np.int64), "floating point"),
    (np.full((4, 3), 200.0, np.float32), r"in \[-1, 1\]"),
    (np.array([[0, 0, np.nan]], np.float32), "NaN"),
    (np.array([{"a": 1}], dtype=object), "not a readable"),
    (b"not a numpy file", "not a readable"),
])
def test_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad.npy"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content, allow_pickle=True)
    with pytest.raises(PaletteError, match=match):
        Palette.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(PaletteError, match="not found"):
        Palette.load(tmp_path / "nope.npy")


def test_quantize_rejects_non_uint8(fitted):
    with pytest.raises(PaletteError, match="uint8 RGB"):
        fitted.quantize(np.zeros((4, 3), np.float32))
    with pytest.raises(PaletteError, match="uint8 RGB"):
        fitted.quantize(np.zeros((4, 4), np.uint8))


def test_palette_cli(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from igpt_fast.cli import cli

    src = tmp_path / "images" / "cats"
    src.mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea")):
        Image.fromarray(getattr(skimage.data, name)()).save(src / f"{i}.png")
    out = tmp_path / "pal" / "palette.npy"
    result = CliRunner().invoke(cli, ["palette", str(tmp_path / "images"), "--k", "64", "--n-px", "16",
                                      "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output
    pal = Palette.load(out)
    assert pal.k == 64 and (tmp_path / "pal" / "palette.png").is_file()
    assert "k 64" in result.output and pal.sha256[:12] in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["palette", str(empty), "--out", str(tmp_path / "x.npy")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("Error:") and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["palette", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
