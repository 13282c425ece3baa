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
  winning ties, for every uint8 colour. A 2^24-entry uint16 lookup table (32 MiB) is filled lazily for
  the colours actually seen, so steady-state quantisation is one gather per pixel (memory-bound).
- A loaded palette is never reordered: OpenAI/HF centres load as they are.
"""
import hashlib
import os
import warnings

import numpy as np

__all__ = ["Palette", "PaletteError"]

_UNSET = np.uint16(0xFFFF)  # lookup-table entry not filled yet; why k is at most 65535
_CELL = 8  # lookup-table cells are 8x8x8 blocks of uint8 colours
_N_CELLS = (256 // _CELL) ** 3
_CELL_OFFSETS = np.stack(np.meshgrid(*[np.arange(_CELL)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (512, 3)


class PaletteError(ValueError):
    """A palette file or array that cannot be used."""


def _to_unit(colours):
    """uint8 (..., 3) -> float64 in [-1, 1], the scaling of the paper and HF (x / 127.5 - 1)."""
    return colours.astype(np.float64) / 127.5 - 1.0


def _pack(colours):
    """uint8 (..., 3) -> uint32 (...) keys r << 16 | g << 8 | b."""
    c = colours.astype(np.uint32)
    return (c[..., 0] << 16) | (c[..., 1] << 8) | c[..., 2]


def _unpack(keys):
    """uint32 (N,) keys -> uint8 (N, 3)."""
    return np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=-1).astype(np.uint8)


class Palette:
    """k colour centres, float32 (k, 3) in [-1, 1]; token id i is centre i."""

    def __init__(self, centers):
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
        self._c64_sq = (self._c64 * self._c64).sum(1)
        self._lut = None  # uint16 (2^24,) ids, filled cell by cell; _UNSET where not filled yet

    @property
    def k(self):
        return self.centers.shape[0]

    def __len__(self):
        return self.k

    def __repr__(self):
        return f"Palette(k={self.k}, sha256={self.sha256[:12]})"

    @property
    def sha256(self):
        """Hex digest of the centres' little-endian float32 bytes (independent of the file header)."""
        return hashlib.sha256(self.centers.astype("<f4").tobytes()).hexdigest()

    # ------------------------------------------------------------------ fit / load / save
    @classmethod
    def fit(cls, pixels, k=512, seed=0, niter=20, gpu=None, verbose=False):
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
        centers = np.clip(km.centroids.reshape(k, 3), -1.0, 1.0)
        unique = np.unique(centers, axis=0)
        if len(unique) < k:
            warnings.warn(f"k-means gave {k - len(unique)} duplicate centres; the palette keeps "
                          f"{len(unique)} distinct ones", stacklevel=2)
        return cls(cls._sorted(unique))

    @staticmethod
    def _sorted(centers):
        """Deterministic order: by luma (ITU-R 601), then R, G, B."""
        luma = centers @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        order = np.lexsort((centers[:, 2], centers[:, 1], centers[:, 0], luma))
        return centers[order]

    @classmethod
    def load(cls, path):
        """Load a float (k, 3) .npy in [-1, 1] (OpenAI kmeans_centers.npy / HF clusters layout)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PaletteError(f"palette file not found: {path}")
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise PaletteError(f"{path} is not a readable .npy palette: {e}") from None
        if not isinstance(arr, np.ndarray):
            raise PaletteError(f"{path} holds an archive, not a (k, 3) array")
        try:
            return cls(arr)
        except PaletteError as e:
            raise PaletteError(f"{path}: {e}") from None

    def save(self, path):
        """Write float32 (k, 3) .npy atomically (temp file, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, self.centers)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ quantize / dequantize
    def _fill_cells(self, cells):
        """Fill the lookup table for whole colour cells (8x8x8 uint8 colours each), exactly.

        For each cell, a centre can be nearest to some colour of the cell only if its distance to the
        cell's box is at most the smallest, over centres, of the distance to the box's far corner.
        Only those candidates (a handful for a 512-colour palette) are scored, with the float64 direct
        formula sum((x - c)^2) over candidates in ascending id order, so argmin keeps the lowest id on
        exact ties: the result equals a brute-force float64 argmin over all k centres.
        """
        cells = np.asarray(cells, dtype=np.int64)
        base = np.stack([cells >> 10, (cells >> 5) & 31, cells & 31], -1) * _CELL  # (n, 3) uint8 corner
        lo = base / 127.5 - 1.0
        hi = (base + _CELL - 1) / 127.5 - 1.0
        dmin = np.zeros((len(cells), self.k))  # (n, k) squared distance from each centre to each box
        dmax = np.zeros((len(cells), self.k))  # (n, k) ... to the box's farthest corner
        for a in range(3):
            c = self._c64[None, :, a]  # (1, k)
            below, above = lo[:, a, None] - c, c - hi[:, a, None]  # (n, k)
            dmin += np.maximum(np.maximum(below, above), 0.0) ** 2
            dmax += np.maximum(-below, -above) ** 2
        cand = dmin <= dmax.min(1, keepdims=True) + 1e-9  # (n, k)
        counts = cand.sum(1)
        order = np.argsort(counts, kind="stable")
        far = np.vstack([self._c64, np.full((1, 3), 1e6)])  # (k + 1, 3): row k pads short candidate lists
        step = max(1, (1 << 23) // (_CELL ** 3 * int(counts.max())))
        for s in range(0, len(order), step):
            rows = order[s:s + step]
            m = int(counts[rows].max())
            idx = np.argsort(~cand[rows], axis=1, kind="stable")[:, :m]  # (r, m) candidate ids, ascending
            idx[np.arange(m)[None] >= counts[rows][:, None]] = self.k
            cen = far[idx]  # (r, m, 3)
            axis = (base[rows][:, :, None] + np.arange(_CELL)) / 127.5 - 1.0  # (r, 3, 8) colour values per axis
            sq = (axis[:, :, :, None] - cen.transpose(0, 2, 1)[:, :, None, :]) ** 2  # (r, 3, 8, m)
            # (dr^2 + dg^2) + db^2: the summation order of sum((x - c)^2, -1) over (r, g, b)
            d = (sq[:, 0, :, None, None] + sq[:, 1, None, :, None]) + sq[:, 2, None, None, :]  # (r, 8, 8, 8, m)
            best = np.take_along_axis(idx, d.reshape(len(rows), -1, m).argmin(-1), axis=1)  # (r, 512)
            colours = base[rows][:, None, :] + _CELL_OFFSETS[None]  # (r, 512, 3)
            self._lut[_pack(colours)] = best.astype(np.uint16)

    def build_lut(self):
        """Compute the whole 2^24-colour lookup table now (a few seconds) instead of lazily."""
        self._ensure_lut()
        for s in range(0, _N_CELLS, 4096):
            self._fill_cells(np.arange(s, min(s + 4096, _N_CELLS)))

    def _ensure_lut(self):
        if self._lut is None:
            self._lut = np.full(1 << 24, _UNSET, dtype=np.uint16)

    def quantize(self, images):
        """uint8 (..., 3) RGB -> uint16 (...) ids of the nearest centre."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != 3:
            raise PaletteError(f"quantize needs uint8 RGB of shape (..., 3), got {images.dtype} {images.shape}")
        self._ensure_lut()
        keys = _pack(images)
        ids = self._lut[keys]
        miss = ids == _UNSET  # colours of cells not filled yet (k <= 65535, so never a real id)
        if miss.any():
            missing = keys[miss]
            cells = ((missing >> 9) & 0x7C00) | ((missing >> 6) & 0x3E0) | ((missing >> 3) & 0x1F)
            new = np.unique(cells)
            for s in range(0, len(new), 4096):
                self._fill_cells(new[s:s + 4096])
            ids[miss] = self._lut[missing]
        return ids

    def colours(self):
        """uint8 (k, 3): each centre as an RGB colour, rint(127.5 * (c + 1))."""
        return np.clip(np.rint(127.5 * (self.centers.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)

    def dequantize(self, ids, n_px):
        """ids (B, n_px * n_px) or (B, n_px, n_px) -> uint8 images (B, n_px, n_px, 3)."""
        ids = np.asarray(ids)
        if ids.size % (n_px * n_px):
            raise PaletteError(f"{ids.size} ids do not form images of {n_px}x{n_px}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.k):
            raise PaletteError(f"ids must lie in [0, {self.k}), found [{ids.min()}, {ids.max()}]")
        return self.colours()[ids.astype(np.int64)].reshape(-1, n_px, n_px, 3)

    def save_swatch(self, path, cell=16, columns=32):
        """A PNG of the palette's colours, `columns` per row, in id order."""
        from PIL import Image

        rows = -(-self.k // columns)
        grid = np.full((rows * columns, 3), 255, dtype=np.uint8)
        grid[:self.k] = self.colours()
        grid = grid.reshape(rows, columns, 3).repeat(cell, 0).repeat(cell, 1)  # (rows*cell, columns*cell, 3)
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}.png"
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, path)
