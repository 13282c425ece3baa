"""Tests of igpt_fast.model against an independent naive implementation of the official iGPT maths
(openai/image-gpt src/model.py), plus AR shift / BERT masking semantics, features, KV cache (eager
and static decode steps), the fused norm backward and quick GELU (gradcheck, fp32 error against
fp64), classification head, activation checkpointing, overfitting, and Triton-vs-torch training."""
import math

import pytest
import torch

from igpt_fast.model import (MLP, Classifier, GPTConfig, IGPT, PRESETS, RMSNorm, _RMSNormFunction, masked_attention,
                             prefix_attention)


def tiny_config(**kw):
    base = dict(n_px=4, n_vocab=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def randomized(model, seed=0):
    """Random weights everywhere (the init zeroes the head, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.ndim == 1 and p.numel() == model.config.n_embd else 0.0))
    return model.eval()


def naive_forward(model, idx, bert_mask=None, collect=None):
    """iGPT written out from the paper/official code with explicit per-head weights, python loops over
    heads and an explicit masked softmax; reads weights from model.state_dict() only."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    c = model.config
    B, T = idx.shape
    C, H = c.n_embd, c.n_head
    hd = C // H

    def norm(x, g):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * g

    h = sd["wte.weight"][idx]
    if c.objective == "ar":
        h = torch.cat([sd["sos"].expand(B, 1, C), h[:, :-1]], 1)
    elif bert_mask is not None:
        h = h * (1.0 - bert_mask.double())[..., None]
    h = h + sd["wpe.weight"][:T]
    for layer in range(c.n_layer):
        p = f"h.{layer}."
        x = norm(h, sd[p + "ln_1.weight"])
        if collect is not None:
            collect.append(x.mean(1))
        w = sd[p + "attn.c_attn.weight"]
        heads = []
        for i in range(H):
            wq = w[i * hd:(i + 1) * hd]
            wk = w[C + i * hd:C + (i + 1) * hd]
            wv = w[2 * C + i * hd:2 * C + (i + 1) * hd]
            q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
            s = q @ k.transpose(1, 2) / math.sqrt(hd)
            if c.objective == "ar":
                keep = torch.tril(torch.ones(T, T, dtype=torch.bool))
                s = torch.where(keep, s, torch.tensor(-1e30, dtype=s.dtype))
            a = torch.exp(s - s.max(-1, keepdim=True).values)
            heads.append((a / a.sum(-1, keepdim=True)) @ v)
        h = h + torch.cat(heads, -1) @ sd[p + "attn.c_proj.weight"].T
        x = norm(h, sd[p + "ln_2.weight"])
        m = x @ sd[p + "mlp.c_fc.weight"].T
        m = m / (1 + torch.exp(-1.702 * m))
        h = h + m @ sd[p + "mlp.c_proj.weight"].T
    h = norm(h, sd["ln_f.weight"])
    if collect is not None:
        collect.append(h.mean(1))
    logits = h @ sd["lm_head.weight"].T
    logp = torch.log_softmax(logits, -1).gather(-1, idx[..., None])[..., 0]
    if bert_mask is None:
        loss = -logp.mean()
    else:
        m = bert_mask.double()
        loss = (-(logp * m).sum(1) / m.sum(1)).mean()
    return logits, loss


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_logits_and_loss_match_naive(objective):
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config(objective=objective, n_head=4)))
    idx = torch.randint(0, 16, (3, 16))
    mask = None
    if objective == "bert":
        mask = torch.rand(3, 16) < 0.3
        mask[:, 0] = True
    logits, loss = model(idx, idx, bert_mask=mask)
    ref_logits, ref_loss = naive_forward(model, idx, mask)
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)


def test_init_matches_paper():
    torch.manual_seed(0)
    c = GPTConfig(n_px=8, n_vocab=512, n_layer=4, n_head=4, n_embd=256)
    model = IGPT(c)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.wpe.weight.std().item() == pytest.approx(0.01, rel=0.05)
    attn = model.h[0].attn
    assert attn.c_attn.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert attn.c_proj.weight.std().item() == pytest.approx(1 / math.sqrt(256 * 4), rel=0.05)
    assert model.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    idx = torch.randint(0, 512, (2, 64))
    _, loss = model(idx, idx)  # zero head: uniform prediction
    assert loss.item() == pytest.approx(math.log(512), abs=1e-5)


