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

Sharded checkpoints (FSDP runs, `RUN/ckpt.dcp/`) are a torch.distributed.checkpoint (DCP) folder
holding every rank's shard of the model and optimizer plus `info.json` (every other entry above). That
format, and the restricted reader of DCP's pickled metadata, is igpt_fast.sharded; its public names
are importable from here too. `load_checkpoint` reads either kind (a DCP folder: the model's full
tensors, no optimizer) and `igpt-fast export` (`export_checkpoint`) turns either into one ckpt.pt-style
file. ckpt.pt files load with weights_only=True.

Replacing a checkpoint leaves no moment in which no complete checkpoint sits under a name a resume
looks at (a kill -9 may land anywhere). A file is written to a temp name (atomic.atomic_path: fsynced,
renamed over ckpt.pt); with keep_previous the current ckpt.pt is first hard-linked to ckpt.prev.pt
(replacing the older one), so ckpt.pt names a complete checkpoint throughout. A DCP folder is written
to ckpt.dcp.tmp/ (every rank's files fsynced, then info.json, the mark of a complete folder), then
ckpt.dcp is renamed to ckpt.prev.dcp and ckpt.dcp.tmp to ckpt.dcp: between those two renames the
newest complete checkpoint is the temp folder. `recover_checkpoint` (run by `train --resume auto`)
therefore looks at the current, the previous and any temp checkpoint, verifies each (it loads; for DCP:
info.json and .metadata readable and every shard present and long enough), takes the newest complete
one by step, puts it under its current name, and clears what a killed save left. Switching kinds (DDP
<-> FSDP) keeps the last two checkpoints and at most one of each name pair.
Disk full during a save is one OutputError line; the previous checkpoint stays as it was.

Refusals, each one CheckpointError line: weights holding NaN or inf (model_from_checkpoint, naming the
tensor), a weights-only file given to a resume (check_resumable: exported and converted files have no
optimizer or data position), and an export or conversion aimed at a run's own files (check_output).

Version 1 files (before the architecture/runtime split) saved `impl` and `grad_checkpoint` in
model_config; they are dropped on load with a note, and a `scheduler` entry is ignored (the
learning rate is a function of the step and the training config).
"""
import errno
import os
import pickle
import re
import shutil
import warnings
import zipfile
from dataclasses import asdict, fields
from typing import IO, TYPE_CHECKING, Any, Union, cast

import torch

from igpt_fast.atomic import atomic_path, fsync_dir, output_error
from igpt_fast.errors import CheckpointError
from igpt_fast.filekind import describe_file
from igpt_fast.sharded import (first_os_error, is_sharded, load_full_optimizer_state, load_sharded_model,
                               load_sharded_state, read_info, read_metadata, write_sharded_folder)

if TYPE_CHECKING:
    from igpt_fast.model import IGPT
    from igpt_fast.palette import Palette

# A checkpoint as the loaders take it: a run folder, a ckpt.pt-style file or a DCP folder
CheckpointPath = Union[str, "os.PathLike[str]"]

__all__ = ["CKPT_NAME", "PREV_NAME", "DCP_NAME", "DCP_PREV_NAME", "FORMAT_VERSION", "CheckpointError",
           "is_sharded", "latest_checkpoint", "resolve_checkpoint", "save_checkpoint", "save_sharded_checkpoint",
           "load_checkpoint", "load_sharded_state", "load_full_optimizer_state", "checkpoint_step",
           "restore_previous", "remove_checkpoints", "model_state", "run_info", "model_from_checkpoint",
           "palette_from_checkpoint", "export_checkpoint", "recover_checkpoint", "run_files", "RUN_FILES",
           "check_resumable", "check_output", "load_run"]

CKPT_NAME = "ckpt.pt"
PREV_NAME = "ckpt.prev.pt"
DCP_NAME = "ckpt.dcp"
DCP_PREV_NAME = "ckpt.prev.dcp"
FORMAT_VERSION = 2
_RUNTIME_KEYS = ("impl", "grad_checkpoint")  # version 1 kept these in model_config
_PREVIOUS = {CKPT_NAME: PREV_NAME, DCP_NAME: DCP_PREV_NAME}  # a run's latest checkpoint -> the one before
_PREVIOUS_KIND = {**{n: n for n in _PREVIOUS}, **{p: n for n, p in _PREVIOUS.items()}}  # any of the four -> its kind


def _sharded_twin(name):
    return os.path.splitext(name)[0] + ".dcp"  # ckpt.pt -> ckpt.dcp


_TEMP = re.compile(r"^(ckpt\.(?:prev\.)?(?:pt|dcp))\.(tmp(?:\.\d+\.\d+)?|old|damaged)$")  # killed saves' leftovers
RUN_FILES = ("config.json", "log.jsonl")  # with any ckpt* entry: what makes a folder a run


def _candidates(run_dir):
    """{name: role} of the run's checkpoint entries: "current" (ckpt.pt, ckpt.dcp), "previous"
    (ckpt.prev.*), "temp" (ckpt.pt.tmp*, ckpt.dcp.tmp*: a save that may have finished) and "junk"
    (other leftovers of a killed save, and damaged checkpoints set aside)."""
    found = {}
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else ():
        m = _TEMP.match(name)
        if name in _PREVIOUS:
            found[name] = "current"
        elif name in _PREVIOUS.values():
            found[name] = "previous"
        elif m and m.group(1) in _PREVIOUS and m.group(2).startswith("tmp"):
            found[name] = "temp"
        elif m:
            found[name] = "junk"
    return found


def _verified_step(path):
    """The step of a complete checkpoint file or DCP folder; CheckpointError saying what is wrong otherwise."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(f"{path} has no .metadata (an unfinished save)")
        info = read_info(path)
        read_metadata(path)
        return int(info["step"])
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is incomplete or damaged: {first[:200]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "step" not in ckpt:
        raise CheckpointError(f"{path} is not an igpt-fast checkpoint")
    return int(ckpt["step"])


_RANK = {"current": 0, "temp": 1, "previous": 2}  # among checkpoints of one step, the name preferred


def _complete_checkpoints(run_dir):
    """([(step, name, role)] of the complete checkpoints, newest first; {name: why} of the others)."""
    good, bad = [], {}
    for name, role in _candidates(run_dir).items():
        if role == "junk":
            continue
        try:
            good.append((_verified_step(os.path.join(run_dir, name)), name, role))
        except CheckpointError as e:
            bad[name] = str(e)
    good.sort(key=lambda c: (-c[0], _RANK[c[2]], c[1]))
    return good, bad


def run_files(run_dir):
    """The names in run_dir that belong to a run (config.json, log.jsonl, any ckpt* entry), sorted."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(n for n in os.listdir(run_dir) if n in RUN_FILES or n.startswith("ckpt"))


def latest_checkpoint(run_dir, name=CKPT_NAME):
    """RUN/name or its sharded twin (ckpt.pt / ckpt.dcp), whichever exists (the newer if both); when
    neither does (a run killed mid-save, before `recover_checkpoint`), the newest complete previous or
    temp checkpoint; None when there is no complete one. Changes nothing."""
    candidates = [p for p in (os.path.join(run_dir, name), os.path.join(run_dir, _sharded_twin(name)))
                  if os.path.isfile(p) or is_sharded(p)]
    if candidates:
        return max(candidates, key=os.path.getmtime)
    if name != CKPT_NAME:
        return None
    good, _ = _complete_checkpoints(run_dir)
    return os.path.join(run_dir, good[0][1]) if good else None


def recover_checkpoint(run_dir):
    """After a crash (main process, before a resume): the newest complete checkpoint among the current,
    previous and temp ones (each verified) takes its current name, as the interrupted save or rollback
    would have left it, and what a killed save left is cleared. Returns (its path, notes: one line per
    thing changed), or (None, why each checkpoint found is incomplete) leaving the folder as it was."""
    if not os.path.isdir(run_dir):
        return None, []
    good, bad = _complete_checkpoints(run_dir)
    notes = []
    chosen = None
    if good:
        step, name, role = good[0]
        kind = _PREVIOUS_KIND[name.split(".tmp")[0]]
        target = os.path.join(run_dir, kind)
        if role != "current":
            for damaged in (n for n in (kind, _other_kind(kind)) if n in bad):
                os.replace(os.path.join(run_dir, damaged), os.path.join(run_dir, damaged + ".damaged"))
                notes.append(f"{damaged} set aside as {damaged}.damaged: {bad.pop(damaged)}")
            if role == "temp":  # the save was killed after its checkpoint was complete: finish it
                kept = _before_install(target, keep_previous=True)
                os.replace(os.path.join(run_dir, name), target)
                _after_install(target, True, kept)
            else:  # a rollback or a folder save killed between its renames: the previous one is the latest
                if os.path.lexists(target):
                    _discard(target)
                os.replace(os.path.join(run_dir, name), target)
                _after_install(target, True, False)
            fsync_dir(run_dir)
            notes.append(f"{name} (step {step}) is the newest complete checkpoint: now {kind}")
        chosen = target
    else:  # nothing to resume: say why each candidate is not one, and leave them all in place
        return None, [why for name, why in bad.items()]
    for name, role in _candidates(run_dir).items():
        if role in ("temp", "junk") and not name.endswith(".damaged"):
            _discard(os.path.join(run_dir, name))
    return chosen, notes


def resolve_checkpoint(run, name=CKPT_NAME):
    """RUN folder (RUN/name or RUN/ckpt.dcp; see latest_checkpoint), checkpoint file or DCP folder -> the
    checkpoint path; CheckpointError if missing."""
    run = os.fspath(run)
    if is_sharded(run):
        return run
    path = (latest_checkpoint(run, name) or os.path.join(run, name)) if os.path.isdir(run) else run
    if not (os.path.isfile(path) or is_sharded(path)):
        hint = ("train first (`igpt-fast train DATA --out RUN`) or pass a checkpoint file"
                if os.path.isdir(run) else "pass a run folder or a checkpoint file")
        raise CheckpointError(f"{path} not found; {hint}")
    return path


def check_resumable(ckpt):
    """CheckpointError, one line, unless the checkpoint dict holds a training state (optimizer, data
    position, training config): an exported or converted file holds weights only."""
    if ckpt.get("sharded") or all(k in ckpt for k in ("optimizer", "data_step", "train_config", "rng")):
        return
    source = f" (made from {ckpt['source']})" if ckpt.get("source") else ""
    raise CheckpointError(
        f"{ckpt.get('path', 'the checkpoint')} holds model weights only{source}, no optimizer, data position or "
        "training config (an exported or converted file), so it cannot be resumed: resume the run it was exported "
        "from, or start a new run from these weights in Python with train(..., model=model_from_checkpoint(PATH))")


def check_output(out):
    """Refuse to write an export or conversion over a run's own files (ckpt*, config.json, log.jsonl inside
    a folder that holds a run): CheckpointError naming the file."""
    out = os.path.abspath(os.fspath(out))
    folder, name = os.path.split(out)
    if (name in RUN_FILES or name.startswith("ckpt") or name == "best.pt") and run_files(folder):
        raise CheckpointError(f"{out} is a name of the run in {folder} (its checkpoints and log); writing there "
                              "would replace its training state: choose another --out, e.g. "
                              f"{os.path.join(folder, 'model.pt')}")


def _discard(path):
    """Remove a file or folder; a folder is renamed away first, so no half-deleted one keeps its name."""
    if os.path.isdir(path) and not os.path.islink(path):
        trash = path + ".old"
        if os.path.isdir(trash):
            shutil.rmtree(trash)
        os.replace(path, trash)
        shutil.rmtree(trash)
    elif os.path.lexists(path):
        os.remove(path)


def _link_or_copy(src, dst):
    """dst becomes a second name of the file src (a copy where hard links are not supported), atomically."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            shutil.copyfile(src, tmp)


def _other_kind(name):
    return DCP_NAME if name == CKPT_NAME else CKPT_NAME


def _before_install(path, keep_previous):
    """Make way for a finished temp checkpoint to be renamed to path (ckpt.pt or ckpt.dcp). keep_previous:
    the run's current checkpoint of the same kind becomes its previous one (a file by a hard link, so
    ckpt.pt never goes missing; a folder by a rename, the temp folder then being the newest complete
    checkpoint). Returns whether it did (then _after_install leaves the other kind's previous alone)."""
    folder, name = os.path.split(path)
    if not (keep_previous and name in _PREVIOUS and os.path.lexists(path)):
        if os.path.isdir(path) and not os.path.islink(path):
            _discard(path)  # a folder is not renamed over
        return False
    _discard(os.path.join(folder, _PREVIOUS[_other_kind(name)]))
    if os.path.isdir(path):
        _discard(os.path.join(folder, _PREVIOUS[name]))
        os.replace(path, os.path.join(folder, _PREVIOUS[name]))
    else:
        _link_or_copy(path, os.path.join(folder, _PREVIOUS[name]))
    return True


def _after_install(path, keep_previous, kept):
    """After the new checkpoint took its name: the other kind's current checkpoint (a run that switched
    between DDP and FSDP) becomes the previous one, or goes when the same kind's was kept."""
    folder, name = os.path.split(path)
    if not (keep_previous and name in _PREVIOUS):
        return
    other = os.path.join(folder, _other_kind(name))
    if os.path.lexists(other):
        if not kept:
            _discard(os.path.join(folder, _PREVIOUS[name]))
            _discard(os.path.join(folder, _PREVIOUS[_other_kind(name)]))
            os.replace(other, os.path.join(folder, _PREVIOUS[_other_kind(name)]))
        else:
            _discard(other)
    fsync_dir(folder)


class _RecordingFile:
    """A file that remembers the first OSError its write raised: torch.save reports a failed write as a
    RuntimeError ("unexpected pos"), which would hide a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


def save_checkpoint(path, state, keep_previous=False):
    """torch.save(state) to a temp file beside path (atomic.atomic_path: fsynced, then renamed over path).
    keep_previous: the run's current checkpoint (ckpt.pt or ckpt.dcp beside path) becomes ckpt.prev.pt /
    ckpt.prev.dcp first (see the module docstring). A full disk is an OutputError naming the file; the
    previous checkpoint is untouched."""
    path = os.fspath(path)
    state = {"version": FORMAT_VERSION, **state}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            out = _RecordingFile(f)
            try:
                torch.save(state, cast(IO[bytes], out))  # torch.save uses its write, flush and fileno
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        kept = _before_install(path, keep_previous)
    _after_install(path, keep_previous, kept)


def save_sharded_checkpoint(path, model, optimizer, info, keep_previous=False):
    """Collective (every rank calls it): the model's and optimizer's shards to the DCP folder path.tmp/,
    `info` (run_info's dict) to path.tmp/info.json by rank 0 (the folder is complete once it is there),
    then the folder renamed to path (see save_checkpoint for keep_previous). Every rank must see the
    same path (a shared filesystem). A full disk on any rank is an OutputError naming the folder."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    path = os.fspath(path)
    tmp = path + ".tmp"
    rank0 = dist.get_rank() == 0
    try:
        if rank0:
            _discard(tmp)  # what a crashed save left (a complete one was taken up by recover_checkpoint)
        dist.barrier()
        write_sharded_folder(tmp, model, optimizer, {"version": FORMAT_VERSION, **info})
        if rank0:
            kept = _before_install(path, keep_previous)
            os.replace(tmp, path)
            fsync_dir(os.path.dirname(path))
            _after_install(path, keep_previous, kept)
    except (OSError, CheckpointException) as err:
        friendly = output_error(first_os_error(err), path)
        if friendly is None:
            raise
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise friendly from None
    dist.barrier()


def _check_loadable(path, err=None):
    """CheckpointError, one line, for a file that is not what torch.load reads (what it holds, sniffed by
    filekind.describe_file, and what was expected) or, given torch.load's error, one it could not read;
    never torch's advice to drop weights_only."""
    kind = describe_file(path)
    if kind.startswith("a damaged zip"):
        raise CheckpointError(f"{path} is not a readable igpt-fast checkpoint: truncated or damaged (a zip archive, "
                              "as torch.save writes, that does not open)")
    if not kind.startswith(("a PyTorch file", "a Python pickle")):
        hint = ("; import it first with `igpt-fast convert`"
                if kind.startswith(("a safetensors", "a TensorFlow", "a Hugging Face")) else "")
        raise CheckpointError(f"{path} is {kind}, not a readable igpt-fast checkpoint (a run folder, ckpt.pt or a "
                              f"file from export or convert){hint}")
    if isinstance(err, pickle.UnpicklingError):
        raise CheckpointError(f"{path} is not a readable igpt-fast checkpoint: a pickle holding Python objects "
                              "besides tensors, which are not loaded (loading them could run code)")
    if err is not None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable igpt-fast checkpoint: a truncated or damaged PyTorch "
                              f"file ({first[:200]})")


def load_checkpoint(run: CheckpointPath, map_location: str | torch.device = "cpu",
                    weights: bool = True) -> dict[str, Any]:
    """The checkpoint dict of a run folder, file (weights_only=True) or DCP folder; CheckpointError, one
    line, for a file that is not an igpt-fast checkpoint, is truncated, or comes from a newer igpt-fast.
    A DCP folder gives the full model tensors (weights=False: none) and no optimizer (sharded optimizer
    state is for resuming training: load_sharded_state)."""
    path = resolve_checkpoint(run)
    if is_sharded(path):
        ckpt = read_info(path)
        if weights:
            ckpt["model"] = {k: v.to(map_location) for k, v in load_sharded_model(path).items()}
        ckpt["sharded"] = True
    else:
        _check_loadable(path)
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
            _check_loadable(path, e)
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
        return read_info(path)["step"]
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


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
    """Remove a run's checkpoints of both kinds, temporary ones and what killed saves left."""
    for name in _candidates(run_dir):
        _discard(os.path.join(run_dir, name))


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


def model_from_checkpoint(ckpt: dict[str, Any] | CheckpointPath, impl: str = "auto",
                          grad_checkpoint: bool = False) -> "IGPT":
    """The IGPT a checkpoint (dict, run folder, file or DCP folder) describes, built from its own config,
    with the run-time choices given here. A missing, unexpected or misshapen key, or a tensor holding NaN
    or inf, raises CheckpointError naming it."""
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
    for k, v in got.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{ckpt.get('path', 'the checkpoint')}: {k} holds non-finite values (NaN or inf): "
                                  "these weights are broken; use an earlier checkpoint of the run")
    model.load_state_dict(got)
    return model


