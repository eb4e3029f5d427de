"""What the config needs to know about a model file without onnxruntime: is it an ONNX model,
and which classes does it report.

check-config runs with the base dependencies only (no onnxruntime, no onnx), so this reads the
top level of the file's protobuf itself: ``ModelProto``'s fields, skipping the graph, keeping the
metadata (where Ultralytics exports write their class names). A PyTorch ``.pt`` or a truncated
download fails here with one clear line instead of an onnxruntime traceback at camera start.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from edge_agent.common.config import file_problem

log = logging.getLogger(__name__)

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Protobuf wire types, and ModelProto's fields with theirs (onnx.proto; 26 is ONNX 1.18's).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_FIELDS = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 7: _LEN, 8: _LEN, 14: _LEN,
                 20: _LEN, 25: _LEN, 26: _LEN}
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14
_METADATA_ENTRY_MAX = 16 * 2**20  # a metadata entry larger than this is skipped, not read
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
_PICKLE_MAGICS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # older torch.save: a pickle


class NotOnnx(ValueError):
    """The file is not an ONNX model (not its protobuf layout, or cut short)."""


def _varint(read: BinaryIO) -> int:
    result = shift = 0
    for _ in range(10):
        byte = read.read(1)
        if not byte:
            raise NotOnnx("the file ends inside a field")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
    raise NotOnnx("a malformed number")


def _string_fields(message: bytes) -> dict[int, str]:
    """The length-delimited fields of a small message as text (a StringStringEntryProto: 1 key, 2 value)."""
    fields: dict[int, str] = {}
    pos = 0
    while pos < len(message):
        tag, pos = _varint_at(message, pos)
        if tag & 7 != _LEN:
            raise NotOnnx("a malformed metadata entry")
        size, pos = _varint_at(message, pos)
        fields[tag >> 3] = message[pos:pos + size].decode("utf-8", errors="replace")
        pos += size
    return fields


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise NotOnnx("a malformed metadata entry")


def _skip(f: BinaryIO, size: int, end: int) -> None:
    if f.tell() + size > end:
        raise NotOnnx("the file ends inside a field (truncated?)")
    f.seek(size, os.SEEK_CUR)


def _read_model_metadata(f: BinaryIO, end: int) -> dict[str, str]:
    """Walk ModelProto's top-level fields to the end of the file; its metadata_props."""
    seen: set[int] = set()
    metadata: dict[str, str] = {}
    while f.tell() < end:
        tag = _varint(f)
        field, wire = tag >> 3, tag & 7
        if field == 0 or wire not in (_VARINT, _I64, _LEN, _I32) or _MODEL_FIELDS.get(field, wire) != wire:
            raise NotOnnx("not the layout of an ONNX model")
        if wire == _VARINT:
            _varint(f)
        elif wire in (_I64, _I32):
            _skip(f, 8 if wire == _I64 else 4, end)
        else:
            size = _varint(f)
            if field == _METADATA_PROPS and size <= _METADATA_ENTRY_MAX and f.tell() + size <= end:
                entry = _string_fields(f.read(size))
                metadata[entry.get(1, "")] = entry.get(2, "")
            else:
                _skip(f, size, end)
        seen.add(field)
    if _IR_VERSION not in seen or _GRAPH not in seen:
        raise NotOnnx("no graph" if f.tell() else "an empty file")
    return metadata


def read_metadata(path: Path) -> dict[str, str]:
    """The model's metadata (``metadata_props``); NotOnnx when it is not an ONNX model, OSError
    when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head.startswith(_ZIP_MAGIC) or head[:2] in _PICKLE_MAGICS:
            raise NotOnnx("a PyTorch checkpoint (zip or pickle): export the model to ONNX first")
        f.seek(0)
        return _read_model_metadata(f, os.fstat(f.fileno()).st_size)


def class_names(metadata: Mapping[str, str]) -> list[str]:
    """Ultralytics exports carry their class names in the metadata; YOLOX is COCO."""
    if "names" in metadata:
        try:
            names = ast.literal_eval(metadata["names"])
            return [str(names[i]) for i in sorted(names)] if isinstance(names, dict) else [str(n) for n in names]
        except (ValueError, SyntaxError, TypeError):
            log.warning("model metadata 'names' is not readable; using COCO names")
    return list(COCO_CLASSES)


@functools.lru_cache(maxsize=8)
def _class_names_of_file(path: str, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    return tuple(class_names(read_metadata(Path(path))))


def file_class_names(path: Path) -> tuple[str, ...] | None:
    """The class names the model file reports, or None when it cannot be read as an ONNX model.
    Cached per file version: config validation asks on every edit."""
    try:
        st = os.stat(path)
        return _class_names_of_file(str(path), st.st_mtime_ns, st.st_size)
    except (OSError, ValueError):  # NotOnnx is a ValueError, and so is a NUL byte in the path
        return None


def model_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as the model (``"<path>: not an ONNX model: ..."``), or None."""
    problem = file_problem(path)
    if problem:
        return problem
    try:
        read_metadata(path)
    except NotOnnx as e:
        return f"{path}: not an ONNX model: {e}"
    except OSError as e:
        return f"{path}: cannot read: {e.strerror or e}"
    return None
