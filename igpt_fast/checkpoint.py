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

Sharded checkpoints (FSDP runs, `RUN/ckpt.dcp/`): a torch.distributed.checkpoint (DCP) folder in
which every rank wrote its shard of {"model": ..., "optimizer": ...} (the FQN-keyed state dicts of
torch.distributed.checkpoint.state_dict.get_state_dict), plus `info.json`, written by rank 0: every
other entry above (the palette and RNG states as base64 tensors). DCP stores global tensor shapes,
so the folder loads on any number of ranks, with FSDP or DDP (`load_sharded_state`), and without
torch.distributed at all (`load_checkpoint`: the model's full tensors, no optimizer). `igpt-fast
export` (`export_checkpoint`) turns either kind into one ckpt.pt-style file. DCP's own metadata is a
pickle: load sharded folders you trust, hand others the exported file.

Writes are atomic: a file goes to PATH.tmp (fsynced), a DCP folder to PATH.tmp/ (each rank's file
fsynced, then info.json), and is renamed over PATH, so a crash leaves the previous checkpoint or the
new one, never half of one. `keep_previous` first renames the run's current checkpoint, of either
kind, to ckpt.prev.pt / ckpt.prev.dcp (dropping the older one), so a run always has its last two
checkpoints and at most one of each name pair, even when it switches between DDP and FSDP.

Version 1 files (before the architecture/runtime split) saved `impl` and `grad_checkpoint` in
model_config; they are dropped on load with a note, and a `scheduler` entry is ignored (the
learning rate is a function of the step and the training config).
"""
import base64
import json
import os
import pickle
import shutil
import warnings
import zipfile
from dataclasses import asdict, fields

import torch

from igpt_fast.errors import IGPTError

__all__ = ["CKPT_NAME", "PREV_NAME", "DCP_NAME", "DCP_PREV_NAME", "FORMAT_VERSION", "CheckpointError",
           "is_sharded", "latest_checkpoint", "resolve_checkpoint", "save_checkpoint", "save_sharded_checkpoint",
           "load_checkpoint", "load_sharded_state", "load_full_optimizer_state", "checkpoint_step",
           "restore_previous", "remove_checkpoints", "model_state", "run_info", "model_from_checkpoint",
           "palette_from_checkpoint", "export_checkpoint"]

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
DCP_NAME = "ckpt.dcp"
DCP_PREV_NAME = "ckpt.prev.dcp"
INFO_NAME = "info.json"  # inside a DCP folder: everything but the model and optimizer tensors
FORMAT_VERSION = 2
_RUNTIME_KEYS = ("impl", "grad_checkpoint")  # version 1 kept these in model_config
_PREVIOUS = {CKPT_NAME: PREV_NAME, DCP_NAME: DCP_PREV_NAME}  # a run's latest checkpoint -> the one before
_ONE_PROCESS_NOTE = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's warning, start


class CheckpointError(IGPTError, ValueError):
    """A path that is not a readable igpt-fast checkpoint, or a checkpoint that does not fit a model."""


def is_sharded(path):
    """True for a torch.distributed.checkpoint folder (it holds .metadata)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def _sharded_twin(name):
    return os.path.splitext(name)[0] + ".dcp"  # ckpt.pt -> ckpt.dcp


def latest_checkpoint(run_dir, name=CKPT_NAME):
    """RUN/name or its sharded twin (ckpt.pt / ckpt.dcp), whichever exists (the newer if both); None."""
    candidates = [p for p in (os.path.join(run_dir, name), os.path.join(run_dir, _sharded_twin(name)))
                  if os.path.isfile(p) or is_sharded(p)]
    return max(candidates, key=os.path.getmtime) if candidates else None


def resolve_checkpoint(run, name=CKPT_NAME):
    """RUN folder (RUN/name or RUN/ckpt.dcp), checkpoint file or DCP folder -> the checkpoint path;
    CheckpointError if missing."""
    run = os.fspath(run)
    if is_sharded(run):
        return run
    path = (latest_checkpoint(run, name) or os.path.join(run, name)) if os.path.isdir(run) else run
    if not (os.path.isfile(path) or is_sharded(path)):
        hint = ("train first (`igpt-fast train DATA --out RUN`) or pass a checkpoint file"
                if os.path.isdir(run) else "pass a run folder or a checkpoint file")
        raise CheckpointError(f"{path} not found; {hint}")
    return path


def _discard(path):
    """Remove a file or folder; a folder is renamed away first, so no half-deleted one keeps its name."""
    if os.path.isdir(path):
        trash = path + ".old"
        if os.path.isdir(trash):
            shutil.rmtree(trash)
        os.replace(path, trash)
        shutil.rmtree(trash)
    elif os.path.lexists(path):
        os.remove(path)


def _install(tmp, path, keep_previous):
    """Rename the finished tmp (file or folder) to path. keep_previous: the run's current checkpoint (of
    either kind) becomes its ckpt.prev.* first and the older ckpt.prev.* goes."""
    folder = os.path.dirname(path)
    current = [n for n in _PREVIOUS if os.path.lexists(os.path.join(folder, n))] if keep_previous else []
    if current:
        for prev in _PREVIOUS.values():
            if not (prev == PREV_NAME and current == [CKPT_NAME]):  # a file replaces a file atomically below
                _discard(os.path.join(folder, prev))
        for name in current:
            os.replace(os.path.join(folder, name), os.path.join(folder, _PREVIOUS[name]))
    if os.path.isdir(path):
        _discard(path)
    os.replace(tmp, path)


def save_checkpoint(path, state, keep_previous=False):
    """torch.save(state) to path.tmp, fsync, rename over path. keep_previous: the run's current checkpoint
    (ckpt.pt or ckpt.dcp beside path) becomes ckpt.prev.pt / ckpt.prev.dcp first."""
    path = os.fspath(path)
    state = {"version": FORMAT_VERSION, **state}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _install(tmp, path, keep_previous)


def _to_json(obj):
    """Tensors -> {"__tensor__": dtype, "shape", "data": base64 of the bytes}; tuples -> lists."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "data": base64.b64encode(data).decode("ascii")}
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tensor__" in obj:
        data = bytearray(base64.b64decode(obj["data"]))
        dtype = getattr(torch, obj["__tensor__"])
        flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(obj["shape"]).clone()
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return obj


def save_sharded_checkpoint(path, model, optimizer, info, keep_previous=False):
    """Collective (every rank calls it): the model's and optimizer's shards to the DCP folder path.tmp/,
    `info` (run_info's dict) to path.tmp/info.json by rank 0, then the folder renamed to path (see
    save_checkpoint for keep_previous). Every rank must see the same path (a shared filesystem)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = os.fspath(path)
    tmp = path + ".tmp"
    rank0 = dist.get_rank() == 0
    if rank0:
        _discard(tmp)  # what a crashed save left
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
    dist.barrier()
    if rank0:
        with open(os.path.join(tmp, INFO_NAME), "w") as f:
            json.dump(_to_json({"version": FORMAT_VERSION, **info}), f)
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, path, keep_previous)
    dist.barrier()


def _read_info(path):
    where = os.path.join(path, INFO_NAME)
    if not os.path.isfile(where):
        raise CheckpointError(f"{path} is a torch.distributed.checkpoint folder but not an igpt-fast checkpoint "
                              f"(no {INFO_NAME})")
    try:
        with open(where) as f:
            info = _from_json(json.load(f))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where} is damaged: {str(e)[:200]}") from None
    if not isinstance(info, dict) or "model_config" not in info:
        raise CheckpointError(f"{where} is not an igpt-fast checkpoint description (no model_config)")
    return info


def _load_sharded_model(path):
    """The full tensors of a DCP folder's model, read in this process alone (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(path)
    try:
        entries = reader.read_metadata().state_dict_metadata
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{path}: cannot read the DCP metadata: {str(e)[:200]}") from None
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
             if k.startswith("model.") and hasattr(m, "size")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTE)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def load_checkpoint(run, map_location="cpu", weights=True):
    """The checkpoint dict of a run folder, file (weights_only=True) or DCP folder; CheckpointError, one
    line, for a file that is not an igpt-fast checkpoint, is truncated, or comes from a newer igpt-fast.
    A DCP folder gives the full model tensors (weights=False: none) and no optimizer (sharded optimizer
    state is for resuming training: load_sharded_state)."""
    path = resolve_checkpoint(run)
    if is_sharded(path):
        ckpt = _read_info(path)
        if weights:
            ckpt["model"] = {k: v.to(map_location) for k, v in _load_sharded_model(path).items()}
        ckpt["sharded"] = True
    else:
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


def checkpoint_step(path):
    """The step of a checkpoint file or DCP folder, without reading its tensors."""
    if is_sharded(path):
        return _read_info(path)["step"]
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


def load_sharded_state(path, model, optimizer):
    """Collective when a process group is up: fill `model` (FSDP-sharded or plain, on any number of ranks)
    and `optimizer` from the DCP folder `path`; DCP reshards from the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTE)  # a single process without a group: intended
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer_state(model, optimizer, saved):
    """Load a plain optimizer state dict (a ckpt.pt's: parameters numbered in param_groups order) into the
    optimizer of a sharded `model`; both optimizers must group the parameters the same way."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    numbers = [i for g in saved["param_groups"] for i in g["params"]]
    if len(names) != len(numbers):
        raise CheckpointError(f"the saved optimizer holds {len(numbers)} parameters, the model {len(names)}")
    by_number = dict(zip(numbers, names))
    by_name = {"state": {by_number[i]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [by_number[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def restore_previous(run_dir):
    """Divergence rollback: the run's latest checkpoint goes and its previous one (ckpt.prev.pt or
    ckpt.prev.dcp) takes the latest name of its kind. Returns that path, or None when there was none
    (then the run has no checkpoint left)."""
    prev = next(((name, p) for name, p in _PREVIOUS.items() if os.path.lexists(os.path.join(run_dir, p))), None)
    for name in _PREVIOUS:
        if prev is None or not (name == prev[0] == CKPT_NAME):  # a file is replaced atomically below
            _discard(os.path.join(run_dir, name))
    if prev is None:
        return None
    path = os.path.join(run_dir, prev[0])
    os.replace(os.path.join(run_dir, prev[1]), path)
    return path


def remove_checkpoints(run_dir):
    """Remove a run's checkpoints of both kinds and any unfinished temporary ones."""
    for name in (*_PREVIOUS, *_PREVIOUS.values()):
        for suffix in ("", ".tmp"):
            _discard(os.path.join(run_dir, name + suffix))


def run_info(config, palette, step=0, **training):
    """Everything a checkpoint holds but the weights: config (a GPTConfig), Palette (or None), step and
    the training entries (data_step, rng, train_config, ...) passed through."""
    return {"model_config": asdict(config),
            "palette": None if palette is None else torch.from_numpy(palette.centers.copy()),
            "palette_sha256": None if palette is None else palette.sha256, "step": step, **training}


def model_state(model, palette, step=0, **training):
    """The dict save_checkpoint writes for `model` (unwrapped IGPT) and its Palette (or None); training
    entries (optimizer, data_step, rng, train_config, ...) are passed through."""
    return {"model": model.state_dict(), **run_info(model.config, palette, step, **training)}


def model_from_checkpoint(ckpt, impl="auto", grad_checkpoint=False):
    """The IGPT a checkpoint (dict, run folder, file or DCP folder) describes, built from its own config,
    with the run-time choices given here. A missing, unexpected or misshapen key raises CheckpointError
    naming it."""
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


def export_checkpoint(run, out):
    """Write the latest checkpoint of RUN (run folder, ckpt.pt or DCP folder) as one file at `out` that
    loads without torch.distributed: the model's full weights, config, palette, step, samples seen and
    training config (no optimizer or RNG state: resume training from the run itself). Returns the
    source checkpoint's dict."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise CheckpointError(f"{out} is a folder; export writes one checkpoint file (e.g. {out}/model.pt)")
    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt)  # checks that the weights fit the config
    keep = {k: ckpt[k] for k in ("model_config", "palette", "palette_sha256", "step", "samples_seen",
                                 "train_config", "extra") if k in ckpt}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(out, {**keep, "model": model.state_dict(), "source": os.path.abspath(ckpt["path"])})
    return ckpt
