"""The `igpt-fast` command line: one click group, one verb per stage.

Heavy imports (torch, faiss, webdataset) happen inside each command so `igpt-fast --help` is instant.
Progress bars go to stderr; stdout carries results.
"""
import os

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="igpt-fast")
def cli():
    """Image GPT: palette -> tokenize -> train -> probe / finetune / sample."""


@cli.command("palette")
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", default="palette.npy", show_default=True, type=click.Path(dir_okay=False),
              help="Output .npy, float32 (k, 3) in [-1, 1]; a swatch PNG is written beside it.")
@click.option("--k", type=click.IntRange(1, 65535), default=512, show_default=True, help="Number of colours.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Images are resized to n_px first, as for tokenize.")
@click.option("--resize", type=click.Choice(["squash", "center-crop", "pad"]), default="squash", show_default=True)
@click.option("--max-pixels", type=click.IntRange(1), default=10_000_000, show_default=True,
              help="Pixels sampled from the train images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=max(1, min(8, os.cpu_count() or 1)), show_default=True,
              help="Decode/resize processes.")
def palette_cmd(src, out, k, n_px, resize, max_pixels, seed, workers):
    """k-means colour palette of the images in SRC... (the same sources tokenize reads)."""
    import time
    import warnings

    from .palette import Palette, PaletteError
    from .tokenize import TokenizeError, sample_pixels

    t0 = time.perf_counter()
    try:
        pixels = sample_pixels(list(src), n_px, resize=resize, max_pixels=max_pixels, seed=seed, workers=workers)
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            palette = Palette.fit(pixels, k=k, seed=seed)
    except (TokenizeError, PaletteError) as e:
        raise click.ClickException(str(e)) from None
    for w in caught:
        click.echo(f"note: {w.message}", err=True)
    t2 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    palette.save(out)
    swatch = os.path.splitext(out)[0] + ".png"
    palette.save_swatch(swatch)
    click.echo(f"palette {out} | k {palette.k} | {len(pixels)} pixels | sample {t1 - t0:.1f} s | "
               f"k-means {t2 - t1:.1f} s | sha256 {palette.sha256[:12]} | swatch {swatch}")


@cli.command("tokenize")
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--palette", "palette_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="palette.npy: float (k, 3) in [-1, 1] (from `igpt-fast palette` or OpenAI's kmeans_centers.npy).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder DIR.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=32, show_default=True, help="Image side in pixels.")
@click.option("--resize", type=click.Choice(["squash", "center-crop", "pad"]), default="squash", show_default=True,
              help="squash = HF ImageGPT's bilinear resize; center-crop; pad (e.g. 28 -> 32, black border).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Fraction of train carved out as val (seeded).")
@click.option("--workers", type=click.IntRange(1), default=max(1, min(8, os.cpu_count() or 1)), show_default=True,
              help="Decode/resize processes.")
@click.option("--shard-size", type=click.IntRange(1), default=5000, show_default=True, help="Samples per shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle and val split seed.")
def tokenize_cmd(src, palette_path, out, n_px, resize, val_fraction, workers, shard_size, seed):
    """Images in SRC... (image folders, CIFAR python folders, IDX files, .tar WebDatasets) -> token shards.

    Writes DIR/{split}-%06d.tar, DIR/palette.npy and DIR/meta.json. Interrupted runs resume: rerun the
    same command.
    """
    from .palette import Palette, PaletteError
    from .tokenize import TokenizeError, tokenize_dataset

    try:
        palette = Palette.load(palette_path)
        meta = tokenize_dataset(list(src), palette, out, n_px=n_px, resize=resize, val_fraction=val_fraction,
                                workers=workers, shard_size=shard_size, seed=seed)
    except (TokenizeError, PaletteError) as e:
        raise click.ClickException(str(e)) from None
    splits = " | ".join(f"{s} {m['samples']} in {m['shards']} shards, {len(m['skipped'])} skipped"
                        for s, m in meta["splits"].items())
    if "_elapsed_s" in meta:
        rate = meta["_tokenized"] / max(meta["_elapsed_s"], 1e-9)
        click.echo(f"tokenized {out} | {splits} | n_px {n_px} | {rate:.0f} img/s")
    else:
        click.echo(f"already complete {out} | {splits} | n_px {n_px}")


