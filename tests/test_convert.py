"""HF ImageGPT <-> IGPT conversion. Import: logits parity with randomly initialised HF models of several
shapes (head dims 16, 96 and 32), every accepted source kind, old causal-mask buffers, and clear errors.
Export: HF logits equal ours for [sos] + x[:-1], HF's image processor gives our tokenizer's ids, a
HF -> IGPT -> HF round trip is bitwise exact (LM and classifier), the CLI in both directions and its
misuse errors. No internet: the HF models are built from ImageGPTConfig with random weights."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from igpt_fast.checkpoint import model_state, save_checkpoint
from igpt_fast.cli import cli
from igpt_fast.errors import IGPTError
from igpt_fast.model import GPTConfig, IGPT
from igpt_fast.palette import Palette
from igpt_fast.tokenize import tokenize_images

transformers = pytest.importorskip("transformers")

from igpt_fast.convert import ConversionError, from_hf_imagegpt, read_hf_palette, to_hf_imagegpt  # noqa: E402

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


@torch.no_grad()
def clf_logits(model, x):
    """Our classifier's logits: clf_head of the average-pooled ln_f output (the last feature row)."""
    return model.clf_head(model.features(x)[:, -1])


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
    torch.testing.assert_close(clf_logits(ours, x), ref, atol=1e-5, rtol=1e-5)


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


def igpt_model(n_classes=0, objective="ar", seed=0, **shape):
    """An IGPT with random non-zero weights everywhere (lm_head and sos included)."""
    config = GPTConfig(**{**dict(n_px=4, n_vocab=16, n_layer=2, n_head=2, n_embd=32), **shape},
                       n_classes=n_classes, objective=objective)
    torch.manual_seed(seed)
    model = IGPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return model


def random_palette(k, seed=0):
    return Palette(np.random.default_rng(seed).uniform(-1, 1, (k, 3)).astype(np.float32))


@pytest.mark.parametrize("shape", SHAPES)
def test_export_logits_and_processor_match(shape, tmp_path):
    n_px, n_embd, n_head, n_layer = shape
    ours = igpt_model(n_px=n_px, n_embd=n_embd, n_head=n_head, n_layer=n_layer)
    palette = random_palette(16)
    to_hf_imagegpt(ours, palette, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # the temp folder is gone
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vocab_size == 17 and hf.config.n_positions == n_px * n_px
    assert hf.config.activation_function == "quick_gelu" and hf.config.layer_norm_epsilon == 1e-5
    assert torch.count_nonzero(hf.lm_head.weight) > 0
    x = torch.randint(0, 16, (3, n_px * n_px))
    with torch.no_grad():
        ref = hf(hf_input(x)).logits
        logits, _ = ours(x)
    torch.testing.assert_close(ref, logits, atol=1e-5, rtol=1e-5)
    processor = transformers.ImageGPTImageProcessor.from_pretrained(tmp_path / "hf")
    images = [Image.fromarray(a) for a in np.random.default_rng(1).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)]
    ids = processor(images, return_tensors="pt").input_ids
    np.testing.assert_array_equal(ids.numpy(), tokenize_images(images, palette, n_px=n_px).reshape(4, -1))


def assert_state_dicts_equal(a, b):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cls, head", [(transformers.ImageGPTForCausalImageModeling, "lm"),
                                       (transformers.ImageGPTForImageClassification, "classifier")])
def test_round_trip_hf_igpt_hf_is_exact(cls, head, tmp_path):
    hf = hf_model(cls, 4, 32, 2, 2, num_labels=5)
    hf.save_pretrained(tmp_path / "src")
    clusters = random_palette(16).centers.tolist()
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters}))
    ours = from_hf_imagegpt(tmp_path / "src")
    sd, config = to_hf_imagegpt(ours, read_hf_palette(tmp_path / "src"), tmp_path / "out", head=head)
    assert_state_dicts_equal(sd, hf.state_dict())
    back = cls.from_pretrained(tmp_path / "out").eval()
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())
    keys = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "activation_function", "layer_norm_epsilon")
    for key in keys + (("num_labels",) if head == "classifier" else ()):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    np.testing.assert_array_equal(read_hf_palette(tmp_path / "out"), read_hf_palette(tmp_path / "src"))


def test_export_classifier(tmp_path):
    ours = igpt_model(n_classes=3)
    x = torch.randint(0, 16, (2, 16))
    to_hf_imagegpt(ours, out_dir=tmp_path / "clf", head="classifier")
    hf = transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "clf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(hf_input(x)).logits, clf_logits(ours, x), atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "clf" / "preprocessor_config.json").exists()  # no palette given
    sd, config = to_hf_imagegpt(ours)  # the default drops the classifier, keeps the LM
    assert "score.weight" not in sd and "lm_head.weight" in sd
    assert config["architectures"] == ["ImageGPTForCausalImageModeling"]