def test_ar_shift_and_sos():
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config()))
    idx = torch.randint(0, 16, (2, 16))
    logits, _ = model(idx)
    # position 0 sees only sos: identical for any image
    other = torch.randint(0, 16, (2, 16))
    logits_other, _ = model(other)
    torch.testing.assert_close(logits[:, 0], logits_other[:, 0])
    torch.testing.assert_close(logits[0, 0], logits[1, 0])
    # changing x_j changes logits at positions > j only; the last pixel is never an input
    j = 6
    changed = idx.clone()
    changed[:, j] = (changed[:, j] + 1) % 16
    logits_changed, _ = model(changed)
    torch.testing.assert_close(logits_changed[:, :j + 1], logits[:, :j + 1])
    assert (logits_changed[:, j + 1] - logits[:, j + 1]).abs().max() > 1e-3
    last = idx.clone()
    last[:, -1] = (last[:, -1] + 1) % 16
    torch.testing.assert_close(model(last)[0], logits)
    # the sos vector matters
    with torch.no_grad():
        model.sos.add_(1.0)
    assert (model(idx)[0][:, 0] - logits[:, 0]).abs().max() > 1e-3


def test_bert_masking():
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config(objective="bert", bert_mask_prob=0.5)))
    idx = torch.randint(0, 16, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [3, 9]] = True
    logits, loss = model(idx, idx, bert_mask=mask)
    # masked tokens are invisible: changing them changes nothing
    changed = idx.clone()
    changed[:, [3, 9]] = (changed[:, [3, 9]] + 5) % 16
    logits_changed, _ = model(changed, bert_mask=mask)
    torch.testing.assert_close(logits_changed, logits)
    # no causal mask: the last pixel influences the first position
    last = idx.clone()
    last[:, -1] = (last[:, -1] + 1) % 16
    assert (model(last, bert_mask=mask)[0][:, 0] - logits[:, 0]).abs().max() > 1e-3
    # the loss covers masked positions only
    lp = torch.log_softmax(logits.double(), -1).gather(-1, idx[..., None])[..., 0]
    assert loss.item() == pytest.approx(-lp[:, [3, 9]].mean().item(), abs=1e-5)
    # a fresh mask every forward, drawn with p = bert_mask_prob
    losses = {round(model(idx, idx)[1].item(), 6) for _ in range(5)}
    assert len(losses) > 1
    masks = torch.stack([model.sample_bert_mask(torch.zeros(64, 64, dtype=torch.long)) for _ in range(4)])
    assert masks.float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_features_match_naive():
    torch.manual_seed(0)
    for objective in ("ar", "bert"):
        model = randomized(IGPT(tiny_config(objective=objective, n_layer=3)))
        idx = torch.randint(0, 16, (3, 16))
        feats = model.features(idx)
        ref = []
        naive_forward(model, idx, collect=ref)
        assert feats.shape == (3, 4, 32)
        torch.testing.assert_close(feats.double(), torch.stack(ref, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 1, 7])
