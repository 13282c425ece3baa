"""HF ImageGPT <-> IGPT conversion. Import: logits parity with randomly initialised HF models of several
shapes (head dims 16, 96 and 32), every accepted source kind, old causal-mask buffers, and clear errors.
Export: HF logits equal ours for [sos] + x[:-1], HF's image processor gives our tokenizer's ids, a
HF -> IGPT -> HF round trip is bitwise exact (LM and classifier), the CLI in both directions and its
misuse errors. OpenAI's TensorFlow checkpoints (a TensorFlow-written fixture in tests/data) read without
TensorFlow, with logits equal to a numpy transcription of OpenAI's forward; hub ids from a locally built HF
cache; wrong kinds of file named in one line; exported file modes and generation_config.json. No internet: the
HF models are built from ImageGPTConfig with random weights."""
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
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors",
                                                   "preprocessor_config.json"]
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
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "generation_config.json", "model.safetensors"]
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
        (["convert", str(tmp_path / "palette.npy"), "--out", str(tmp_path / "x.pt")], "is a NumPy array (.npy)"),
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


# OpenAI's TensorFlow release, read without TensorFlow. tests/data/openai_tf/ was written once by TensorFlow's own
# Saver (tests/data/make_tf_checkpoint.py): a tiny iGPT in OpenAI's variable layout, three data shards, Adam slots,
# global_step, and float16 / bfloat16 / int64 tensors; expected.npz holds every tensor's values.
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TF_DIR = os.path.join(DATA, "openai_tf")
TF_PREFIX = os.path.join(TF_DIR, "model.ckpt-1000")


def tf_expected():
    with np.load(os.path.join(TF_DIR, "expected.npz")) as z:
        return {k.replace(".", "/"): z[k] for k in z.files}


