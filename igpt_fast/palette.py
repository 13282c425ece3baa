"""The colour palette: k-means centres that turn RGB pixels into iGPT tokens and back.

References: Chen et al. 2020, section 3.1 (512 k-means clusters of RGB values scaled to [-1, 1]);
openai/image-gpt `kmeans_centers.npy` (float (512, 3) in [-1, 1]); transformers
ImageGPTImageProcessor (argmin of squared Euclidean distance).

- `Palette.fit` runs faiss k-means (on the GPU when faiss-gpu sees one) on the *distinct* colours of
  the sample, weighted by their counts: the same objective as k-means on every pixel, at a fraction of
  the cost. Centres are sorted by luma, then R, G, B, so a seed gives one palette.
  When the sample has no more distinct colours than k (Fashion-MNIST has at most 256 grey levels),
  k-means is pointless: the palette is exactly those colours and has fewer than k entries (a warning
  says so). Duplicate centres are never kept.
- `quantize` is exact: ids equal a float64 brute-force argmin of `sum((x - c)^2)` with the lowest index
  winning ties, for every uint8 colour. It reads a 2^24-entry uint16 lookup table (32 MiB), so
  quantisation is one gather per pixel (memory-bound). The table comes from, in order: a complete
  table persisted for this palette (memory-mapped, shared by every process on the machine); or a
  sentinel table filled lazily, 8x8x8 colour cell by cell, for the colours seen. `build_lut` fills
  the whole table at once (vectorised, a few seconds for 512 colours) and persists it; tokenize and
  `igpt-fast palette` call it, and so does `quantize` when one call meets many unfilled cells.
- Persisted tables live in `lut_cache_dir()` ($IGPT_FAST_CACHE_DIR, else $XDG_CACHE_HOME/igpt-fast,
  else ~/.cache/igpt-fast) as `lut-v1-{sha256}.bin`: a 64-byte header (magic, format version, the
  palette's sha256 digest, k) then the ids, written atomically (igpt_fast.atomic). A table is used only
  when its header names this exact palette and a spot check against the brute force agrees; an
  unwritable cache folder only costs the persistence (one warning).
- A loaded palette is never reordered: OpenAI/HF centres load as they are.
"""
import hashlib
import mmap
import os
import warnings

import numpy as np
import numpy.typing as npt

from .atomic import atomic_path
from .errors import PaletteError
from .filekind import describe_file

__all__ = ["Palette", "PaletteError", "lut_cache_dir"]