def test_kv_cache_matches_full_forward(t):
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config(n_head=4)))
    idx = torch.randint(0, 16, (3, 16))
    logits, _ = model(idx)
    model.setup_cache(3)
    step_logits = [model.prefill(idx[:, :t])]
    for i in range(t, 15):
        step_logits.append(model.decode(idx[:, i], i))
    torch.testing.assert_close(torch.stack(step_logits, 1), logits[:, t:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="n_ctx - 1"):
        model.decode(idx[:, 15], 15)
    model.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        model.decode(idx[:, 0], 0)


def test_static_decode_matches_eager_decode():
    """decode_static (whole-cache shapes, the step torch.compile compiles) gives decode's logits; on
    the CPU it reads the prefix through prefix_attention, which equals the masked whole-cache
    attention that CUDA graphs replay."""
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config(n_head=4)))
    idx = torch.randint(0, 16, (3, 16))
    logits, _ = model(idx)
    model.setup_cache(3)
    cache = model.h[0].attn.kv_cache
    step_logits = [model.prefill(idx[:, :5])]
    for i in range(5, 15):
        step_logits.append(model.decode_static(idx[:, i], torch.tensor([i])))
    torch.testing.assert_close(torch.stack(step_logits, 1), logits[:, 5:], atol=1e-5, rtol=1e-5)
    model.setup_cache(3)
    assert model.h[0].attn.kv_cache is cache  # a matching cache is kept: a compiled step sees the same buffers
    q = torch.randn(3, 4, 1, 8)
    for pos in (0, 6, 15):
        p = torch.tensor([pos])
        torch.testing.assert_close(prefix_attention(q, cache.k_cache, cache.v_cache, p),
                                   masked_attention(q, cache.k_cache, cache.v_cache, cache.mask(p)))
    model.setup_cache(2)
    assert model.h[0].attn.kv_cache is not cache and model.h[0].attn.kv_cache.k_cache.size(0) == 2


def _naive_rms_norm(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w


def test_rms_norm_function_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, w))
    y = _RMSNormFunction.apply(x, w, 1e-5)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):  # never a silent zero second derivative
        gx.sum().backward()
    xt = torch.randn(8, 5, 3, dtype=torch.float64).transpose(0, 2).requires_grad_()  # non-contiguous
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (xt, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_error_against_fp64(dtype):
    """Output and gradients of RMSNorm in `dtype` against the fp64 formula: at most twice the error
    of the same formula written with plain PyTorch ops in `dtype` (the fused backward in fp32 and
    fp64, the float32 norm then the gain in bf16)."""
    torch.manual_seed(0)
    x64 = torch.randn(4, 64, 256, dtype=torch.float64) * 3
    w64 = 1 + 0.2 * torch.randn(256, dtype=torch.float64)
    dy64 = torch.randn(4, 64, 256, dtype=torch.float64)
    norm = RMSNorm(256).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w64)

    def run(fn, x, w, dy):
        x = x.detach().requires_grad_()
        y = fn(x, w)
        y.backward(dy)
        return y.double(), x.grad.double(), w.grad.double()

    ref = run(_naive_rms_norm, x64, w64.clone().requires_grad_(), dy64)
    ours = run(lambda x, w: norm(x), x64.to(dtype), norm.weight, dy64.to(dtype))
    plain = run(_naive_rms_norm, x64.to(dtype), w64.to(dtype).requires_grad_(), dy64.to(dtype))
    floor = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for name, a, b, r in zip(("y", "dx", "dw"), ours, plain, ref):
        err, plain_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2 * plain_err + floor * r.abs().max().item(), (name, err, plain_err)


