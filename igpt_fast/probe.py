"""Layer-sweep linear probe: features of every layer in one pass, one logistic regression per layer.

Reference: Chen et al. 2020, section 3.3 and figure 3 (linear probe accuracy vs layer; the best layer
is in the middle of the network). The features of layer l are the mean over positions of block l's
ln_1 output, and of the last "layer" the ln_f output (`IGPT.features`, shape (B, n_layer + 1, n_embd)).

Pipeline (`probe`):
1. `extract_features` streams each split once from the shards (`data.eval_loader`), on the GPU when
   the model is there (bf16 autocast on CUDA), and keeps (N, n_layer + 1, n_embd) float32 on the CPU.
2. Features are standardised per layer and dimension with the train mean and std.
3. `fit_logistic` fits multinomial logistic regression, loss = mean cross-entropy + l2/2 * ||W||^2
   (bias not penalised), with full-batch L-BFGS. All layers and all L2 values of the grid are one
   batched problem (weights (L, D, G K), one bmm per evaluation), but `lbfgs` keeps a history, a
   step size and a stopping test per problem: optimising the sum of the losses with one shared
   L-BFGS state (torch.optim.LBFGS) couples the problems through the shared line search and
   curvature pairs and converges far more slowly. Layers are split into chunks when the problem
   would not fit `max_bytes`.
4. Per layer, the L2 with the best val accuracy is chosen (ties: the larger L2) and the train fit at
   that L2 is scored on test (on val when the data has no test split). Without a val split, a seeded
   `val_fraction` of train is held out for the choice.
5. The raw-pixel baseline runs the same classifier on the palette colours of the tokens
   (dequantized RGB scaled to [-1, 1], flattened to 3 n_ctx values).

The results dict is what `igpt-fast probe` writes to RUN/probe.json; `plot_probe` draws RUN/probe.png.
"""
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from igpt_fast.errors import ProbeError
from igpt_fast.model import IGPT, autocast
from igpt_fast.palette import Palette
from igpt_fast.progress import Progress, duration, fmt

__all__ = ["L2_GRID", "ProbeError", "extract_features", "standardize", "lbfgs", "fit_logistic", "predict",
           "sweep", "pixel_features", "probe", "format_table", "plot_probe"]

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@torch.no_grad()
def extract_features(model, data, split, batch_size=64, device=None, max_samples=None, return_tokens=False,
                     progress=True, meta=None):
    """Features of every layer for the samples of one split, in one pass over its shards.

    Returns (feats float32 (N, n_layer + 1, n_embd) on the CPU, labels int64 (N,)) and, with
    return_tokens, also tokens int32 (N, n_ctx). max_samples stops after the first N samples (the
    tokenizer shuffles each split, so that is a random subset).
    """
    from igpt_fast.data import eval_loader, read_meta

    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    meta = meta if meta is not None else read_meta(data)
    total = meta.get("splits", {}).get(split, {}).get("samples")
    if max_samples is not None:
        total = max_samples if total is None else min(total, max_samples)
    feats, labels, tokens = [], [], []
    n = 0
    bar = Progress(total, f"features {split}", unit="images", enabled=progress)
    try:
        for idx, y in eval_loader(data, split, batch_size, meta=meta):
            if max_samples is not None and n + len(idx) > max_samples:
                idx, y = idx[:max_samples - n], y[:max_samples - n]
            with autocast(device):
                f = model.features(idx.to(device, non_blocking=True))  # (B, n_layer + 1, n_embd)
            feats.append(f.float().cpu())
            labels.append(y)
            if return_tokens:
                tokens.append(idx.to(torch.int32))
            n += len(idx)
            bar.update(len(idx))
            if max_samples is not None and n >= max_samples:
                break
    finally:
        bar.close()
    if n == 0:
        raise ProbeError(f"split {split!r} of {data} has no samples")
    out = (torch.cat(feats), torch.cat(labels))
    return out + (torch.cat(tokens),) if return_tokens else out


def standardize(train, *others):
    """Per-layer, per-dimension standardisation with the train statistics.

    train (N, L, D) (or (N, D)); others of the same trailing shape. A dimension that is constant on
    train is only centred (its std is taken as 1). Returns the standardised tensors in order.
    """
    mean = train.mean(0, keepdim=True)  # (1, L, D)
    std = train.std(0, keepdim=True)  # (1, L, D)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple((x - mean) / std for x in (train, *others))


