"""Tokenizer and shard-streaming throughput.

1. Images/s of `igpt_fast.tokenize.tokenize_images` vs Hugging Face ImageGPTImageProcessor on the same
   images, the same palette, in the same process, for 32x32 and 256x256 sources resized to n_px=32
   (squash, the HF resize). HF gets a warm-up call, then the median of --hf-rep runs. Ours are exact
   float64 argmins; HF's processor computes |x|^2 - 2 x.c + |c|^2 in float32, which can misorder two
   centres whose distances differ by ~1e-7. Each row counts the differing ids and checks that at
   every one of them our centre is at least as near in float64 (`hf_differences_explained`). Ours is
   timed twice: `cold` is the first call on a fresh Palette with no persisted lookup table (filled for
   the colours seen), `warm` the median of later calls (steady state of a long tokenize run).
2. The first --fresh-images (2,000) 32x32 images of a fresh process: a subprocess that has never used
   the palette generates the images, then times `Palette.load` + `tokenize_images` (imports excluded,
   HF's too). Two rows: `ours-fresh-no-table` (no persisted lookup table yet: filled lazily, or whole
   when the call meets enough unfilled cells) and `ours-fresh-persisted` (the table `Palette.build_lut`
   persisted, as `igpt-fast palette` and tokenize leave it). HF (warm) runs on the same 2,000 images
   in this process, --hf-batch (256) images a call, its fastest way (one call on all 2,000 builds a
   2M x 512 float32 distance matrix, 4 GB). The three take turns for --fresh-rep rounds and each row
   is the median of its rounds, so a shared machine's load falls on all alike.
3. Tokens/s of the training and evaluation streams (igpt_fast.data) from one process (one worker).

HF's distance matmul runs on BLAS threads, which spin badly when other processes hold the cores; on
a shared machine run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 (the rows record `blas_threads`).

Goals: tokenizer >= 100x HF with identical ids, including the first 2,000 images of a fresh process;
streaming >= 1M tokens/s per worker.
Usage: python benchmarks/bench_tokenize.py [--images 256] [--fresh-images 2000] [--out benchmarks/results]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

from igpt_fast.palette import Palette
from igpt_fast.tokenize import resize_image, to_rgb, tokenize_images

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def source_images(n, size, seed=0):
    """n distinct RGB PIL images of size x size: random crops of scikit-image's colour photos."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    images = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(photo.shape[:2]) // 2, min(photo.shape[:2]) + 1))
        y = int(rng.integers(0, photo.shape[0] - side + 1))
        x = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side])
        images.append(crop.resize((size, size), Image.BICUBIC))
    return images


def compare_with_hf(images, n_px, palette, ours, hf_ids):
    """(number of ids that differ, whether ours is strictly nearer in float64 at each of them)."""
    hf_ids = hf_ids.astype(np.int64).reshape(ours.shape)
    where = np.argwhere(ours.astype(np.int64) != hf_ids)
    if len(where) == 0:
        return 0, True
    pixels = np.stack([resize_image(to_rgb(images[i]), n_px).reshape(-1, 3)[j] for i, j in where])
    x = pixels.astype(np.float64) / 127.5 - 1.0
    c = palette.centers.astype(np.float64)
    d_ours = ((x - c[ours[where[:, 0], where[:, 1]].astype(np.int64)]) ** 2).sum(-1)
    d_hf = ((x - c[hf_ids[where[:, 0], where[:, 1]]]) ** 2).sum(-1)
    return len(where), bool(np.all(d_ours <= d_hf))


def hf_processor(palette, n_px):
    from transformers import ImageGPTImageProcessor

    return ImageGPTImageProcessor(clusters=palette.centers, size={"height": n_px, "width": n_px})


def time_hf(hf, images, hf_rep, batch=None):
    """(median seconds of hf_rep runs after a warm-up call, HF's ids); a run calls HF on `batch` images
    at a time (all at once when None)."""
    hf(images[:4], return_tensors="np")  # warm-up: HF's first call pays one-off set-up costs
    batch = batch or len(images)
    hf_times = []
    for _ in range(hf_rep):
        t = time.perf_counter()
        hf_ids = np.concatenate([np.asarray(hf(images[s:s + batch], return_tensors="np")["input_ids"])
                                 for s in range(0, len(images), batch)])
        hf_times.append(time.perf_counter() - t)
    return float(np.median(hf_times)), hf_ids


