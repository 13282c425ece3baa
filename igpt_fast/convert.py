"""Hugging Face ImageGPT <-> IGPT, and OpenAI's TensorFlow release -> IGPT: import (from_hf_imagegpt,
from_openai_imagegpt) and export (to_hf_imagegpt).

Reference: transformers src/transformers/models/imagegpt/modeling_imagegpt.py,
configuration_imagegpt.py and image_processing_imagegpt.py; openai/image-gpt src/model.py.
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
  class has none) loads: config.json, model.safetensors (fp32 as stored), generation_config.json
  (head "lm": sample from sos, n_ctx tokens, temperature 1, no top-k), and, given the palette,
  preprocessor_config.json for `ImageGPTImageProcessor` (palette as `clusters`, bilinear squash resize
  to n_px, as `igpt-fast tokenize --resize squash`). HF -> IGPT -> HF gives back the same tensors bit
  for bit. BERT-objective models have no HF class (HF's ImageGPT is causal only): export refuses them.
- The palette: HF stores it as `clusters` in preprocessor_config.json (read_hf_palette).
- Hub ids: `openai/imagegpt-small` is read from the local Hugging Face cache (HF_HOME / HF_HUB_CACHE,
  resolved by huggingface_hub's snapshot_download(local_files_only=True): nothing is downloaded, so
  HF_HUB_OFFLINE changes nothing here); a model not in the cache is one line naming the command that
  fetches it (`hf download ID`, or `huggingface-cli download ID` with an older huggingface_hub).
- OpenAI's TensorFlow release (openai/image-gpt: model.ckpt-N.index + .data-*-of-* shards, and
  kmeans_centers.npy for the palette) is read without TensorFlow (igpt_fast.tf_checkpoint). Its
  variables (src/model.py, scope `model/`): wte (n_vocab, C), wpe (n_ctx, C), sos (C), wtet (the
  untied head, (n_vocab, C)), ln_f/g, h{i}/ln_1/g, h{i}/ln_2/g; h{i}/attn/{q,k,v}_proj of shape
  (n_head, C / n_head, C) used as einsum "bsf,hef->bhse" (output (h, e), input f: nn.Linear's layout
  once flattened, so the head count comes from the shape); h{i}/attn/c_proj of the same shape used as
  "bhse,hef->bsf" (input (h, e), output f: transposed for nn.Linear); h{i}/mlp/c_fc/w (C, 4C) and
  h{i}/mlp/c_proj/w (4C, C), [in, out]; clf/wclf (classes, C) after finetuning. No biases. A
  checkpoint without sos was trained with the BERT objective. Optimizer slots (.../Adam, .../Adam_1,
  beta powers, global_step) are skipped; any other variable is refused, naming it.
- describe_file(path), which names what a path holds so a verb given the wrong kind of file says what it
  got, lives in igpt_fast.filekind (checkpoint.py and palette.py use it too) and is still importable here.
"""
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Union

import torch

from igpt_fast.errors import ConversionError
from igpt_fast.filekind import HF_WEIGHT_FILES, describe_file
from igpt_fast.model import GPTConfig, IGPT

if TYPE_CHECKING:
    import numpy as np

    from igpt_fast.palette import Palette

__all__ = ["from_hf_imagegpt", "from_openai_imagegpt", "to_hf_imagegpt", "read_hf_palette", "read_openai_palette",
           "load_hf_state_dict", "resolve_source", "source_format", "describe_file", "ConversionError"]

# What from_hf_imagegpt reads: a folder, weights file or hub id; a state dict; a transformers ImageGPT model.
HFSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor], torch.nn.Module]
_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _hub_download_command(repo_id):
    """The command the installed huggingface_hub ships for downloading a model."""
    from importlib import metadata

    try:
        scripts = {e.name for e in metadata.distribution("huggingface_hub").entry_points}
    except metadata.PackageNotFoundError:
        return f"pip install huggingface_hub, then: hf download {repo_id}"
    return f"hf download {repo_id}" if "hf" in scripts else f"huggingface-cli download {repo_id}"


