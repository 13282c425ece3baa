"""TensorFlow checkpoints read without TensorFlow: OpenAI's released iGPT weights (openai/image-gpt,
`model.ckpt-N.index` + `model.ckpt-N.data-0000i-of-000NN` + `.meta`, the graph, which is not needed).

A TF checkpoint (tensor bundle, TF 1.x and 2.x `Saver` / `tf.train.Checkpoint`; reference:
tensorflow/core/util/tensor_bundle/tensor_bundle.{h,cc}, core/protobuf/tensor_bundle.proto,
core/lib/io/table_builder.cc, format.cc, block_builder.cc) is:
- PREFIX.index, an SSTable (LevelDB's table format). Its last 48 bytes are the footer: the
  metaindex and index block handles (each a varint64 offset and a varint64 size), zero padding to 40
  bytes, then the magic 0xdb4775248b80fb57 as fixed64 little-endian. Every block is followed by a
  5-byte trailer: the compression type (0 none, 1 snappy) and the masked crc32c of the block and that
  type byte. A block is a run of entries (varint32 shared key bytes, varint32 unshared key bytes,
  varint32 value size, the unshared key bytes, the value) then its restart offsets (uint32 each) and
  their count (uint32). The index block maps the last key of each data block to its handle.
- In that table, key "" holds a BundleHeaderProto (1 num_shards, 2 endianness: 0 little, 1 big,
  3 version) and every other key is a tensor name holding a BundleEntryProto (1 dtype, 2 shape: a
  TensorShapeProto whose field 2 repeats Dim {1 size}, 3 shard_id, 4 offset, 5 size, 6 crc32c
  (fixed32, masked), 7 slices for partitioned variables).
- PREFIX.data-%05d-of-%05d (one per shard): the tensors' raw bytes, row-major, at (offset, size).

Limits: uncompressed index blocks (TF writes bundle indexes uncompressed; a snappy-compressed table is
refused); little-endian bundles; dtypes float16, bfloat16 (returned as float32, exactly), float32,
float64, int8/16/32/64, uint8/16/32/64 and bool (string tensors are listed, never read); whole
(unpartitioned) tensors. The index's block checksums are checked; a tensor's bytes are checked for
length against its shard, not for their crc32c (a pure-Python crc32c over iGPT-S's 300 MB would take
minutes). Every refusal is one TFCheckpointError line naming the file.
"""
import os
import re

import numpy as np

from igpt_fast.errors import TFCheckpointError

__all__ = ["TFCheckpointError", "tf_checkpoint_prefix", "read_tf_index", "read_tf_tensor", "read_tf_checkpoint",
           "TABLE_MAGIC", "crc32c", "mask_crc"]

TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48
_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 9: "int64", 10: "bool",
           14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32", 23: "uint64"}
_STRING = 7