def _as_grid(l2, X):
    scalar = not isinstance(l2, (list, tuple, np.ndarray, torch.Tensor))
    grid = torch.as_tensor([l2] if scalar else list(l2), dtype=X.dtype, device=X.device).reshape(-1)  # (G,)
    if (grid < 0).any():
        raise ValueError(f"L2 strengths must be >= 0, got {grid.tolist()}")
    return grid, scalar


def lbfgs(f, x, max_iter=200, tol=1e-5, history_size=20, max_backtracks=20):
    """Batched L-BFGS: minimise P independent smooth functions at once, each with its own history,
    step size and stopping test, so every problem follows the path it would follow alone.

    f(x) -> (loss (P,), grad (P, n)) for x (P, n). Directions by the two-loop recursion (Nocedal &
    Wright, algorithm 7.4) with the initial scaling s.y / y.y; steps by Armijo backtracking from 1
    (c1 = 1e-4, halving), all problems evaluated together. A problem stops when max |grad| <= tol, when
    the decrease its direction predicts is below the rounding of its loss, or when no step decreases
    its loss (both: converged to working precision). Returns (x, loss, grad, iterations).
    """
    loss, g = f(x)
    eps = 8 * torch.finfo(loss.dtype).eps
    S: list[torch.Tensor] = []
    Y: list[torch.Tensor] = []
    R: list[torch.Tensor] = []
    gamma = torch.clamp(1.0 / g.abs().sum(1), max=1.0)  # (P,): first step as torch.optim.LBFGS
    active = g.abs().amax(1) > tol  # (P,)
    it = 0
    while it < max_iter and active.any():
        it += 1
        q = -g
        alphas = []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(R)):
            a = rho * (s * q).sum(1)  # (P,)
            q = q - a[:, None] * y
            alphas.append(a)
        d = gamma[:, None] * q
        for s, y, rho, a in zip(S, Y, R, reversed(alphas)):
            d = d + (a - rho * (y * d).sum(1))[:, None] * s
        gd = (g * d).sum(1)  # (P,)
        ascent = gd >= 0
        d = torch.where(ascent[:, None], -g, d)
        gd = torch.where(ascent, -(g * g).sum(1), gd)
        # a predicted decrease below the loss's rounding cannot be verified by a line search: converged
        active = active & (-gd > eps * loss.abs().clamp_min(1.0))
        d = d * active[:, None]
        t = torch.ones_like(loss)
        done = ~active
        x_new, loss_new, g_new = x.clone(), loss.clone(), g.clone()
        for _ in range(max_backtracks):
            trial = x + t[:, None] * d
            lt, gt = f(trial)
            ok = ~done & (lt <= loss + 1e-4 * t * gd)
            x_new[ok], loss_new[ok], g_new[ok] = trial[ok], lt[ok], gt[ok]
            done = done | ok
            if done.all():
                break
            t = torch.where(done, t, 0.5 * t)
        s, y = x_new - x, g_new - g
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        valid = sy > 1e-10 * torch.sqrt((s * s).sum(1) * yy).clamp_min(1e-30)
        R.append(torch.where(valid, 1.0 / sy.clamp_min(1e-30), torch.zeros_like(sy)))  # rho 0: pair ignored
        S.append(s)
        Y.append(y)
        gamma = torch.where(valid, sy / yy.clamp_min(1e-30), gamma)
        if len(S) > history_size:
            S.pop(0), Y.pop(0), R.pop(0)
        stuck = active & ~done
        x, loss, g = x_new, loss_new, g_new
        active = active & ~stuck & (g.abs().amax(1) > tol)
    return x, loss, g, it


