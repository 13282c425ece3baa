"""What kind of file a path holds, for one-line errors: any verb given the wrong kind of file (a palette
to `sample` or `convert`, a shard to `convert`, a checkpoint to `tokenize --palette`) says what it got
and what it expected.

This module exists so that every reader can ask without importing another reader: checkpoint.py,
palette.py and convert.py all use describe_file, and it imports no igpt_fast module, so none of them
imports another just for it (no import cycle).

describe_file(path) sniffs the first and last bytes, never loads the file: NumPy array (dtype and
shape from the .npy header), PyTorch file (torch.save's zip with data.pkl), legacy pickle, NumPy
archive, zip, safetensors, tar (a tokenized shard), gzip, TensorFlow checkpoint index and data shard,
PNG / JPEG / GIF / BMP / WebP image, JSON (an HF model config, meta.json), text; and folders: an
igpt-fast run folder, a sharded (DCP) checkpoint, a Hugging Face model folder or cache, a folder of
tokenized shards, a TensorFlow checkpoint folder.
"""
import json
import os
import re
import zipfile

import numpy as np

__all__ = ["HF_WEIGHT_FILES", "describe_file"]

# The weight files of a Hugging Face model folder, in the order convert.py loads them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")

_IMAGE_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"BM", "a BMP image"))


def _describe_folder(path: str) -> str:
    names = set(os.listdir(path))
    if {"ckpt.pt", "ckpt.dcp", "ckpt.prev.pt", "log.jsonl"} & names:
        return "an igpt-fast run folder"
    if ".metadata" in names:
        return "a sharded (DCP) checkpoint folder"
    if "config.json" in names and names & set(HF_WEIGHT_FILES):
        return "a Hugging Face model folder"
    if "meta.json" in names and any(n.endswith(".tar") for n in names):
        return "a folder of tokenized shards (meta.json and .tar shards)"
    if any(n.endswith(".index") for n in names) and any(".data-" in n for n in names):
        return "a folder holding a TensorFlow checkpoint"
    if any(n.startswith("models--") for n in names):
        return "a Hugging Face cache folder"
    return "an empty folder" if not names else f"a folder of {len(names)} entries"


def describe_file(path: str | os.PathLike[str]) -> str:
    """What `path` holds, as a short phrase for error messages ("a NumPy array (.npy), float32 (512, 3)",
    "a PyTorch file (torch.save)", "a tar archive", ...), sniffed from its first bytes, never loaded."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _describe_folder(path)
    if not os.path.isfile(path):
        return "nothing (no such file or folder)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(max(size - 8, 0))
        tail = f.read(8)
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        try:
            with open(path, "rb") as f:
                fmt = np.lib.format
                version = fmt.read_magic(f)
                shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
            return f"a NumPy array (.npy), {dtype} {tuple(shape)}"
        except (ValueError, OSError):
            return "a damaged NumPy array file (.npy)"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "a PyTorch file (torch.save)"
        if names and all(n.endswith(".npy") for n in names):
            return "a NumPy archive (.npz)"
        return "a zip archive"
    if len(head) >= 8 + 2 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "a safetensors file"
    if head[257:262] == b"ustar" or path.endswith(".tar"):
        return "a tar archive (e.g. a tokenized shard)" if head[257:262] == b"ustar" else "a damaged tar archive"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    if size >= 48 and int.from_bytes(tail, "little") == 0xDB4775248B80FB57:
        return "a TensorFlow checkpoint index"
    if re.search(r"\.data-\d{5}-of-\d{5}$", path):
        return "a TensorFlow checkpoint data shard"
    for magic, what in _IMAGE_MAGIC:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a legacy torch.save file?)"
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        try:
            with open(path) as f:
                obj = json.load(f)
        except (ValueError, OSError):
            return "a damaged JSON file"
        if isinstance(obj, dict) and obj.get("model_type"):
            return f"a model config (JSON, model_type {obj['model_type']!r})"
        if isinstance(obj, dict) and "n_ctx" in obj and "palette_sha256" in obj:
            return "a tokenized data description (meta.json)"
        return "a JSON file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return f"a binary file ({size} bytes) of no kind igpt-fast knows"
