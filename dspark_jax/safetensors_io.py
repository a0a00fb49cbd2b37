"""Safetensors files read row range by row range and written tensor by tensor.

The format is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets)
and the raw little-endian data. Reading a row range of a tensor is one ``readinto`` of a
contiguous byte range (no mmap: pages of a mapped multi-GB file would count in the process's
resident memory until it is unmapped), straight into the caller's buffer when the layouts
agree, so a loader holds at most the piece it is placing.
Writing streams one tensor at a time, so exporting needs no host copy of the model.

A checkpoint directory holds ``model.safetensors`` or ``model.safetensors.index.json`` plus
the shards that index names (Hugging Face's layout); ``TensorSource`` checks that the index
and the shards agree before anything is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that does not match what its config promises; the message names the problem."""


class SafetensorsFile:
    """The header of one safetensors file and positioned reads of its tensors' rows."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its header length)")
            (n,) = struct.unpack("<Q", head)
            if n > os.path.getsize(path) - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} past the end of the file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        self.data_start = 8 + n
        header.pop("__metadata__", None)
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            self.tensors[name] = (DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"]),
                                  int(info["data_offsets"][0]))
        self._file = None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the tensor's first axis (the whole of a 0-d tensor), read into
        ``out`` when given (C-contiguous, the tensor's dtype and the rows' shape)."""
        dtype, shape, offset = self.tensors[name]
        if not shape:
            start, stop, row_shape = 0, 1, ()
        else:
            stop = shape[0] if stop is None else min(stop, shape[0])
            row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        rows_shape = ((stop - start),) + row_shape if shape else ()
        if out is None:
            out = np.empty(rows_shape, dtype)
        elif out.shape != rows_shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(f"{name}: rows {start}:{stop} are {dtype}{list(rows_shape)}, "
                             f"the buffer is {out.dtype}{list(out.shape)}")
        view = out.reshape(-1).view(np.uint8)
        if self._file is None:
            self._file = open(self.path, "rb", buffering=0)
        self._file.seek(self.data_start + offset + start * row_bytes)
        done = 0
        while done < view.size:
            got = self._file.readinto(memoryview(view)[done:])
            if not got:
                raise CheckpointError(f"{self.path}: file ends inside tensor {name!r} (truncated?)")
            done += got
        return out

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorSource:
    """The tensors of a safetensors directory (single file or sharded index), read lazily."""

    def __init__(self, model_dir: str | os.PathLike):
        from .config import read_json

        self.model_dir = os.fspath(model_dir)
        index_path = os.path.join(self.model_dir, INDEX_FILE)
        single_path = os.path.join(self.model_dir, SINGLE_FILE)
        if os.path.exists(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            paths = {name: os.path.join(self.model_dir, f) for name, f in weight_map.items()}
            for path in sorted(set(paths.values())):
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: shard listed in {index_path} not found")
            self.files = {path: SafetensorsFile(path) for path in sorted(set(paths.values()))}
            for path, shard in self.files.items():
                for name in shard.tensors:
                    if paths.get(name) != path:
                        where = f"lists it in {os.path.basename(paths[name])}" if name in paths else "does not list it"
                        raise CheckpointError(f"{path}: shard holds tensor {name!r} but {index_path} {where}")
            for name, path in paths.items():
                if name not in self.files[path].tensors:
                    raise CheckpointError(f"{index_path}: names tensor {name!r} in {os.path.basename(path)}, "
                                          "which does not hold it")
            self.file_of = {name: self.files[path] for name, path in paths.items()}
        elif os.path.exists(single_path):
            shard = SafetensorsFile(single_path)
            self.files = {single_path: shard}
            self.file_of = {name: shard for name in shard.tensors}
        else:
            raise FileNotFoundError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def names(self) -> set[str]:
        return {n for n in self.file_of if not n.endswith(IGNORED_SUFFIXES)}

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.file_of:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name!r}")
        return self.file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def read_rows(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        return self._file(name).read_rows(name, start, stop, out)

    def get(self, name: str) -> np.ndarray:
        return self.read_rows(name)

    def close(self):
        for f in self.files.values():
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------- writing

# One tensor to write: its name, shape and dtype (for the header) and a function that makes it.
TensorEntry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def write_safetensors(path: str, entries: Sequence[TensorEntry], metadata: dict | None = None):
    """Write a safetensors file one tensor at a time (only the tensor being written is in
    memory). The file appears under ``path`` when complete, with the umask's permissions."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype, make in entries:
            array = np.ascontiguousarray(make())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: made {array.dtype}{list(array.shape)}, declared {np.dtype(dtype)}{list(shape)}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)


def parse_size(size: int | str | None) -> int | None:
    """Bytes from an int or a string like ``"500MB"``, ``"2GB"``, ``"1GiB"`` (None: no limit)."""
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max shard size {size!r}: expected bytes or a size like 500MB, 2GB, 1GiB")
    value, unit = float(m.group(1)), m.group(2).rstrip("B") or ""
    base = 1024 if unit.endswith("I") else 1000
    power = "KMGT".index(unit[0]) + 1 if unit else 0
    return int(value * base**power)


def shard_groups(entries: Sequence[TensorEntry], max_shard_bytes: int | None) -> list[list[TensorEntry]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own)."""
    if max_shard_bytes is None:
        return [list(entries)]
    groups, size = [[]], 0
    for entry in entries:
        n = math.prod(entry[1]) * np.dtype(entry[2]).itemsize
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += n
    return groups


def remove_weights(model_dir: str):
    """Delete the weight files of an earlier save (a stale index would shadow a new single file)."""
    for name in os.listdir(model_dir):
        if name in (SINGLE_FILE, INDEX_FILE) or SHARD_PATTERN.match(name):
            os.remove(os.path.join(model_dir, name))


def save_tensors(model_dir: str, entries: Iterable[TensorEntry], max_shard_size: int | str | None = None):
    """Write ``model.safetensors``, or shards plus ``model.safetensors.index.json`` when the
    tensors exceed ``max_shard_size`` (Hugging Face's names: ``model-00001-of-00003.safetensors``)."""
    entries = list(entries)
    groups = shard_groups(entries, parse_size(max_shard_size))
    remove_weights(model_dir)
    if len(groups) == 1:
        write_safetensors(os.path.join(model_dir, SINGLE_FILE), groups[0])
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(os.path.join(model_dir, fname), group)
        for name, shape, dtype, _ in group:
            weight_map[name] = fname
            total += math.prod(shape) * np.dtype(dtype).itemsize
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