_UNSET = np.uint16(0xFFFF)  # lookup-table entry not filled yet; why k is at most 65535
_CELL = 8  # lookup-table cells are 8x8x8 blocks of uint8 colours
_N_CELLS = (256 // _CELL) ** 3
_CELL_OFFSETS = np.stack(np.meshgrid(*[np.arange(_CELL)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (512, 3)
_CELL_OFFSET_KEYS = (_CELL_OFFSETS[:, 0] << 16) | (_CELL_OFFSETS[:, 1] << 8) | _CELL_OFFSETS[:, 2]  # (512,)
_FULL_BUILD_CELLS = _N_CELLS // 4  # one quantize call missing this many cells builds the whole table
_LUT_MAGIC = b"IGPTLUT\x01"  # format version 1
_LUT_HEADER = 64  # magic (8), palette sha256 digest (32), k (8, little-endian), zeros (16)
_LUT_SIZE = 1 << 24


def lut_cache_dir() -> str:
    """Folder of persisted lookup tables: $IGPT_FAST_CACHE_DIR, $XDG_CACHE_HOME/igpt-fast or ~/.cache/igpt-fast."""
    if os.environ.get("IGPT_FAST_CACHE_DIR"):
        return os.environ["IGPT_FAST_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "igpt-fast")


def _to_unit(colours: np.ndarray) -> npt.NDArray[np.float64]:
    """uint8 (..., 3) -> float64 in [-1, 1], the scaling of the paper and HF (x / 127.5 - 1)."""
    return colours.astype(np.float64) / 127.5 - 1.0


def _pack(colours: np.ndarray) -> npt.NDArray[np.uint32]:
    """uint8 (..., 3) -> uint32 (...) keys r << 16 | g << 8 | b.

    Written byte by byte into little-endian words (b, g, r, 0): three strided copies, ~3x faster
    than widening and shifting.
    """
    flat = colours.reshape(-1, 3)  # (N, 3)
    keys = np.zeros(len(flat), dtype="<u4")
    octets = keys.view(np.uint8).reshape(-1, 4)  # (N, 4)
    octets[:, 0], octets[:, 1], octets[:, 2] = flat[:, 2], flat[:, 1], flat[:, 0]
    return keys.reshape(colours.shape[:-1])


def _unpack(keys: np.ndarray) -> npt.NDArray[np.uint8]:
    """uint32 (N,) keys -> uint8 (N, 3)."""
    return np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint8)


class Palette:
    """k colour centres, float32 (k, 3) in [-1, 1]; token id i is centre i."""

    def __init__(self, centers: npt.ArrayLike) -> None:
        centers = np.asarray(centers)
        if centers.ndim != 2 or centers.shape[1] != 3 or centers.shape[0] < 1:
            raise PaletteError(f"palette must have shape (k, 3), got {centers.shape}")
        if not np.issubdtype(centers.dtype, np.floating):
            raise PaletteError(f"palette must be floating point in [-1, 1], got dtype {centers.dtype}")
        if centers.shape[0] > 65535:
            raise PaletteError(f"palette has {centers.shape[0]} centres; at most 65535 fit uint16 ids")
        centers = np.ascontiguousarray(centers, dtype=np.float32)
        if not np.isfinite(centers).all():
            raise PaletteError("palette has NaN or infinite values")
        if np.abs(centers).max() > 1.0 + 1e-4:
            raise PaletteError(
                f"palette values must lie in [-1, 1] (x / 127.5 - 1), found {np.abs(centers).max():.3f}; "
                "a palette of 0..255 values can be converted with c / 127.5 - 1")
        self.centers = centers
        self.centers.setflags(write=False)
        self._c64 = centers.astype(np.float64)
        self._c64_far = np.vstack([self._c64, np.full((1, 3), 1e6)])  # (k + 1, 3): row k pads candidate lists
        # (512, M) candidate ids of the 32x32x32 colour blocks, filled on first use
        self._blocks: np.ndarray | None = None
        # uint16 (2^24,) ids; while not _lut_complete, _UNSET where not filled yet
        self._lut: npt.NDArray[np.uint16] | None = None
        self._lut_complete = False

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_lut"], state["_lut_complete"] = None, False  # 32 MiB; rebuilt or re-mapped where needed
        state["_blocks"] = None
        return state

    @property
    def k(self) -> int:
        return self.centers.shape[0]

    def __len__(self) -> int:
        return self.k

    def __repr__(self) -> str:
        return f"Palette(k={self.k}, sha256={self.sha256[:12]})"

    @property
    def sha256(self) -> str:
        """Hex digest of the centres' little-endian float32 bytes (independent of the file header)."""
        return hashlib.sha256(self.centers.astype("<f4").tobytes()).hexdigest()

    @classmethod
    def fit(cls, pixels: npt.ArrayLike, k: int = 512, seed: int = 0, niter: int = 20, gpu: bool | None = None,
            verbose: bool = False) -> "Palette":
        """k-means palette of uint8 RGB pixels (N, 3) (or (..., 3)); deterministic for a seed.

        gpu=None uses a GPU when faiss was built with one and sees one.
        """
        import faiss

        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
            raise PaletteError(f"fit needs uint8 RGB pixels of shape (..., 3), got {pixels.dtype} {pixels.shape}")
        if k < 1 or k > 65535:
            raise PaletteError(f"k must be in [1, 65535], got {k}")
        keys, counts = np.unique(_pack(pixels.reshape(-1, 3)), return_counts=True)
        if len(keys) == 0:
            raise PaletteError("fit needs at least one pixel")
        distinct = _to_unit(_unpack(keys)).astype(np.float32)  # (U, 3)
        if len(keys) <= k:
            if len(keys) < k:
                warnings.warn(f"the pixels have only {len(keys)} distinct colours (< k={k}); "
                              f"the palette is exactly those {len(keys)} colours", stacklevel=2)
            return cls(cls._sorted(distinct))
        if gpu is None:
            gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        km = faiss.Kmeans(3, k, niter=niter, seed=seed, gpu=bool(gpu), verbose=verbose,
                          max_points_per_centroid=1 << 30, min_points_per_centroid=1)
        km.train(distinct, weights=counts.astype(np.float32))
        assert km.centroids is not None  # set by train
        centers = np.clip(km.centroids.reshape(k, 3), -1.0, 1.0)
        unique = np.unique(centers, axis=0)
        if len(unique) < k:
            warnings.warn(f"k-means gave {k - len(unique)} duplicate centres; the palette keeps "
                          f"{len(unique)} distinct ones", stacklevel=2)
        return cls(cls._sorted(unique))

    @staticmethod
    def _sorted(centers: np.ndarray) -> np.ndarray:
        """Deterministic order: by luma (ITU-R 601), then R, G, B."""
        luma = centers @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        order = np.lexsort((centers[:, 2], centers[:, 1], centers[:, 0], luma))
        return centers[order]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Palette":
        """Load a float (k, 3) .npy in [-1, 1] (OpenAI kmeans_centers.npy / HF clusters layout)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PaletteError(f"palette file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            kind = describe_file(path)
            why = f": {e}" if kind.startswith("a NumPy array") else ""
            raise PaletteError(f"{path} is {kind}, not a readable .npy palette (a (k, 3) float array){why}") from None
        if not isinstance(arr, np.ndarray):
            raise PaletteError(f"{path} is {describe_file(path)}, not a .npy palette (a (k, 3) float array)")
        try:
            return cls(arr)
        except PaletteError as e:
            raise PaletteError(f"{path}: {e}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write float32 (k, 3) .npy atomically (igpt_fast.atomic: OutputError when it cannot be written)."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, self.centers)

    def _box_candidates(self, base: np.ndarray, side: int,
                        ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The centres among `ids` that can be nearest to some colour of each box, in ascending id order.

        base: (n, 3) uint8 corners of boxes [base, base + side - 1]^3; ids: (n, M) ascending centre ids per
        box, padded with k (a centre far outside the cube). A centre qualifies when its squared distance
        to the box is at most the smallest squared distance of any centre to the box's far corner (+1e-9
        for rounding); the nearest centre of every colour in the box qualifies. A box inside a larger box
        keeps a subset of the larger box's candidates (both distances only shrink), so narrowing a parent's
        list loses nothing. Returns (n, m) ids (padded with k) and (n,) counts.
        """
        lo = base / 127.5 - 1.0  # (n, 3)
        hi = (base + side - 1) / 127.5 - 1.0
        cen = self._c64_far[ids]  # (n, M, 3)
        dmin = np.zeros(ids.shape)  # (n, M) squared distance from each centre to each box
        dmax = np.zeros(ids.shape)  # (n, M) ... to the box's farthest corner
        for a in range(3):
            below, above = lo[:, a, None] - cen[:, :, a], cen[:, :, a] - hi[:, a, None]  # (n, M)
            dmin += np.maximum(np.maximum(below, above), 0.0) ** 2
            dmax += np.maximum(-below, -above) ** 2
        cand = dmin <= dmax.min(1, keepdims=True) + 1e-9  # (n, M)
        counts = cand.sum(1)
        m = int(counts.max())
        out = np.take_along_axis(ids, np.argsort(~cand, axis=1, kind="stable")[:, :m], axis=1)  # (n, m)
        out[np.arange(m)[None] >= counts[:, None]] = self.k
        return out, counts

    def _cell_candidates(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidate ids (n, m) and counts (n,) of 8x8x8 colour cells, narrowed from their 32x32x32 block's."""
        if self._blocks is None:  # the 512 blocks' lists, against all k centres, once per palette
            b = np.arange(512)
            base = np.stack([b >> 6, (b >> 3) & 7, b & 7], -1) * 32  # (512, 3)
            self._blocks = self._box_candidates(base, 32, np.broadcast_to(np.arange(self.k), (512, self.k)))[0]
        coords = np.stack([cells >> 10, (cells >> 5) & 31, cells & 31], -1)  # (n, 3) in 0..31
        block = ((coords[:, 0] >> 2) << 6) | ((coords[:, 1] >> 2) << 3) | (coords[:, 2] >> 2)
        return self._box_candidates(coords * _CELL, _CELL, self._blocks[block])

    def _fill_cells(self, cells: npt.ArrayLike) -> None:
        """Fill the lookup table for whole colour cells (8x8x8 uint8 colours each), exactly.

        Only each cell's candidates (`_box_candidates`: a handful for a 512-colour palette) are scored,
        with the float64 direct formula sum((x - c)^2) over candidates in ascending id order, so argmin
        keeps the lowest id on exact ties: the result equals a brute-force float64 argmin over all k
        centres.
        """
        cells = np.asarray(cells, dtype=np.int64)
        base = np.stack([cells >> 10, (cells >> 5) & 31, cells & 31], -1) * _CELL  # (n, 3) uint8 corner
        base_keys = (base[:, 0] << 16) | (base[:, 1] << 8) | base[:, 2]  # (n,)
        ids, counts = self._cell_candidates(cells)  # (n, m), (n,)
        order = np.argsort(counts, kind="stable")
        for s in range(0, len(order), 2048):
            rows = order[s:s + 2048]
            m = int(counts[rows].max())
            idx = ids[rows, :m]  # (r, m) candidate ids, ascending, padded with k
            axis = (base[rows][:, :, None] + np.arange(_CELL)) / 127.5 - 1.0  # (r, 3, 8) colour values per axis
            sq = (axis[:, None] - self._c64_far[idx][:, :, :, None]) ** 2  # (r, m, 3, 8)
            for j in range(m):  # candidates in ascending id order; a tie keeps the earlier (lower) id
                # (dr^2 + dg^2) + db^2: the summation order of sum((x - c)^2, -1) over (r, g, b)
                d = ((sq[:, j, 0, :, None, None] + sq[:, j, 1, None, :, None]) + sq[:, j, 2, None, None, :])
                d = d.reshape(len(rows), _CELL ** 3)  # (r, 512)
                if j == 0:
                    best_d, best_j = d, np.zeros(d.shape, dtype=np.intp)
                else:
                    closer = d < best_d
                    best_j[closer] = j
                    np.minimum(best_d, d, out=best_d)
            best = np.take_along_axis(idx, best_j, axis=1)  # (r, 512)
            self._ensure_lut()[base_keys[rows][:, None] + _CELL_OFFSET_KEYS[None]] = best.astype(np.uint16)

    def build_lut(self, persist: bool = True) -> None:
        """Make the whole 2^24-colour lookup table ready: the persisted one, else computed (a few seconds
        for 512 colours) and, when `persist`, written to `lut_cache_dir()` for the next process."""
        if self._lut_complete:
            return
        if self._map_persisted_lut():
            return
        if self._lut is None or not self._lut.flags.writeable:
            self._lut = np.full(_LUT_SIZE, _UNSET, dtype=np.uint16)
        for s in range(0, _N_CELLS, 4096):
            self._fill_cells(np.arange(s, min(s + 4096, _N_CELLS)))
        self._lut_complete = True
        if persist:
            self._persist_lut()

    def lut_path(self) -> str:
        """Where this palette's complete lookup table is persisted (it may not exist yet)."""
        return os.path.join(lut_cache_dir(), f"lut-v1-{self.sha256}.bin")

    def _lut_header(self) -> bytes:
        return _LUT_MAGIC + bytes.fromhex(self.sha256) + self.k.to_bytes(8, "little") + bytes(16)

    def _persist_lut(self) -> None:
        path = self.lut_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                f.write(self._lut_header())
                f.write(np.ascontiguousarray(self._lut, dtype="<u2").data)
        except OSError as e:  # OutputError included: the table is only a cache
            warnings.warn(f"could not persist the palette's lookup table to {path} ({e}); set "
                          "IGPT_FAST_CACHE_DIR to a writable folder to skip rebuilding it in every process",
                          stacklevel=3)

    def _map_persisted_lut(self) -> bool:
        """Memory-map this palette's persisted table if one exists and checks out; True when mapped."""
        path = self.lut_path()
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != _LUT_HEADER + 2 * _LUT_SIZE or f.read(_LUT_HEADER) != self._lut_header():
                    return False
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError:
            return False
        lut = np.frombuffer(buf, dtype="<u2", count=_LUT_SIZE, offset=_LUT_HEADER)  # (2^24,) read-only
        probe = ((np.arange(1, 65, dtype=np.uint64) * 0x9E3779B1) % _LUT_SIZE).astype(np.uint32)  # spread out
        x = _to_unit(_unpack(probe))  # (64, 3)
        d = (x[:, None, 0] - self._c64[None, :, 0]) ** 2  # (64, k), summed r, g, b as in _fill_cells
        d = (d + (x[:, None, 1] - self._c64[None, :, 1]) ** 2) + (x[:, None, 2] - self._c64[None, :, 2]) ** 2
        expected = d.argmin(1)  # (64,) brute force, lowest id on ties
        if not np.array_equal(lut[probe], expected):
            warnings.warn(f"{path} does not match its palette; rebuilding it", stacklevel=3)
            return False
        self._lut, self._lut_complete = lut, True
        return True

    def _ensure_lut(self) -> npt.NDArray[np.uint16]:
        """The lookup table: the persisted one mapped, else an unfilled one, on first use."""
        if self._lut is None and not self._map_persisted_lut():
            self._lut = np.full(_LUT_SIZE, _UNSET, dtype=np.uint16)
        assert self._lut is not None  # _map_persisted_lut sets it when it returns True
        return self._lut

    def quantize(self, images: npt.ArrayLike) -> npt.NDArray[np.uint16]:
        """uint8 (..., 3) RGB -> uint16 (...) ids of the nearest centre."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != 3:
            raise PaletteError(f"quantize needs uint8 RGB of shape (..., 3), got {images.dtype} {images.shape}")
        keys = _pack(images)
        ids = np.take(self._ensure_lut(), keys)
        if self._lut_complete:
            return ids
        miss = ids == _UNSET  # colours of cells not filled yet (k <= 65535, so never a real id)
        if miss.any():
            missing = keys[miss]
            seen = np.zeros(_N_CELLS, dtype=bool)
            seen[((missing >> 9) & 0x7C00) | ((missing >> 6) & 0x3E0) | ((missing >> 3) & 0x1F)] = True
            new = np.flatnonzero(seen)  # the cells to fill, ascending
            if len(new) >= _FULL_BUILD_CELLS:
                self.build_lut()
            else:
                for s in range(0, len(new), 4096):
                    self._fill_cells(new[s:s + 4096])
            ids[miss] = self._ensure_lut()[missing]  # build_lut may have mapped a new table
        return ids

    def colours(self) -> npt.NDArray[np.uint8]:
        """uint8 (k, 3): each centre as an RGB colour, rint(127.5 * (c + 1))."""
        return np.clip(np.rint(127.5 * (self.centers.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)

    def dequantize(self, ids: npt.ArrayLike, n_px: int) -> npt.NDArray[np.uint8]:
        """ids (B, n_px * n_px) or (B, n_px, n_px) -> uint8 images (B, n_px, n_px, 3)."""
        ids = np.asarray(ids)
        if ids.size % (n_px * n_px):
            raise PaletteError(f"{ids.size} ids do not form images of {n_px}x{n_px}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.k):
            raise PaletteError(f"ids must lie in [0, {self.k}), found [{ids.min()}, {ids.max()}]")
        return self.colours()[ids.astype(np.int64)].reshape(-1, n_px, n_px, 3)

    def save_swatch(self, path: str | os.PathLike[str], cell: int = 24, columns: int | None = None) -> None:
        """A labelled PNG of the palette: a title band ("palette: k = 512") over a near-square grid of
        cells in id order, each cell filled with its colour and carrying its id (black or white, whichever
        reads on it). columns: cells per row (default: a power of two for a power-of-two k, 512 -> 32 x
        16, else ceil(sqrt(k))), so at most the last row is part empty."""
        from PIL import Image, ImageDraw, ImageFont

        k = self.k
        if columns is None:
            columns = 1 << int(np.ceil(np.log2(k) / 2)) if k & (k - 1) == 0 else int(np.ceil(np.sqrt(k)))
        columns = max(1, min(columns, k))
        rows = -(-k // columns)
        band, title = 18, f"palette: k = {k}"  # title band height in pixels, its text
        draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), ImageFont.load_default()
        cell = max(cell, -(-(int(draw.textbbox((0, 0), title, font=font)[2]) + 6) // columns))  # the title fits
        colours = self.colours()
        grid = np.full((rows * columns, 3), 255, dtype=np.uint8)
        grid[:k] = colours
        grid = grid.reshape(rows, columns, 3).repeat(cell, 0).repeat(cell, 1)  # (rows*cell, columns*cell, 3)
        picture = Image.new("RGB", (max(columns * cell, 1), rows * cell + band), (255, 255, 255))
        picture.paste(Image.fromarray(grid), (0, band))
        draw = ImageDraw.Draw(picture)
        draw.text((3, 3), title, fill=(0, 0, 0), font=font)
        luma = colours.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # (k,)
        for i in range(k):
            r, c = divmod(i, columns)
            x0, y0, x1, y1 = draw.textbbox((0, 0), str(i), font=font)
            if x1 - x0 > cell - 2:  # ids too wide for tiny cells stay colour only
                continue
            xy = (c * cell + (cell - (x1 - x0)) // 2 - x0, band + r * cell + (cell - (y1 - y0)) // 2 - y0)
            draw.text(xy, str(i), fill=(0, 0, 0) if luma[i] > 140 else (255, 255, 255), font=font)
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