def bench_tokenizer(palette, n_images, n_px, rep, workers, hf_rep):
    from common import time_fn

    hf = hf_processor(palette, n_px)
    rows = []
    for size in (32, 256):
        images = source_images(n_images, size)
        hf_s, hf_ids = time_hf(hf, images, hf_rep)
        fresh = Palette(palette.centers)
        t = time.perf_counter()
        ours = tokenize_images(images, fresh, n_px=n_px)
        cold_s = time.perf_counter() - t
        warm_ms, _, _ = time_fn(lambda: tokenize_images(images, fresh, n_px=n_px), warmup=1, rep=rep)
        par_ms, _, _ = time_fn(lambda: tokenize_images(images, fresh, n_px=n_px, workers=workers), warmup=1, rep=rep)
        differ, explained = compare_with_hf(images, n_px, palette, ours, hf_ids)
        timings = (("hf", 1, hf_s), ("ours-cold", 1, cold_s), ("ours-warm", 1, warm_ms / 1e3),
                   ("ours-warm", workers, par_ms / 1e3))
        for impl, n_workers, seconds in timings:
            rows.append(dict(bench="tokenize", source_px=size, n_px=n_px, images=n_images, impl=impl,
                             workers=n_workers, ms=round(seconds * 1e3, 2), img_per_s=round(n_images / seconds, 1),
                             speedup_vs_hf=round(hf_s / seconds, 1), ids_differing_from_hf=differ,
                             hf_differences_explained=explained))
        print(f"{size}x{size} -> {n_px}: HF {n_images / hf_s:7.0f} img/s | ours cold {n_images / cold_s:7.0f} | "
              f"warm {n_images / (warm_ms / 1e3):7.0f} ({hf_s / (warm_ms / 1e3):.0f}x) | "
              f"warm, {workers} workers {n_images / (par_ms / 1e3):7.0f} ({hf_s / (par_ms / 1e3):.0f}x) | "
              f"ids differing from HF {differ} (all HF float32 near-ties: {explained})")
    return rows


def fresh_child(palette_path, n_images, n_px, ids_out):
    """In a process that has not used the palette: time Palette.load + tokenize_images of n_images
    32x32 images; print the seconds as JSON, save the ids."""
    images = source_images(n_images, 32)
    t = time.perf_counter()
    palette = Palette.load(palette_path)
    ids = tokenize_images(images, palette, n_px=n_px)
    seconds = time.perf_counter() - t
    np.save(ids_out, ids)
    print(json.dumps({"seconds": seconds, "table_complete": bool(palette._lut_complete)}))


