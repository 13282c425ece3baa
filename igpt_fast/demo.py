"""`igpt-fast demo`: palette -> tokenize -> train -> probe -> finetune -> sample on real data, each stage
through its own CLI verb, each reused when an earlier run left its result in the demo folder.

Sized for two CPU cores (Fashion-MNIST at 14x14, 16 grey levels, the tiny preset): about 7 minutes
with the install. The summary lists the accuracies and the paths of the plots and grids.

The verb is defined here and added to the group by cli.py; it finds its sibling verbs by name in the
group it runs under (click's `get_command`), so this module never imports cli.py (no import cycle) and
stays torch-free at import, like the rest of the command line.
"""
import json
import os

import click

from igpt_fast.options import OUTPUT_DIR, POSITIVE, Device, workers_option


def _stage(i, text):
    click.echo(f"[{i}/6] {text}")


def _reuse(path, what):
    if os.path.isfile(path):
        click.echo(f"      reusing {what}")
        return True
    return False


def run_demo(ctx, src, out, n_px, k, steps, batch_size, finetune_steps, finetune_lr, max_train, max_eval, workers,
             device=None):
    """Run (or reuse) every stage into `out`, each by invoking its verb of the group `ctx` runs under;
    returns the paths the summary reads. device None: each verb's default."""
    from igpt_fast.checkpoint import load_checkpoint

    group = ctx.find_root()

    def invoke(verb, **params):
        ctx.invoke(group.command.get_command(group, verb), **params)

    on = {} if device is None else {"device": device}  # the verbs that run a model

    os.makedirs(out, exist_ok=True)
    p = {"palette": os.path.join(out, "palette.npy"), "data": os.path.join(out, "data"), "run": os.path.join(out, "run")}
    p.update(ckpt=os.path.join(p["run"], "ckpt.pt"), probe=os.path.join(p["run"], "probe.json"),
             finetune=os.path.join(p["run"], "finetune"), samples=os.path.join(p["run"], "samples"))
    p.update(completions=os.path.join(p["samples"], "completions.png"),
             unconditional=os.path.join(p["samples"], "samples.png"))
    _stage(1, f"palette -> {p['palette']}")
    if not _reuse(p["palette"], "the existing palette"):
        invoke("palette", src=(src,), out=p["palette"], k=k, n_px=n_px, workers=workers)
    _stage(2, f"tokenize -> {p['data']}")
    invoke("tokenize", src=(src,), palette_path=p["palette"], out=p["data"], n_px=n_px, val_fraction=0.1,
           workers=workers)
    _stage(3, f"train (tiny preset, {steps} steps) -> {p['run']}")
    done = load_checkpoint(p["ckpt"])["step"] if os.path.isfile(p["ckpt"]) else 0
    if done >= steps:
        click.echo(f"      reusing {p['ckpt']} (step {done})")
    else:
        invoke("train", data_dir=p["data"], out=p["run"], preset="tiny", steps=steps, batch_size=batch_size,
               warmup_steps=max(1, steps // 10), eval_every=0, eval_batches=10, ckpt_every=50, log_every=10,
               resume="auto", **on)
    _stage(4, f"probe (every layer, {max_train} train images) -> {p['probe']}")
    if not _reuse(p["probe"], "the existing probe.json"):
        invoke("probe", run_dir=p["run"], data_dir=p["data"], max_train=max_train, max_eval=max_eval, **on)
    _stage(5, f"finetune ({finetune_steps} steps) -> {p['finetune']}")
    invoke("finetune", run_dir=p["run"], data_dir=p["data"], steps=finetune_steps, lr=finetune_lr,
           eval_every=max(1, finetune_steps // 2), eval_batches=10, max_eval=max_eval, resume="auto", **on)
    _stage(6, f"sample -> {p['samples']}")
    if not _reuse(p["completions"], "the existing completions"):
        invoke("sample", run_dir=p["run"], data_dir=p["data"], n_images=8, samples_per_image=3, **on)
    if not _reuse(p["unconditional"], "the existing samples"):
        invoke("sample", run_dir=p["run"], n_samples=16, **on)
    return p


def summary(p):
    """The demo's closing lines: data, probe and finetune accuracies, and where the pictures are."""
    with open(os.path.join(p["data"], "meta.json")) as f:
        meta = json.load(f)
    with open(p["probe"]) as f:
        probe = json.load(f)
    with open(os.path.join(p["finetune"], "finetune.json")) as f:
        ft = json.load(f)
    splits = ", ".join(f"{s} {m['samples']}" for s, m in meta["splits"].items())
    best = probe["layers"][probe["best_layer"]]
    pixels = f"{probe['pixels']['test_acc']:.4f}" if probe["pixels"] else "-"
    ev = probe["eval_split"]
    test = f"test acc {ft['test_acc']:.4f} ({ft['n_test']} images)" if ft["test_acc"] is not None else "no test split"
    lines = [
        f"demo summary | palette {meta['n_vocab']} colours | n_px {meta['n_px']} (n_ctx {meta['n_ctx']}) | "
        f"{splits} | shards in {p['data']}",
        f"  linear probe  | best layer {best['layer']} of {probe['n_layer']} | {ev} acc {best['test_acc']:.4f} "
        f"| last layer {probe['layers'][-1]['test_acc']:.4f} | raw pixels {pixels} | chance "
        f"{1.0 / probe['n_classes']:.4f} | {probe['n_train']} train, {probe['n_test'] or probe['n_val']} {ev} images",
        f"  finetune      | val acc {ft['val_acc']:.4f} | {test} | best step {ft['best_step']} of {ft['steps_run']}",
    ]
    pictures = [("loss curve", os.path.join(p["run"], "loss.png")), ("probe plot", os.path.join(p["run"], "probe.png")),
                ("finetune curve", os.path.join(p["finetune"], "loss.png")), ("completions", p["completions"]),
                ("samples", p["unconditional"])]
    return lines + [f"  {name:<13} | {path}" for name, path in pictures]


@click.command("demo")
@click.option("--src", default="/usr/share/datasets/fashion-mnist", show_default=True, type=click.Path(),
              help="Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) or any source tokenize reads.")
@click.option("--out", default="demo", show_default=True, type=OUTPUT_DIR,
              help="Demo folder; completed stages found there are reused.")
@click.option("--n-px", type=click.IntRange(1, 1024), default=14, show_default=True,
              help="Image side (14: Fashion-MNIST halved, so two CPU cores train in minutes).")
@click.option("--k", type=click.IntRange(2, 65535), default=16, show_default=True, help="Palette colours.")
@click.option("--steps", type=click.IntRange(1), default=250, show_default=True,
              help="Pretraining steps (tiny preset).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Pretraining batch.")
@click.option("--finetune-steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--finetune-lr", type=POSITIVE, default=1e-3, show_default=True,
              help="Finetuning LR (pretraining uses 3e-3).")
@click.option("--max-train", type=click.IntRange(1), default=2000, show_default=True,
              help="Train images the probe fits on.")
@click.option("--max-eval", type=click.IntRange(1), default=1000, show_default=True,
              help="Val and test images the probe and the finetuned model are scored on.")
@workers_option
@click.option("--device", type=Device(), default=None,
              help="cpu, cuda, cuda:1: where train, probe, finetune and sample run (default: cuda when present).")
@click.pass_context
def demo_cmd(ctx, src, out, **options):
    """Images to results on real data: palette -> tokenize -> train -> probe -> finetune -> sample, ending
    with a summary of the accuracies and the paths of the plots and grids.

    Every stage reuses what an earlier run left in --out: the palette, complete shards, a trained
    checkpoint (an interrupted training resumes), probe.json, finetune.json and the sample grids.
    """
    if not os.path.exists(src):
        raise click.ClickException(f"{src} not found; install Debian's Fashion-MNIST "
                                   "(sudo apt-get install -y dataset-fashion-mnist) or pass --src DIR")
    paths = run_demo(ctx, src, out, **options)
    for line in summary(paths):
        click.echo(line)
