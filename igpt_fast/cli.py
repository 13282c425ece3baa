"""The `igpt-fast` command line: one click group, one verb per stage (`demo` is defined in demo.py and
the `bench` passthrough group in bench.py; both are added here).

Heavy imports (torch, faiss, webdataset) happen inside each command so `igpt-fast --help` is instant;
this module imports neither torch nor numpy. What several verbs share is defined once, in options.py:
the options (--impl, --resize, --workers, --device, --data, --tensorboard), the parameter types, and the
spellings of the previous release (`train DATA_DIR`, `--num-workers`, `sample RUN --images a.png`), which
work for one release, hidden from --help, each printing a one-line note. The --config files of train and
finetune are read by run_config.py.

One vocabulary across verbs: raw images are the positional SRC... (palette, tokenize), a run being read
is the positional RUN (probe, finetune, sample, export), token shards are always `--data DIR` (train,
verify, probe, finetune, sample), what a verb writes is `--out`, worker processes are `--workers`, and
every verb that runs a model takes `--device` and `--impl`. The library's expected failures
(igpt_fast.errors.IGPTError: bad input, missing or incompatible artefacts) are caught once, by the group,
and shown as one line; anything else keeps its traceback. Progress bars go to stderr; stdout carries results.
"""
import os

import click

from . import __version__
from .bench import bench
from .demo import demo_cmd
from .errors import IGPTError
from .options import (NON_NEGATIVE, OUTPUT_DIR, OUTPUT_FILE, POSITIVE, FiniteFloat, FloatList, OutputPath, Verb,
                      data_options, device_option, explicit_params, images_flag, impl_option,
                      loader_workers_option, need_data, overwrite_option, renamed_option, resize_option,
                      tensorboard_option, train_device_option, workers_option)
from .run_config import config_option, finetune_config_option


class _Group(click.Group):
    """The igpt-fast group: an IGPTError from any verb becomes a one-line error (exit status 1); one with an
    exit_code (train.RunStopped: a run stopped by SIGTERM or Ctrl-C after saving) is its one line on
    stderr, from the main process, and that exit status (143, 130). Its verbs are options.Verb commands
    (renamed spellings land in their new parameter)."""

    command_class = Verb

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IGPTError as e:
            code = getattr(e, "exit_code", None)
            if code is None:
                raise click.ClickException(str(e)) from None
            if _main_process():
                click.echo(str(e), err=True)
            ctx.exit(code)


def _check_tensorboard(tensorboard: bool) -> None:
    """--tensorboard without the tensorboard package: one line naming it, before any work (train, finetune)."""
    if tensorboard:
        from .train import tensorboard_writer_class

        tensorboard_writer_class()


def _pop(flags, *names):
    """The named entries of a command's keyword arguments, taken out of them (a dict of one kind of option)."""
    return {name: flags.pop(name) for name in names}


def _main_process():
    from .distributed import is_main_process

    return is_main_process()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="igpt-fast")
def cli():
    """Image GPT: palette -> tokenize -> train -> probe / finetune / sample."""


cli.add_command(demo_cmd)
cli.add_command(bench)


@cli.command("palette")
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", default="palette.npy", show_default=True, type=OUTPUT_FILE,
              help="Output .npy, float32 (k, 3) in [-1, 1]; a swatch PNG is written beside it.")
@click.option("--k", type=click.IntRange(1, 65535), default=512, show_default=True, help="Number of colours.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Images are resized to n_px first, as for tokenize.")
@resize_option
@click.option("--max-pixels", type=click.IntRange(1), default=10_000_000, show_default=True,
              help="Pixels sampled from the train images.")
@click.option("--seed", type=int, default=0, show_default=True)
@workers_option
def palette_cmd(src, out, k, n_px, resize, max_pixels, seed, workers):
    """k-means colour palette of the images in SRC... (the same sources tokenize reads)."""
    import time
    import warnings

    from .palette import Palette
    from .tokenize import sample_pixels

    t0 = time.perf_counter()
    pixels = sample_pixels(list(src), n_px, resize=resize, max_pixels=max_pixels, seed=seed, workers=workers)
    t1 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        palette = Palette.fit(pixels, k=k, seed=seed)
    t2 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    palette.save(out)
    swatch = os.path.splitext(out)[0] + ".png"
    palette.save_swatch(swatch)
    with warnings.catch_warnings(record=True) as caught_lut:
        warnings.simplefilter("always")
        palette.build_lut()  # persisted: the first tokenize of any later process skips filling it
    for w in caught + caught_lut:
        click.echo(f"note: {w.message}", err=True)
    click.echo(f"palette {out} | k {palette.k} | {len(pixels)} pixels | sample {t1 - t0:.1f} s | "
               f"k-means {t2 - t1:.1f} s | lookup table {time.perf_counter() - t2:.1f} s | "
               f"sha256 {palette.sha256[:12]} | swatch {swatch}")


