"""Any image -> uint8 RGB at n_px x n_px: the colour rule (`to_rgb`) and the resize modes (`resize_image`).

References: transformers `ImageGPTImageProcessor` (PIL bilinear squash resize, which `squash` matches
byte for byte); Pillow's mode list (https://pillow.readthedocs.io/en/stable/handbook/concepts.html).

Colour rule (`to_rgb`), deterministic and documented:
- RGB as is (EXIF orientation and ICC profiles are ignored, like HF); grey, bilevel, palette, YCbCr,
  LAB, HSV and CMYK use PIL's `convert("RGB")` (CMYK naively, without a profile).
- anything with alpha (RGBA, LA, PA, or P/L with a transparency entry) is composited over white:
  `rgb = (c * a + 255 * (255 - a) + 127) // 255`.
- 16-bit (I;16*, and I clipped to [0, 65535]) is scaled to 8 bits by `(v + 128) // 257` (0 -> 0,
  65535 -> 255, nearest); float (F) is clipped to [0, 255] and rounded.
Each conversion has a kind (alpha, 16-bit, 32-bit, float, grey, bilevel, palette, cmyk, ycbcr, lab,
hsv; None for plain 8-bit RGB) that tokenize counts in meta.json `converted`.

Resize modes (`resize_image`), all PIL bilinear on 8-bit RGB:
- `squash` (default): to n_px x n_px ignoring aspect, byte-identical to HF's processor. Images already
  n_px x n_px are not resampled (PIL's resize returns a copy then, so ids stay identical).
- `center-crop`: the central square (side = the shorter side) resampled to n_px in one step
  (PIL's `box`), i.e. shorter side to n_px, then centre crop, without a second rounding.
- `pad`: an image larger than n_px is shrunk so its longer side is n_px (aspect kept, sides rounded);
  smaller images are not enlarged (28 -> 32 pads 2 pixels on each side); the image is centred on black
  (0, 0, 0), an odd remainder going to the bottom / right.
"""
import numpy as np
from PIL import Image

from .options import RESIZE_MODES
from .errors import TokenizeError

__all__ = ["RESIZE_MODES", "to_rgb", "to_rgb_kind", "resize_image", "prepare", "prepare_batch", "fast_batch",
           "array_kind"]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_MODE_KINDS = {"L": "grey", "1": "bilevel", "P": "palette", "CMYK": "cmyk", "YCbCr": "ycbcr", "LAB": "lab",
               "HSV": "hsv", "I": "32-bit", "F": "float"}


def _composite_on_white(rgba):
    """uint8 (H, W, 4) -> uint8 (H, W, 3): alpha over an opaque white background, rounded."""
    c = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:].astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def array_kind(image):
    """What converting one image array (H, W[, C]) to RGB does: a `converted` kind, None for uint8 RGB."""
    if image.dtype == np.uint16:
        return "16-bit"
    if image.dtype == np.bool_:
        return "bilevel"
    return {1: "grey", 2: "alpha", 3: None, 4: "alpha"}.get(image.shape[-1] if image.ndim == 3 else 1)


def _array_to_rgb(a):
    """uint8/uint16 array (H, W), (H, W, 1|2|3|4) -> uint8 (H, W, 3) by the module's colour rule."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise TokenizeError(f"image arrays must be (H, W) or (H, W, 1|2|3|4), got {a.shape}")
    return _channels_to_rgb(a)


def _channels_to_rgb(a):
    """uint8/uint16/bool (..., C), C in 1..4 (grey, grey+alpha, RGB, RGBA) -> uint8 (..., 3)."""
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise TokenizeError(f"image arrays must be uint8 or uint16, got {a.dtype}")
    if a.shape[-1] not in (1, 2, 3, 4):
        raise TokenizeError(f"image arrays need 1 to 4 channels (grey, grey+alpha, RGB, RGBA), got {a.shape}")
    if a.shape[-1] == 3:
        return a
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 2:
        a = np.concatenate([np.repeat(a[..., :1], 3, axis=-1), a[..., 1:]], axis=-1)  # LA -> RGBA
    return _composite_on_white(a)


def to_rgb_kind(image):
    """PIL image or array -> (PIL RGB image, converted kind or None), by the module's colour rule."""
    if not isinstance(image, Image.Image):
        a = np.asarray(image)
        kind = array_kind(a)
        return Image.fromarray(_array_to_rgb(a)), kind
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in _ALPHA_MODES or (mode in ("P", "L", "1") and "transparency" in image.info):
        return Image.fromarray(_composite_on_white(np.asarray(image.convert("RGBA")))), "alpha"
    if mode.startswith("I;16") or mode == "I":
        v = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return Image.fromarray(_array_to_rgb(v.astype(np.uint16))), "16-bit" if mode != "I" else "32-bit"
    if mode == "F":
        v = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 255)).astype(np.uint8)
        return Image.fromarray(_array_to_rgb(v)), "float"
    return image.convert("RGB"), _MODE_KINDS.get(mode, mode.lower())