def _crc_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data):
    """CRC-32C (Castagnoli) of bytes; pure Python, for index blocks (kilobytes)."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def mask_crc(c):
    """LevelDB's masked crc (rotate right by 15, add a constant), as stored in tables and bundles."""
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(buf, pos):
    """(value, next position) of the base-128 varint at buf[pos]."""
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf):
    """{field number: [values]} of a serialized protobuf message: ints for varint and fixed fields,
    bytes for length-delimited ones (sub-messages, strings, packed arrays)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + size]), pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        fields.setdefault(number, []).append(value)
    return fields


def _block(data, offset, size, where):
    """The contents of the table block at (offset, size), its trailer checked."""
    if offset + size + 5 > len(data):
        raise TFCheckpointError(f"{where} is truncated (a block ends past the file's {len(data)} bytes)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    stored = int.from_bytes(data[offset + size + 1:offset + size + 5], "little")
    if mask_crc(crc32c(data[offset:offset + size + 1])) != stored:
        raise TFCheckpointError(f"{where} is damaged (a block's checksum does not match)")
    if kind != 0:
        raise TFCheckpointError(f"{where} has {'snappy-' if kind == 1 else ''}compressed blocks (type {kind}); "
                                "this reader supports uncompressed TF bundle indexes only")
    return contents


def _block_entries(block):
    """[(key, value)] of one block, prefix-compressed keys expanded."""
    if len(block) < 4:
        raise ValueError("block shorter than its restart count")
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError("restart array larger than its block")
    entries, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        size, pos = _varint(block, pos)
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        entries.append((key, bytes(block[pos:pos + size])))
        pos += size
    if pos != end:
        raise ValueError("entries overrun the restart array")
    return entries


def tf_checkpoint_prefix(path):
    """The checkpoint prefix of PREFIX.index, PREFIX.data-*, PREFIX itself, or a folder holding one
    checkpoint (its `checkpoint` state file's choice, else its only *.index); None when path is none of
    these."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if os.path.isfile(state):
            with open(state, errors="replace") as f:
                m = re.search(r'^model_checkpoint_path:\s*"(.*)"', f.read(), re.M)
            if m and os.path.isfile(os.path.join(path, m.group(1)) + ".index"):
                return os.path.join(path, m.group(1))
        indexes = sorted(n for n in os.listdir(path) if n.endswith(".index") and not n.endswith(".json.index"))
        if len(indexes) > 1:
            raise TFCheckpointError(f"{path} holds {len(indexes)} TensorFlow checkpoints "
                                    f"({', '.join(indexes[:4])}): pass one .index file")
        return os.path.join(path, indexes[0][:-len(".index")]) if indexes else None
    if path.endswith(".index") and os.path.isfile(path):
        return path[:-len(".index")]
    m = re.fullmatch(r"(.*)\.data-\d{5}-of-\d{5}", path)
    if m and os.path.isfile(m.group(1) + ".index"):
        return m.group(1)
    return path if os.path.isfile(path + ".index") else None


def read_tf_index(prefix):
    """(num_shards, {tensor name: entry}) of PREFIX.index; an entry is a dict with dtype (a numpy name,
    "bfloat16", or "string"/"dtype N" where unreadable), shape, shard, offset, size."""
    where = f"{prefix}.index"
    try:
        with open(where, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TFCheckpointError(f"cannot read {where}: {e.strerror or e}") from None
    if len(data) < _FOOTER or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise TFCheckpointError(f"{where} is not a TensorFlow checkpoint index (no SSTable footer)")
    try:
        pos = len(data) - _FOOTER
        _, pos = _varint(data, pos)  # metaindex handle: empty in a bundle
        _, pos = _varint(data, pos)
        index_offset, pos = _varint(data, pos)
        index_size, pos = _varint(data, pos)
        entries = []
        for _, handle in _block_entries(_block(data, index_offset, index_size, where)):
            offset, p = _varint(handle, 0)
            size, _ = _varint(handle, p)
            entries.extend(_block_entries(_block(data, offset, size, where)))
        header, tensors = None, {}
        for key, value in entries:
            if key == b"":
                header = _proto_fields(value)
                continue
            fields = _proto_fields(value)
            dtype = fields.get(1, [0])[0]
            shape = tuple(_proto_fields(d).get(1, [0])[0] for d in _proto_fields(fields.get(2, [b""])[0]).get(2, []))
            tensors[key.decode("utf-8", "replace")] = dict(
                dtype=_DTYPES.get(dtype, "string" if dtype == _STRING else f"dtype {dtype}"), shape=shape,
                shard=fields.get(3, [0])[0], offset=fields.get(4, [0])[0], size=fields.get(5, [0])[0],
                sliced=bool(fields.get(7)))
    except ValueError as e:
        raise TFCheckpointError(f"{where} is damaged: {e}") from None
    if header is None:
        raise TFCheckpointError(f"{where} is an SSTable but not a TensorFlow checkpoint index (no bundle header)")
    if header.get(2, [0])[0] != 0:
        raise TFCheckpointError(f"{where} is a big-endian checkpoint; this reader reads little-endian ones only")
    return header.get(1, [1])[0], tensors


def _shard_path(prefix, shard, num_shards):
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def read_tf_tensor(prefix, name, entry, num_shards):
    """The numpy array of one index entry (bfloat16 as float32)."""
    dtype = entry["dtype"]
    if entry["sliced"]:
        raise TFCheckpointError(f"{prefix}: {name} is a partitioned variable; this reader reads whole tensors only")
    if dtype not in _DTYPES.values():
        raise TFCheckpointError(f"{prefix}: {name} has {dtype}, which this reader does not read")
    stored = np.dtype("uint16" if dtype == "bfloat16" else dtype)
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if count * stored.itemsize != entry["size"]:
        raise TFCheckpointError(f"{prefix}.index is damaged: {name} is {entry['size']} bytes, its shape "
                                f"{entry['shape']} needs {count * stored.itemsize}")
    path = _shard_path(prefix, entry["shard"], num_shards)
    try:
        length = os.path.getsize(path)
    except OSError:
        raise TFCheckpointError(f"{path} is missing: the checkpoint is incomplete (every .data-*-of-"
                                f"{num_shards:05d} shard is needed)") from None
    if entry["offset"] + entry["size"] > length:
        raise TFCheckpointError(f"{path} is truncated ({length} bytes; {name} ends at byte "
                                f"{entry['offset'] + entry['size']})")
    arr = np.fromfile(path, dtype=stored.newbyteorder("<"), count=count, offset=entry["offset"])
    if dtype == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is float32's upper half: exact
    return arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(entry["shape"])


def read_tf_checkpoint(prefix, names=None):
    """{name: numpy array} of a TF checkpoint's tensors (all, or those in names)."""
    num_shards, entries = read_tf_index(prefix)
    wanted = entries if names is None else {n: entries[n] for n in names}
    return {name: read_tf_tensor(prefix, name, entry, num_shards) for name, entry in wanted.items()}
