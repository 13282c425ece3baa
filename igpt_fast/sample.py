"""Sampling from an Image GPT: unconditional samples, completions of partial images, image grids.

References: Chen et al. 2020, section 4 and figure 1 (completions of the top half of images);
openai/image-gpt src/run.py (sampling at temperature 1 from sos, no top-k; it recomputed the whole
sequence for every pixel, O(n_ctx^2) forwards); pytorch-labs/gpt-fast generate.py (prefill once,
then one cached decode step per token; temperature and top-k on the last logits).

- `generate` (AR): prefill [sos, prefix] into the KV cache, then one `decode` per pixel: O(n_ctx)
  work per image. `use_cache=False` recomputes the full prefix for every pixel (the reference path;
  `benchmarks/bench_sample.py` times both). With the same generator both paths draw the same tokens.
  `compile=True` runs each decode step as one torch.compile graph of the static-shape
  `model.decode_static` (gpt-fast's compiled decode_one_token; CUDA graphs on CUDA); sampling stays
  eager, so the generator's draws are the same.
- Precision (`autocast`): on CUDA the model runs under bf16 autocast, as `train` runs it (the Triton
  attention takes bf16, not fp32), with the KV cache in bf16; elsewhere in the model's own dtype
  (fp32). Prefill, decode, the compiled decode and BERT unmasking all run under it; the sampling
  rule always works on fp32 logits. A user's own autocast around `generate` is kept, the cache
  follows its dtype. impl="triton" where the kernels cannot run (the CPU without TRITON_INTERPRET=1,
  bf16 under the interpreter, head dim > 128) is refused with a SampleError before sampling starts;
  the one-query decode step takes the torch path under every impl (model.Attention).
- Sampling rule (`sample_logits`): temperature 0 is greedy (argmax); otherwise logits / temperature,
  top-k keeps the k largest logits (top_k=1 is greedy), then one multinomial draw per row.
- BERT-objective models cannot decode left to right; `generate` fills the missing pixels by
  iterative unmasking instead: all unknown pixels start masked (token embedding zeroed, as in
  training) and `bert_steps` forwards each sample the next chunk of masked pixels in raster order,
  conditioned on everything already known. The model was trained with 15% of pixels masked, so far
  more masking than that is out of its training distribution: expect rough completions and poor
  unconditional samples.
- `complete` repeats each image's first `rows` rows `samples_per_image` times and samples the rest;
  `completion_grid` draws original | masked input (the unconditioned part grey) | completions, each
  column labelled in a band above it.
"""
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from igpt_fast.atomic import atomic_path
from igpt_fast.checkpoint import load_run  # noqa: F401 (its home before checkpoint.py; still importable here)
from igpt_fast.errors import SampleError
from igpt_fast.model import IGPT, autocast
from igpt_fast.palette import Palette
from igpt_fast.progress import Progress

__all__ = ["SampleError", "load_run", "load_originals", "autocast", "sample_logits", "generate", "complete",
           "unconditional", "image_grid", "label_columns", "completion_grid", "samples_grid", "save_png"]

GREY = 128  # colour of the pixels a completion did not condition on, in the masked-input column
LABEL_BAND = 16  # pixels of the band of column labels over a completion grid


def load_originals(model: IGPT, palette: Palette | None, ckpt_path: str, data_dir: str | None = None,
                   meta: dict | None = None, split: str = "test", n_images: int = 8, image_files: Sequence[str] = (),
                   resize: str = "squash") -> tuple[torch.Tensor | None, Palette]:
    """(tokens (N, n_ctx) to complete or None, palette to draw with): the first n_images of a split of
    the shards in data_dir (meta: its meta.json), or image files tokenized with the run's palette, or
    None for unconditional samples. SampleError when there is nothing to draw with."""
    if data_dir:
        from igpt_fast.data import eval_loader, load_data_palette, read_meta

        meta = meta if meta is not None else read_meta(data_dir)
        palette = palette if palette is not None else load_data_palette(data_dir, meta)
        batch = next(iter(eval_loader(data_dir, split, n_images, meta=meta)), None)
        if batch is None:
            raise SampleError(f"split {split!r} of {data_dir} has no samples")
        return batch[0], palette
    if palette is None:
        raise SampleError(f"{ckpt_path} stores no palette to draw with; convert it again with "
                          "`igpt-fast convert ... --palette palette.npy`")
    if not image_files:
        return None, palette
    from PIL import Image, UnidentifiedImageError

    from igpt_fast.tokenize import tokenize_images

    try:
        pictures = [Image.open(p) for p in image_files]
    except (UnidentifiedImageError, OSError) as e:
        raise SampleError(f"cannot read an image: {e}") from None
    ids = tokenize_images(pictures, palette, n_px=model.config.n_px, resize=resize)
    return torch.from_numpy(ids.astype(np.int64)), palette