def fit_logistic(X, y, l2, n_classes=None, max_iter=200, tol=1e-5, history_size=20):
    """Multinomial logistic regression by full-batch L-BFGS, many independent problems at once.

    X: (L, N, D) float features of L problems sharing labels (or (N, D) for one); y: (N,) int64 in
    [0, n_classes); l2: a float or a sequence of G floats. Loss of each (layer, l2) problem: mean
    cross-entropy + l2/2 * ||W||^2. The L x G problems run through `lbfgs` together: one bmm per
    evaluation for all of them. Works on X's device and dtype.
    Returns (W, b): W (L, G, D, K), b (L, G, K); the L axis is dropped for 2-D X and the G axis for
    a scalar l2.
    """
    single = X.dim() == 2
    if single:
        X = X[None]  # (1, N, D)
    L, N, D = X.shape
    y = y.to(X.device)
    K = int(n_classes) if n_classes is not None else int(y.max()) + 1
    grid, scalar = _as_grid(l2, X)
    G = len(grid)
    target = y.view(1, N, 1, 1).expand(L, N, G, 1)

    def f(theta):
        """theta (L G, D K + K) -> (loss (L G,), grad (L G, D K + K))."""
        with torch.enable_grad():
            theta = theta.detach().requires_grad_(True)
            W = theta[:, :D * K].view(L, G, D, K)
            b = theta[:, D * K:].reshape(L, 1, G * K)
            logits = torch.baddbmm(b, X, W.permute(0, 2, 1, 3).reshape(L, D, G * K)).view(L, N, G, K)
            nll = -logits.log_softmax(-1).gather(-1, target).squeeze(-1).mean(1)  # (L, G)
            loss = nll + 0.5 * grid * W.pow(2).sum((2, 3))  # (L, G)
            (grad,) = torch.autograd.grad(loss.sum(), theta)
        return loss.detach().reshape(-1), grad

    theta = torch.zeros(L * G, D * K + K, device=X.device, dtype=X.dtype)
    theta, _, _, _ = lbfgs(f, theta, max_iter=max_iter, tol=tol, history_size=history_size)
    W = theta[:, :D * K].view(L, G, D, K)
    b = theta[:, D * K:].reshape(L, G, K)
    if scalar:
        W, b = W[:, 0], b[:, 0]
    if single:
        W, b = W[0], b[0]
    return W, b


def predict(X, W, b):
    """Class predictions of features X under weights as fit_logistic returns them.

    X (N, D) with W (D, K) -> (N,); X (N, D) with W (G, D, K) -> (G, N);
    X (L, N, D) with W (L, D, K) -> (L, N); X (L, N, D) with W (L, G, D, K) -> (L, G, N).
    """
    if X.dim() == 2:
        return (X @ W + b.unsqueeze(-2)).argmax(-1)
    if W.dim() == 3:
        return (torch.bmm(X, W) + b[:, None]).argmax(-1)  # (L, N)
    return (X[:, None] @ W + b[:, :, None]).argmax(-1)  # (L, 1, N, D) @ (L, G, D, K) -> (L, G, N)


def _accuracy(X, y, W, b):
    """Accuracy (L, G) of weights W (L, G, D, K) on X (L, N, D)."""
    return (predict(X, W, b) == y.to(X.device).view(1, 1, -1)).float().mean(-1)