def to_rgb(image):
    """PIL image or array -> PIL RGB image, by the colour rule in the module docstring."""
    return to_rgb_kind(image)[0]


def _rgb_array(image):
    """PIL RGB image -> uint8 (h, w, 3), read-only; tobytes + frombuffer is ~1.6x faster than asarray."""
    w, h = image.size
    return np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(h, w, 3)


def resize_image(image, n_px, resize="squash"):
    """PIL RGB image -> uint8 (n_px, n_px, 3) by one of RESIZE_MODES (see the module docstring)."""
    w, h = image.size
    if resize == "squash":
        if (w, h) != (n_px, n_px):
            image = image.resize((n_px, n_px), Image.BILINEAR)
        return _rgb_array(image)
    if resize == "center-crop":
        if (w, h) != (n_px, n_px):
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
            image = image.resize((n_px, n_px), Image.BILINEAR, box=box)
        return _rgb_array(image)
    if resize == "pad":
        if max(w, h) > n_px:
            scale = n_px / max(w, h)
            w, h = max(1, min(n_px, round(w * scale))), max(1, min(n_px, round(h * scale)))
            image = image.resize((w, h), Image.BILINEAR)
        out = np.zeros((n_px, n_px, 3), dtype=np.uint8)
        top, left = (n_px - h) // 2, (n_px - w) // 2
        out[top:top + h, left:left + w] = _rgb_array(image)
        return out
    raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")


def prepare(image, n_px, resize):
    """One PIL image or array -> (uint8 (n_px, n_px, 3), converted kind or None)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (n_px, n_px, 3):
        return image, None
    rgb, kind = to_rgb_kind(image)
    return resize_image(rgb, n_px, resize), kind


def fast_batch(batch, n_px, resize):
    """Array batch (B, H, W[, C]) needing no resampling -> uint8 (B, n_px, n_px, 3); else None.

    Same result as `prepare` per image: sizes equal to n_px are never resampled, and `pad` does not
    resample images no larger than n_px.
    """
    if batch.ndim == 3:
        batch = batch[..., None]  # (B, H, W, 1)
    h, w = batch.shape[1:3]
    if (h, w) == (n_px, n_px):
        return _channels_to_rgb(batch)
    if resize == "pad" and h <= n_px and w <= n_px:
        out = np.zeros((len(batch), n_px, n_px, 3), dtype=np.uint8)
        top, left = (n_px - h) // 2, (n_px - w) // 2
        out[:, top:top + h, left:left + w] = _channels_to_rgb(batch)
        return out
    return None


def prepare_batch(images, n_px, resize):
    """PIL images / arrays (a list, or an array (B, H, W[, C])) -> uint8 (B, n_px, n_px, 3)."""
    if resize not in RESIZE_MODES:
        raise TokenizeError(f"unknown resize mode {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise TokenizeError(f"an image array batch must be (B, H, W) or (B, H, W, C), got {images.shape}; "
                                "pass a single image as a list of one")
        if images.dtype == np.uint8 and images.shape[1:] == (n_px, n_px, 3):
            return images  # the fast path: nothing to convert or resample
        fast = fast_batch(images, n_px, resize)
        if fast is not None:
            return fast
    out = np.empty((len(images), n_px, n_px, 3), dtype=np.uint8)
    flat, size = memoryview(out.reshape(-1)), n_px * n_px * 3
    for i, image in enumerate(images):
        if isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (n_px, n_px):
            flat[i * size:(i + 1) * size] = image.tobytes()  # no conversion, no resampling in any mode
        else:
            out[i] = prepare(image, n_px, resize)[0]
    return out