@cli.command("tokenize", short_help="Quantize images (folders, CIFAR, IDX, tars) into token shards.")
@click.argument("src", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--palette", "palette_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="palette.npy: float (k, 3) in [-1, 1] (from `igpt-fast palette` or OpenAI's kmeans_centers.npy).")
@click.option("--out", required=True, type=OUTPUT_DIR, help="Output folder DIR.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=32, show_default=True, help="Image side in pixels.")
@resize_option
@click.option("--val-fraction", type=FiniteFloat(0, 0.999), default=0.0, show_default=True,
              help="Fraction of train carved out as val (seeded).")
@workers_option
@click.option("--shard-size", type=click.IntRange(1), default=5000, show_default=True, help="Samples per shard.")
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle and val split seed.")
@click.option("--restart", is_flag=True,
              help="Discard what an earlier tokenize left in DIR (other settings, a changed source) and start over.")
def tokenize_cmd(src, palette_path, out, n_px, resize, val_fraction, workers, shard_size, seed, restart=False):
    """Resize and quantize the images in SRC... into token shards with --palette.

    SRC: image folders (class = subfolder), CIFAR python folders, MNIST-family IDX image files (their
    labels are read from the X-labels-idx1-ubyte[.gz] file beside X-images-idx3-ubyte[.gz]; pass only the
    images file, or the folder of both) and .tar WebDatasets. Writes DIR/{split}-%06d.tar, DIR/palette.npy
    and DIR/meta.json. Interrupted runs resume: rerun the same command (refused if the sources changed
    meanwhile: --restart starts over).
    """
    import warnings

    from .palette import Palette
    from .tokenize import tokenize_dataset

    palette = Palette.load(palette_path)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"note: {message}", err=True)
        meta = tokenize_dataset(list(src), palette, out, n_px=n_px, resize=resize, val_fraction=val_fraction,
                                workers=workers, shard_size=shard_size, seed=seed, restart=restart)
    splits = " | ".join(f"{s} {m['samples']} in {m['shards']} shards, "
                        f"{m.get('skipped_count', len(m['skipped']))} skipped" for s, m in meta["splits"].items())
    if meta.get("converted"):
        splits += " | converted " + ", ".join(f"{n} {kind}" for kind, n in meta["converted"].items())
    if not meta.already_complete:
        rate = meta.tokenized / max(meta.elapsed_s, 1e-9)
        click.echo(f"tokenized {out} | {splits} | n_px {n_px} | {rate:.0f} img/s")
    else:
        click.echo(f"already complete {out} | {splits} | n_px {n_px}")


@cli.command("verify", short_help="Check every shard of --data DIR against its meta.json.")
@data_options("verify", "Token shards DIR to check (from `igpt-fast tokenize`).")
def verify_cmd(data_dir):
    """Read every shard of --data DIR once and check it against meta.json (structure, samples, size, sha256).

    Prints one line per split and one per bad shard; exit status 1 when a shard is bad.
    """
    from .data import verify_data

    need_data(data_dir, "verify")
    reports = verify_data(data_dir)
    for r in reports:
        expected = "" if r.expected is None else f" of {r.expected}"
        state = f"{len(r.bad)} bad" if r.bad else "ok"
        click.echo(f"{r.split}: {r.shards} shards, {r.samples}{expected} samples | {state}"
                   + (f" | {r.unchecked} without sha256 in meta.json" if r.unchecked else ""))
        for url, reason in r.bad.items():
            click.echo(f"  bad {os.path.basename(url) or r.split}: {reason}")
    if any(r.unchecked for r in reports):
        click.echo("note: meta.json lists no sha256 for some shards (tokenized before shard digests): those are "
                   "checked for structure and counts only; re-run `igpt-fast tokenize` to add them", err=True)
    n_bad = sum(len(r.bad) for r in reports)
    if n_bad:
        raise click.ClickException(f"{n_bad} bad shard(s) or split(s) in {data_dir}; see above")


