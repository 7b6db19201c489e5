"""Safetensors files read without torch: the header, and how many of a tensor's values are not finite.

The gateway checks uploads and reads the base model's layer shapes here, so torch stays out of its process.
The format: 8 bytes (little-endian) giving the header's length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the data,
offsets counted from its start. The header is checked as ``safetensors`` checks it on open: every
tensor's byte size matches its dtype and shape, and the tensors tile the data exactly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_CHUNK_BYTES = 8 << 20  # values are checked this many bytes at a time, whatever the tensor's size


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its bytes per value, whether it is floating point, and torch's name for it."""

    itemsize: int
    floating: bool
    torch_name: str


# The sub-byte dtypes (F4, F6_*) are left out: no adapter is stored in them, and their shapes count packed values.
DTYPES: dict[str, DType] = {
    "F64": DType(8, True, "torch.float64"),
    "F32": DType(4, True, "torch.float32"),
    "F16": DType(2, True, "torch.float16"),
    "BF16": DType(2, True, "torch.bfloat16"),
    "F8_E4M3": DType(1, True, "torch.float8_e4m3fn"),
    "F8_E4M3FNUZ": DType(1, True, "torch.float8_e4m3fnuz"),
    "F8_E5M2": DType(1, True, "torch.float8_e5m2"),
    "F8_E5M2FNUZ": DType(1, True, "torch.float8_e5m2fnuz"),
    "F8_E8M0": DType(1, True, "torch.float8_e8m0fnu"),
    "C64": DType(8, False, "torch.complex64"),
    "I64": DType(8, False, "torch.int64"),
    "I32": DType(4, False, "torch.int32"),
    "I16": DType(2, False, "torch.int16"),
    "I8": DType(1, False, "torch.int8"),
    "U64": DType(8, False, "torch.uint64"),
    "U32": DType(4, False, "torch.uint32"),
    "U16": DType(2, False, "torch.uint16"),
    "U8": DType(1, False, "torch.uint8"),
    "BOOL": DType(1, False, "torch.bool"),
}

# The float8 formats have no numpy dtype: a byte is not finite when these bits are all set (NaN or inf),
# or, for the "fnuz" formats, when it is exactly 0x80 (their only NaN, and they have no inf).
_FLOAT8_NONFINITE_BITS = {"F8_E4M3": 0x7F, "F8_E5M2": 0x7C, "F8_E8M0": 0xFF}
_FNUZ_NAN = 0x80


class TensorFileError(ValueError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it; ``begin`` and ``end`` are byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors in the safetensors file at ``path``, by name; reads the header only, never the data."""
    with path.open("rb") as file:
        return read_header_from(file, path.stat().st_size)


def read_header_from(file: BinaryIO, file_size: int) -> dict[str, TensorEntry]:
    """``read_header`` for an open file of ``file_size`` bytes, read from its start."""
    prefix = file.read(8)
    if len(prefix) < 8:
        raise TensorFileError(f"the file is {file_size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER_BYTES, file_size - 8):
        raise TensorFileError(f"the header length {length} is past the end of a {file_size}-byte file")
    try:
        header = json.loads(file.read(length).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"the header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise TensorFileError("the header is not a JSON object")
    data_start = 8 + length
    entries = {name: _entry(name, info, data_start) for name, info in header.items() if name != "__metadata__"}
    _check_tiling(entries.values(), data_start, file_size)
    return entries


def _entry(name: str, info: object, data_start: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise TensorFileError(f"tensor '{name}' is not described by a JSON object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise TensorFileError(f"tensor '{name}' has dtype {dtype!r}, not one this reader supports")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise TensorFileError(f"tensor '{name}' has shape {shape!r}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise TensorFileError(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    size = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != size:
        raise TensorFileError(f"tensor '{name}' spans {end - begin} bytes; {dtype} of shape {shape} needs {size}")
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(entries: Iterable[TensorEntry], data_start: int, file_size: int) -> None:
    """The tensors cover the data from its first byte to the file's last, without gaps or overlaps."""
    position = data_start
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise TensorFileError(f"tensor '{entry.name}' does not start where the previous tensor ends")
        position = entry.end
    if position != file_size:
        raise TensorFileError(f"the tensors end at byte {position} of a {file_size}-byte file")


def count_nonfinite(file: BinaryIO, entry: TensorEntry) -> int:
    """How many of a floating-point tensor's values are NaN or infinite, reading a bounded chunk at a time."""
    if not DTYPES[entry.dtype].floating:
        raise ValueError(f"tensor '{entry.name}' has dtype {entry.dtype}, which is not floating point")
    return sum(_count_nonfinite(chunk, entry.dtype) for chunk in _chunks(file, entry))


def _chunks(file: BinaryIO, entry: TensorEntry) -> Iterator[bytes]:
    step = _CHUNK_BYTES - _CHUNK_BYTES % DTYPES[entry.dtype].itemsize
    file.seek(entry.begin)
    for start in range(entry.begin, entry.end, step):
        size = min(step, entry.end - start)
        chunk = file.read(size)
        if len(chunk) != size:
            raise TensorFileError(f"tensor '{entry.name}' is cut short by the end of the file")
        yield chunk


def _count_nonfinite(raw: bytes, dtype: str) -> int:
    if dtype in ("F16", "F32", "F64"):
        values = np.frombuffer(raw, dtype=f"<f{DTYPES[dtype].itemsize}")
    elif dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, then read them as float32.
        values = (np.frombuffer(raw, dtype="<u2").astype("<u4") << 16).view("<f4")
    else:
        codes = np.frombuffer(raw, dtype=np.uint8)
        if dtype in _FLOAT8_NONFINITE_BITS:
            bits = _FLOAT8_NONFINITE_BITS[dtype]
            return int(np.count_nonzero((codes & bits) == bits))
        return int(np.count_nonzero(codes == _FNUZ_NAN))
    return int(values.size - np.count_nonzero(np.isfinite(values)))
