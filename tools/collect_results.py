"""Collect the small artefacts of AR and BERT runs into a results folder and print the summary table.

For each run folder RUN (after `igpt-fast train`, `probe`, `finetune` and `sample` into RUN) this copies
config.json, log.jsonl, loss.png, probe.json, probe.png, finetune/{finetune.json, log.jsonl, loss.png} and
the sample grids (never checkpoints) to OUT/<objective>/ (names in FILES), draws OUT/probe_ar_vs_bert.png
(probe accuracy per layer of every run, raw pixels as a line) and prints a markdown table.

Usage: python tools/collect_results.py --out results/fashion-mnist runs/ar runs/bert
"""
import argparse
import json
import os
import shutil

FILES = {"config.json": "config.json", "log.jsonl": "log.jsonl", "loss.png": "loss.png",
         "probe.json": "probe.json", "probe.png": "probe.png", "finetune/finetune.json": "finetune.json",
         "finetune/log.jsonl": "finetune_log.jsonl",
         "finetune/loss.png": "finetune_loss.png", "samples/completions.png": "completions.png",
         "samples/samples.png": "samples.png"}  # RUN/... -> OUT/<objective>/...


def collect(run, out):
    with open(os.path.join(run, "config.json")) as f:
        objective = json.load(f)["model"]["objective"]
    dest = os.path.join(out, objective)
    os.makedirs(dest, exist_ok=True)
    for name, target in FILES.items():
        if os.path.isfile(os.path.join(run, name)):
            shutil.copyfile(os.path.join(run, name), os.path.join(dest, target))
    return objective, dest


def table(dests):
    lines = []
    for objective, dest in dests:
        with open(os.path.join(dest, "probe.json")) as f:
            probe = json.load(f)
        with open(os.path.join(dest, "finetune.json")) as f:
            ft = json.load(f)
        if not lines:
            heads = [f"layer {r['layer']}" if r["layer"] < probe["n_layer"] else "ln_f" for r in probe["layers"]]
            lines.append("| objective | " + " | ".join(heads) + " | best layer | raw pixels | finetune val | "
                         "finetune test |")
            lines.append("|" + "---|" * (len(heads) + 5))
        accs = [f"{r['test_acc']:.3f}" for r in probe["layers"]]
        lines.append(f"| {objective} | " + " | ".join(accs) + f" | {probe['best_layer']} | "
                     f"{probe['pixels']['test_acc']:.3f} | {ft['val_acc']:.3f} | {ft['test_acc']:.3f} |")
    return "\n".join(lines)


def plot(dests, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    pixels = None
    for objective, dest in dests:
        with open(os.path.join(dest, "probe.json")) as f:
            probe = json.load(f)
        ax.plot([r["layer"] for r in probe["layers"]], [r["test_acc"] for r in probe["layers"]], "o-",
                label=f"{objective} (probe, test)")
        pixels = probe["pixels"]["test_acc"]
    if pixels is not None:
        ax.axhline(pixels, color="grey", ls="--", label="raw pixels")
    ax.set_xticks(range(probe["n_layer"] + 1))
    ax.set_xlabel("layer (last = ln_f)")
    ax.set_ylabel("linear probe accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dests = [collect(run, args.out) for run in args.runs]
    plot(dests, os.path.join(args.out, "probe_ar_vs_bert.png"))
    print(table(dests))


if __name__ == "__main__":
    main()