@cli.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder RUN (config, log, ckpt).")
@click.option("--preset", type=click.Choice(["tiny", "igpt-s", "igpt-m", "igpt-l", "igpt-xl"]), default="tiny",
              show_default=True, help="Model size; n_vocab always comes from the data's palette.")
@click.option("--objective", type=click.Choice(["ar", "bert"]), default="ar", show_default=True)
@click.option("--n-px", type=click.IntRange(1), help="Override the preset's image side (must match the data).")
@click.option("--n-layer", type=click.IntRange(1), help="Override the preset's depth.")
@click.option("--n-head", type=click.IntRange(1), help="Override the preset's head count.")
@click.option("--n-embd", type=click.IntRange(1), help="Override the preset's width.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Activation checkpointing (recompute blocks in backward).")
@click.option("--impl", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
              help="Kernels for attention and cross-entropy.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True, help="Peak LR.")
@click.option("--min-lr", type=click.FloatRange(0), default=0.0, show_default=True, help="LR at the end of the cosine.")
@click.option("--warmup-steps", type=click.IntRange(0), default=100, show_default=True)
@click.option("--lr-decay-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Cosine horizon in steps (0 = --steps).")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--grad-clip", type=click.FloatRange(0), default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--log-every", type=click.IntRange(1), default=10, show_default=True)
@click.option("--eval-every", type=click.IntRange(0), default=200, show_default=True, help="0 = only at the end.")
@click.option("--eval-batches", type=click.IntRange(0), default=20, show_default=True, help="Per process; 0 = all.")
@click.option("--ckpt-every", type=click.IntRange(0), default=500, show_default=True, help="0 = only at the end.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--num-workers", type=click.IntRange(0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--peak-tflops", type=click.FloatRange(0), default=0.0, help="GPU peak for MFU (default: looked up).")
@click.option("--resume", help="'auto' (RUN/ckpt.pt when present) or a checkpoint path.")
def train_cmd(data_dir, out, preset, objective, n_px, n_layer, n_head, n_embd, dropout, grad_checkpoint, impl,
              compile_, steps, batch_size, grad_accum, lr, min_lr, warmup_steps, lr_decay_steps, weight_decay,
              grad_clip, log_every, eval_every, eval_batches, ckpt_every, seed, num_workers, peak_tflops, resume):
    """Pretrain an Image GPT on the token shards in DATA_DIR (from `igpt-fast tokenize`).

    Under `torchrun --nproc_per_node=K` the same command runs DDP. Prints
    `step | loss | ms/step | tok/s | mfu`; writes RUN/config.json, RUN/log.jsonl, RUN/ckpt.pt, RUN/loss.png.
    """
    from .data import DataError, read_meta
    from .model import PRESETS, GPTConfig
    from .palette import PaletteError
    from .train import DataMismatchError, TrainConfig, TrainingDiverged, cleanup_distributed, train

    if resume is not None and resume != "auto" and not os.path.isfile(resume):
        raise click.UsageError(f"--resume {resume}: no such checkpoint (use 'auto' or a ckpt.pt path)")
    try:
        meta = read_meta(data_dir)
    except DataError as e:
        raise click.ClickException(str(e)) from None
    arch = dict(PRESETS[preset])
    arch.update({k: v for k, v in dict(n_px=n_px, n_layer=n_layer, n_head=n_head, n_embd=n_embd).items()
                 if v is not None})
    try:
        model_config = GPTConfig(**arch, n_vocab=meta["n_vocab"], objective=objective, dropout=dropout, impl=impl,
                                 grad_checkpoint=grad_checkpoint)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    tcfg = TrainConfig(data_dir=data_dir, out_dir=out, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                       lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, lr_decay_steps=lr_decay_steps,
                       weight_decay=weight_decay, grad_clip=grad_clip, log_every=log_every, eval_every=eval_every,
                       eval_batches=eval_batches, ckpt_every=ckpt_every, seed=seed, compile=compile_,
                       num_workers=num_workers, peak_tflops=peak_tflops)
    try:
        result = train(model_config, tcfg, resume=resume)
    except (DataError, DataMismatchError, PaletteError, TrainingDiverged) as e:
        raise click.ClickException(str(e)) from None
    finally:
        cleanup_distributed()
    if result["val_loss"] is not None:
        click.echo(f"done | step {result['step']} | val_loss {result['val_loss']:.4f} | {result['ckpt']}")
    else:
        click.echo(f"done | step {result['step']} | loss {result['loss']:.4f} | {result['ckpt']}")


@cli.command("convert")
@click.argument("source", type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output checkpoint (e.g. igpt-s.pt).")
@click.option("--n-head", type=click.IntRange(1), help="Needed when SOURCE is a bare weights file (no config.json).")
@click.option("--palette", "palette_path", type=click.Path(exists=True, dir_okay=False),
              help="palette.npy to store (default: the clusters of SOURCE/preprocessor_config.json, if any).")
def convert_cmd(source, out, n_head, palette_path):
    """Convert a Hugging Face ImageGPT checkpoint (directory or weights file) to an igpt-fast checkpoint.

    The output loads with igpt_fast.train.load_checkpoint + model_from_checkpoint, and its logits for x
    equal HF's for [512] + x[:-1].
    """
    from dataclasses import asdict

    import torch

    from .convert import ConversionError, from_hf_imagegpt, read_hf_palette
    from .palette import Palette, PaletteError
    from .train import CKPT_VERSION, save_checkpoint

    try:
        model = from_hf_imagegpt(source, n_head=n_head)
        if palette_path is not None:
            palette = Palette.load(palette_path)
        else:
            clusters = read_hf_palette(source) if os.path.isdir(source) else None
            palette = Palette(clusters) if clusters is not None else None
    except (ConversionError, PaletteError) as e:
        raise click.ClickException(str(e)) from None
    if palette is not None and palette.k != model.config.n_vocab:
        raise click.ClickException(f"the palette has {palette.k} colours but the model has n_vocab "
                                   f"{model.config.n_vocab}; pass the matching --palette")
    state = {"version": CKPT_VERSION, "model": model.state_dict(), "model_config": asdict(model.config), "step": 0,
             "palette": None if palette is None else torch.from_numpy(palette.centers.copy()),
             "palette_sha256": None if palette is None else palette.sha256, "source": os.path.abspath(source)}
    save_checkpoint(out, state)
    c = model.config
    where = "no palette (pass --palette)" if palette is None else f"palette {palette.sha256[:12]}"
    click.echo(f"converted {source} -> {out} | {c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, "
               f"{c.n_px}x{c.n_px}, {model.num_params() / 1e6:.1f}M params | {where}")


@cli.command("demo")
@click.option("--src", default="/usr/share/datasets/fashion-mnist", show_default=True, type=click.Path(),
              help="Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) or any source tokenize reads.")
@click.option("--out", default="demo", show_default=True, type=click.Path(file_okay=False),
              help="Demo folder; completed stages found there are reused.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=14, show_default=True,
              help="Image side (14: Fashion-MNIST halved, so two CPU cores train in minutes).")
@click.option("--k", type=click.IntRange(2, 65535), default=16, show_default=True, help="Palette colours.")
@click.option("--steps", type=click.IntRange(1), default=250, show_default=True,
              help="Pretraining steps (tiny preset).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Pretraining batch.")
@click.option("--finetune-steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True,
              help="Finetuning LR (pretraining uses 3e-3).")
@click.option("--max-train", type=click.IntRange(1), default=2000, show_default=True,
              help="Train images the probe fits on.")
@click.option("--max-eval", type=click.IntRange(1), default=1000, show_default=True,
              help="Val and test images the probe and the finetuned model are scored on.")
@click.option("--workers", type=click.IntRange(1), default=max(1, min(8, os.cpu_count() or 1)), show_default=True)
@click.pass_context
def demo_cmd(ctx, src, out, n_px, k, steps, batch_size, finetune_steps, finetune_lr, max_train, max_eval, workers):
    """Images to results on real data: palette -> tokenize -> train -> probe -> finetune -> sample, ending
    with a summary of the accuracies and the paths of the plots and grids.

    Every stage reuses what an earlier run left in --out: the palette, complete shards, a trained
    checkpoint (an interrupted training resumes), probe.json, finetune.json and the sample grids.
    """
    import json

    if not os.path.exists(src):
        raise click.ClickException(f"{src} not found; install Debian's Fashion-MNIST "
                                   "(sudo apt-get install -y dataset-fashion-mnist) or pass --src DIR")
    os.makedirs(out, exist_ok=True)
    palette_path = os.path.join(out, "palette.npy")
    data_dir = os.path.join(out, "data")
    run = os.path.join(out, "run")
    click.echo(f"[1/6] palette -> {palette_path}")
    if os.path.exists(palette_path):
        click.echo("      reusing the existing palette")
    else:
        ctx.invoke(palette_cmd, src=(src,), out=palette_path, k=k, n_px=n_px, workers=workers)
    click.echo(f"[2/6] tokenize -> {data_dir}")
    ctx.invoke(tokenize_cmd, src=(src,), palette_path=palette_path, out=data_dir, n_px=n_px, val_fraction=0.1,
               workers=workers)

    click.echo(f"[3/6] train (tiny preset, {steps} steps) -> {run}")
    ckpt_path = os.path.join(run, "ckpt.pt")
    done = 0
    if os.path.isfile(ckpt_path):
        from .train import load_checkpoint

        done = load_checkpoint(ckpt_path)["step"]
    if done >= steps:
        click.echo(f"      reusing {ckpt_path} (step {done})")
    else:
        ctx.invoke(train_cmd, data_dir=data_dir, out=run, preset="tiny", n_px=n_px, steps=steps,
                   batch_size=batch_size, warmup_steps=max(1, steps // 10), eval_every=0, eval_batches=10,
                   ckpt_every=50, log_every=10, resume="auto")
    probe_path = os.path.join(run, "probe.json")
    click.echo(f"[4/6] probe (every layer, {max_train} train images) -> {probe_path}")
    if os.path.isfile(probe_path):
        click.echo("      reusing the existing probe.json")
    else:
        ctx.invoke(probe_cmd, run=run, data_dir=data_dir, max_train=max_train, max_eval=max_eval)
    ft_dir = os.path.join(run, "finetune")
    click.echo(f"[5/6] finetune ({finetune_steps} steps) -> {ft_dir}")
    ctx.invoke(finetune_cmd, run=run, data_dir=data_dir, steps=finetune_steps, lr=finetune_lr,
               eval_every=max(1, finetune_steps // 2), eval_batches=10, max_eval=max_eval, resume="auto")
    samples_dir = os.path.join(run, "samples")
    grids = [os.path.join(samples_dir, "completions.png"), os.path.join(samples_dir, "samples.png")]
    click.echo(f"[6/6] sample -> {samples_dir}")
    if os.path.isfile(grids[0]):
        click.echo("      reusing the existing completions")
    else:
        ctx.invoke(sample_cmd, run=run, data_dir=data_dir, n_images=8, samples_per_image=3)
    if os.path.isfile(grids[1]):
        click.echo("      reusing the existing samples")
    else:
        ctx.invoke(sample_cmd, run=run, n_samples=16)

    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    with open(probe_path) as f:
        probe = json.load(f)
    with open(os.path.join(ft_dir, "finetune.json")) as f:
        ft = json.load(f)
    splits = ", ".join(f"{s} {m['samples']}" for s, m in meta["splits"].items())
    best = probe["layers"][probe["best_layer"]]
    chance = 1.0 / probe["n_classes"]
    pixels = f"{probe['pixels']['test_acc']:.4f}" if probe["pixels"] else "-"
    ev = probe["eval_split"]
    click.echo(f"demo summary | palette {meta['n_vocab']} colours | n_px {meta['n_px']} (n_ctx {meta['n_ctx']}) | "
               f"{splits} | shards in {data_dir}")
    click.echo(f"  linear probe  | best layer {best['layer']} of {probe['n_layer']} | {ev} acc {best['test_acc']:.4f} "
               f"| last layer {probe['layers'][-1]['test_acc']:.4f} | raw pixels {pixels} | chance {chance:.4f} "
               f"| {probe['n_train']} train, {probe['n_test'] or probe['n_val']} {ev} images")
    test = f"test acc {ft['test_acc']:.4f} ({ft['n_test']} images)" if ft["test_acc"] is not None else "no test split"
    click.echo(f"  finetune      | val acc {ft['val_acc']:.4f} | {test} | best step {ft['best_step']} "
               f"of {ft['steps_run']}")
    for name, path in [("loss curve", os.path.join(run, "loss.png")), ("probe plot", os.path.join(run, "probe.png")),
                       ("finetune curve", os.path.join(ft_dir, "loss.png")), ("completions", grids[0]),
                       ("samples", grids[1])]:
        click.echo(f"  {name:<13} | {path}")


def _torch_device(device):
    """--device value -> torch.device: cuda when present unless told otherwise."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise click.UsageError(f"--device {device}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
    return dev


def _open_run(run, device):
    """(model, palette or None, ckpt path) of RUN, or a ClickException naming the fix."""
    from .sample import SampleError, load_run

    try:
        return load_run(run, device)
    except SampleError as e:
        raise click.ClickException(str(e)) from None


def _check_run_data(data_dir, model, palette):
    """meta.json of DATA_DIR, checked against the run's model and palette (ClickException on mismatch)."""
    from .data import DataError, read_meta
    from .train import DataMismatchError, check_data

    try:
        meta = read_meta(data_dir)
        check_data(meta, model.config, palette.sha256 if palette is not None else None, data_dir)
    except (DataError, DataMismatchError) as e:
        raise click.ClickException(str(e)) from None
    return meta


@cli.command("probe")
@click.argument("run", type=click.Path(exists=True))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Tokenized, labelled dataset (from `igpt-fast tokenize`) with the run's palette.")
@click.option("--max-train", type=click.IntRange(1), help="Use at most N train samples (speed).")
@click.option("--max-eval", type=click.IntRange(1), help="Use at most N val and N test samples.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Feature extraction batch.")
@click.option("--device", help="cuda, cuda:1, cpu (default: cuda when present).")
@click.option("--l2", "l2_grid", default="1e-4,1e-3,1e-2,1e-1,1", show_default=True,
              help="L2 strengths tried per layer (comma-separated); the best on val is kept.")
@click.option("--max-iter", type=click.IntRange(1), default=200, show_default=True, help="L-BFGS iterations.")
@click.option("--no-pixels", is_flag=True, help="Skip the raw-pixel baseline.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for probe.json and probe.png (default: RUN).")
def probe_cmd(run, data_dir, max_train, max_eval, batch_size, device, l2_grid, max_iter, no_pixels, out):
    """Linear probe of every layer of RUN (a run folder or ckpt.pt) on the labelled shards in --data.

    Features of all layers in one pass per split, logistic regression per layer (L-BFGS, L2 chosen on
    val), accuracy on test (val without a test split), a raw-pixel baseline. Prints
    `layer | val acc | test acc | best L2`; writes probe.json and probe.png.
    """
    import json

    from .palette import PaletteError
    from .probe import ProbeError, format_table, plot_probe, probe
    from .train import DataMismatchError

    try:
        grid = [float(v) for v in l2_grid.split(",") if v.strip()]
    except ValueError:
        raise click.UsageError(f"--l2 {l2_grid!r}: expected comma-separated numbers such as 1e-3,1e-2") from None
    if not grid or min(grid) < 0:
        raise click.UsageError(f"--l2 {l2_grid!r}: give one or more strengths >= 0")
    dev = _torch_device(device)
    model, palette, ckpt_path = _open_run(run, dev)
    _check_run_data(data_dir, model, palette)
    out = out or os.path.dirname(os.path.abspath(ckpt_path))
    try:
        result = probe(model, data_dir, batch_size=batch_size, device=dev, max_train=max_train, max_eval=max_eval,
                       l2_grid=grid, max_iter=max_iter, pixels=not no_pixels,
                       log=lambda s: click.echo(s, err=True))
    except (ProbeError, DataMismatchError, PaletteError) as e:
        raise click.ClickException(str(e)) from None
    result.update(run=os.path.abspath(ckpt_path), data=os.path.abspath(data_dir), device=str(dev))
    os.makedirs(out, exist_ok=True)
    json_path, png_path = os.path.join(out, "probe.json"), os.path.join(out, "probe.png")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    plot_probe(result, png_path, title=f"linear probe: {os.path.basename(os.path.dirname(result['run']))}")
    click.echo(format_table(result))
    best = result["layers"][result["best_layer"]]
    pixels = f" | raw pixels {result['pixels']['test_acc']:.4f}" if result["pixels"] else ""
    click.echo(f"best layer {best['layer']} | {result['eval_split']} acc {best['test_acc']:.4f}{pixels} | "
               f"{result['n_train']} train, {result['n_val']} val, {result['n_test']} test | "
               f"{result['seconds']:.1f} s | {json_path} | {png_path}")


@cli.command("finetune")
@click.argument("run", type=click.Path(exists=True))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Tokenized, labelled dataset with train and val splits (test is scored when present).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: RUN/finetune).")
@click.option("--steps", type=click.IntRange(1), default=500, show_default=True, help="Optimizer steps (at most).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), help="Peak LR (default: the pretraining LR / 10).")
@click.option("--gen-weight", type=click.FloatRange(0), default=1.0, show_default=True,
              help="Weight of L_GEN in L_CLF + w L_GEN (0 = classification loss only).")
@click.option("--warmup-steps", type=click.IntRange(0), help="Default: steps // 10.")
@click.option("--eval-every", type=click.IntRange(0), default=100, show_default=True,
              help="Val accuracy every N steps (0 = only at the end).")
@click.option("--eval-batches", type=click.IntRange(0), default=20, show_default=True,
              help="Val batches per evaluation during training; 0 = the whole split.")
@click.option("--patience", type=click.IntRange(0), default=3, show_default=True,
              help="Stop after N evaluations without a better val accuracy (0 = never).")
@click.option("--max-eval", type=click.IntRange(1), help="Score the best model on at most N val and N test samples.")
@click.option("--n-classes", type=click.IntRange(2), help="Default: meta.json's class names, else the train labels.")
@click.option("--grad-clip", type=click.FloatRange(0), default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--log-every", type=click.IntRange(1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", help="'auto' (OUT/ckpt.pt when present; a finished run is reported) or a checkpoint path.")
def finetune_cmd(run, data_dir, out, steps, batch_size, lr, gen_weight, warmup_steps, eval_every, eval_batches,
                 patience, max_eval, n_classes, grad_clip, log_every, seed, resume):
    """Finetune the pretrained RUN (run folder or ckpt.pt) as a classifier on the shards in --data.

    Average-pooled ln_f output -> zero-initialised bias-free linear head; loss L_CLF + w L_GEN; early
    stopping on val accuracy. Writes OUT/best.pt (best model), OUT/ckpt.pt (latest state, for --resume),
    OUT/log.jsonl, OUT/loss.png and OUT/finetune.json (val and test accuracy of the best model).
    """
    from .data import DataError
    from .finetune import BEST_NAME, FINETUNE_DIR, RESULT_NAME, FinetuneError, finetune
    from .palette import PaletteError
    from .train import CKPT_NAME, DataMismatchError, TrainingDiverged, cleanup_distributed

    ckpt_path = os.path.join(run, CKPT_NAME) if os.path.isdir(run) else run
    if not os.path.isfile(ckpt_path):
        raise click.ClickException(f"{ckpt_path} not found; pretrain first with `igpt-fast train {data_dir} --out "
                                   f"{run}` (or pass a checkpoint file)")
    if resume is not None and resume != "auto" and not os.path.isfile(resume):
        raise click.UsageError(f"--resume {resume}: no such checkpoint (use 'auto' or a ckpt.pt path)")
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), FINETUNE_DIR)
    result_path = os.path.join(out, RESULT_NAME)
    finished = resume == "auto" and os.path.isfile(result_path)
    try:
        result = finetune(ckpt_path, data_dir, out_dir=out, steps=steps, batch_size=batch_size, lr=lr,
                          gen_weight=gen_weight, warmup_steps=warmup_steps, eval_every=eval_every,
                          eval_batches=eval_batches, patience=patience, max_eval=max_eval, n_classes=n_classes,
                          seed=seed, resume=resume, grad_clip=grad_clip, log_every=log_every)
    except (DataError, DataMismatchError, FinetuneError, PaletteError, TrainingDiverged) as e:
        raise click.ClickException(str(e)) from None
    finally:
        cleanup_distributed()
    if result is None:  # not the main process of a torchrun launch
        return
    if finished:
        click.echo(f"already finetuned ({result_path}; delete {out} to redo)")
    test = f" | test acc {result['test_acc']:.4f} ({result['n_test']})" if result["test_acc"] is not None else ""
    click.echo(f"done | val acc {result['val_acc']:.4f} ({result['n_val']}){test} | best step {result['best_step']} "
               f"of {result['steps_run']} | {os.path.join(out, BEST_NAME)} | {result_path}")


@cli.command("sample")
@click.argument("run", type=click.Path(exists=True))
@click.argument("image_files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--images", "from_files", is_flag=True,
              help="Complete the image files given after RUN (tokenized with the run's palette).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Complete the first --n-images images of a split of these shards.")
@click.option("--split", default="test", show_default=True, help="Split of --data.")
@click.option("--n-images", type=click.IntRange(1), default=8, show_default=True, help="Images taken from --data.")
@click.option("--rows", type=click.IntRange(0), help="Condition on the first K rows (default n_px // 2).")
@click.option("--samples-per-image", type=click.IntRange(1), default=4, show_default=True)
@click.option("--n-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Unconditional samples (when neither --data nor image files are given).")
@click.option("--temperature", type=click.FloatRange(0), default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = no top-k.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Sequences per batch.")
@click.option("--device", help="cuda, cuda:1, cpu (default: cuda when present).")
@click.option("--resize", type=click.Choice(["squash", "center-crop", "pad"]), default="squash", show_default=True,
              help="How image files are brought to n_px (as tokenize).")
@click.option("--bert-steps", type=click.IntRange(1), help="BERT runs: unmasking forwards (default n_px).")
@click.option("--scale", type=click.IntRange(1), help="Upscale factor of the grid (default: cells >= 64 px).")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: RUN/samples).")
def sample_cmd(run, image_files, from_files, data_dir, split, n_images, rows, samples_per_image, n_samples,
               temperature, top_k, seed, batch_size, device, resize, bert_steps, scale, out):
    """Sample images from RUN (a run folder or ckpt.pt) with the KV cache.

    Unconditional by default (a grid of --n-samples); with --data DIR or `--images a.png b.png`,
    completions of the first --rows rows: a grid original | masked input | --samples-per-image
    completions. Writes the PNG grid and the token arrays (.npy, uint16) to --out.
    """
    import time

    import numpy as np
    import torch

    from .sample import SampleError, complete, completion_grid, samples_grid, save_png, unconditional

    if from_files and not image_files:
        raise click.UsageError("--images needs image files after RUN: igpt-fast sample RUN --images a.png b.png")
    if image_files and data_dir:
        raise click.UsageError("complete either --data shards or image files, not both")
    dev = _torch_device(device)
    model, palette, ckpt_path = _open_run(run, dev)
    c = model.config
    rows = c.n_px // 2 if rows is None else rows
    if rows >= c.n_px:
        raise click.UsageError(f"--rows {rows}: the images have {c.n_px} rows; condition on fewer")
    originals = None
    if data_dir:
        from .data import DataError, eval_loader
        from .palette import PaletteError
        from .train import DataMismatchError, load_data_palette

        meta = _check_run_data(data_dir, model, palette)
        try:
            if palette is None:
                palette = load_data_palette(data_dir, meta)
            originals, _ = next(iter(eval_loader(data_dir, split, n_images)))
        except (DataError, DataMismatchError, PaletteError) as e:
            raise click.ClickException(str(e)) from None
    elif image_files:
        from PIL import Image, UnidentifiedImageError

        from .tokenize import tokenize_images

        if palette is None:
            raise click.ClickException(f"{ckpt_path} stores no palette to tokenize the images with; convert it "
                                       "again with `igpt-fast convert ... --palette palette.npy`")
        try:
            pictures = [Image.open(p) for p in image_files]
        except (UnidentifiedImageError, OSError) as e:
            raise click.ClickException(f"cannot read an image: {e}") from None
        originals = torch.from_numpy(tokenize_images(pictures, palette, n_px=c.n_px, resize=resize).astype(np.int64))
    elif palette is None:
        raise click.ClickException(f"{ckpt_path} stores no palette to draw the samples with; convert it again "
                                   "with `igpt-fast convert ... --palette palette.npy`")
    out = out or os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "samples")
    os.makedirs(out, exist_ok=True)
    scale = scale or max(1, -(-64 // c.n_px))
    gen = torch.Generator(device=dev).manual_seed(seed)
    kw = dict(batch_size=batch_size, temperature=temperature, top_k=top_k or None, generator=gen,
              bert_steps=bert_steps, progress=True)
    t0 = time.perf_counter()
    try:
        if originals is not None:
            tokens = complete(model, originals, rows, samples_per_image, **kw)  # (N, S, n_ctx)
            picture = completion_grid(palette, originals, tokens, c.n_px, rows, scale=scale)
            np.save(os.path.join(out, "originals.npy"), originals.numpy().astype(np.uint16))
            name = "completions"
        else:
            tokens = unconditional(model, n_samples, **kw)  # (N, n_ctx)
            picture = samples_grid(palette, tokens, c.n_px, scale=scale)
            name = "samples"
    except SampleError as e:
        raise click.ClickException(str(e)) from None
    seconds = time.perf_counter() - t0
    np.save(os.path.join(out, f"{name}.npy"), tokens.numpy().astype(np.uint16))
    png = os.path.join(out, f"{name}.png")
    save_png(picture, png)
    n_seq = tokens.numel() // c.n_ctx
    given = rows * c.n_px if originals is not None else 0
    what = (f"{len(originals)} images x {samples_per_image} completions from {rows} rows" if originals is not None
            else f"{n_seq} unconditional samples")
    click.echo(f"{what} | {c.objective} | {n_seq * (c.n_ctx - given) / seconds:.0f} px/s | {seconds:.1f} s | "
               f"{png} | {os.path.join(out, name + '.npy')}")


@cli.group("bench")
def bench():
    """Kernel microbenchmarks: CSV, markdown and a plot in benchmarks/results/ (needs a source checkout).

    Each verb runs the script benchmarks/bench_<op>.py of the checkout this package was installed from
    (`pip install -e .`) and passes every option through: `igpt-fast bench attention --help` lists them,
    `--smoke` runs tiny shapes on CPU."""


_PASSTHROUGH = dict(ignore_unknown_options=True, allow_extra_args=True)


def _run_bench_script(script, args):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(repo, "benchmarks", script)
    if not os.path.exists(path):
        raise click.ClickException(f"{path} not found: the benchmarks live in the source tree; clone igpt-fast, "
                                   "`pip install -e .` there and run `igpt-fast bench ...` again")
    returncode = subprocess.run([sys.executable, path, *args]).returncode
    if returncode:
        sys.exit(returncode)


@bench.command("attention", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_attention_cmd(args):
    """Flash attention vs SDPA backends vs naive: ms, TFLOP/s, memory (see --help)."""
    _run_bench_script("bench_attention.py", args)


@bench.command("softmax", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_softmax_cmd(args):
    """Row softmax vs torch.softmax: GB/s vs the copy bandwidth (see --help)."""
    _run_bench_script("bench_softmax.py", args)


@bench.command("cross-entropy", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cross_entropy_cmd(args):
    """Fused cross-entropy vs F.cross_entropy: GB/s, memory (see --help)."""
    _run_bench_script("bench_cross_entropy.py", args)


def main():
    cli()


if __name__ == "__main__":
    main()