def _layers_per_chunk(N, D, G, K, max_bytes, itemsize=4):
    """How many layers of one batched fit fit in max_bytes: features, logits and their grads,
    L-BFGS history of the weights."""
    per_layer = itemsize * (N * D + 4 * N * G * K + (2 * 20 + 4) * D * G * K)
    return max(1, int(max_bytes // per_layer))


def _default_max_bytes(device):
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.6 * free)
    return 4 << 30


def sweep(train, val, test, l2_grid=L2_GRID, n_classes=None, device=None, max_iter=200, max_bytes=None,
          log=None):
    """Standardise, fit every layer at every L2, choose the L2 on val, score on test.

    train, val, test: (features (N, L, D), labels (N,)) pairs on the CPU (test may be None: val is
    scored then). Returns a list of L dicts {"layer", "l2", "val_acc", "test_acc", "val_acc_by_l2"}.
    """
    (Xtr, ytr), (Xva, yva) = train, val
    Xte, yte = test if test is not None else (Xva, yva)
    device = torch.device(device) if device is not None else torch.device("cpu")
    K = int(n_classes) if n_classes is not None else int(torch.cat([ytr, yva, yte]).max()) + 1
    Xtr, Xva, Xte = standardize(Xtr.float(), Xva.float(), Xte.float())
    N, L, D = Xtr.shape
    grid = [float(v) for v in l2_grid]
    G = len(grid)
    step = _layers_per_chunk(N, D, G, K, max_bytes or _default_max_bytes(device))
    rows = []
    for lo in range(0, L, step):
        hi = min(L, lo + step)
        t0 = time.perf_counter()

        def on_device(X):
            return X[:, lo:hi].transpose(0, 1).contiguous().to(device)  # (l, N, D)

        W, b = fit_logistic(on_device(Xtr), ytr, grid, n_classes=K, max_iter=max_iter)  # (l, G, D, K), (l, G, K)
        val_acc = _accuracy(on_device(Xva), yva, W, b).cpu()  # (l, G)
        test_acc = _accuracy(on_device(Xte), yte, W, b).cpu()  # (l, G)
        train_acc = _accuracy(on_device(Xtr), ytr, W, b).cpu()  # (l, G)
        for i in range(hi - lo):
            best = max(range(G), key=lambda g: (round(val_acc[i, g].item(), 6), grid[g]))
            rows.append({"layer": lo + i, "l2": grid[best], "train_acc": train_acc[i, best].item(),
                         "val_acc": val_acc[i, best].item(), "test_acc": test_acc[i, best].item(),
                         "val_acc_by_l2": [round(a, 6) for a in val_acc[i].tolist()]})
        if log is not None:
            log(f"fit layers {lo}..{hi - 1} | {N} x {D} features | {G} L2 values | "
                f"{duration(time.perf_counter() - t0)}")
    return rows


def pixel_features(tokens, palette, n_px):
    """Raw-pixel baseline features: tokens (N, n_ctx) -> float32 (N, 1, 3 n_ctx), the dequantized
    RGB colours scaled to [-1, 1] (x / 127.5 - 1), raster order, flattened."""
    rgb = palette.dequantize(np.asarray(tokens), n_px)  # (N, n_px, n_px, 3) uint8
    x = torch.from_numpy(rgb.reshape(len(rgb), 1, -1)).float()  # (N, 1, 3 n_ctx)
    return x / 127.5 - 1.0


def _labelled(y, split):
    if (y < 0).any():
        raise ProbeError(f"split {split!r} has {(y < 0).sum().item()} unlabelled samples; the linear probe needs "
                         "a labelled dataset (labels come from class folders, CIFAR or IDX label files)")
    return y


def probe(model: IGPT, data: str, palette: Palette | None = None, batch_size: int = 64,
          device: torch.device | str | None = None, max_train: int | None = None, max_eval: int | None = None,
          l2_grid: Sequence[float] = L2_GRID, max_iter: int = 200, pixels: bool = True, val_fraction: float = 0.1,
          seed: int = 0, progress: bool = True, log: Callable[[str], object] | None = None,
          meta: dict | None = None) -> dict[str, Any]:
    """Linear probe of every layer of `model` on the tokenized dataset `data` (see the module docstring).

    palette: the Palette of the tokens (default: data/palette.npy), used by the raw-pixel baseline;
    pixels=False skips the baseline. device: where features and fits run (default: the model's).
    max_train / max_eval: use at most that many train / val and test samples. meta: data's meta.json
    dict (read when None).
    Returns a dict: {"layers": [{"layer", "l2", "train_acc", "val_acc", "test_acc", "val_acc_by_l2"}],
    "pixels": the same for the baseline (or None), "best_layer", "eval_split", "n_train", "n_val",
    "n_test", "n_classes", "l2_grid", "n_layer", "n_embd", "seconds"}.
    """
    from igpt_fast.data import read_meta

    t0 = time.perf_counter()
    log = log or (lambda s: print(s, file=sys.stderr))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device)
    meta = meta if meta is not None else read_meta(data)
    splits = {s for s, m in meta.get("splits", {}).items() if m.get("samples", 0) > 0}
    if "train" not in splits:
        raise ProbeError(f"{data} has no train split; the probe fits its classifiers on train")
    kw = dict(batch_size=batch_size, device=device, return_tokens=pixels, progress=progress, meta=meta)
    tr = extract_features(model, data, "train", max_samples=max_train, **kw)
    _labelled(tr[1], "train")
    if "val" in splits:
        va = extract_features(model, data, "val", max_samples=max_eval, **kw)
    else:
        n_val = max(1, int(round(val_fraction * len(tr[1]))))
        if n_val >= len(tr[1]):
            raise ProbeError(f"{data} has no val split and too few train samples ({len(tr[1])}) to hold some out")
        perm = torch.randperm(len(tr[1]), generator=torch.Generator().manual_seed(seed))
        va = tuple(t[perm[:n_val]] for t in tr)
        tr = tuple(t[perm[n_val:]] for t in tr)
        log(f"no val split: holding out {n_val} train samples (seed {seed}) to choose L2")
    _labelled(va[1], "val")
    eval_split = "test" if "test" in splits else "val"
    te = extract_features(model, data, "test", max_samples=max_eval, **kw) if eval_split == "test" else None
    if te is not None:
        _labelled(te[1], "test")
    labels = torch.cat([tr[1], va[1]] + ([te[1]] if te is not None else []))
    names = meta.get("class_names")
    n_classes = len(names) if names else int(labels.max()) + 1
    if len(torch.unique(tr[1])) < 2:
        raise ProbeError("the train samples hold fewer than two classes; nothing to classify")

    common = dict(l2_grid=l2_grid, n_classes=n_classes, device=device, max_iter=max_iter, log=log)
    layers = sweep(tr[:2], va[:2], te[:2] if te is not None else None, **common)
    pixel_rows = None
    if pixels:
        if palette is None:
            from igpt_fast.data import load_data_palette
            palette = load_data_palette(data, meta)
        n_px = model.config.n_px
        pix = [(pixel_features(s[2], palette, n_px), s[1]) for s in (tr, va) + ((te,) if te is not None else ())]
        pixel_rows = sweep(pix[0], pix[1], pix[2] if te is not None else None, **common)[0]
        pixel_rows.pop("layer")
    best = max(layers, key=lambda r: (r["val_acc"], -r["layer"]))
    return {"layers": layers, "pixels": pixel_rows, "best_layer": best["layer"], "eval_split": eval_split,
            "n_train": len(tr[1]), "n_val": len(va[1]), "n_test": len(te[1]) if te is not None else 0,
            "n_classes": n_classes, "l2_grid": [float(v) for v in l2_grid], "n_layer": model.config.n_layer,
            "n_embd": model.config.n_embd, "seconds": time.perf_counter() - t0}