@cli.command("train", short_help="Pretrain an Image GPT on the token shards in --data DIR.")
@config_option
@data_options("train", "Token shards DIR (from `igpt-fast tokenize`).")
@click.option("--out", required=True, type=OUTPUT_DIR, help="Run folder RUN (config, log, ckpt).")
@click.option("--preset", type=click.Choice(["tiny", "igpt-s", "igpt-m", "igpt-l", "igpt-xl"]), default="tiny",
              show_default=True, help="Model size; n_vocab always comes from the data's palette.")
@click.option("--objective", type=click.Choice(["ar", "bert"]), default="ar", show_default=True)
@click.option("--n-px", type=click.IntRange(1), hidden=True, help="The image side is the data's (meta.json).")
@click.option("--n-layer", type=click.IntRange(1), help="Override the preset's depth.")
@click.option("--n-head", type=click.IntRange(1), help="Override the preset's head count.")
@click.option("--n-embd", type=click.IntRange(1), help="Override the preset's width.")
@click.option("--dropout", type=FiniteFloat(0, 0.999), default=0.0, show_default=True)
@click.option("--grad-checkpoint", is_flag=True, help="Activation checkpointing (recompute blocks in backward).")
@impl_option
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun: DDP (replicas, RUN/ckpt.pt) or FSDP2 (sharded model and optimizer, "
                   "RUN/ckpt.dcp/ written by every rank). Chosen per run; a checkpoint of either resumes with either.")
@click.option("--mixed-precision/--no-mixed-precision", default=None,
              help="--parallel fsdp: bf16 parameters in forward/backward, gradients reduced in fp32 "
                   "(default: on with CUDA, off on CPU).")
@click.option("--steps", type=click.IntRange(1), default=1000, show_default=True,
              help="Optimizer steps (with --max-minutes: at most this many, unbounded unless given).")
@click.option("--max-minutes", type=NON_NEGATIVE, default=0.0,
              help="Wall-clock budget of this training process (setup, steps, checkpoints, evaluations): at the end "
                   "of warmup the steps that fit are fixed, so the cosine ends on time. 0 = no budget.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Micro-batch per process.")
@click.option("--grad-accum", type=click.IntRange(1), default=1, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=POSITIVE, default=3e-3, show_default=True, help="Peak LR.")
@click.option("--min-lr", type=NON_NEGATIVE, default=0.0, show_default=True, help="LR at the end of the cosine.")
@click.option("--warmup-steps", type=click.IntRange(0), default=100, show_default=True)
@click.option("--lr-decay-steps", type=click.IntRange(0), default=0, show_default=True,
              help="Cosine horizon in steps (0 = --steps).")
@click.option("--weight-decay", type=NON_NEGATIVE, default=0.0, show_default=True)
@click.option("--grad-clip", type=NON_NEGATIVE, default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--spike-factor", type=NON_NEGATIVE, default=4.0, show_default=True,
              help="Stop when the loss exceeds this x its recent median (0 = only non-finite losses stop).")
@click.option("--log-every", type=click.IntRange(1), default=10, show_default=True)
@click.option("--eval-every", type=click.IntRange(0), default=200, show_default=True, help="0 = only at the end.")
@click.option("--eval-batches", type=click.IntRange(0), default=20, show_default=True, help="Per process; 0 = all.")
@click.option("--ckpt-every", type=click.IntRange(0), default=500, show_default=True, help="0 = only at the end.")
@click.option("--seed", type=int, default=0, show_default=True)
@loader_workers_option
@renamed_option("--num-workers", "workers", "--workers", type=click.IntRange(0))
@train_device_option
@tensorboard_option
@click.option("--on-bad-shard", type=click.Choice(["error", "skip"]), default="error", show_default=True,
              help="A corrupt or unreadable train shard stops the run (error) or is left out with a warning, "
                   "counted as skipped_shards in log.jsonl (skip). Evaluation always stops on one.")
@click.option("--peak-tflops", type=NON_NEGATIVE, default=0.0, help="GPU peak for MFU (default: looked up).")
@click.option("--resume", help="'auto' (RUN/ckpt.pt or RUN/ckpt.dcp when present) or a checkpoint path. Flags "
              "given with it: training flags override the checkpoint's; architecture flags must match it.")