def _check_impl(model, device, dtype):
    """SampleError when impl="triton" cannot run the model's attention in `dtype` on `device`: refused
    in one line before sampling rather than by the kernels mid-sample."""
    if model.impl != "triton":
        return
    head_dim = model.config.n_embd // model.config.n_head
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpret:
        why = f"on {device.type} the Triton kernels need the interpreter (start with TRITON_INTERPRET=1)"
    elif interpret and dtype == torch.bfloat16:
        why = "the Triton interpreter has no bf16"
    elif head_dim > 128:
        why = f"the Triton attention takes head dims up to 128, this model's is {head_dim}"
    else:
        return
    raise SampleError(f"impl 'triton' cannot sample here: {why}; use --impl auto or --impl torch")


def sample_logits(logits, temperature=1.0, top_k=None, generator=None):
    """One token per row of logits (B, V), in fp32 whatever the logits' dtype: greedy at temperature
    0, else a draw from softmax(logits / temperature) restricted to the top_k largest logits (None or
    0: all)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float()
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _bert_fill(model, out, t0, temperature, top_k, generator, steps, bar):
    """Iterative unmasking of positions t0.. of out (B, n_ctx) in `steps` raster-order chunks."""
    n_ctx = out.size(1)
    masked = torch.zeros_like(out, dtype=torch.bool)
    masked[:, t0:] = True
    bounds = np.linspace(t0, n_ctx, max(1, min(steps, n_ctx - t0)) + 1).round().astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        logits, _ = model(out, bert_mask=masked)  # (B, n_ctx, V)
        B, V = logits.size(0), logits.size(-1)
        chunk = logits[:, lo:hi].reshape(-1, V)  # (B * (hi - lo), V)
        out[:, lo:hi] = sample_logits(chunk, temperature, top_k, generator).view(B, hi - lo)
        masked[:, lo:hi] = False
        bar.update(B * (hi - lo))
    return out


_COMPILED_STEPS: dict[str | None, Callable] = {}  # torch.compile mode -> the compiled _decode_step (one per process, as in gpt-fast)


def _decode_step(model, tok, t):
    return model.decode_static(tok, t)


def compiled_decode_step(device):
    """model.decode_static under torch.compile(fullgraph=True, dynamic=False): on CUDA with
    mode="reduce-overhead" (CUDA graphs replay the whole step), elsewhere the default mode. Called as
    step(model, tok (B,), t (1,) int64 tensor) -> logits (B, n_vocab); compiled on first use per
    model, batch size and dtype."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(_decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _COMPILED_STEPS[mode]


def _decode_loop(model, logits, out, t0, temperature, top_k, generator, bar, compile):
    """Fill out[:, t0:] from the prefill's logits: sample pixel t, then one decode step for pixel t + 1."""
    n_ctx = out.size(1)
    if compile:
        step = compiled_decode_step(out.device)
        graphs = out.device.type == "cuda"
        t_pos = torch.tensor([t0], device=out.device)  # (1,): the pixel whose token goes in next
    for t in range(t0, n_ctx):
        out[:, t] = sample_logits(logits, temperature, top_k, generator)
        del logits  # a CUDA graph replay overwrites the buffer it lives in
        bar.update(out.size(0))
        if t + 1 == n_ctx:
            break
        if not compile:
            logits = model.decode(out[:, t], t)
            continue
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits = step(model, out[:, t].contiguous(), t_pos)
        t_pos += 1
    return out