def openai_logits(t, x, bert=False):
    """OpenAI's src/model.py forward in float64 numpy, written from its einsums: gen_logits for tokens x."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    n_layer = len({k.split("/")[1] for k in t if k.startswith("model/h")})

    def norm(h, g):
        return h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-5) * g

    h = t["model/wte"][x]  # (B, T, C)
    if not bert:
        h = np.concatenate([np.broadcast_to(t["model/sos"], (x.shape[0], 1, h.shape[2])), h[:, :-1]], axis=1)
    h = h + t["model/wpe"][: x.shape[1]]
    T = x.shape[1]
    for i in range(n_layer):
        p = f"model/h{i}/"
        a = norm(h, t[p + "ln_1/g"])
        q, k, v = (np.einsum("bsf,hef->bhse", a, t[p + f"attn/{n}_proj"]) for n in "qkv")  # (B, H, T, hd)
        w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(v.shape[-1])  # (B, H, T, T)
        if not bert:
            w = np.where(np.tril(np.ones((T, T), bool)), w, -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        h = h + np.einsum("bhse,hef->bsf", w @ v, t[p + "attn/c_proj"])
        m = norm(h, t[p + "ln_2/g"]) @ t[p + "mlp/c_fc/w"]
        h = h + (m / (1 + np.exp(-1.702 * m))) @ t[p + "mlp/c_proj/w"]
    return norm(h, t["model/ln_f/g"]) @ t["model/wtet"].T  # (B, T, n_vocab)


def test_tf_reader_reads_what_tensorflow_wrote(tmp_path):
    from igpt_fast.tf_checkpoint import read_tf_checkpoint, read_tf_index, tf_checkpoint_prefix

    for path in (TF_DIR, TF_PREFIX, TF_PREFIX + ".index", TF_PREFIX + ".data-00001-of-00003"):
        assert tf_checkpoint_prefix(path) == TF_PREFIX, path
    num_shards, entries = read_tf_index(TF_PREFIX)
    assert num_shards == 3 and {e["shard"] for e in entries.values()} == {0, 1, 2}
    assert entries["extra/bf16"]["dtype"] == "bfloat16" and entries["model/h1/attn/q_proj"]["shape"] == (2, 8, 16)
    tensors = read_tf_checkpoint(TF_PREFIX)
    expected = tf_expected()
    assert {"global_step", "beta1_power", "model/wte/Adam", "model/wte/Adam_1"} <= set(tensors)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype and np.array_equal(tensors[name], value), name
    # a `checkpoint` state file is followed when it names a checkpoint here, ignored when it names another machine's
    shutil.copytree(TF_DIR, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "/elsewhere/model.ckpt-5"\n')
    assert tf_checkpoint_prefix(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "model.ckpt-1000")
    for name in os.listdir(TF_DIR):
        if name.startswith("model.ckpt-1000."):
            shutil.copy(os.path.join(TF_DIR, name), tmp_path / "ckpt" / name.replace("-1000.", "-2000."))
    (tmp_path / "ckpt" / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-2000"\n')
    assert tf_checkpoint_prefix(tmp_path / "ckpt") == str(tmp_path / "ckpt" / "model.ckpt-2000")


def test_tf_reader_damage_is_one_line(tmp_path):
    from igpt_fast.tf_checkpoint import TFCheckpointError, read_tf_checkpoint, tf_checkpoint_prefix

    def copy(name):
        shutil.copytree(TF_DIR, tmp_path / name)
        return str(tmp_path / name / "model.ckpt-1000")

    prefix = copy("truncated")
    shard = prefix + ".data-00002-of-00003"
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    with pytest.raises(TFCheckpointError, match=r"data-00002-of-00003 is truncated"):
        read_tf_checkpoint(prefix)
    prefix = copy("missing")
    os.remove(prefix + ".data-00001-of-00003")
    with pytest.raises(TFCheckpointError, match=r"data-00001-of-00003 is missing"):
        read_tf_checkpoint(prefix)
    prefix = copy("flipped")
    index = bytearray(open(prefix + ".index", "rb").read())
    index[20] ^= 0x10  # inside the first data block
    open(prefix + ".index", "wb").write(bytes(index))
    with pytest.raises(TFCheckpointError, match="checksum"):
        read_tf_checkpoint(prefix)
    prefix = copy("notindex")
    open(prefix + ".index", "wb").write(b"\0" * 100)
    with pytest.raises(TFCheckpointError, match="not a TensorFlow checkpoint index"):
        read_tf_checkpoint(prefix)
    copy("two")
    shutil.copy(tmp_path / "two" / "model.ckpt-1000.index", tmp_path / "two" / "model.ckpt-5.index")
    with pytest.raises(TFCheckpointError, match="holds 2 TensorFlow checkpoints"):
        tf_checkpoint_prefix(tmp_path / "two")


@pytest.mark.parametrize("folder, bert", [("openai_tf", False), ("openai_tf_bert", True)])
def test_openai_checkpoint_logits_match_reference(folder, bert):
    """IGPT from OpenAI's TF layout gives the logits of OpenAI's own forward (float64 numpy, from its einsums):
    q/k/v_proj (n_head, hd, C) as [out, in], c_proj as [in, out], heads from the shape, optimizer slots skipped;
    without sos the checkpoint is a BERT-objective one (no shift, no causal mask)."""
    from igpt_fast.convert import from_openai_imagegpt

    model = from_openai_imagegpt(os.path.join(DATA, folder))
    c = model.config
    assert (c.n_vocab, c.n_px, c.n_embd, c.n_head, c.n_layer, c.objective) == (8, 3, 16, 2, 2, "bert" if bert else "ar")
    x = torch.randint(0, 8, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(x)
    expected = {k: v for k, v in tf_expected().items() if k.startswith("model/")}
    ref = openai_logits(expected, x.numpy(), bert=bert)
    torch.testing.assert_close(logits.double(), torch.from_numpy(ref), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConversionError, match="n_head=4 disagrees"):
        from_openai_imagegpt(os.path.join(DATA, folder), n_head=4)


def test_cli_openai_checkpoint_to_igpt_and_on_to_hf(tmp_path):
    """convert reads the TF folder (kmeans_centers.npy beside it becomes the palette) and the result exports to an
    HF folder whose logits for [sos] + x[:-1] are OpenAI's for x."""
    shutil.copytree(TF_DIR, tmp_path / "igpt-s")
    palette = random_palette(8)
    np.save(tmp_path / "igpt-s" / "kmeans_centers.npy", palette.centers)
    invoke = CliRunner().invoke
    res = invoke(cli, ["convert", str(tmp_path / "igpt-s"), "--out", str(tmp_path / "s.pt")])
    assert res.exit_code == 0 and f"palette {palette.sha256[:12]}" in res.output, res.output
    res = invoke(cli, ["convert", str(tmp_path / "s.pt"), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 8, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(torch.cat([torch.full((2, 1), 8), x[:, :-1]], dim=1)).logits
    expected = {k: v for k, v in tf_expected().items() if k.startswith("model/")}
    torch.testing.assert_close(ref.double(), torch.from_numpy(openai_logits(expected, x.numpy())), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(read_hf_palette(tmp_path / "hf"), palette.centers)
    res = invoke(cli, ["convert", TF_PREFIX + ".index", "--to", "hf", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "OpenAI TensorFlow checkpoint; to import it leave out --to hf" in res.output


def make_hub_cache(cache, repo_id, tmp_path):
    """A Hugging Face hub cache as `hf download` leaves it: blobs named by hash, a snapshot folder of links to
    them, refs/main naming the snapshot's commit."""
    import hashlib

    hf = hf_model(transformers.ImageGPTForCausalImageModeling, 4, 32, 2, 2)
    hf.save_pretrained(tmp_path / "saved")
    clusters = random_palette(16).centers.tolist()
    (tmp_path / "saved" / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters}))
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(tmp_path / "saved"):
        data = (tmp_path / "saved" / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, repo / "snapshots" / commit), repo / "snapshots" / commit / name)
    return hf


def test_hub_id_from_the_local_cache(tmp_path):
    """`convert openai/imagegpt-small` reads the model from the HF cache that HF_HOME names, offline, in a fresh
    process (huggingface_hub reads its environment once, at import)."""
    import subprocess
    import sys

    hf = make_hub_cache(tmp_path / "home" / "hub", "openai/imagegpt-small", tmp_path)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-c", "from igpt_fast.cli import main; main()", "convert", "openai/imagegpt-small", "--out",
           str(tmp_path / "s.pt")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "converted openai/imagegpt-small (Hugging Face cache: " in res.stdout and "palette" in res.stdout
    from igpt_fast.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(tmp_path / "s.pt")
    assert ckpt["source"] == "openai/imagegpt-small"
    x = torch.randint(0, 16, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model_from_checkpoint(ckpt)(x)[0], hf(hf_input(x)).logits, atol=1e-5, rtol=1e-5)


def test_hub_id_not_in_the_cache_names_the_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from igpt_fast.convert import resolve_source

    make_hub_cache(tmp_path / "hub", "openai/imagegpt-small", tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert os.path.isfile(os.path.join(resolve_source("openai/imagegpt-small"), "model.safetensors"))
    res = CliRunner().invoke(cli, ["convert", "openai/imagegpt-medium", "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "is neither a local path nor a model in the Hugging Face cache" in res.output
    assert "`hf download openai/imagegpt-medium`" in res.output and "HF_HUB_OFFLINE" not in res.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = CliRunner().invoke(cli, ["convert", "openai/imagegpt-medium", "--out", str(tmp_path / "m.pt")])
    assert "(HF_HUB_OFFLINE is set: unset it for the download)" in res.output
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "no" / "such" / "dir"), "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and "no such file or directory" in res.output


def test_wrong_kind_of_file_is_one_line_naming_it(tmp_path):
    """Every verb given a file of another kind says what it got and what it expected, in one line."""
    random_palette(16).save(tmp_path / "palette.npy")
    save_checkpoint(tmp_path / "model.pt", model_state(igpt_model(), random_palette(16)))
    import io
    import tarfile

    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        info = tarfile.TarInfo("000.tokens.npy")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    data = tmp_path / "data"
    data.mkdir()
    p = str(tmp_path)
    cases = [
        (["convert", f"{p}/palette.npy", "--out", f"{p}/x.pt"], "palette.npy is a NumPy array (.npy), float32 (16, 3): "
                                                                "expected a Hugging Face ImageGPT folder"),
        (["convert", f"{p}/train-000000.tar", "--out", f"{p}/x.pt"], "train-000000.tar is a tar archive"),
        (["convert", TF_PREFIX + ".index", "--out", f"{p}/x.pt", "--palette", f"{p}/model.pt"],
         "model.pt is a PyTorch file (torch.save), not a .npy palette"),
        (["sample", f"{p}/palette.npy", "--out", f"{p}/s"], "palette.npy is a NumPy array (.npy), float32 (16, 3), "
                                                            "not a readable igpt-fast checkpoint"),
        (["probe", f"{p}/train-000000.tar", "--data", str(data)], "train-000000.tar is a tar archive"),
        (["export", TF_PREFIX + ".index", "--out", f"{p}/e.pt"], "is a TensorFlow checkpoint index, not a readable "
                                                                   "igpt-fast checkpoint"),
        (["tokenize", f"{p}/images", "--palette", f"{p}/model.pt", "--out", f"{p}/tok"],
         "model.pt is a PyTorch file (torch.save), not a .npy palette"),
    ]
    for args, message in cases:
        res = CliRunner().invoke(cli, args)
        assert res.exit_code in (1, 2) and message in res.output, (args, res.output)
        assert "weights_only" not in res.output and "mmap" not in res.output and "Traceback" not in res.output
    from igpt_fast.convert import describe_file

    (tmp_path / "meta.json").write_text(json.dumps({"n_ctx": 16, "palette_sha256": "x"}))
    kinds = {TF_DIR: "a folder holding a TensorFlow checkpoint", TF_PREFIX + ".data-00001-of-00003":
             "a TensorFlow checkpoint data shard", f"{p}/images/a.png": "a PNG image",
             f"{p}/meta.json": "a tokenized data description (meta.json)",
             f"{p}/missing": "nothing (no such file or folder)"}
    for path, kind in kinds.items():
        assert describe_file(path) == kind, path


def test_export_modes_and_generation_config(tmp_path):
    """The HF folder's files get the ordinary mode (0644 under umask 022; safetensors alone would write 0600), and
    generation_config.json makes a bare generate() sample whole images from sos at temperature 1, no top-k."""
    old = os.umask(0o022)
    try:
        to_hf_imagegpt(igpt_model(), random_palette(16), tmp_path / "hf")
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "hf"):
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o777 == 0o644, name
    assert os.stat(tmp_path / "hf").st_mode & 0o777 == 0o755
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (gen.bos_token_id, gen.pad_token_id, gen.max_length, gen.do_sample, gen.top_k) == (16, 16, 17, True, 0)
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    torch.manual_seed(0)
    out = hf.generate(input_ids=torch.full((3, 1), 16))
    assert out.shape == (3, 17) and (out[:, 0] == 16).all() and (out[:, 1:] < 16).all()
    to_hf_imagegpt(igpt_model(n_classes=2), out_dir=tmp_path / "clf", head="classifier")
    assert not (tmp_path / "clf" / "generation_config.json").exists()
