"""The checkpoint format of igpt-fast: one module writes, reads, finds and rebuilds from it.

A checkpoint is one `torch.save`d dict (`RUN/ckpt.pt`), loadable with `weights_only=True`:

    version        FORMAT_VERSION (2); version 1 files load too (see below)
    model          the unwrapped IGPT's state dict
    model_config   GPTConfig as a dict: the architecture only (how to run a model -- impl,
                   activation checkpointing, compile, dtype -- is chosen by whoever loads it)
    palette        float32 (k, 3) tensor in [-1, 1], or None (a converted model without one)
    palette_sha256 the palette's sha256 (Palette.sha256), or None
    step           optimizer steps taken
    and, for a training state: optimizer, data_step (micro-batches each rank consumed),
    samples_seen, world_size, rng (one state per rank), train_config (TrainConfig as a dict),
    extra (free-form: e.g. the val accuracy of a finetuning best.pt).

Writes are atomic: the dict goes to PATH.tmp, is fsynced, and renamed over PATH, so a crash leaves
the previous file or the new one, never half of one. `keep_previous` first renames the current file
to ckpt.prev.pt, so a run always has its last two checkpoints.

Version 1 files (before the architecture/runtime split) saved `impl` and `grad_checkpoint` in
model_config; they are dropped on load with a note, and a `scheduler` entry is ignored (the
learning rate is a function of the step and the training config).
"""
import os
import pickle
import warnings
import zipfile
from dataclasses import asdict, fields

import torch

from igpt_fast.errors import IGPTError

__all__ = ["CKPT_NAME", "PREV_NAME", "FORMAT_VERSION", "CheckpointError", "resolve_checkpoint", "save_checkpoint",
           "load_checkpoint", "model_state", "model_from_checkpoint", "palette_from_checkpoint"]

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
FORMAT_VERSION = 2
_RUNTIME_KEYS = ("impl", "grad_checkpoint")  # version 1 kept these in model_config


class CheckpointError(IGPTError, ValueError):
    """A path that is not a readable igpt-fast checkpoint, or a checkpoint that does not fit a model."""


def resolve_checkpoint(run, name=CKPT_NAME):
    """RUN folder (RUN/name) or checkpoint file -> the checkpoint path; CheckpointError if missing."""
    run = os.fspath(run)
    path = os.path.join(run, name) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        hint = ("train first (`igpt-fast train DATA --out RUN`) or pass a checkpoint file"
                if os.path.isdir(run) else "pass a run folder or a checkpoint file")
        raise CheckpointError(f"{path} not found; {hint}")
    return path


def save_checkpoint(path, state, keep_previous=False):
    """torch.save(state) to path.tmp, fsync, rename over path. keep_previous: an existing path becomes
    ckpt.prev.pt (beside it) first."""
    path = os.fspath(path)
    state = {"version": FORMAT_VERSION, **state}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and os.path.isfile(path):
        os.replace(path, os.path.join(os.path.dirname(path), PREV_NAME))
    os.replace(tmp, path)


def load_checkpoint(run, map_location="cpu"):
    """The checkpoint dict of a run folder or file (weights_only=True); CheckpointError, one line, for a
    file that is not an igpt-fast checkpoint, is truncated, or comes from a newer igpt-fast."""
    path = resolve_checkpoint(run)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable igpt-fast checkpoint (truncated or another kind of "
                              f"file): {first[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{path} is a torch file but not an igpt-fast checkpoint (no model / model_config)")
    version = ckpt.get("version", 1)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this igpt-fast reads up to "
                              f"{FORMAT_VERSION}: upgrade igpt-fast")
    dropped = [k for k in _RUNTIME_KEYS if k in ckpt["model_config"]]
    if dropped:
        ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k not in _RUNTIME_KEYS}
        warnings.warn(f"{path}: format {version} checkpoint; ignoring the saved run-time setting(s) "
                      f"{', '.join(dropped)} (chosen when the model is run, e.g. --impl)", stacklevel=2)
    ckpt["version"] = FORMAT_VERSION
    ckpt["path"] = path
    return ckpt


def model_state(model, palette, step=0, **training):
    """The dict save_checkpoint writes for `model` (unwrapped IGPT) and its Palette (or None); training
    entries (optimizer, data_step, rng, train_config, ...) are passed through."""
    return {"model": model.state_dict(), "model_config": asdict(model.config),
            "palette": None if palette is None else torch.from_numpy(palette.centers.copy()),
            "palette_sha256": None if palette is None else palette.sha256, "step": step, **training}


def model_from_checkpoint(ckpt, impl="auto", grad_checkpoint=False):
    """The IGPT a checkpoint (dict, run folder or file) describes, built from its own config, with the
    run-time choices given here. A missing, unexpected or misshapen key raises CheckpointError naming it."""
    from igpt_fast.model import GPTConfig, IGPT

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(ckpt["model_config"]) - known)
    if unknown:
        raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')}: unknown model_config field(s) "
                              f"{', '.join(unknown)}; it was written by a newer igpt-fast")
    model = IGPT(GPTConfig(**ckpt["model_config"]), impl=impl, grad_checkpoint=grad_checkpoint)
    expected = model.state_dict()
    got = ckpt["model"]
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    bad = [f"{k} {tuple(got[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
           if k in got and tuple(got[k].shape) != tuple(v.shape)]
    if missing or extra or bad:
        what = "; ".join(s for s in (f"missing {', '.join(missing[:5])}" if missing else "",
                                     f"unexpected {', '.join(extra[:5])}" if extra else "",
                                     f"shape {', '.join(bad[:5])}" if bad else "") if s)
        raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')}: weights do not fit its config: {what}")
    model.load_state_dict(got)
    return model


def palette_from_checkpoint(ckpt):
    """The Palette stored in a checkpoint dict, or None."""
    from igpt_fast.palette import Palette

    return Palette(ckpt["palette"].numpy()) if ckpt.get("palette") is not None else None
