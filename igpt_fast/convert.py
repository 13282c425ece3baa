"""Hugging Face ImageGPT <-> IGPT: import (from_hf_imagegpt) and export (to_hf_imagegpt).

Reference: transformers src/transformers/models/imagegpt/modeling_imagegpt.py,
configuration_imagegpt.py and image_processing_imagegpt.py.
- HF vocab is n_vocab + 1: row n_vocab (512) of `wte.weight` is the sos vector; HF never adds it, so
  HF logits for input [512] + x[:-1] equal IGPT logits for x.
- HF Conv1D weights are [in, out] (transposed for nn.Linear); c_attn fuses q | k | v in that column
  order, which is IGPT's fused c_attn row order once transposed.
- HF linears carry biases that iGPT does not have; they must be zero (checked, never dropped silently)
  on import, and are written as zeros on export.
- HF's ImageGPTLayerNorm is iGPT's norm (x / sqrt(mean(x^2) + eps) * g, no mean, no bias): the
  weights map one to one.
- Old checkpoints carry causal-mask buffers (`attn.bias` of shape (1, 1, n, n), `attn.masked_bias`);
  they are ignored.
- Accepted import sources: a save_pretrained / hub-snapshot directory (config.json + model.safetensors,
  a sharded *.index.json, or pytorch_model.bin), a weights file or a state dict (n_head then
  required: it is not in the weights), or an HF model object. Heads: ImageGPTModel (no head: the
  lm_head stays zero), ImageGPTForCausalImageModeling (lm_head), ImageGPTForImageClassification
  (score -> IGPT's classification head, which pools ln_f like HF).
- Export writes a folder that `ImageGPTForCausalImageModeling.from_pretrained` (head="lm", the
  default: a finetuned model's classification head is left out) or
  `ImageGPTForImageClassification.from_pretrained` (head="classifier": the lm_head is left out, as HF's
  class has none) loads: config.json, model.safetensors (fp32 as stored), and, given the palette,
  preprocessor_config.json for `ImageGPTImageProcessor` (palette as `clusters`, bilinear squash resize
  to n_px, as `igpt-fast tokenize --resize squash`). HF -> IGPT -> HF gives back the same tensors bit
  for bit. BERT-objective models have no HF class (HF's ImageGPT is causal only): export refuses them.
- The palette: HF stores it as `clusters` in preprocessor_config.json (read_hf_palette).
"""
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping

import torch

from igpt_fast.errors import IGPTError
from igpt_fast.model import GPTConfig, IGPT