def test_export_errors(tmp_path):
    assert issubclass(ConversionError, IGPTError) and issubclass(ConversionError, ValueError)
    with pytest.raises(ConversionError, match="autoregressive only"):
        to_hf_imagegpt(igpt_model(objective="bert"))
    with pytest.raises(ConversionError, match="no classification head"):
        to_hf_imagegpt(igpt_model(), head="classifier")
    with pytest.raises(ConversionError, match="n_vocab 16"):
        to_hf_imagegpt(igpt_model(), random_palette(8))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not an ImageGPT folder"):
        to_hf_imagegpt(igpt_model(), out_dir=tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    # an earlier export is replaced as a whole
    to_hf_imagegpt(igpt_model(seed=1), random_palette(16), tmp_path / "hf")
    model = igpt_model(seed=2)
    to_hf_imagegpt(model, out_dir=tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(from_hf_imagegpt(tmp_path / "hf").lm_head.weight, model.lm_head.weight)
    assert sorted(os.listdir(tmp_path)) == ["busy", "hf"]


def test_cli_both_directions_and_misuse(tmp_path):
    hf = hf_model(transformers.ImageGPTForCausalImageModeling, 4, 32, 2, 2)
    hf.save_pretrained(tmp_path / "hf")
    palette = random_palette(16)
    palette.save(tmp_path / "palette.npy")
    run = tmp_path / "run"
    run.mkdir()
    invoke = CliRunner().invoke
    res = invoke(cli, ["convert", str(tmp_path / "hf"), "--out", str(run / "ckpt.pt"), "--palette",
                       str(tmp_path / "palette.npy")])
    assert res.exit_code == 0, res.output
    res = invoke(cli, ["convert", str(run), "--to", "hf", "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    assert f"ImageGPTForCausalImageModeling | 2 layers, 32 wide, 2 heads, 4x4 | palette {palette.sha256[:12]}" \
        in res.output
    back = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "back")
    assert_state_dicts_equal(back.state_dict(), hf.state_dict())
    np.testing.assert_array_equal(read_hf_palette(tmp_path / "back"), palette.centers)

    misuse = [
        (["convert", str(run), "--out", str(tmp_path / "x.pt")], "pass --to hf"),
        (["convert", str(run / "ckpt.pt"), "--out", str(tmp_path / "x.pt")], "pass --to hf"),
        (["convert", str(tmp_path / "hf"), "--to", "hf", "--out", str(tmp_path / "x")], "leave out --to hf"),
        (["convert", str(run), "--to", "hf", "--n-head", "2", "--out", str(tmp_path / "x")], "--n-head is for"),
        (["convert", str(tmp_path / "hf"), "--head", "lm", "--out", str(tmp_path / "x.pt")], "--head is for"),
        (["convert", str(tmp_path / "hf"), "--out", str(tmp_path)], "is a folder"),
        (["convert", str(run), "--to", "hf", "--head", "classifier", "--out", str(tmp_path / "x")],
         "no classification head"),
        (["convert", str(tmp_path / "palette.npy"), "--out", str(tmp_path / "x.pt")], "not a readable checkpoint"),
        (["convert", str(tmp_path / "back"), "--palette", str(tmp_path / "palette.npy"), "--to", "hf", "--out",
          str(tmp_path / "x")], "leave out --to hf"),
    ]
    for args, message in misuse:
        res = invoke(cli, args)
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    other = random_palette(16, seed=5)
    other.save(tmp_path / "other.npy")
    res = invoke(cli, ["convert", str(run), "--to", "hf", "--palette", str(tmp_path / "other.npy"), "--out",
                       str(tmp_path / "x")])
    assert res.exit_code != 0 and "leave out --palette" in res.output
    assert not (tmp_path / "x").exists()


def test_cli_finetuned_run_and_bert_run(tmp_path):
    invoke = CliRunner().invoke
    save_checkpoint(tmp_path / "clf.pt", model_state(igpt_model(n_classes=3), random_palette(16)))
    res = invoke(cli, ["convert", str(tmp_path / "clf.pt"), "--to", "hf", "--out", str(tmp_path / "lm")])
    assert res.exit_code == 0 and "the 3-class head is left out (--head classifier exports it)" in res.output
    res = invoke(cli, ["convert", str(tmp_path / "clf.pt"), "--to", "hf", "--head", "classifier", "--out",
                       str(tmp_path / "clf")])
    assert res.exit_code == 0 and "ImageGPTForImageClassification" in res.output, res.output
    assert transformers.ImageGPTForImageClassification.from_pretrained(tmp_path / "clf").config.num_labels == 3
    save_checkpoint(tmp_path / "bert.pt", model_state(igpt_model(objective="bert"), None))
    res = invoke(cli, ["convert", str(tmp_path / "bert.pt"), "--to", "hf", "--out", str(tmp_path / "bert")])
    assert res.exit_code == 1 and "autoregressive only" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bert").exists()


def test_damaged_hf_folders_are_one_line_errors(tmp_path):
    """A config.json that is not JSON, a truncated safetensors file and a config that disagrees with the
    tensors (which converted silently before) each give one line naming the file or the key."""
    hf = hf_model(transformers.ImageGPTForCausalImageModeling, 4, 32, 2, 2)
    hf.save_pretrained(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "config.json").read_text())
    cases = {"notjson": ("config.json", "{not json", "config.json is not valid JSON"),
             "truncated": ("model.safetensors", None, "model.safetensors is truncated or damaged")}
    for key, value in [("n_embd", 64), ("n_layer", 3), ("vocab_size", 33), ("n_positions", 25), ("n_head", 3)]:
        cases[key] = ("config.json", json.dumps({**config, key: value}), f"config.json has {key}={value}")
    for name, (file, text, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(tmp_path / "good", folder)
        if text is None:
            data = (folder / file).read_bytes()
            (folder / file).write_bytes(data[: len(data) // 2])
        else:
            (folder / file).write_text(text)
        res = CliRunner().invoke(cli, ["convert", str(folder), "--out", str(tmp_path / f"{name}.pt")])
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, (name, res.output)
        assert message in res.output and "Traceback" not in res.output, (name, res.output)
        assert not (tmp_path / f"{name}.pt").exists()
