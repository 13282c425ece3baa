"""HF ImageGPT -> IGPT conversion: logits parity with randomly initialised HF models of several shapes
(head dims 16, 96 and 32), every accepted source kind, old causal-mask buffers, and clear errors.
No internet: the HF models are built from ImageGPTConfig with random weights."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from igpt_fast.convert import ConversionError, from_hf_imagegpt, read_hf_palette  # noqa: E402

SHAPES = [  # (n_px, n_embd, n_head, n_layer)
    (4, 32, 2, 2),
    (3, 192, 2, 1),  # head dim 96, as iGPT-L
    (5, 64, 2, 3),
]


def hf_model(cls, n_px, n_embd, n_head, n_layer, seed=0, num_labels=3):
    cfg = transformers.ImageGPTConfig(vocab_size=17, n_positions=n_px * n_px, n_embd=n_embd, n_head=n_head,
                                      n_layer=n_layer, num_labels=num_labels)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def hf_input(x):
    return torch.cat([torch.full((x.shape[0], 1), 16), x[:, :-1]], dim=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_causal_lm_logits_match(shape, tmp_path):
    hf = hf_model(transformers.ImageGPTForCausalImageModeling, *shape)
    hf.save_pretrained(tmp_path)
    ours = from_hf_imagegpt(tmp_path)
    assert (ours.config.n_px, ours.config.n_embd, ours.config.n_head, ours.config.n_layer) == shape
    assert ours.config.n_vocab == 16
    x = torch.randint(0, 16, (3, shape[0] ** 2))
    with torch.no_grad():
        ref = hf(hf_input(x)).logits
    logits, _ = ours(x)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.sos, hf.transformer.wte.weight[16])


def test_base_model_features_and_bin_with_mask_buffers(tmp_path):
    n_px, n_embd, n_head, n_layer = 4, 32, 4, 3
    hf = hf_model(transformers.ImageGPTModel, n_px, n_embd, n_head, n_layer)
    sd = dict(hf.state_dict())
    for i in range(n_layer):  # old checkpoints carry causal-mask buffers
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16, dtype=torch.uint8)).view(1, 1, 16, 16)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours = from_hf_imagegpt(tmp_path)
    assert torch.count_nonzero(ours.lm_head.weight) == 0
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        out = hf(hf_input(x), output_hidden_states=True)
        ref = [hf.h[i].ln_1(out.hidden_states[i]).mean(1) for i in range(n_layer)]
        ref.append(out.last_hidden_state.mean(1))
    torch.testing.assert_close(ours.features(x), torch.stack(ref, 1), atol=1e-5, rtol=1e-5)
    # the same weights as a bare file or a state dict need n_head
    with pytest.raises(ConversionError, match="n_head"):
        from_hf_imagegpt(tmp_path / "pytorch_model.bin")
    again = from_hf_imagegpt(tmp_path / "pytorch_model.bin", n_head=n_head)
    torch.testing.assert_close(again.features(x), ours.features(x))
    from_hf_imagegpt(sd, n_head=n_head)
    with pytest.raises(ConversionError, match="disagrees"):
        from_hf_imagegpt(tmp_path, n_head=2)


def test_classification_head(tmp_path):
    hf = hf_model(transformers.ImageGPTForImageClassification, 4, 32, 2, 2, num_labels=5)
    ours = from_hf_imagegpt(hf)
    assert ours.config.n_classes == 5
    x = torch.randint(0, 16, (3, 16))
    with torch.no_grad():
        ref = hf(hf_input(x)).logits
    torch.testing.assert_close(ours.classify(x)[0], ref, atol=1e-5, rtol=1e-5)


def test_nonzero_bias_and_bad_options_rejected(tmp_path):
    hf = hf_model(transformers.ImageGPTForCausalImageModeling, 4, 32, 2, 2)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.bias[3] = 0.5
    with pytest.raises(ConversionError, match=r"h\.1\.mlp\.c_fc\.bias is non-zero"):
        from_hf_imagegpt(hf)
    hf = hf_model(transformers.ImageGPTForCausalImageModeling, 4, 32, 2, 2)
    hf.config.activation_function = "gelu_new"
    with pytest.raises(ConversionError, match="activation_function"):
        from_hf_imagegpt(hf)
    with pytest.raises(ConversionError, match="no such file"):
        from_hf_imagegpt(tmp_path / "missing")
    with pytest.raises(ConversionError, match="config.json"):
        from_hf_imagegpt(tmp_path)


def test_read_hf_palette(tmp_path):
    clusters = np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters.tolist()}))
    np.testing.assert_array_equal(read_hf_palette(tmp_path), clusters)
    assert read_hf_palette(tmp_path / "nothing") is None