__all__ = ["from_hf_imagegpt", "to_hf_imagegpt", "read_hf_palette", "load_hf_state_dict", "source_format",
           "ConversionError"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class ConversionError(IGPTError, ValueError):
    """A checkpoint that cannot be mapped exactly between HF ImageGPT and IGPT."""


def _load_weights_file(path):
    """The tensors of a .safetensors, sharded .index.json or pytorch_model.bin file; ConversionError, one
    line naming the file, for a truncated or damaged one."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise ConversionError(f"{path} is truncated or damaged: {str(e).splitlines()[0][:200]}") from None
    if path.endswith(".index.json"):
        try:
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{path} is not a valid weights index: {str(e)[:200]}") from None
        sd = {}
        for shard in shards:
            sd.update(_load_weights_file(os.path.join(os.path.dirname(path), shard)))
        return sd
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is truncated or not a weights file: {first}") from None


def load_hf_state_dict(source):
    """(state dict, HF config dict or None) from a directory, a weights file, a state dict or a model."""
    if isinstance(source, Mapping):
        return dict(source), None
    if hasattr(source, "state_dict") and hasattr(source, "config"):
        return source.state_dict(), source.config.to_dict()
    path = os.fspath(source)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConversionError(f"{path} has no config.json; pass the weights file and n_head instead")
        try:
            with open(cfg_path) as f:
                hf_config = json.load(f)
        except ValueError as e:
            raise ConversionError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(hf_config, dict):
            raise ConversionError(f"{cfg_path} is not an ImageGPT config (a JSON object)")
        for name in _WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return _load_weights_file(os.path.join(path, name)), hf_config
        raise ConversionError(f"{path} has none of {', '.join(_WEIGHT_FILES)}")
    if os.path.isfile(path):
        return _load_weights_file(path), None
    raise ConversionError(f"no such file or directory: {path}")


def read_hf_palette(directory):
    """The (k, 3) float32 colour clusters of an HF snapshot's preprocessor_config.json, or None."""
    import numpy as np

    path = os.path.join(os.fspath(directory), "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        clusters = json.load(f).get("clusters")
    return None if clusters is None else np.asarray(clusters, dtype=np.float32)


def _check_hf_config(hf_config):
    """Reject HF options that change the maths IGPT implements."""
    expected = dict(activation_function="quick_gelu", scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    for key, value in expected.items():
        if key in hf_config and hf_config[key] != value:
            raise ConversionError(f"HF config has {key}={hf_config[key]!r}; IGPT implements {key}={value!r}")
    n_inner = hf_config.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf_config["n_embd"]:
        raise ConversionError(f"HF config has n_inner={n_inner}; IGPT's MLP is 4 * n_embd wide")
    if abs(hf_config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise ConversionError(f"HF config has layer_norm_epsilon={hf_config['layer_norm_epsilon']}; IGPT uses 1e-5")


def from_hf_imagegpt(source, n_head=None):
    """Build an IGPT (fp32, eval mode) from an HF ImageGPT checkpoint; see the module docstring.

    n_head is required when source carries no config (a weights file or a state dict); when both
    exist they must agree. Raises ConversionError on non-zero biases or unsupported options."""
    sd, hf_config = load_hf_state_dict(source)
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in sd.items()}
    if hf_config is not None:
        _check_hf_config(hf_config)
        if n_head is not None and n_head != hf_config.get("n_head"):
            raise ConversionError(f"n_head={n_head} disagrees with the checkpoint's config "
                                  f"(n_head={hf_config.get('n_head')})")
        n_head = hf_config.get("n_head")
    if n_head is None:
        raise ConversionError("this source has no config.json: pass n_head (e.g. 8 for imagegpt-small)")
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        raise ConversionError("not an ImageGPT state dict: wte.weight / wpe.weight missing")

    n_vocab = sd["wte.weight"].shape[0] - 1
    n_ctx, n_embd = sd["wpe.weight"].shape
    n_px = math.isqrt(n_ctx)
    if n_px * n_px != n_ctx:
        raise ConversionError(f"{n_ctx} positions is not a square image")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
    n_layer = len(layers)
    if layers != set(range(n_layer)):
        raise ConversionError(f"layer indices are not contiguous: {sorted(layers)}")
    n_classes = sd["score.weight"].shape[0] if "score.weight" in sd else 0
    if hf_config is not None:  # the config must describe these tensors: a disagreement is refused, naming the key
        where = (os.path.join(os.fspath(source), "config.json") if isinstance(source, (str, os.PathLike))
                 else "the HF config")
        for key, actual in (("vocab_size", n_vocab + 1), ("n_positions", n_ctx), ("n_embd", n_embd),
                            ("n_layer", n_layer)):
            if key in hf_config and hf_config[key] != actual:
                raise ConversionError(f"{where} has {key}={hf_config[key]!r} but the weights have {actual}: the "
                                      "config and the weights do not belong together")
    if not isinstance(n_head, int) or n_head < 1 or n_embd % n_head:
        raise ConversionError(f"{where if hf_config is not None else 'n_head'} has n_head={n_head!r}, which does not "
                              f"divide the weights' n_embd {n_embd}")
    config = GPTConfig(n_px=n_px, n_vocab=n_vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                       objective="ar", n_classes=n_classes)

    for key, value in sd.items():
        if key.endswith(".bias") and not re.fullmatch(r"h\.\d+\.attn\.bias", key):
            if value.abs().max().item() != 0.0:
                raise ConversionError(f"{key} is non-zero (max |b| = {value.abs().max().item():.3g}); "
                                      "IGPT has no biases, so this checkpoint cannot be converted exactly")

    ours = {
        "wte.weight": sd["wte.weight"][:n_vocab],
        "sos": sd["wte.weight"][n_vocab],
        "wpe.weight": sd["wpe.weight"],
        "ln_f.weight": sd["ln_f.weight"],
        "lm_head.weight": sd.get("lm_head.weight", torch.zeros(n_vocab, n_embd)),
    }
    if n_classes:
        ours["clf_head.weight"] = sd["score.weight"]
    for i in range(n_layer):
        p = f"h.{i}."
        ours[p + "ln_1.weight"] = sd[p + "ln_1.weight"]
        ours[p + "ln_2.weight"] = sd[p + "ln_2.weight"]
        for name in _LINEARS:
            ours[p + name + ".weight"] = sd[p + name + ".weight"].t()  # Conv1D [in, out] -> Linear [out, in]
    known = set(ours) | {"wte.weight", "score.weight"}
    known |= {f"h.{i}.{name}.weight" for i in range(n_layer) for name in _LINEARS}
    left = [k for k in sd if k not in known and not k.endswith("bias")]
    if left:
        raise ConversionError(f"unexpected tensors that IGPT cannot represent: {', '.join(sorted(left)[:5])}")
    model = IGPT(config)
    target = model.state_dict()
    for key, value in ours.items():
        if value.shape != target[key].shape:
            raise ConversionError(f"{key}: HF tensor has shape {tuple(value.shape)}, IGPT expects {tuple(target[key].shape)}")
    model.load_state_dict({k: v.float().contiguous() for k, v in ours.items()}, strict=True)
    return model.eval()


def source_format(path):
    """"hf" for an HF ImageGPT folder or weights file, "igpt" for an igpt-fast run folder or checkpoint;
    ConversionError for anything else. Lets the CLI tell a user which direction they meant."""
    from igpt_fast.checkpoint import CheckpointError, resolve_checkpoint

    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            resolve_checkpoint(path)  # a run folder (or a sharded checkpoint folder)
            return "igpt"
        except CheckpointError:
            if os.path.isfile(os.path.join(path, "config.json")) and any(
                    os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
                return "hf"
        raise ConversionError(f"{path} is neither an igpt-fast run (no checkpoint) nor a Hugging Face ImageGPT "
                              f"folder (config.json + one of {', '.join(_WEIGHT_FILES)})")
    if not os.path.isfile(path):
        raise ConversionError(f"no such file or directory: {path}")
    if path.endswith((".safetensors", ".index.json")):
        return "hf"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is not a readable checkpoint: {first}") from None
    if isinstance(obj, Mapping) and "model_config" in obj:
        return "igpt"
    if isinstance(obj, Mapping) and any(k in obj for k in ("wte.weight", "transformer.wte.weight")):
        return "hf"
    raise ConversionError(f"{path} holds neither an igpt-fast checkpoint nor ImageGPT weights")


def _hf_config(config, head, dropout):
    """The config.json of transformers' ImageGPTConfig for an IGPT config."""
    hf = dict(model_type="imagegpt", vocab_size=config.n_vocab + 1, n_positions=config.n_ctx, n_embd=config.n_embd,
              n_layer=config.n_layer, n_head=config.n_head, n_inner=None, activation_function="quick_gelu",
              resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
              initializer_range=0.02, scale_attn_weights=True, use_cache=True, tie_word_embeddings=False,
              scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, add_cross_attention=False)
    if head == "classifier":
        hf["architectures"] = ["ImageGPTForImageClassification"]
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.n_classes)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(config.n_classes)}
    else:
        hf["architectures"] = ["ImageGPTForCausalImageModeling"]
    return hf


def _preprocessor_config(clusters, n_px):
    """preprocessor_config.json of ImageGPTImageProcessor: bilinear squash to n_px, x / 127.5 - 1, nearest cluster."""
    return {"image_processor_type": "ImageGPTImageProcessor", "clusters": clusters.tolist(),
            "do_color_quantize": True, "do_normalize": True, "do_resize": True,
            "size": {"height": n_px, "width": n_px}, "resample": 2}


def to_hf_imagegpt(model, palette=None, out_dir=None, head="lm"):
    """IGPT -> (HF state dict, HF config dict); with out_dir, also write the HF folder (see the
    module docstring) atomically: a temp folder beside out_dir, renamed into place.

    head "lm": ImageGPTForCausalImageModeling (a classification head, if any, is left out);
    "classifier": ImageGPTForImageClassification (needs config.n_classes > 0; the lm_head is left out).
    palette: a Palette, a (n_vocab, 3) array or tensor in [-1, 1], or None (no preprocessor_config.json).
    Raises ConversionError for BERT-objective models and impossible requests."""
    import numpy as np

    config = model.config
    if config.objective != "ar":
        raise ConversionError(f"this model was trained with the {config.objective!r} objective; Hugging Face's "
                              "ImageGPT is autoregressive only, so there is no HF model to export it to")
    if head not in ("lm", "classifier"):
        raise ConversionError(f"head must be 'lm' or 'classifier', got {head!r}")
    if head == "classifier" and model.clf_head is None:
        raise ConversionError("this model has no classification head to export (finetune it first, or export "
                              "head='lm')")
    clusters = None
    if palette is not None:
        clusters = np.asarray(getattr(palette, "centers", palette), dtype=np.float32)
        if clusters.shape != (config.n_vocab, 3):
            raise ConversionError(f"the palette has shape {clusters.shape} but the model has n_vocab "
                                  f"{config.n_vocab}: pass the palette the model was trained with")

    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    C = config.n_embd
    zeros = {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
    sd = {"transformer.wte.weight": torch.cat([ours["wte.weight"], ours["sos"][None]], dim=0),  # (n_vocab + 1, C)
          "transformer.wpe.weight": ours["wpe.weight"]}
    for i in range(config.n_layer):
        p = f"h.{i}."
        sd["transformer." + p + "ln_1.weight"] = ours[p + "ln_1.weight"]
        sd["transformer." + p + "ln_2.weight"] = ours[p + "ln_2.weight"]
        for name in _LINEARS:
            w = ours[p + name + ".weight"]
            sd["transformer." + p + name + ".weight"] = w.t()  # Linear [out, in] -> Conv1D [in, out]
            sd["transformer." + p + name + ".bias"] = torch.zeros(zeros[name], dtype=w.dtype)
    sd["transformer.ln_f.weight"] = ours["ln_f.weight"]
    if head == "lm":
        sd["lm_head.weight"] = ours["lm_head.weight"]
    else:
        sd["score.weight"] = ours["clf_head.weight"]
    sd = {k: v.contiguous() for k, v in sd.items()}
    hf_config = _hf_config(config, head, config.dropout)
    if out_dir is not None:
        _write_hf_folder(os.fspath(out_dir), sd, hf_config,
                         None if clusters is None else _preprocessor_config(clusters, config.n_px))
    return sd, hf_config


def _is_hf_export(path):
    """True when path holds the config.json of an ImageGPT model."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") == "imagegpt"
    except (OSError, ValueError):
        return False


def _write_hf_folder(out_dir, state_dict, hf_config, preprocessor):
    """Write the files into a temp folder beside out_dir, then rename it into place. An existing
    out_dir is replaced only when it is empty or an earlier ImageGPT export."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConversionError("writing model.safetensors needs the safetensors package: pip install safetensors") \
            from None
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise ConversionError(f"{out_dir} is a file; the Hugging Face export is a folder: choose another --out")
        if os.listdir(out_dir) and not _is_hf_export(out_dir):
            raise ConversionError(f"{out_dir} exists and is not an ImageGPT folder; choose a new or empty --out")
    out_dir = os.path.abspath(out_dir)
    tmp, old = f"{out_dir}.tmp{os.getpid()}", f"{out_dir}.old{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this pid
    os.makedirs(tmp)
    try:
        save_file(state_dict, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        files = {"config.json": hf_config}
        if preprocessor is not None:
            files["preprocessor_config.json"] = preprocessor
        for name, obj in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
        if os.path.isdir(out_dir):
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
