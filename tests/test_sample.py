"""Sampling tests: the KV-cache path draws exactly the tokens of the full-recompute path under the
same generator, temperature / top-k semantics (top-k 1 is greedy, the sampled distribution is
softmax(logits / T) over the top k), completions keep their prefix, BERT runs fill by unmasking, and
`igpt-fast sample` writes its grids and token arrays (unconditional, from shards, from image files).

Precision and --impl: generate runs the model under `autocast(device)` (bf16 on CUDA) and every impl
draws the tokens of impl="torch"; on a faked GPU (kernels._is_cuda patched, as in
test_kernels_dispatch.py, with a CPU fp16 autocast standing in for CUDA's bf16 one) impl="triton"
samples on every path; where Triton cannot run, `igpt-fast sample --impl triton` fails in one line."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from igpt_fast.checkpoint import CheckpointError
from igpt_fast.cli import cli
from igpt_fast.model import GPTConfig, IGPT
import igpt_fast.sample as sample
from igpt_fast.sample import (SampleError, autocast, complete, completion_grid, generate, image_grid, load_run,
                              sample_logits, unconditional)
from test_kernels_dispatch import fake_cuda, launches  # noqa: F401 (fixtures)
from sources import run_piped
from test_probe import N_PX, PALETTE, make_dataset, make_run

interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton kernels under the interpreter")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(objective="ar", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = IGPT(GPTConfig(n_px=N_PX, n_vocab=PALETTE.k, n_layer=2, n_head=2, n_embd=32, objective=objective))
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    return model.to(dtype).eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("top_k", [None, 5])
def test_cache_equals_full_recompute(top_k):
    model = tiny_model()
    uncached = generate(model, n=3, top_k=top_k, generator=gen(1), use_cache=False)
    cached = generate(model, n=3, top_k=top_k, generator=gen(1), use_cache=True)
    assert torch.equal(cached, uncached)
    assert len({tuple(r) for r in cached.tolist()}) == 3  # really sampled: three different images
    prefix = cached[:, :20]
    a = generate(model, prefix, temperature=0.7, top_k=top_k, generator=gen(2), use_cache=False)
    b = generate(model, prefix, temperature=0.7, top_k=top_k, generator=gen(2), use_cache=True)
    assert torch.equal(a, b) and torch.equal(b[:, :20], prefix)


def test_compiled_decode_draws_the_eager_tokens():
    """generate(compile=True) (torch.compile of the static-shape decode step) draws exactly the eager
    tokens for the same generator, unconditionally and from a prefix with top-k, and keeps its KV
    cache (and so the compiled graph's buffers) for the next call."""
    model = tiny_model()
    eager = generate(model, n=3, generator=gen(1))
    compiled = generate(model, n=3, generator=gen(1), compile=True)
    assert torch.equal(compiled, eager)
    cache = model.h[0].attn.kv_cache
    assert cache is not None
    prefix = eager[:, :20]
    a = generate(model, prefix, temperature=0.7, top_k=5, generator=gen(2), compile=True)
    assert model.h[0].attn.kv_cache is cache
    b = generate(model, prefix, temperature=0.7, top_k=5, generator=gen(2))
    assert torch.equal(a, b) and torch.equal(a[:, :20], prefix)
    assert model.h[0].attn.kv_cache is cache  # the eager path keeps a cache it found
    model.clear_cache()
    generate(model, n=1, temperature=0)
    assert model.h[0].attn.kv_cache is None  # and frees one it set up
    with pytest.raises(SampleError, match="compile"):
        generate(model, n=1, use_cache=False, compile=True)
    with pytest.raises(SampleError, match="compile"):
        generate(tiny_model("bert"), n=1, compile=True)


def test_greedy_cache_equals_recompute_in_fp32():
    model = tiny_model(dtype=torch.float32)
    a = generate(model, n=2, temperature=0, use_cache=False)
    b = generate(model, n=2, temperature=0, use_cache=True)
    assert torch.equal(a, b)


def test_top_k_one_is_greedy():
    model = tiny_model()
    greedy = generate(model, n=2, temperature=0)
    assert torch.equal(generate(model, n=2, top_k=1, generator=gen(0)), greedy)
    assert torch.equal(generate(model, n=2, temperature=5.0, top_k=1, generator=gen(3)), greedy)
    assert torch.equal(greedy[0], greedy[1])  # the same prefix (none): the same greedy image


def test_temperature_and_top_k_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(40000, 1)
    for T, k in ((1.0, None), (2.0, None), (0.5, 3), (1.0, 2)):
        draws = sample_logits(logits, temperature=T, top_k=k, generator=gen(0))
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        z = logits[0].double() / T
        if k:
            z[torch.argsort(z, descending=True)[k:]] = float("-inf")
        expected = torch.softmax(z, 0)
        assert (freq - expected).abs().max() < 0.01, (T, k, freq, expected)
        if k:
            assert freq[expected == 0].sum() == 0
    assert torch.equal(sample_logits(logits[:3], temperature=0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        sample_logits(logits, temperature=-1)


def test_completion_keeps_prefix_and_varies():
    model = tiny_model()
    tokens = torch.randint(0, PALETTE.k, (2, N_PX * N_PX), generator=gen(5))
    out = complete(model, tokens, rows=3, samples_per_image=4, batch_size=3, generator=gen(6))
    assert out.shape == (2, 4, N_PX * N_PX)
    assert torch.equal(out[:, :, :3 * N_PX], tokens[:, None, :3 * N_PX].expand(2, 4, -1))
    assert len({tuple(r) for r in out[0].tolist()}) == 4
    with pytest.raises(SampleError):
        complete(model, tokens, rows=N_PX)
    with pytest.raises(SampleError):
        generate(model, tokens)  # a full-length prefix leaves nothing to sample


def test_unconditional_batches_match_one_batch():
    model = tiny_model(dtype=torch.float32)
    greedy_one = unconditional(model, 5, batch_size=5, temperature=0)
    greedy_split = unconditional(model, 5, batch_size=2, temperature=0)
    assert greedy_one.shape == (5, N_PX * N_PX) and torch.equal(greedy_one, greedy_split)


def test_bert_fills_by_unmasking():
    model = tiny_model("bert")
    tokens = torch.randint(0, PALETTE.k, (2, N_PX * N_PX), generator=gen(7))
    out = complete(model, tokens, rows=4, samples_per_image=2, generator=gen(8), bert_steps=3)
    assert torch.equal(out[:, :, :4 * N_PX], tokens[:, None, :4 * N_PX].expand(2, 2, -1))
    assert out.min() >= 0 and out.max() < PALETTE.k
    # one step = every masked pixel sampled independently given the prefix: greedy equals one forward
    mask = torch.zeros(1, N_PX * N_PX, dtype=torch.bool)
    mask[:, 4 * N_PX:] = True
    logits, _ = model(tokens[:1], bert_mask=mask)
    greedy = generate(model, tokens[:1, :4 * N_PX], temperature=0, bert_steps=1)
    assert torch.equal(greedy[0, 4 * N_PX:], logits[0, 4 * N_PX:].argmax(-1))


def test_grids():
    imgs = np.zeros((2, 3, 4, 4, 3), dtype=np.uint8)
    imgs[1, 2] = 200
    g = image_grid(imgs, pad=1, scale=2)
    assert g.shape == (2 * 9 + 1, 3 * 9 + 1, 3)
    assert (g[10:18, 19:27] == 200).all() and (g[0] == 255).all()
    originals = np.full((1, N_PX * N_PX), PALETTE.k - 1)
    samples = np.zeros((1, 2, N_PX * N_PX), dtype=np.int64)
    pic = completion_grid(PALETTE, originals, samples, N_PX, rows=3, scale=1)
    band = sample.LABEL_BAND
    assert pic.shape == (band + N_PX + 4, 4 * (N_PX + 2) + 2, 3)  # the grid under its band of column labels
    masked = pic[band + 2:band + 2 + N_PX, 2 + (N_PX + 2):2 + (N_PX + 2) + N_PX]  # second column
    assert (masked[:3] == 255).all() and (masked[3:] == 128).all()


def test_completion_grid_labels_its_columns():
    """Each column (original | input | sample 1 | sample 2) has dark label text in the band over it, the
    band holds nothing else, and below it is the unlabelled grid unchanged."""
    originals = np.full((2, N_PX * N_PX), PALETTE.k - 1)
    samples = np.full((2, 2, N_PX * N_PX), PALETTE.k - 1)
    scale, band, cell = 8, sample.LABEL_BAND, N_PX * 8
    pic = completion_grid(PALETTE, originals, samples, N_PX, rows=3, scale=scale)
    plain = image_grid(np.full((2, 4, N_PX, N_PX, 3), 255, dtype=np.uint8), scale=scale)
    plain[2:, :][np.all(pic[band + 2:] == 128, axis=-1)] = 128  # the grey of the masked input
    assert np.array_equal(pic[band:], plain)
    ink = pic[:band].min(-1) < 128  # (band, width): dark label pixels
    for col in range(4):
        x = 2 + col * (cell + 2)
        assert ink[:, x:x + cell].sum() > 10, col  # a label over every column
        assert not ink[:, x + cell:x + cell + 2].any()  # nothing in the gaps between columns
    assert not ink[:, :2].any() and not ink[:, -2:].any()


def test_cli_sample_outputs(tmp_path):
    data = make_dataset(str(tmp_path))
    run, _ = make_run(str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(cli, ["sample", run, "--n-samples", "5", "--device", "cpu", "--seed", "1"])
    assert res.exit_code == 0, res.output
    samples = np.load(os.path.join(run, "samples", "samples.npy"))
    assert samples.shape == (5, N_PX * N_PX) and samples.dtype == np.uint16
    w, h = Image.open(os.path.join(run, "samples", "samples.png")).size
    assert (w, h) == (3 * (8 * N_PX + 2) + 2, 2 * (8 * N_PX + 2) + 2)  # 3 x 2 cells of 8x-scaled images

    out = str(tmp_path / "from_data")
    res = runner.invoke(cli, ["sample", run, "--data", data, "--split", "test", "--n-images", "3", "--rows", "2",
                              "--samples-per-image", "2", "--top-k", "4", "--out", out, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    comp, orig = np.load(os.path.join(out, "completions.npy")), np.load(os.path.join(out, "originals.npy"))
    assert comp.shape == (3, 2, N_PX * N_PX) and orig.shape == (3, N_PX * N_PX)
    assert (comp[:, :, :2 * N_PX] == orig[:, None, :2 * N_PX]).all()
    assert Image.open(os.path.join(out, "completions.png")).size == (4 * (8 * N_PX + 2) + 2,
                                                                     sample.LABEL_BAND + 3 * (8 * N_PX + 2) + 2)

    files = []
    for i, value in enumerate((0, 255)):
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((16, 12, 3), value, dtype=np.uint8)).save(path)
        files.append(path)
    out = str(tmp_path / "from_files")
    res = runner.invoke(cli, ["sample", run, "--images", *files, "--samples-per-image", "1", "--out", out,
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    orig = np.load(os.path.join(out, "originals.npy"))
    assert (orig[0] == 0).all() and (orig[1] == PALETTE.k - 1).all()  # black and white in the grey palette
    comp = np.load(os.path.join(out, "completions.npy"))
    assert comp.shape == (2, 1, N_PX * N_PX) and (comp[:, 0, :N_PX * N_PX // 2] == orig[:, :N_PX * N_PX // 2]).all()


def test_cli_sample_compile(tmp_path):
    """`igpt-fast sample --compile` writes the samples of the eager command for the same seed; a BERT
    run, which has no left-to-right decode step, is refused with a one-line error."""
    run, _ = make_run(str(tmp_path))
    runner = CliRunner()
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        res = runner.invoke(cli, ["sample", run, "--n-samples", "2", "--device", "cpu", "--seed", "3",
                                  "--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
    assert np.array_equal(np.load(tmp_path / "eager" / "samples.npy"), np.load(tmp_path / "compiled" / "samples.npy"))
    bert_run, _ = make_run(str(tmp_path / "bert"), objective="bert")
    res = runner.invoke(cli, ["sample", bert_run, "--n-samples", "1", "--device", "cpu", "--compile"])
    assert res.exit_code == 1 and "needs an AR model" in res.output


def test_cli_sample_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["sample", str(tmp_path)])
    assert res.exit_code != 0 and "ckpt.pt not found" in res.output and "igpt-fast train" in res.output
    with pytest.raises(CheckpointError, match="igpt-fast train"):
        load_run(tmp_path)
    run, _ = make_run(str(tmp_path))
    res = runner.invoke(cli, ["sample", run, "--images"])
    assert res.exit_code == 2 and "--images needs image files" in res.output
    res = runner.invoke(cli, ["sample", run, "--rows", str(N_PX)])
    assert res.exit_code == 2 and "--rows" in res.output


def test_autocast_by_device():
    """CUDA: bf16 autocast, as train runs; the CPU: no autocast, the model's fp32."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU-only torch warns that it disables CUDA autocast
        ctx = autocast(torch.device("cuda", 0))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    x = torch.randn(2, 3)
    with autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (x @ x.T).dtype == torch.float32


@interpreter
@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_generate_with_every_impl_draws_the_torch_tokens(impl):
    """On the CPU impl="triton" runs the Triton attention (interpreter) in prefill and every BERT
    forward, the one-query decode step takes the torch path: the same tokens as impl="torch"."""
    ar, bert = tiny_model(dtype=torch.float32), tiny_model("bert", dtype=torch.float32)
    prefix = torch.randint(0, PALETTE.k, (2, 3 * N_PX), generator=gen(4))

    def draws(model_impl):
        ar.impl = bert.impl = model_impl
        return (generate(ar, n=2, generator=gen(1)),
                generate(ar, prefix, temperature=0.7, top_k=5, generator=gen(2)),
                generate(bert, prefix, generator=gen(3), bert_steps=3))

    for got, want in zip(draws(impl), draws("torch")):
        assert torch.equal(got, want)


@interpreter
@pytest.mark.parametrize("impl", ["auto", "triton", "torch"])
def test_generate_on_fake_cuda_runs_every_path_under_autocast(impl, fake_cuda, launches, monkeypatch):
    """A faked GPU, where Triton attention refuses fp32: generate's autocast (a CPU fp16 one stands in
    for CUDA's bf16, which the interpreter lacks) makes prefill, the cached decode, the compiled
    decode, the recompute path and BERT unmasking run under every impl, with the cache in fp16 and
    the Triton kernels launched unless impl="torch"."""
    monkeypatch.setattr(sample, "autocast", lambda device: torch.autocast("cpu", dtype=torch.float16))
    names = launches()
    ar, bert = tiny_model(dtype=torch.float32), tiny_model("bert", dtype=torch.float32)
    ar.impl = bert.impl = impl
    prefix = torch.randint(0, PALETTE.k, (2, 3 * N_PX), generator=gen(4))
    outs = [generate(ar, n=2, generator=gen(1)),
            generate(ar, prefix, top_k=5, generator=gen(2)),
            generate(ar, prefix[:, :-2], use_cache=False, generator=gen(2)),
            generate(bert, prefix, generator=gen(3), bert_steps=2),
            generate(ar, prefix, generator=gen(2), compile=True)]
    assert ar.h[0].attn.kv_cache.k_cache.dtype == torch.float16  # the compiled step keeps its cache
    for out in outs:
        assert out.dtype == torch.long and out.min() >= 0 and out.max() < PALETTE.k
    for out in outs[1:]:
        assert torch.equal(out[:, :3 * N_PX - 2], prefix[:, :-2])
    assert ("_attn_fwd_kernel" in names) == (impl != "torch")
    ar.clear_cache()


@interpreter
def test_impl_triton_refused_before_sampling_where_it_cannot_run():
    model = tiny_model(dtype=torch.bfloat16)
    model.impl = "triton"
    with pytest.raises(SampleError, match="no bf16"):
        generate(model, n=1)
    wide = IGPT(GPTConfig(n_px=2, n_vocab=4, n_layer=1, n_head=1, n_embd=136), impl="triton")
    with pytest.raises(SampleError, match="head dims up to 128, this model's is 136"):
        generate(wide, n=1)


def test_cli_sample_impl_triton_without_interpreter_fails_in_one_line(tmp_path):
    """--impl triton on the CPU without TRITON_INTERPRET=1: exit status 1, one line naming the fix, no traceback."""
    run, _ = make_run(str(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "igpt_fast.cli", "sample", run, "--impl", "triton", "--device", "cpu",
                          "--n-samples", "1"], capture_output=True, text=True, env=env, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and res.stdout == "" and len(lines) == 1, res.stderr
    assert lines[0].startswith("Error: ") and "TRITON_INTERPRET=1" in lines[0] and "--impl auto" in lines[0]


def test_cli_sample_progress_in_a_log_file(tmp_path):
    """Output piped to a file: no carriage returns, one progress display over all batches ending in a line
    with the total, and the paths printed as given on the command line (relative stays relative)."""
    run, _ = make_run(str(tmp_path))
    code, text = run_piped(tmp_path, "sample", "run", "--n-samples", "3", "--batch-size", "2", "--device", "cpu",
                           progress_seconds=3600, cwd=tmp_path)
    assert code == 0, text
    assert "\r" not in text
    progress = [ln for ln in text.splitlines() if ln.startswith("sample: ")]
    total = 3 * N_PX * N_PX
    assert len(progress) == 1 and progress[0].startswith(f"sample: {total}/{total} px (100%) | "), text
    assert text.splitlines()[-1].endswith(f" | {os.path.join('run', 'samples', 'samples.png')} | "
                                          f"{os.path.join('run', 'samples', 'samples.npy')}")