def resolve_source(source: str | os.PathLike[str]) -> str:
    """A local path for a conversion source: an existing path as it is, a TF checkpoint prefix
    (PREFIX.index exists) as it is, or a Hugging Face hub id ("openai/imagegpt-small") as its snapshot
    folder in the local HF cache. ConversionError, one line, otherwise: for a hub id not in the cache, the
    command that downloads it."""
    from igpt_fast.tf_checkpoint import tf_checkpoint_prefix

    source = os.fspath(source)
    if os.path.exists(source) or tf_checkpoint_prefix(source):
        return source
    if not re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", source):
        raise ConversionError(f"no such file or directory: {source}")
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError
    except ImportError:
        raise ConversionError(f"no such file or directory: {source} (to read a Hugging Face hub id from the local "
                              "cache, pip install huggingface_hub)") from None
    offline = " (HF_HUB_OFFLINE is set: unset it for the download)" if constants.HF_HUB_OFFLINE else ""
    try:
        return snapshot_download(source, local_files_only=True)
    except IncompleteSnapshotError:
        raise ConversionError(f"the Hugging Face cache ({constants.HF_HUB_CACHE}) holds {source} only in part; "
                              f"complete it with `{_hub_download_command(source)}`{offline}") from None
    except LocalEntryNotFoundError:
        raise ConversionError(f"{source} is neither a local path nor a model in the Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}); download it first with `{_hub_download_command(source)}`"
                              f"{offline}, or pass the folder it is in") from None
    except HFValidationError:
        raise ConversionError(f"no such file or directory: {source}") from None


_TF_SKIP = re.compile(r"(^|/)(Adam|Adam_1|adam_m|adam_v|Momentum|ExponentialMovingAverage|global_step|beta1_power|"
                      r"beta2_power)$")


def read_openai_palette(source: str | os.PathLike[str]) -> "np.ndarray | None":
    """The (k, 3) float32 kmeans_centers.npy beside an OpenAI checkpoint (its folder), or None."""
    from igpt_fast.palette import Palette

    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    path = os.path.join(folder, "kmeans_centers.npy")
    return Palette.load(path).centers if os.path.isfile(path) else None