@overwrite_option
@click.pass_context
def train_cmd(ctx, data_dir, out, preset, resume, overwrite, device, tensorboard, workers, **flags):
    """Pretrain an Image GPT on the token shards in --data DIR (from `igpt-fast tokenize`).

    Under `torchrun --nproc_per_node=K` (or `--nnodes N` with a c10d rendezvous) the same command runs
    DDP, or FSDP2 with --parallel fsdp (then RUN/ckpt.dcp/, resumable on any number of processes;
    `igpt-fast export RUN --out model.pt` makes one file of it). Prints
    `step/steps | loss | lr | ms/step | tok/s | mfu | eta`; writes RUN/config.json, RUN/log.jsonl, RUN/ckpt.pt (and
    ckpt.prev.pt), RUN/loss.png (and RUN/tb/ with --tensorboard). A folder holding a checkpoint needs
    --resume auto or --overwrite. `--config RUN/config.json --out RUN2` repeats a run.
    """
    from .checkpoint import is_sharded
    from .data import read_meta
    from .model import PRESETS, GPTConfig
    from .distributed import cleanup_distributed
    from .train import UNBOUNDED_STEPS, RunOptions, TrainConfig, train

    if resume is not None and resume != "auto" and not (os.path.isfile(resume) or is_sharded(resume)):
        raise click.UsageError(f"--resume {resume}: no such checkpoint (use 'auto', a ckpt.pt path or a ckpt.dcp "
                               "folder)")
    if resume is not None and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other; pass one")
    if flags["mixed_precision"] is not None and flags["parallel"] != "fsdp":
        raise click.UsageError("--mixed-precision is for --parallel fsdp (DDP runs use bf16 autocast on CUDA)")
    need_data(data_dir, "train")
    _check_tensorboard(tensorboard)
    options = RunOptions(**_pop(flags, "impl", "grad_checkpoint", "compile", "parallel", "mixed_precision"),
                         device=None if device is None else str(device), tensorboard=tensorboard)
    meta = read_meta(data_dir)  # the one read of this command: passed down
    n_px = flags.pop("n_px")  # a hidden check: old command lines gave it, the data alone decides it
    if n_px is not None and n_px != meta["n_px"]:
        raise click.UsageError(f"--n-px {n_px}: the image side is the data's, {meta['n_px']} (meta.json of "
                               f"{data_dir}); drop --n-px, or tokenize again with --n-px {n_px} to train at that size")
    arch = {**PRESETS[preset], **{k: v for k, v in _pop(flags, "n_layer", "n_head", "n_embd").items() if v is not None}}
    try:
        model_config = GPTConfig(**{**arch, "n_px": meta["n_px"]}, n_vocab=meta["n_vocab"],
                                 **_pop(flags, "objective", "dropout"))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    explicit = explicit_params(ctx, ["objective", "dropout", "n_layer", "n_head", "n_embd", *flags])
    flags["num_workers"] = workers  # TrainConfig's name for --workers
    if explicit_params(ctx, ["workers"]):
        explicit.add("num_workers")
    if "preset" in explicit_params(ctx, ["preset"]):
        explicit |= set(PRESETS[preset]) - {"n_px"}
    if flags["max_minutes"] and "steps" not in explicit:
        flags["steps"] = UNBOUNDED_STEPS  # the budget decides
    try:
        result = train(model_config, TrainConfig(data_dir=data_dir, out_dir=out, **flags), options, resume, overwrite,
                       explicit, meta=meta)
    finally:
        cleanup_distributed()
    if _main_process():
        last = (f"val_loss {result['val_loss']:.4f}" if result["val_loss"] is not None
                else f"loss {result['loss']:.4f}")
        click.echo(f"done | step {result['step']} | {last} | {result['ckpt']}")


@cli.command("export")
@click.argument("run", type=click.Path(exists=True))
@click.option("--out", required=True, type=OUTPUT_FILE, help="Output checkpoint file, e.g. model.pt.")
def export_cmd(run, out):
    """Write the latest checkpoint of RUN (a run folder, a ckpt.pt, or an FSDP run's ckpt.dcp folder) as one
    ckpt.pt-format file: full model weights, config, palette, step and training config, no optimizer.

    probe, sample, finetune, convert and `model_from_checkpoint` load it in any process, without
    torch.distributed (they also read a ckpt.dcp folder directly). To continue training, resume from
    RUN itself: its sharded checkpoint resumes on any number of processes, with DDP or FSDP.
    """
    from .checkpoint import export_checkpoint

    ckpt = export_checkpoint(run, out)
    c = ckpt["model_config"]
    kind = "sharded (DCP)" if ckpt.get("sharded") else "single file"
    click.echo(f"exported {ckpt['path']} ({kind}, step {ckpt['step']}) -> {out} | {c['n_layer']} layers, "
               f"{c['n_embd']} wide, {c['n_px']}x{c['n_px']} | "
               + (f"palette {ckpt['palette_sha256'][:12]}" if ckpt.get("palette_sha256") else "no palette"))