def format_table(result):
    """The probe table as text: layer | val acc | test acc (in %) | best L2, then the pixel baseline. Without a
    test split the chosen L2 is scored on val (eval_split "val"), so the test column is left out rather than
    repeating val."""
    test = result["eval_split"] == "test"
    cols = [("val acc", "val_acc", 7)] + ([("test acc", "test_acc", 8)] if test else [])
    lines = [" | ".join([f"{'layer':>6}"] + [f"{head:>{w}}" for head, _, w in cols] + [f"{'best L2':>7}"])]
    last = result["n_layer"]
    rows = [(f"{r['layer']}" if r["layer"] < last else f"{r['layer']}f", r,
             " *" if r["layer"] == result["best_layer"] else "") for r in result["layers"]]
    if result.get("pixels") is not None:
        rows.append(("pixels", result["pixels"], ""))
    for name, r, mark in rows:
        lines.append(" | ".join([f"{name:>6}"] + [f"{fmt(key, r[key]):>{w}}" for _, key, w in cols]
                                + [f"{r['l2']:7.0e}{mark}"]))
    return "\n".join(lines)


def plot_probe(result, path, title=None):
    """Accuracy vs layer (the paper's figure 3), the raw-pixel baseline as a horizontal line. Test and val
    accuracy with a test split; val accuracy alone without one (it is then also the scored split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in result["layers"]]
    ev = result["eval_split"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if ev == "test":
        ax.plot(layers, [100 * r["test_acc"] for r in result["layers"]], "o-", label="test accuracy")
        ax.plot(layers, [100 * r["val_acc"] for r in result["layers"]], "s--", alpha=0.6, label="val accuracy")
    else:
        ax.plot(layers, [100 * r["val_acc"] for r in result["layers"]], "o-", label="val accuracy (no test split)")
    p = result.get("pixels")
    if p is not None:
        ax.axhline(100 * p["test_acc"], color="grey", linestyle=":", label=f"raw pixels ({ev})")
    ax.set_xlabel("layer (last = ln_f output)")
    ax.set_ylabel("linear probe accuracy (%)")
    ax.set_xticks(layers if len(layers) <= 25 else layers[::max(1, math.ceil(len(layers) / 25))])
    ax.set_title(title or "linear probe by layer")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
