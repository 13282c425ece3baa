"""Hugging Face ImageGPT checkpoints -> IGPT (from_hf_imagegpt) and the converted-checkpoint file.

Reference: transformers src/transformers/models/imagegpt/modeling_imagegpt.py and
configuration_imagegpt.py; docs/IGPT_REFERENCE.md ("HF ImageGPT compatibility").
- HF vocab is n_vocab + 1: row n_vocab (512) of `wte.weight` is the sos vector; HF never adds it, so
  HF logits for input [512] + x[:-1] equal IGPT logits for x.
- HF Conv1D weights are [in, out] (transposed for nn.Linear); c_attn fuses q | k | v in that column
  order, which is IGPT's fused c_attn row order once transposed.
- HF linears carry biases that iGPT does not have; they must be zero (checked, never dropped silently).
- Old checkpoints carry causal-mask buffers (`attn.bias` of shape (1, 1, n, n), `attn.masked_bias`);
  they are ignored.
- Accepted sources: a save_pretrained / hub-snapshot directory (config.json + model.safetensors,
  a sharded *.index.json, or pytorch_model.bin), a weights file or a state dict (n_head then
  required: it is not in the weights), or an HF model object. Heads: ImageGPTModel (no head: the
  lm_head stays zero), ImageGPTForCausalImageModeling (lm_head), ImageGPTForImageClassification
  (score -> IGPT's classification head, which pools ln_f like HF).
- The palette: HF stores it as `clusters` in preprocessor_config.json (read_hf_palette).
"""
import json
import math
import os
import re
from collections.abc import Mapping

import torch

from igpt_fast.model import GPTConfig, IGPT

__all__ = ["from_hf_imagegpt", "read_hf_palette", "load_hf_state_dict", "ConversionError"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class ConversionError(ValueError):
    """An HF checkpoint that cannot be mapped onto IGPT exactly."""


def _load_weights_file(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_load_weights_file(os.path.join(os.path.dirname(path), shard)))
        return sd
    return torch.load(path, map_location="cpu", weights_only=True)


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
        with open(cfg_path) as f:
            hf_config = json.load(f)
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
        if n_head is not None and n_head != hf_config["n_head"]:
            raise ConversionError(f"n_head={n_head} disagrees with the checkpoint's config (n_head={hf_config['n_head']})")
        n_head = hf_config["n_head"]
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