@cli.command("convert")
@click.argument("source")
@click.option("--out", required=True, type=OutputPath(),
              help="Output: a checkpoint file (--to igpt, e.g. igpt-s.pt) or a folder (--to hf).")
@click.option("--to", "to", type=click.Choice(["igpt", "hf"]), default="igpt", show_default=True,
              help="igpt: Hugging Face ImageGPT or OpenAI checkpoint -> igpt-fast checkpoint; hf: igpt-fast run -> "
                   "Hugging Face folder.")
@click.option("--n-head", type=click.IntRange(1), help="--to igpt: needed when SOURCE is a bare weights file.")
@click.option("--palette", "palette_path", type=click.Path(exists=True, dir_okay=False),
              help="palette.npy to store (default: SOURCE's own: HF clusters, OpenAI's kmeans_centers.npy beside "
                   "the checkpoint, or the checkpoint's palette).")
@click.option("--head", type=click.Choice(["lm", "classifier"]),
              help="--to hf: ImageGPTForCausalImageModeling (lm, the default) or ImageGPTForImageClassification "
                   "(classifier, for finetuned runs).")
def convert_cmd(source, out, to, n_head, palette_path, head):
    """Convert between Hugging Face ImageGPT (or OpenAI's TensorFlow release) and igpt-fast.

    --to igpt (default): SOURCE is an HF ImageGPT folder or weights file, a hub id such as
    openai/imagegpt-small that is in the local Hugging Face cache (`hf download openai/imagegpt-small`
    puts it there), or an OpenAI image-gpt TensorFlow checkpoint (its folder or model.ckpt-N.index; read
    without TensorFlow; kmeans_centers.npy beside it becomes the palette). OUT is an igpt-fast
    checkpoint (loads with model_from_checkpoint) whose logits for x equal HF's for [n_vocab] + x[:-1].

    --to hf: SOURCE is an igpt-fast run folder or checkpoint; OUT is a folder that
    ImageGPTForCausalImageModeling.from_pretrained and ImageGPTImageProcessor.from_pretrained load
    (the run's palette as the processor's clusters). A finetuned run's classification head is left out
    unless --head classifier (then ImageGPTForImageClassification, without the LM head). BERT-objective
    runs have no HF counterpart.
    """
    from .checkpoint import (check_output, load_checkpoint, model_from_checkpoint, model_state, palette_from_checkpoint,
                             save_checkpoint)
    from .convert import (from_hf_imagegpt, from_openai_imagegpt, read_hf_palette, read_openai_palette, resolve_source,
                          source_format, to_hf_imagegpt)
    from .palette import Palette

    check_output(out)  # never over a run's checkpoint or log
    local = resolve_source(source) if to == "igpt" else source  # a hub id -> its folder in the local HF cache
    kind = source_format(local)
    if to == "igpt" and kind == "igpt":
        raise click.UsageError(f"{source} is an igpt-fast run or checkpoint already; to export it to Hugging Face "
                               "pass --to hf")
    if to == "hf" and kind in ("hf", "openai"):
        what = "a Hugging Face ImageGPT" if kind == "hf" else "an OpenAI TensorFlow"
        raise click.UsageError(f"{source} is {what} checkpoint; to import it leave out --to hf")
    if to == "hf" and n_head is not None:
        raise click.UsageError("--n-head is for --to igpt (a bare HF weights file); a checkpoint knows its heads")
    if to == "igpt" and head is not None:
        raise click.UsageError("--head is for --to hf")
    if to == "igpt" and os.path.isdir(out):
        raise click.UsageError(f"--out {out} is a folder; --to igpt writes one checkpoint file (e.g. {out}/model.pt)")

    palette = Palette.load(palette_path) if palette_path is not None else None
    if to == "igpt" and kind == "openai":
        model = from_openai_imagegpt(local, n_head=n_head)
        clusters = read_openai_palette(local) if palette is None else None
        palette = Palette(clusters) if clusters is not None else palette
    elif to == "igpt":
        model = from_hf_imagegpt(local, n_head=n_head)
        clusters = read_hf_palette(local) if palette is None and os.path.isdir(local) else None
        palette = Palette(clusters) if clusters is not None else palette
    else:
        ckpt = load_checkpoint(local)
        model = model_from_checkpoint(ckpt)
        own = palette_from_checkpoint(ckpt)
        if own is not None and palette is not None and own.sha256 != palette.sha256:
            raise click.ClickException(f"{source} was trained with palette {own.sha256[:12]}, not "
                                       f"{palette_path} ({palette.sha256[:12]}); leave out --palette")
        palette = own if own is not None else palette
    if palette is not None and palette.k != model.config.n_vocab:
        raise click.ClickException(f"the palette has {palette.k} colours but the model has n_vocab "
                                   f"{model.config.n_vocab}; pass the matching --palette")
    c = model.config
    shape = f"{c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, {c.n_px}x{c.n_px}"
    if to == "hf":
        _, hf_config = to_hf_imagegpt(model, palette, out, head=head or "lm")
        notes = [hf_config["architectures"][0], shape]
        notes.append("no palette: preprocessor_config.json not written (pass --palette)" if palette is None
                     else f"palette {palette.sha256[:12]} in preprocessor_config.json")
        if head != "classifier" and c.n_classes:
            notes.append(f"the {c.n_classes}-class head is left out (--head classifier exports it)")
        click.echo(f"exported {source} -> {out} | " + " | ".join(notes))
        return
    save_checkpoint(out, model_state(model, palette, source=source if local != source else os.path.abspath(source)))
    where = "no palette (pass --palette)" if palette is None else f"palette {palette.sha256[:12]}"
    origin = f" (Hugging Face cache: {local})" if local != source else ""
    objective = " | BERT objective (no sos in the checkpoint)" if c.objective == "bert" else ""
    click.echo(f"converted {source}{origin} -> {out} | {shape}, {model.num_params() / 1e6:.1f}M params | "
               f"{where}{objective}")