@torch.no_grad()
def generate(model: IGPT, prefix: torch.Tensor | None = None, n: int | None = None, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, bert_steps: int | None = None,
             progress: bool | Progress = False, compile: bool = False) -> torch.Tensor:
    """Sample images token by token. prefix: int tokens (B, t) with 0 <= t < n_ctx (the first t pixels
    of each image, kept as they are), or None with n for n unconditional samples. Returns int64
    tokens (B, n_ctx) on the model's device. AR models use the KV cache (use_cache=False: recompute
    every prefix); BERT models use iterative unmasking in bert_steps forwards (default n_px). The model
    runs under `autocast(device)` (bf16 on CUDA); SampleError when its impl cannot run here. progress:
    False, True (a display of the pixels drawn on stderr: igpt_fast.progress) or a progress.Progress to
    update (one display over several calls).

    compile=True (AR, with the cache): the decode step is `compiled_decode_step` (torch.compile of
    model.decode_static; CUDA graphs on CUDA); the first call per model, batch size and dtype pays
    the compilation. The same tokens as the eager step for the same generator, up to ties that
    floating-point rounding can flip. The KV cache stays on the model after the call, so the next
    call replays the same graph on the same buffers; model.clear_cache() frees it. (An eager call
    frees the cache it set up and keeps one that was already there.)"""
    c = model.config
    device = next(model.parameters()).device
    if prefix is None:
        if n is None or n < 1:
            raise SampleError("pass a prefix (B, t) or the number of unconditional samples n >= 1")
        prefix = torch.zeros(n, 0, dtype=torch.long)
    prefix = torch.as_tensor(prefix).to(device=device, dtype=torch.long)
    B, t0 = prefix.shape
    if not 0 <= t0 < c.n_ctx:
        raise SampleError(f"the prefix has {t0} tokens; it must be shorter than n_ctx {c.n_ctx}")
    if t0 and (prefix.min() < 0 or prefix.max() >= c.n_vocab):
        raise SampleError(f"prefix tokens must lie in [0, {c.n_vocab})")
    if compile and (c.objective != "ar" or not use_cache):
        raise SampleError("compile=True compiles the KV-cache decode step: it needs an AR model and use_cache=True")
    with autocast(device):
        amp = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if amp else next(model.parameters()).dtype
        _check_impl(model, device, dtype)
        model.eval()
        out = torch.zeros(B, c.n_ctx, dtype=torch.long, device=device)
        out[:, :t0] = prefix
        own = not isinstance(progress, Progress)
        bar = (progress if isinstance(progress, Progress)
               else Progress(B * (c.n_ctx - t0), "sample", unit="px", enabled=bool(progress)))
        try:
            if c.objective == "bert":
                return _bert_fill(model, out, t0, temperature, top_k, generator, bert_steps or c.n_px, bar)
            if use_cache:
                had_cache = model._blocks()[0].attn.kv_cache is not None
                model.setup_cache(B, dtype=dtype)  # under autocast, k and v come out of c_attn in its dtype
                try:
                    logits = model.prefill(prefix)  # (B, V): logits for x_{t0}
                    _decode_loop(model, logits, out, t0, temperature, top_k, generator, bar, compile)
                finally:
                    if not (compile or had_cache):
                        model.clear_cache()
            else:
                for t in range(t0, c.n_ctx):
                    logits, _ = model(out[:, :t + 1])  # (B, t + 1, V); position t predicts x_t
                    out[:, t] = sample_logits(logits[:, -1], temperature, top_k, generator)
                    bar.update(B)
            return out
        finally:
            if own:
                bar.close()


def _batched(model, prefix, batch_size, progress, **kw):
    """generate over prefix (N, t) in batches of batch_size rows, one progress display for all of them;
    (N, n_ctx) on the CPU."""
    outs = []
    total = len(prefix) * (model.config.n_ctx - prefix.size(1))
    with Progress(total, "sample", unit="px", enabled=progress) as bar:
        for i in range(0, len(prefix), batch_size):
            outs.append(generate(model, prefix[i:i + batch_size], progress=bar, **kw).cpu())
    return torch.cat(outs)


def complete(model: IGPT, tokens: torch.Tensor, rows: int | None = None, samples_per_image: int = 1,
             batch_size: int = 64, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, bert_steps: int | None = None,
             progress: bool = False, compile: bool = False) -> torch.Tensor:
    """Completions of images from their first `rows` rows (default n_px // 2).

    tokens: int (N, n_ctx) (or (N, >= rows * n_px)). Returns int64 (N, samples_per_image, n_ctx) on the
    CPU; [:, :, :rows * n_px] equals the given prefix.
    """
    n_px = model.config.n_px
    rows = n_px // 2 if rows is None else rows
    if not 0 <= rows < n_px:
        raise SampleError(f"rows must be in [0, {n_px}) for {n_px}x{n_px} images, got {rows}")
    tokens = torch.as_tensor(np.asarray(tokens)).long()
    if tokens.dim() != 2 or tokens.size(1) < rows * n_px:
        raise SampleError(f"tokens must be (N, >= {rows * n_px}), got {tuple(tokens.shape)}")
    prefix = tokens[:, :rows * n_px].repeat_interleave(samples_per_image, dim=0)  # (N * S, rows * n_px)
    out = _batched(model, prefix, batch_size, progress, temperature=temperature, top_k=top_k,
                   generator=generator, use_cache=use_cache, bert_steps=bert_steps, compile=compile)
    return out.view(len(tokens), samples_per_image, -1)  # (N, S, n_ctx)