def palette_from_checkpoint(ckpt: dict[str, Any]) -> "Palette | None":
    """The Palette stored in a checkpoint dict, or None."""
    from igpt_fast.palette import Palette

    return Palette(ckpt["palette"].numpy()) if ckpt.get("palette") is not None else None


def export_checkpoint(run: CheckpointPath, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the latest checkpoint of RUN (run folder, ckpt.pt or DCP folder) as one file at `out` that
    loads without torch.distributed: the model's full weights, config, palette, step, samples seen and
    training config (no optimizer or RNG state: resume training from the run itself). Returns the
    source checkpoint's dict."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise CheckpointError(f"{out} is a folder; export writes one checkpoint file (e.g. {out}/model.pt)")
    check_output(out)
    ckpt = load_checkpoint(run)
    model = model_from_checkpoint(ckpt)  # checks that the weights fit the config
    keep = {k: ckpt[k] for k in ("model_config", "palette", "palette_sha256", "step", "samples_seen",
                                 "train_config", "extra") if k in ckpt}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(out, {**keep, "model": model.state_dict(), "source": os.path.abspath(ckpt["path"])})
    return ckpt


def load_run(run_dir: CheckpointPath, device: str | torch.device = "cpu", impl: str = "auto",
             data_dir: str | os.PathLike[str] | None = None, meta: dict[str, Any] | None = None,
             ) -> tuple["IGPT", "Palette | None", str, dict[str, Any] | None]:
    """What probe and sample start from: a run folder or checkpoint -> (IGPT in eval mode on device, Palette
    or None, checkpoint path, meta.json of data_dir or None). The model comes from the checkpoint's own
    config; impl is how to run it; with data_dir, its meta.json (`meta` when the caller read it) is
    checked against the model and the run's palette."""
    from igpt_fast.data import check_data, read_meta

    ckpt = load_checkpoint(run_dir)
    model = model_from_checkpoint(ckpt, impl=impl).to(device).eval()
    palette = palette_from_checkpoint(ckpt)
    if data_dir is not None:
        meta = meta if meta is not None else read_meta(data_dir)
        check_data(meta, model.config, palette.sha256 if palette is not None else None, data_dir)
    return model, palette, ckpt["path"], meta