@cli.command("probe")
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Tokenized, labelled dataset (from `igpt-fast tokenize`) with the run's palette.")
@click.option("--max-train", type=click.IntRange(1), help="Use at most N train samples (speed).")
@click.option("--max-eval", type=click.IntRange(1), help="Use at most N val and N test samples.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Feature extraction batch.")
@device_option
@impl_option
@click.option("--l2", "l2_grid", type=FloatList(), default="1e-4,1e-3,1e-2,1e-1,1", show_default=True,
              help="L2 strengths tried per layer (comma-separated); the best on val is kept.")
@click.option("--max-iter", type=click.IntRange(1), default=200, show_default=True, help="L-BFGS iterations.")
@click.option("--no-pixels", is_flag=True, help="Skip the raw-pixel baseline.")
@click.option("--out", type=OUTPUT_DIR, help="Folder for probe.json and probe.png (default: RUN).")
def probe_cmd(run_dir, data_dir, max_train, max_eval, batch_size, device, impl, l2_grid, max_iter, no_pixels, out):
    """Linear probe of every layer of RUN (a run folder or ckpt.pt) on the labelled shards in --data.

    Features of all layers in one pass per split, logistic regression per layer (L-BFGS, L2 chosen on
    val), accuracy on test (val without a test split), a raw-pixel baseline. Prints
    `layer | val acc | test acc | best L2`; writes probe.json and probe.png.
    """
    import json

    from .checkpoint import load_run
    from .probe import format_table, plot_probe, probe
    from .progress import duration, fmt
    from .runlog import write_text_atomic

    model, _, ckpt_path, meta = load_run(run_dir, device, impl, data_dir)
    out = out or os.path.dirname(ckpt_path) or "."  # paths print as the user wrote them
    result = probe(model, data_dir, batch_size=batch_size, device=device, max_train=max_train, max_eval=max_eval,
                   l2_grid=l2_grid, max_iter=max_iter, pixels=not no_pixels, log=lambda s: click.echo(s, err=True),
                   meta=meta)
    result.update(run=os.path.abspath(ckpt_path), data=os.path.abspath(data_dir), device=str(device))
    os.makedirs(out, exist_ok=True)
    json_path, png_path = os.path.join(out, "probe.json"), os.path.join(out, "probe.png")
    write_text_atomic(json_path, json.dumps(result, indent=2))
    plot_probe(result, png_path, title=f"linear probe: {os.path.basename(os.path.dirname(result['run']))}")
    click.echo(format_table(result))
    best = result["layers"][result["best_layer"]]
    pixels = f" | raw pixels {fmt('acc', result['pixels']['test_acc'])}" if result["pixels"] else ""
    click.echo(f"best layer {best['layer']} | {result['eval_split']} acc {fmt('acc', best['test_acc'])}{pixels} | "
               f"{result['n_train']} train, {result['n_val']} val, {result['n_test']} test | "
               f"{duration(result['seconds'])} | {json_path} | {png_path}")