def from_openai_imagegpt(source: str | os.PathLike[str], n_head: int | None = None) -> IGPT:
    """Build an IGPT (fp32, eval mode) from an OpenAI image-gpt TensorFlow checkpoint: a folder holding
    one, its .index file, a data shard or its prefix (model.ckpt-1000000). Variable layout: see the
    module docstring. The head count comes from the q_proj shape (n_head, if given, must agree)."""
    from dataclasses import replace

    from igpt_fast.tf_checkpoint import read_tf_checkpoint, read_tf_index, tf_checkpoint_prefix

    prefix = tf_checkpoint_prefix(source)
    if prefix is None:
        raise ConversionError(f"{source} is {describe_file(source)}, not a TensorFlow checkpoint")
    _, entries = read_tf_index(prefix)
    names = [n for n in entries if n.startswith("model/") and not _TF_SKIP.search(n)]
    if "model/wte" not in names or "model/wpe" not in names:
        raise ConversionError(f"{prefix} is a TensorFlow checkpoint without model/wte and model/wpe: not an "
                              "OpenAI image-gpt checkpoint")
    arrays = read_tf_checkpoint(prefix, names)
    tf = {n[len("model/"):]: torch.from_numpy(a.astype("float32")) for n, a in arrays.items()}
    n_vocab, C = tf["wte"].shape
    known = {"wte", "wpe", "wtet", "sos", "ln_f/g", "clf/wclf"}
    layers = sorted({int(m.group(1)) for n in tf if (m := re.match(r"h(\d+)/", n))})
    for i in layers:
        known |= {f"h{i}/{n}" for n in ("ln_1/g", "ln_2/g", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/c_proj",
                                        "mlp/c_fc/w", "mlp/c_proj/w")}
    unknown = sorted(set(tf) - known)
    if unknown:
        raise ConversionError(f"{prefix}: unexpected variables that IGPT cannot represent: "
                              f"{', '.join('model/' + n for n in unknown[:5])}")
    q0 = tf.get("h0/attn/q_proj")
    if q0 is not None and q0.dim() == 3:
        if n_head is not None and n_head != q0.shape[0]:
            raise ConversionError(f"n_head={n_head} disagrees with the checkpoint (model/h0/attn/q_proj has "
                                  f"{q0.shape[0]} heads)")
        n_head = q0.shape[0]
    ln_f = tf.get("ln_f/g")
    if ln_f is None:
        raise ConversionError(f"{prefix}: model/ln_f/g is missing")
    sos = tf.get("sos")
    sd = {"wte.weight": torch.cat([tf["wte"], (sos if sos is not None else torch.zeros(C))[None]]),  # (n_vocab + 1, C)
          "wpe.weight": tf["wpe"], "ln_f.weight": ln_f}
    if "wtet" in tf:
        sd["lm_head.weight"] = tf["wtet"]
    if "clf/wclf" in tf:
        sd["score.weight"] = tf["clf/wclf"]
    try:
        for i in layers:
            p, g = f"h.{i}.", f"h{i}/"
            flat = {n: tf[g + "attn/" + n].reshape(C, C) for n in ("q_proj", "k_proj", "v_proj", "c_proj")}
            sd[p + "ln_1.weight"], sd[p + "ln_2.weight"] = tf[g + "ln_1/g"], tf[g + "ln_2/g"]
            # q/k/v: [out (h, e), in f] -> HF Conv1D [in, out], q | k | v along out
            sd[p + "attn.c_attn.weight"] = torch.cat([flat["q_proj"], flat["k_proj"], flat["v_proj"]]).t()  # (C, 3C)
            sd[p + "attn.c_proj.weight"] = flat["c_proj"]  # [in (h, e), out f]: Conv1D's layout already
            sd[p + "mlp.c_fc.weight"] = tf[g + "mlp/c_fc/w"].reshape(C, 4 * C)
            sd[p + "mlp.c_proj.weight"] = tf[g + "mlp/c_proj/w"].reshape(4 * C, C)
    except KeyError as e:
        raise ConversionError(f"{prefix}: model/{e.args[0]} is missing") from None
    except RuntimeError as e:  # a reshape that does not fit n_embd
        raise ConversionError(f"{prefix}: a layer's weights do not fit n_embd {C}: {str(e)[:200]}") from None
    model = from_hf_imagegpt(sd, n_head=n_head)
    if sos is None:  # trained with the BERT objective: no sos, no causal mask
        bert = IGPT(replace(model.config, objective="bert"))
        bert.load_state_dict(model.state_dict())
        model = bert.eval()
    return model


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
    kind = describe_file(path)
    if kind not in ("a PyTorch file (torch.save)", "a Python pickle (a legacy torch.save file?)"):
        raise ConversionError(f"{path} is {kind}, not a weights file (model.safetensors, pytorch_model.bin)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConversionError(f"{path} holds Python objects besides tensors, which are not loaded (loading them "
                              "could run code): not a weights file") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is truncated or not a weights file: {first}") from None


def load_hf_state_dict(source: HFSource) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, HF config dict or None) from a directory, a weights file, a state dict or a model."""
    if isinstance(source, Mapping):
        return dict(source), None
    if isinstance(source, torch.nn.Module):  # a transformers ImageGPT model
        hf_config: Any = source.config
        return source.state_dict(), hf_config.to_dict()
    path = resolve_source(source)
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
        for name in HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, name)):
                return _load_weights_file(os.path.join(path, name)), hf_config
        raise ConversionError(f"{path} has none of {', '.join(HF_WEIGHT_FILES)}")
    return _load_weights_file(path), None


def read_hf_palette(directory: str | os.PathLike[str]) -> "np.ndarray | None":
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


def from_hf_imagegpt(source: HFSource, n_head: int | None = None) -> IGPT:
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


def source_format(path: str | os.PathLike[str]) -> str:
    """"hf" for an HF ImageGPT folder or weights file, "openai" for an OpenAI TensorFlow checkpoint, "igpt"
    for an igpt-fast run folder or checkpoint; ConversionError, naming what path holds, for anything else.
    path must be local (resolve_source first). Lets the CLI tell a user which direction they meant."""
    from igpt_fast.checkpoint import CheckpointError, resolve_checkpoint
    from igpt_fast.tf_checkpoint import TFCheckpointError, tf_checkpoint_prefix

    path = os.fspath(path)
    expected = ("expected a Hugging Face ImageGPT folder or weights file (config.json + model.safetensors), an "
                "OpenAI TensorFlow checkpoint (model.ckpt-N.index + data shards) or an igpt-fast run or checkpoint")
    try:
        if tf_checkpoint_prefix(path) is not None:
            return "openai"
    except TFCheckpointError as e:
        raise ConversionError(str(e)) from None
    if os.path.isdir(path):
        try:
            resolve_checkpoint(path)  # a run folder (or a sharded checkpoint folder)
            return "igpt"
        except CheckpointError:
            if os.path.isfile(os.path.join(path, "config.json")) and any(
                    os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHT_FILES):
                return "hf"
        raise ConversionError(f"{path} is {describe_file(path)}: {expected}")
    if not os.path.isfile(path):
        raise ConversionError(f"no such file or directory: {path}")
    kind = describe_file(path)
    if kind == "a safetensors file" or path.endswith(".index.json"):
        return "hf"
    if kind not in ("a PyTorch file (torch.save)", "a Python pickle (a legacy torch.save file?)"):
        raise ConversionError(f"{path} is {kind}: {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind.startswith("a PyTorch"))
    except pickle.UnpicklingError:
        raise ConversionError(f"{path} is a pickle holding Python objects besides tensors, which are not loaded "
                              f"(loading them could run code): {expected}") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} is not a readable checkpoint: {first}") from None
    if isinstance(obj, Mapping) and "model_config" in obj:
        return "igpt"
    if isinstance(obj, Mapping) and any(k in obj for k in ("wte.weight", "transformer.wte.weight")):
        return "hf"
    raise ConversionError(f"{path} is a PyTorch file holding neither an igpt-fast checkpoint nor ImageGPT weights: "
                          f"{expected}")


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


def to_hf_imagegpt(model: IGPT, palette: "Palette | np.ndarray | torch.Tensor | None" = None,
                   out_dir: str | os.PathLike[str] | None = None,
                   head: str = "lm") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
                         None if clusters is None else _preprocessor_config(clusters, config.n_px),
                         _generation_config(config) if head == "lm" else None)
    return sd, hf_config


def _is_hf_export(path):
    """True when path holds the config.json of an ImageGPT model."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("model_type") == "imagegpt"
    except (OSError, ValueError):
        return False