@pytest.mark.parametrize("n_tokens", [3, 96])  # fewer tokens than channels (decode) and more (training)
def test_mlp_is_quick_gelu(n_tokens):
    """MLP computes c_proj(h * sigmoid(1.702 h)), h = c_fc(x), on both of its paths, gradients included."""
    torch.manual_seed(0)
    mlp = MLP(GPTConfig(n_embd=32, n_head=4)).double()
    x = torch.randn(1, n_tokens, 32, dtype=torch.float64, requires_grad=True)

    def naive(x, w_fc, w_proj):
        h = x @ w_fc.T
        return (h * torch.sigmoid(1.702 * h)) @ w_proj.T

    torch.testing.assert_close(mlp(x), naive(x, mlp.c_fc.weight, mlp.c_proj.weight), atol=1e-12, rtol=1e-12)
    g = torch.randn(1, n_tokens, 32, dtype=torch.float64)
    ours = torch.autograd.grad(mlp(x), (x, mlp.c_fc.weight, mlp.c_proj.weight), g)
    ref = torch.autograd.grad(naive(x, mlp.c_fc.weight, mlp.c_proj.weight), (x, mlp.c_fc.weight, mlp.c_proj.weight), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_classifier_head():
    torch.manual_seed(0)
    model = randomized(IGPT(tiny_config()))
    _, gen_ref = model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="classification head"):
        Classifier(model)
    model.add_classifier(10)
    assert model.config.n_classes == 10
    classify = Classifier(model)
    assert list(classify.state_dict()) == ["model." + k for k in model.state_dict()]
    idx = torch.randint(0, 16, (4, 16))
    labels = torch.randint(0, 10, (4,))
    clf_logits, gen_loss, clf_loss = classify(idx, idx, labels)
    assert torch.count_nonzero(clf_logits) == 0
    assert clf_loss.item() == pytest.approx(math.log(10), abs=1e-6)
    torch.testing.assert_close(gen_loss, model(idx, idx)[1])
    with torch.no_grad():
        model.clf_head.weight.normal_()
    ref = []
    naive_forward(model, idx, collect=ref)
    expected = ref[-1] @ model.clf_head.weight.double().T
    torch.testing.assert_close(classify(idx)[0].double(), expected, atol=1e-5, rtol=1e-5)
    rebuilt = IGPT(model.config)
    rebuilt.load_state_dict(model.state_dict())


def test_grad_checkpoint_same_gradients():
    torch.manual_seed(0)
    base = randomized(IGPT(tiny_config(objective="bert"))).train()
    ckpt = IGPT(tiny_config(objective="bert"), grad_checkpoint=True).train()
    ckpt.load_state_dict(base.state_dict())
    idx = torch.randint(0, 16, (2, 16))
    grads = []
    for model in (base, ckpt):
        torch.manual_seed(1)
        model.zero_grad()
        model(idx, idx)[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "sos" not in grads[0]  # BERT has no sos
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    model = IGPT(tiny_config())
    idx = torch.randint(0, 16, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for _ in range(150):
        _, loss = model(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # only pixel 0 of each image is unpredictable (both images start from sos): log(2)/16 floor
    assert loss.item() < 0.1


def test_presets_and_config_errors():
    assert PRESETS["igpt-l"]["n_embd"] // PRESETS["igpt-l"]["n_head"] == 96
    assert GPTConfig(**PRESETS["igpt-xl"]).n_ctx == 4096
    s = IGPT(GPTConfig(**{**PRESETS["igpt-s"], "n_layer": 1}))
    per_layer = 12 * 512 * 512
    assert s.num_params() - per_layer == pytest.approx(512 * 512 + 512 * 512 + 512 + 512 * 3, rel=1e-6)
    with pytest.raises(ValueError, match="objective"):
        GPTConfig(objective="mlm")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(TypeError):
        GPTConfig(impl="torch")  # how to run a model is not part of its architecture
    with pytest.raises(ValueError, match="impl"):
        IGPT(GPTConfig(n_layer=1), impl="cuda")


def test_triton_kernels_train_like_torch():
    """A few optimizer steps of a tiny model with impl="triton" (interpreter on CPU) track the
    torch path step by step."""
    kattn = pytest.importorskip("igpt_fast.kernels.flash_attention")
    if not hasattr(kattn, "flash_attention"):
        pytest.skip("igpt_fast.kernels.flash_attention has no flash_attention yet")
    kce = pytest.importorskip("igpt_fast.kernels.fused_cross_entropy")
    if not hasattr(kce, "triton_cross_entropy"):
        pytest.skip("igpt_fast.kernels.fused_cross_entropy has no triton_cross_entropy yet")
    losses = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        model = IGPT(tiny_config(n_px=4, n_layer=2, n_head=2, n_embd=64), impl=impl)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
        g = torch.Generator().manual_seed(0)
        losses[impl] = []
        for _ in range(5):
            idx = torch.randint(0, 16, (2, 16), generator=g)
            _, loss = model(idx, idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[impl].append(loss.item())
    assert losses["torch"][-1] < losses["torch"][0]
    for a, b in zip(losses["torch"], losses["triton"]):
        assert b == pytest.approx(a, abs=1e-3)