@cli.command("finetune")
@finetune_config_option
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True))
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Tokenized, labelled dataset with train and val splits (test is scored when present).")
@click.option("--out", type=OUTPUT_DIR, help="Output folder (default: RUN/finetune).")
@click.option("--steps", type=click.IntRange(1), default=500, show_default=True, help="Optimizer steps (at most).")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--lr", type=POSITIVE, help="Peak LR (default: the pretraining LR / 10).")
@click.option("--gen-weight", type=NON_NEGATIVE, default=1.0, show_default=True,
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
@click.option("--grad-clip", type=NON_NEGATIVE, default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--log-every", type=click.IntRange(1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@loader_workers_option
@train_device_option
@impl_option
@tensorboard_option
@click.option("--resume", help="'auto' (OUT/ckpt.pt when present; a finished run is reported) or a checkpoint path.")
@overwrite_option
@click.pass_context
def finetune_cmd(ctx, run_dir, data_dir, out, impl, resume, overwrite, device, tensorboard, workers, **flags):
    """Finetune the pretrained RUN (run folder or ckpt.pt) as a classifier on the shards in --data.

    Average-pooled ln_f output -> zero-initialised bias-free linear head; loss L_CLF + w L_GEN; early
    stopping on val accuracy. Writes OUT/best.pt (best model), OUT/ckpt.pt (latest state, for --resume),
    OUT/log.jsonl, OUT/loss.png (and OUT/tb/ with --tensorboard), OUT/config.json (the settings: `--config
    OUT/config.json --out OUT2` repeats the run) and OUT/finetune.json (val and test accuracy of the best model).
    """
    from .checkpoint import resolve_checkpoint
    from .finetune import BEST_NAME, FINETUNE_DIR, RESULT_NAME, FinetuneConfig, finetune, finetune_config
    from .progress import fmt
    from .distributed import cleanup_distributed
    from .train import RunOptions

    ckpt_path = resolve_checkpoint(run_dir)
    if resume is not None and resume != "auto" and not os.path.isfile(resume):
        raise click.UsageError(f"--resume {resume}: no such checkpoint (use 'auto' or a ckpt.pt path)")
    out = out or os.path.join(os.path.dirname(ckpt_path), FINETUNE_DIR)  # paths print as the user wrote them
    finished = resume == "auto" and os.path.isfile(os.path.join(out, RESULT_NAME))
    _check_tensorboard(tensorboard)
    fcfg = FinetuneConfig(**_pop(flags, "gen_weight", "patience", "max_eval", "n_classes"))
    explicit = explicit_params(ctx, flags) | ({"num_workers"} if explicit_params(ctx, ["workers"]) else set())
    tcfg = finetune_config(data_dir, out, num_workers=workers, **flags)
    options = RunOptions(impl=impl, device=None if device is None else str(device), tensorboard=tensorboard)
    try:
        result = finetune(ckpt_path, tcfg, fcfg, options, resume, overwrite, explicit)
    finally:
        cleanup_distributed()
    if result is None:  # not the main process of a torchrun launch
        return
    if finished:
        click.echo(f"already finetuned ({os.path.join(out, RESULT_NAME)}; delete {out} to redo)")
    test = (f" | test acc {fmt('acc', result['test_acc'])} ({result['n_test']})" if result["test_acc"] is not None
            else "")
    click.echo(f"done | val acc {fmt('acc', result['val_acc'])} ({result['n_val']}){test} | best step "
               f"{result['best_step']} "
               f"of {result['steps_run']} | {os.path.join(out, BEST_NAME)} | {os.path.join(out, RESULT_NAME)}")


@cli.command("sample")
@click.argument("run_dir", metavar="RUN", type=click.Path(exists=True))
@click.argument("image_files", metavar="[IMAGE]...", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--images", "from_files", is_flag=True, hidden=True, callback=images_flag)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="Complete the first --n-images images of a split of these shards.")
@click.option("--split", default="test", show_default=True, help="Split of --data.")
@click.option("--n-images", type=click.IntRange(1), default=8, show_default=True, help="Images taken from --data.")
@click.option("--rows", type=click.IntRange(0), help="Condition on the first K rows (default n_px // 2).")
@click.option("--samples-per-image", type=click.IntRange(1), default=4, show_default=True)
@click.option("--n-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Unconditional samples (when neither --data nor image files are given).")
@click.option("--temperature", type=NON_NEGATIVE, default=1.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True, help="0 = no top-k.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Sequences per batch.")
@device_option
@impl_option
@resize_option
@click.option("--bert-steps", type=click.IntRange(1), help="BERT runs: unmasking forwards (default n_px).")
@click.option("--scale", type=click.IntRange(1), help="Upscale factor of the grid (default: cells >= 64 px).")
@click.option("--out", type=OUTPUT_DIR, help="Output folder (default: RUN/samples).")
@click.option("--compile", is_flag=True,
              help="AR runs: torch.compile the decode step (CUDA graphs on CUDA); compiling takes a while first.")
def sample_cmd(run_dir, image_files, from_files, data_dir, split, n_images, rows, samples_per_image, n_samples, device,
               impl, resize, scale, out, seed, **draw):
    """Sample images from RUN (a run folder or ckpt.pt) with the KV cache.

    Unconditional by default (a grid of --n-samples); with --data DIR or image files (`sample RUN a.png
    b.png`, tokenized with the run's palette), completions of the first --rows rows: a grid original |
    masked input | --samples-per-image completions. Writes the PNG grid and the token arrays (.npy,
    uint16) to --out. On CUDA the model runs under bf16 autocast, as in training (draws stay fp32);
    elsewhere in fp32.
    """
    import time

    import numpy as np
    import torch

    from .checkpoint import load_run
    from .sample import complete, completion_grid, load_originals, samples_grid, save_png, unconditional

    if from_files and not image_files:
        raise click.UsageError("--images needs image files after RUN: igpt-fast sample RUN a.png b.png")
    if image_files and data_dir:
        raise click.UsageError("complete either --data shards or image files, not both")
    model, palette, ckpt_path, meta = load_run(run_dir, device, impl, data_dir)
    c = model.config
    rows = c.n_px // 2 if rows is None else rows
    if rows >= c.n_px:
        raise click.UsageError(f"--rows {rows}: the images have {c.n_px} rows; condition on fewer")
    originals, palette = load_originals(model, palette, ckpt_path, data_dir, meta, split, n_images, image_files,
                                        resize)
    out = out or os.path.join(os.path.dirname(ckpt_path), "samples")  # paths print as the user wrote them
    os.makedirs(out, exist_ok=True)
    scale = scale or max(1, -(-64 // c.n_px))
    kw = dict(draw, top_k=draw["top_k"] or None, generator=torch.Generator(device=device).manual_seed(seed),
              progress=True)
    t0 = time.perf_counter()
    if originals is not None:
        tokens = complete(model, originals, rows, samples_per_image, **kw)  # (N, S, n_ctx)
        picture = completion_grid(palette, originals, tokens, c.n_px, rows, scale=scale)
        np.save(os.path.join(out, "originals.npy"), originals.numpy().astype(np.uint16))
        name, given = "completions", rows * c.n_px
        what = f"{len(originals)} images x {samples_per_image} completions from {rows} rows"
    else:
        tokens = unconditional(model, n_samples, **kw)  # (N, n_ctx)
        picture = samples_grid(palette, tokens, c.n_px, scale=scale)
        name, given, what = "samples", 0, f"{n_samples} unconditional samples"
    seconds = time.perf_counter() - t0
    np.save(os.path.join(out, f"{name}.npy"), tokens.numpy().astype(np.uint16))
    png = os.path.join(out, f"{name}.png")
    save_png(picture, png)
    n_seq = tokens.numel() // c.n_ctx
    click.echo(f"{what} | {c.objective} | {n_seq * (c.n_ctx - given) / seconds:.0f} px/s | {seconds:.1f} s | "
               f"{png} | {os.path.join(out, name + '.npy')}")


def main():
    cli()


if __name__ == "__main__":
    main()