def _generation_config(config):
    """generation_config.json for ImageGPTForCausalImageModeling.generate: start from sos (id n_vocab; HF
    has no separate end or pad token, so sos stands for both and is never sampled: the head has n_vocab
    outputs), sample n_ctx tokens at temperature 1 from the full distribution, as OpenAI did (top_k 0:
    transformers' default of 50 would truncate it)."""
    sos = config.n_vocab
    return {"bos_token_id": sos, "eos_token_id": sos, "pad_token_id": sos, "decoder_start_token_id": sos,
            "max_length": config.n_ctx + 1, "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_hf_folder(out_dir, state_dict, hf_config, preprocessor, generation=None):
    """Write the folder through igpt_fast.atomic.atomic_path (a temp folder beside out_dir, renamed into
    place). An existing out_dir is replaced only when it is empty or an earlier ImageGPT export. Files get
    the ordinary mode (0666 less the umask): safetensors writes model.safetensors 0600."""
    from igpt_fast.atomic import atomic_path

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
    old = f"{out_dir}.old{os.getpid()}"
    files = {"config.json": hf_config, "preprocessor_config.json": preprocessor, "generation_config.json": generation}
    try:
        with atomic_path(out_dir) as tmp:
            os.makedirs(tmp)
            weights = os.path.join(tmp, "model.safetensors")
            save_file(state_dict, weights, metadata={"format": "pt"})
            os.chmod(weights, 0o666 & ~_umask())
            for name, obj in files.items():
                if obj is not None:
                    with open(os.path.join(tmp, name), "w") as f:
                        json.dump(obj, f, indent=2)
                        f.write("\n")
            if os.path.isdir(out_dir) and os.listdir(out_dir):  # an earlier export: set aside, removed below
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out_dir, old)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(out_dir):
            os.replace(old, out_dir)  # the rename failed: the earlier export stays
        raise
    shutil.rmtree(old, ignore_errors=True)
