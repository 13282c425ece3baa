"""The sharded checkpoint format of FSDP runs (`RUN/ckpt.dcp/`): writing, checking and reading one folder.

A sharded checkpoint is a torch.distributed.checkpoint (DCP) folder in which every rank wrote its shard
of {"model": ..., "optimizer": ...} (the FQN-keyed state dicts of
torch.distributed.checkpoint.state_dict.get_state_dict), plus `info.json`, written by rank 0 once the
shards are on disk (so its presence marks a complete folder): every other entry of a checkpoint (see
igpt_fast.checkpoint), the palette and RNG states as base64 tensors. DCP stores global tensor shapes,
so the folder loads on any number of ranks, with FSDP or DDP (`load_sharded_state`), and without
torch.distributed at all (`load_sharded_model`: the model's full tensors, no optimizer).

It is its own file because it has its own format and its own trust rules. DCP's metadata (`.metadata`)
is a pickle, not a weights_only torch file: it is read with a restricted unpickler that builds only
the classes torch.distributed.checkpoint writes there (its metadata dataclasses, _StorageInfo,
torch.Size, dtypes, layouts, paths), so a planted pickle that names anything else is refused, never
run. Before any tensor is read, every shard file the metadata names must exist, lie inside the folder
and be long enough, so a missing or truncated shard is one CheckpointError line.

Where a folder is written and how it replaces a run's previous checkpoint (temp name, renames,
recovery after a kill) is igpt_fast.checkpoint's business; this module only fills a folder and reads one.
"""
import base64
import functools
import json
import os
import pickle
import warnings
from typing import Any

import torch

from igpt_fast.atomic import fsync_dir
from igpt_fast.errors import CheckpointError

__all__ = ["INFO_NAME", "is_sharded", "write_sharded_folder", "read_info", "read_metadata", "load_sharded_model",
           "load_sharded_state", "load_full_optimizer_state", "first_os_error"]

INFO_NAME = "info.json"  # inside a DCP folder: everything but the model and optimizer tensors
_ONE_PROCESS_NOTE = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's warning, start


def is_sharded(path):
    """True for a torch.distributed.checkpoint folder (it holds .metadata)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


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


def write_sharded_folder(folder, model, optimizer, info):
    """Collective (every rank calls it): the model's and optimizer's shards to the DCP folder `folder`,
    then `info` (the checkpoint's other entries, version included) to folder/info.json by rank 0, fsynced:
    the folder is complete once that file is there. Errors are DCP's and the OS's, unchanged."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=folder)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(folder, INFO_NAME), "w") as f:
            json.dump(_to_json(info), f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(folder)


def first_os_error(err):
    """The OSError behind a torch.distributed.checkpoint failure (any rank's), or None."""
    for failure in getattr(err, "failures", {}).values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, OSError):
            return exc
    return err if isinstance(err, OSError) else None


def read_info(path):
    """The checkpoint entries of the DCP folder `path` (its info.json, tensors decoded); CheckpointError, one line."""
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


# What torch.distributed.checkpoint pickles into .metadata (torch/distributed/checkpoint/metadata.py and
# filesystem.py): the only globals the restricted unpickler builds, besides torch dtypes.
_DCP_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
    "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata: any global outside _DCP_GLOBALS and torch's dtypes is refused, not imported."""

    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which torch.distributed.checkpoint never writes")


def read_metadata(path):
    """The DCP Metadata of the folder `path`, read with the restricted unpickler and checked against the
    shard files (each one present and long enough for the entries it holds); CheckpointError, one line."""
    where = os.path.join(path, ".metadata")
    try:
        with open(where, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{where} is not DCP metadata and was not loaded ({str(e)[:200]}); "
                              "the file may have been planted: use a checkpoint you trust") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(f"{where} is damaged or truncated: {str(e)[:200] or type(e).__name__}") from None
    entries, storage = getattr(metadata, "state_dict_metadata", None), getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{where} is not the metadata of a DCP checkpoint")
    needed: dict[str, int] = {}
    for info in storage.values():
        rel, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if not isinstance(rel, str) or os.path.basename(rel) != rel:
            raise CheckpointError(f"{where} names a shard outside its folder ({rel!r})")
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        shard = os.path.join(path, rel)
        if not os.path.isfile(shard):
            raise CheckpointError(f"{shard} is missing: the sharded checkpoint {path} is incomplete (copied in part?); "
                                  "resume from the previous one or copy the whole folder again")
        size = os.path.getsize(shard)
        if size < end:
            raise CheckpointError(f"{shard} is truncated ({size} of at least {end} bytes): the sharded checkpoint "
                                  f"{path} is incomplete; resume from the previous one or copy the whole folder again")
    return metadata


@functools.cache
def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """DCP's FileSystemReader whose metadata goes through read_metadata (no arbitrary unpickling)."""

        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(os.fspath(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader


def load_sharded_model(path):
    """The full tensors of a DCP folder's model, read in this process alone (no process group)."""
    import torch.distributed.checkpoint as dcp

    reader = _safe_reader_class()(path)
    entries = reader.read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
             if k.startswith("model.") and hasattr(m, "size")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTE)
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def load_sharded_state(path, model, optimizer):
    """Collective when a process group is up: fill `model` (FSDP-sharded or plain, on any number of ranks)
    and `optimizer` from the DCP folder `path`; DCP reshards from the world size that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    read_metadata(path)  # on every rank: a bad folder is the same one-line error everywhere
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS_NOTE)  # a single process without a group: intended
        dcp.load(state, storage_reader=_safe_reader_class()(path))
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
    by_name: dict[str, Any] = {
        "state": {by_number[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [by_number[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