def unconditional(model: IGPT, n: int, batch_size: int = 64, temperature: float = 1.0, top_k: int | None = None,
                  generator: torch.Generator | None = None, use_cache: bool = True, bert_steps: int | None = None,
                  progress: bool = False, compile: bool = False) -> torch.Tensor:
    """n samples from sos alone: int64 (n, n_ctx) on the CPU."""
    prefix = torch.zeros(n, 0, dtype=torch.long)
    return _batched(model, prefix, batch_size, progress, temperature=temperature, top_k=top_k,
                    generator=generator, use_cache=use_cache, bert_steps=bert_steps, compile=compile)


def image_grid(images, pad=2, scale=1, background=255):
    """uint8 images (R, C, H, W, 3) -> one uint8 picture (R (H s + pad) + pad, C (W s + pad) + pad, 3),
    each image upscaled s times (nearest) and framed by `pad` pixels of `background`."""
    images = np.asarray(images)
    R, C, H, W, _ = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=2).repeat(scale, axis=3)  # (R, C, H s, W s, 3)
        H, W = H * scale, W * scale
    grid = np.full((R * (H + pad) + pad, C * (W + pad) + pad, 3), background, dtype=np.uint8)
    for r in range(R):
        for col in range(C):
            y, x = pad + r * (H + pad), pad + col * (W + pad)
            grid[y:y + H, x:x + W] = images[r, col]
    return grid


def label_columns(grid, labels, width, pad=2, band=LABEL_BAND, background=255):
    """A band of column labels over an image_grid picture: uint8 (H, W, 3) -> (band + H, W, 3).

    labels: one tuple per column, the label then shorter forms ("original", "orig"); the first that fits
    the column's `width` pixels is written centred over it, none when none fits (tiny cells)."""
    from PIL import Image, ImageDraw, ImageFont

    grid = np.asarray(grid)
    picture = Image.new("RGB", (grid.shape[1], band + grid.shape[0]), (background,) * 3)
    picture.paste(Image.fromarray(grid), (0, band))
    draw, font = ImageDraw.Draw(picture), ImageFont.load_default()
    for col, forms in enumerate(labels):
        for text in forms:
            x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
            if x1 - x0 <= width:
                x = pad + col * (width + pad) + (width - (x1 - x0)) // 2 - x0
                draw.text((x, (band - (y1 - y0)) // 2 - y0), text, fill=(0, 0, 0), font=font)
                break
    return np.asarray(picture)


def completion_grid(palette, originals, samples, n_px, rows, scale=1):
    """original | masked input (pixels after the first `rows` rows grey) | completions, one image per row,
    under a band of column labels ("original", "input", "sample 1", ...; `label_columns`).

    originals: int (N, n_ctx); samples: int (N, S, n_ctx). Returns uint8 (LABEL_BAND + height, width, 3)."""
    originals, samples = np.asarray(originals), np.asarray(samples)
    N, S, _ = samples.shape
    orig = palette.dequantize(originals, n_px)  # (N, n_px, n_px, 3)
    masked = orig.copy()
    masked[:, rows:] = GREY
    comp = palette.dequantize(samples.reshape(N * S, -1), n_px).reshape(N, S, n_px, n_px, 3)
    grid = image_grid(np.concatenate([orig[:, None], masked[:, None], comp], axis=1), scale=scale)
    labels = [("original", "orig"), ("input", "in")] + [(f"sample {j}", f"s{j}", f"{j}") for j in range(1, S + 1)]
    return label_columns(grid, labels, n_px * scale)


def samples_grid(palette, samples, n_px, columns=None, scale=1):
    """A near-square grid of unconditional samples (N, n_ctx): uint8 (height, width, 3)."""
    samples = np.asarray(samples)
    N = len(samples)
    columns = columns or math.ceil(math.sqrt(N))
    rows = math.ceil(N / columns)
    imgs = np.full((rows * columns, n_px, n_px, 3), 255, dtype=np.uint8)
    imgs[:N] = palette.dequantize(samples, n_px)
    return image_grid(imgs.reshape(rows, columns, n_px, n_px, 3), scale=scale)


def save_png(picture, path):
    """Write a uint8 (H, W, 3) picture as PNG, atomically (atomic.atomic_path; the format is named, since
    the temp name has no .png suffix)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(picture)).save(tmp, format="PNG")
