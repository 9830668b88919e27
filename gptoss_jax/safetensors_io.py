"""A small, strict reader/writer for the safetensors format.

Reading memory-maps each file and hands out numpy views, so a tensor costs host memory only while
it is being converted. bf16 maps to `ml_dtypes.bfloat16` (numpy has no bf16). Every structural
problem — a header that does not parse, offsets past the end of the file (a truncated download),
overlapping tensors, a size that disagrees with shape and dtype — is an error naming the file and
tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from gptoss_jax import atomic

DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that is malformed, truncated or inconsistent."""


class SafetensorsFile:
    """Lazy access to the tensors of one file: `keys()`, `shape(k)`, `dtype(k)`, `get(k)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise SafetensorsError(f"{self.path}: file too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise SafetensorsError(
                        f"{self.path}: header length {n} exceeds the file size {size} (truncated file?)"
                    )
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        data_size = size - self._base
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        spans = []
        for key, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(
                    f"{self.path}: tensor {key!r} has a malformed or unsupported header entry {info!r}"
                ) from None
            if end > data_size:
                raise SafetensorsError(
                    f"{self.path}: tensor {key!r} ends at byte {end} of the data "
                    f"section but the file holds only {data_size} (truncated file?)"
                )
            if end - start != int(np.prod(shape)) * dtype.itemsize or start < 0:
                raise SafetensorsError(
                    f"{self.path}: tensor {key!r} spans {end - start} bytes, "
                    f"but {info['dtype']}{list(shape)} needs "
                    f"{int(np.prod(shape)) * dtype.itemsize}"
                )
            self._entries[key] = (dtype, shape, start, end)
            spans.append((start, end, key))
        spans.sort()
        for (_, e0, k0), (s1, _, k1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise SafetensorsError(f"{self.path}: tensors {k0!r} and {k1!r} overlap")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if data_size else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        """A read-only view into the mapped file."""
        dtype, shape, start, end = self._entries[key]
        if end == start:
            return np.zeros(shape, dtype)
        raw = self._mmap[self._base + start : self._base + end]
        return raw.view(dtype).reshape(shape)


def save_file(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Write tensors (numpy arrays, bf16 as ml_dtypes) in key order, 8-byte aligned header."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"tensor {key!r}: dtype {arr.dtype} cannot be stored in safetensors")
        header[key] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic.file(path) as tmp, open(tmp, "wb") as f:  # never a half-written file under `path`
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())


def open_all(paths: Iterable[str]) -> tuple[dict[str, SafetensorsFile], dict[str, SafetensorsFile]]:
    """Open files and index their tensors; a tensor stored in two files is an error."""
    files, where = {}, {}
    for p in paths:
        f = SafetensorsFile(p)
        files[p] = f
        for k in f.keys():
            if k in where:
                raise SafetensorsError(f"tensor {k!r} is stored twice: in {where[k].path} and in {p}")
            where[k] = f
    return files, where
