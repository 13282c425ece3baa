"""Linear probe tests: the batched L-BFGS logistic regression against a Newton's-method
reference, joint vs separate fits, per-layer feature shapes, the table and plot with and without a test
split, and `igpt-fast probe` end to end on a tiny model and tiny shards written by the real tokenizer
(`tokenize_dataset` on generated PNGs).

`make_dataset` and `make_run` are shared with tests/test_sample.py."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.palette import Palette
from igpt_fast.probe import (ProbeError, extract_features, fit_logistic, format_table, lbfgs, pixel_features,
                             plot_probe, predict, probe, standardize)
from igpt_fast.tokenize import tokenize_dataset
from igpt_fast.checkpoint import model_state, save_checkpoint
from sources import run_piped

pytestmark = pytest.mark.usefixtures("one_thread")

N_PX = 8
PALETTE = Palette(np.linspace(-1, 1, 16)[:, None].repeat(3, 1))  # 16 grey levels


def make_images(folder, n, label, rng):
    """n 8x8 PNGs of class `label`: dark top half (class 0) or dark bottom half (class 1), plus noise."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = rng.integers(150, 256, size=(N_PX, N_PX), dtype=np.int64)
        rows = slice(0, N_PX // 2) if label == 0 else slice(N_PX // 2, N_PX)
        img[rows] = rng.integers(0, 100, size=(N_PX // 2, N_PX))
        Image.fromarray(img.astype(np.uint8), "L").save(os.path.join(folder, f"{i:03d}.png"))


def make_dataset(root, splits=(("train", 24), ("val", 8), ("test", 8))):
    """Tokenized two-class dataset in root/data (n_px 8, 16-colour palette); returns the folder."""
    rng = np.random.default_rng(0)
    src = os.path.join(root, "src")
    for split, n in splits:
        for label in (0, 1):
            make_images(os.path.join(src, split, f"c{label}"), n // 2, label, rng)
    out = os.path.join(root, "data")
    tokenize_dataset([src], PALETTE, out, n_px=N_PX, shard_size=5, progress=False)
    return out


def make_run(root, objective="ar", n_layer=2, seed=0):
    """A run folder with RUN/ckpt.pt (a random tiny model, the test palette) as `igpt-fast train` writes."""
    torch.manual_seed(seed)
    cfg = GPTConfig(n_px=N_PX, n_vocab=PALETTE.k, n_layer=n_layer, n_head=2, n_embd=32, objective=objective)
    model = IGPT(cfg)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # a zero head would make every pixel uniform
    run = os.path.join(root, "run")
    os.makedirs(run, exist_ok=True)
    save_checkpoint(os.path.join(run, "ckpt.pt"), model_state(model, PALETTE))
    return run, model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(str(tmp_path_factory.mktemp("probe")))


# ---------------------------------------------------------------------------------------- L-BFGS fit

def reference_fit(X, y, l2, K, iters=40):
    """Damped Newton's method with the exact Hessian (float64) on mean CE + l2/2 ||W||^2: an
    independent solver, converged to machine precision on a small problem."""
    N, D = X.shape

    def loss(theta):
        W, b = theta[:D * K].view(D, K), theta[D * K:]
        return F.cross_entropy(X @ W + b, y) + 0.5 * l2 * W.pow(2).sum()

    theta = torch.zeros(D * K + K, dtype=torch.float64)
    for _ in range(iters):
        g = torch.autograd.functional.jacobian(loss, theta)
        if g.abs().max() < 1e-13:
            break
        H = torch.autograd.functional.hessian(loss, theta)
        step = -torch.linalg.pinv(H, hermitian=True) @ g  # the bias is shift-invariant: H is singular there
        t = 1.0
        while loss(theta + t * step) > loss(theta) + 1e-4 * t * (g @ step) and t > 1e-8:
            t /= 2
        theta = theta + t * step
    return theta[:D * K].view(D, K), theta[D * K:]


def loss_of(X, y, W, b, l2):
    return (F.cross_entropy(X @ W + b, y) + 0.5 * l2 * W.pow(2).sum()).item()


def blobs(n, D, K, sep, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, D, generator=g, dtype=torch.float64) * sep
    y = torch.arange(n) % K
    return centres[y] + torch.randn(n, D, generator=g, dtype=torch.float64), y


def test_fit_matches_newton_reference():
    X, y = blobs(240, 6, 3, sep=1.0, seed=0)  # overlapping classes: a non-trivial optimum
    l2 = 0.05
    W, b = fit_logistic(X, y, l2, max_iter=500, tol=1e-10)
    W_ref, b_ref = reference_fit(X, y, l2, 3)
    # the bias is shift-invariant across classes (unpenalised); compare after centring
    torch.testing.assert_close(W, W_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(b - b.mean(), b_ref - b_ref.mean(), atol=1e-6, rtol=0)
    assert loss_of(X, y, W, b, l2) <= loss_of(X, y, W_ref, b_ref, l2) + 1e-10
    # the gradient at the solution vanishes
    W_ = W.clone().requires_grad_(True)
    b_ = b.clone().requires_grad_(True)
    (F.cross_entropy(X @ W_ + b_, y) + 0.5 * l2 * W_.pow(2).sum()).backward()
    assert W_.grad.abs().max() < 1e-7 and b_.grad.abs().max() < 1e-7


def test_separable_data_reaches_full_accuracy():
    X, y = blobs(300, 20, 5, sep=6.0, seed=1)
    Xte, yte = blobs(300, 20, 5, sep=6.0, seed=1)
    Xtr, Xte = standardize(X.float(), Xte.float())
    W, b = fit_logistic(Xtr, y, 1e-3, max_iter=100)
    assert (predict(Xtr, W, b) == y).float().mean() == 1.0
    assert (predict(Xte, W, b) == yte).float().mean() == 1.0


def test_joint_fit_equals_separate_fits():
    """Layers x L2 values optimised as one batched problem give each problem's own optimum."""
    L, grid = 3, [0.01, 0.3]
    X = torch.stack([blobs(150, 5, 4, sep=1.0 + layer, seed=layer)[0] for layer in range(L)])  # (L, N, D)
    y = torch.arange(150) % 4
    W, b = fit_logistic(X, y, grid, max_iter=500, tol=1e-9)
    assert W.shape == (L, 2, 5, 4) and b.shape == (L, 2, 4)
    for layer in range(L):
        for g, l2 in enumerate(grid):
            Ws, bs = fit_logistic(X[layer], y, l2, max_iter=500, tol=1e-9)
            torch.testing.assert_close(W[layer, g], Ws, atol=1e-8, rtol=0)
            torch.testing.assert_close(b[layer, g] - b[layer, g].mean(), bs - bs.mean(), atol=1e-8, rtol=0)
    preds = predict(X, W, b)
    assert preds.shape == (L, 2, 150)
    assert torch.equal(preds[1, 0], predict(X[1], W[1, 0], b[1, 0]))


def test_lbfgs_batch_of_quadratics():
    """Each problem reaches its own minimum A_p^-1 c_p, on the path it follows alone, in float32 too."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(3, 6, 6, generator=g, dtype=torch.float64)).Q
    A = Q @ torch.diag_embed(torch.tensor([[1.0] * 6, [1, 2, 5, 10, 50, 100.0], [1e-2, 1, 1, 1, 1, 1e2]],
                                          dtype=torch.float64)) @ Q.transpose(1, 2)  # (3, 6, 6)
    c = torch.randn(3, 6, generator=g, dtype=torch.float64)

    def f(x):
        Ax = (A @ x[:, :, None])[:, :, 0]
        return 0.5 * (x * Ax).sum(1) - (c * x).sum(1), Ax - c

    x, _, grad, _ = lbfgs(f, torch.zeros(3, 6, dtype=torch.float64), max_iter=200, tol=1e-10)
    torch.testing.assert_close(x, torch.linalg.solve(A, c), atol=1e-6, rtol=0)  # condition number 1e4
    assert grad.abs().max() <= 1e-6  # where the loss decrease reaches float64 rounding
    alone, _, _, _ = lbfgs(lambda z: tuple(t[1:2] for t in f(z.expand(3, 6).contiguous())),
                           torch.zeros(1, 6, dtype=torch.float64), max_iter=200, tol=1e-10)
    torch.testing.assert_close(alone[0], x[1], atol=1e-12, rtol=0)
    x32, loss32, _, iters = lbfgs(lambda z: tuple(t.float() for t in f(z.double())), torch.zeros(3, 6),
                                  max_iter=200, tol=0.0)
    assert iters < 200  # stops at float32 precision instead of backtracking forever
    solution = torch.linalg.solve(A, c)
    torch.testing.assert_close(x32.double(), solution, atol=1e-3 * solution.abs().max().item(), rtol=0)


def test_stronger_l2_shrinks_weights():
    X, y = blobs(200, 8, 3, sep=1.0, seed=2)
    W, _ = fit_logistic(X, y, [1e-3, 1e-1, 10.0], max_iter=300)
    norms = W.pow(2).sum((-1, -2))
    assert norms[0] > norms[1] > norms[2]


def test_standardize_uses_train_statistics():
    tr = torch.randn(100, 3, 4) * 5 + 2
    tr[:, 0, 0] = 7.0  # constant on train: centred only
    te = torch.randn(50, 3, 4)
    s_tr, s_te = standardize(tr, te)
    torch.testing.assert_close(s_tr.mean(0), torch.zeros(3, 4), atol=1e-5, rtol=0)
    assert torch.allclose(s_tr.std(0)[1:], torch.ones(2, 4), atol=1e-5)
    torch.testing.assert_close(s_te[:, 0, 0], te[:, 0, 0] - 7.0)
    torch.testing.assert_close(s_te[:, 1], (te[:, 1] - tr[:, 1].mean(0)) / tr[:, 1].std(0))


# ---------------------------------------------------------------------------------------- features

def test_features_per_layer_shapes_and_values(data_dir, tmp_path):
    _, model = make_run(str(tmp_path), n_layer=3)
    feats, labels, tokens = extract_features(model, data_dir, "train", batch_size=7, return_tokens=True,
                                             progress=False)
    assert feats.shape == (24, 4, 32) and feats.dtype == torch.float32
    assert labels.shape == (24,) and sorted(labels.tolist()) == [0] * 12 + [1] * 12
    assert tokens.shape == (24, N_PX * N_PX)
    torch.testing.assert_close(feats, model.features(tokens.long()))
    sub, _ = extract_features(model, data_dir, "train", batch_size=5, max_samples=9, progress=False)
    torch.testing.assert_close(sub, feats[:9])
    pix = pixel_features(tokens, PALETTE, N_PX)
    assert pix.shape == (24, 1, 3 * N_PX * N_PX)
    expected = PALETTE.colours()[tokens.numpy()].reshape(24, 1, -1) / 127.5 - 1.0
    torch.testing.assert_close(pix, torch.from_numpy(expected).float())


def test_probe_library_result(data_dir, tmp_path):
    _, model = make_run(str(tmp_path), n_layer=2)
    result = probe(model, data_dir, batch_size=8, l2_grid=(1e-2, 1.0), max_iter=50, progress=False,
                   log=lambda s: None)
    assert [r["layer"] for r in result["layers"]] == [0, 1, 2]
    assert result["eval_split"] == "test" and result["n_test"] == 8 and result["n_val"] == 8
    # the classes differ by which half is dark: raw pixels separate them
    assert result["pixels"]["test_acc"] == 1.0
    for r in result["layers"]:
        assert r["l2"] in (1e-2, 1.0) and len(r["val_acc_by_l2"]) == 2
        assert r["val_acc"] == max(r["val_acc_by_l2"])


def test_probe_without_val_or_labels(tmp_path):
    data = make_dataset(str(tmp_path), splits=(("train", 20),))
    _, model = make_run(str(tmp_path))
    result = probe(model, data, l2_grid=(0.1,), max_iter=20, pixels=False, progress=False, log=lambda s: None)
    assert result["eval_split"] == "val" and result["n_val"] == 2 and result["n_train"] == 18
    assert result["pixels"] is None
    src = tmp_path / "unlabelled"
    make_images(str(src), 6, 0, np.random.default_rng(0))
    bare = tokenize_dataset([str(src)], PALETTE, str(tmp_path / "bare"), n_px=N_PX, progress=False)
    assert bare["splits"]["train"]["samples"] == 6
    with pytest.raises(ProbeError, match="unlabelled"):
        probe(model, str(tmp_path / "bare"), pixels=False, progress=False, log=lambda s: None)


def _result(eval_split):
    """A probe result of two layers and the pixel baseline; without a test split test_acc repeats val_acc."""
    rows = [dict(layer=0, l2=0.1, val_acc=0.5, test_acc=0.25), dict(layer=1, l2=1.0, val_acc=0.75, test_acc=0.625)]
    pixels = dict(layer=0, l2=0.1, val_acc=0.375, test_acc=0.125)
    if eval_split == "val":
        for r in rows + [pixels]:
            r["test_acc"] = r["val_acc"]
    return {"layers": rows, "pixels": pixels, "best_layer": 1, "eval_split": eval_split, "n_layer": 1}


@pytest.mark.parametrize("eval_split", ["test", "val"])
def test_table_and_plot_show_test_only_with_a_test_split(eval_split, tmp_path, monkeypatch):
    lines = format_table(_result(eval_split)).splitlines()
    cells = [[c.strip() for c in line.split(" | ")] for line in lines]
    if eval_split == "test":
        assert cells[0] == ["layer", "val acc", "test acc", "best L2"]
        assert cells[2][:3] == ["1f", "75.00%", "62.50%"] and cells[3][:3] == ["pixels", "37.50%", "12.50%"]
    else:
        assert cells[0] == ["layer", "val acc", "best L2"]
        assert cells[2] == ["1f", "75.00%", "1e+00 *"] and cells[3] == ["pixels", "37.50%", "1e-01"]
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_probe(_result(eval_split), str(tmp_path / "probe.png"))
    curves = {line.get_label(): list(line.get_ydata()) for line in figures[0].axes[0].get_lines()}
    if eval_split == "test":
        assert curves == {"test accuracy": [25.0, 62.5], "val accuracy": [50.0, 75.0],
                          "raw pixels (test)": [12.5, 12.5]}
    else:
        assert curves == {"val accuracy (no test split)": [50.0, 75.0], "raw pixels (val)": [37.5, 37.5]}


# ---------------------------------------------------------------------------------------- CLI

def test_cli_probe_writes_json_and_png(data_dir, tmp_path):
    run, _ = make_run(str(tmp_path), n_layer=2)
    res = CliRunner().invoke(cli, ["probe", run, "--data", data_dir, "--batch-size", "8", "--max-train", "16",
                                   "--max-iter", "30", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with open(os.path.join(run, "probe.json")) as f:
        result = json.load(f)
    assert result["n_train"] == 16 and len(result["layers"]) == 3
    assert result["pixels"] is not None
    assert os.path.getsize(os.path.join(run, "probe.png")) > 0
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == "layer")
    assert "val acc" in lines[header] and "test acc" in lines[header] and "best L2" in lines[header]
    assert lines[header + 4].split()[0] == "pixels"


def test_cli_probe_errors_name_the_fix(data_dir, tmp_path):
    res = CliRunner().invoke(cli, ["probe", str(tmp_path), "--data", data_dir])
    assert res.exit_code != 0 and "ckpt.pt not found" in res.output and "igpt-fast train" in res.output
    other = tmp_path / "other"
    other.mkdir()
    cfg = GPTConfig(n_px=4, n_vocab=PALETTE.k, n_layer=1, n_head=2, n_embd=16)
    save_checkpoint(str(other / "ckpt.pt"), model_state(IGPT(cfg), None))
    res = CliRunner().invoke(cli, ["probe", str(other), "--data", data_dir])
    assert res.exit_code != 0 and "8x8" in res.output and "4x4" in res.output


def test_cli_probe_output_in_a_log_file(data_dir, tmp_path):
    """Output piped to a file: no carriage returns, one final progress line per split with its total, the
    table's accuracies in %, and the paths printed as given (a relative RUN gives relative paths)."""

    make_run(str(tmp_path), n_layer=1)
    code, text = run_piped(tmp_path, "probe", "run", "--data", data_dir, "--batch-size", "8", "--max-train", "16",
                           "--max-iter", "20", "--l2", "0.1", "--device", "cpu", progress_seconds=3600, cwd=tmp_path)
    assert code == 0, text
    assert "\r" not in text
    progress = [ln.split(" | ")[0] for ln in text.splitlines() if ln.startswith("features ")]
    assert progress == ["features train: 16/16 images (100%)", "features val: 8/8 images (100%)",
                        "features test: 8/8 images (100%)"]
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == "layer")
    for row in lines[header + 1:header + 4]:  # layers 0, 1f and the pixel baseline
        val, test = row.split(" | ")[1:3]
        assert val.strip().endswith("%") and test.strip().endswith("%"), row
    assert lines[-1].endswith(f" | {os.path.join('run', 'probe.json')} | {os.path.join('run', 'probe.png')}")