def run_fresh_child(palette_path, n_images, n_px, ids_path, cache):
    """One fresh process (lookup-table cache folder `cache`) -> (seconds, whether its table was complete)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--fresh-child", palette_path,
                           "--fresh-images", str(n_images), "--n-px", str(n_px), "--ids-out", ids_path],
                          env={**os.environ, "IGPT_FAST_CACHE_DIR": cache}, capture_output=True, text=True, check=True)
    child = json.loads(done.stdout.splitlines()[-1])
    return child["seconds"], child["table_complete"]


def bench_fresh_process(palette, n_images, n_px, hf_rep, fresh_rep, hf_batch):
    """Rows for HF and for the first n_images of a fresh process, without and with a persisted table.

    The three are measured in turn, fresh_rep rounds (HF: hf_rep calls a round), and each row is the
    median over its rounds, so load from other processes on a shared machine falls on all three alike.
    """
    images = source_images(n_images, 32)
    hf = hf_processor(palette, n_px)
    impls = ("hf", "ours-fresh-no-table", "ours-fresh-persisted")
    times = {impl: [] for impl in impls}
    ids = {}
    with tempfile.TemporaryDirectory() as tmp:
        palette_path, persisted = os.path.join(tmp, "palette.npy"), os.path.join(tmp, "persisted")
        palette.save(palette_path)
        os.environ["IGPT_FAST_CACHE_DIR"] = persisted
        Palette(palette.centers).build_lut()  # what `igpt-fast palette` leaves behind
        for r in range(fresh_rep):
            seconds, ids["hf"] = time_hf(hf, images, hf_rep, batch=hf_batch)
            times["hf"].append(seconds)
            for impl, cache in (("ours-fresh-no-table", os.path.join(tmp, f"empty{r}")),
                                ("ours-fresh-persisted", persisted)):
                ids_path = os.path.join(tmp, f"{impl}.npy")
                seconds, complete = run_fresh_child(palette_path, n_images, n_px, ids_path, cache)
                assert complete or impl == "ours-fresh-no-table", "the persisted table was not used"
                times[impl].append(seconds)
                ids[impl] = np.load(ids_path)
    hf_s = float(np.median(times["hf"]))
    rows = []
    for impl in impls:
        seconds = float(np.median(times[impl]))
        differ, explained = compare_with_hf(images, n_px, palette, ids[impl], ids["hf"]) if impl != "hf" else (0, True)
        rows.append(dict(bench="tokenize", source_px=32, n_px=n_px, images=n_images, impl=impl, workers=1,
                         ms=round(seconds * 1e3, 2), img_per_s=round(n_images / seconds, 1),
                         speedup_vs_hf=round(hf_s / seconds, 1), ids_differing_from_hf=differ,
                         hf_differences_explained=explained))
        print(f"first {n_images} 32x32 images of a fresh process, {impl}: {seconds * 1e3:.0f} ms (rounds: "
              f"{', '.join(f'{t * 1e3:.0f}' for t in times[impl])}) | {hf_s / seconds:.1f}x HF | ids differing "
              f"from HF {differ} (all HF float32 near-ties: {explained})")
    rows[0].update(ids_differing_from_hf=rows[-1]["ids_differing_from_hf"],
                   hf_differences_explained=rows[-1]["hf_differences_explained"])
    return rows


def bench_stream(n_ctx, n_samples, batch_size, steps):
    import webdataset as wds

    from igpt_fast.data import eval_loader, train_loader

    rows = []
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        with wds.ShardWriter(os.path.join(root, "train-%06d.tar"), maxcount=2000, verbose=0) as sink:
            for i in range(n_samples):
                sink.write({"__key__": f"s{i:07d}", "tokens.npy": rng.integers(0, 512, n_ctx).astype(np.uint16),
                            "cls": i % 10})
        with open(os.path.join(root, "meta.json"), "w") as f:
            f.write('{"n_ctx": %d}' % n_ctx)
        loaders = {"train": lambda: train_loader(root, batch_size, seed=0),
                   "eval": lambda: eval_loader(root, "train", batch_size)}
        for name, make in loaders.items():
            it = iter(make())
            next(it)
            t = time.perf_counter()
            n = 0
            for _ in range(steps):
                try:
                    tokens, _ = next(it)
                except StopIteration:
                    break
                n += tokens.numel()
            seconds = time.perf_counter() - t
            rows.append(dict(bench="stream", stream=name, n_ctx=n_ctx, batch_size=batch_size, workers=1,
                             tokens=n, ms=round(seconds * 1e3, 1), tok_per_s=round(n / seconds)))
            print(f"stream {name:5s}: {n / seconds / 1e6:6.2f} M tokens/s per worker (n_ctx {n_ctx}, batch {batch_size})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--fresh-images", type=int, default=2000, help="images of the fresh-process rows")
    ap.add_argument("--fresh-rep", type=int, default=3, help="fresh processes per row (median)")
    ap.add_argument("--hf-batch", type=int, default=256,
                    help="fresh-process rows: HF gets this many images a call (2,000 at once allocate a 4 GB "
                         "float32 distance matrix and run slower)")
    ap.add_argument("--n-px", type=int, default=32)
    ap.add_argument("--rep", type=int, default=5)
    ap.add_argument("--hf-rep", type=int, default=3, help="timed HF runs (median) after a warm-up call")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for the parallel row")
    ap.add_argument("--stream-samples", type=int, default=8000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--fresh-child", metavar="PALETTE", help=argparse.SUPPRESS)
    ap.add_argument("--ids-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fresh_child:
        return fresh_child(args.fresh_child, args.fresh_images, args.n_px, args.ids_out)
    from common import env_info, write_results

    palette = Palette.fit(np.concatenate([np.asarray(im).reshape(-1, 3) for im in source_images(64, 64, seed=1)]),
                          k=512, seed=0)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["IGPT_FAST_CACHE_DIR"] = cache  # this run's tables only: cold rows stay cold on a rerun
        rows = bench_tokenizer(palette, args.images, args.n_px, args.rep, args.workers, args.hf_rep)
        rows += bench_fresh_process(palette, args.fresh_images, args.n_px, args.hf_rep, args.fresh_rep,
                                    args.hf_batch)
    rows += bench_stream(args.n_px * args.n_px, args.stream_samples, 64, args.stream_samples // 64 - 2)
    info = env_info()
    info["blas_threads"] = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or "default"
    write_results([{**info, **r} for r in rows], "tokenize", args.out)


if __name__ == "__main__":
    main()
