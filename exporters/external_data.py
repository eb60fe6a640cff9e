"""The external-data files an ONNX file names, read from its protobuf bytes without ``onnx``.

The CLI declares them as inputs, so that no output overwrites a model's weights
(docs/safety.md), and it does so before any stage is imported: ``import onnx`` alone takes
about a second. Only the messages that can hold a tensor are opened (the fields below, by their
numbers in ``onnx.proto``); every other field, a weight's raw bytes included, is skipped by its
length, and the file is memory-mapped, so a skipped weight is never read from disk.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Iterator

# message -> {field number: the message that field holds}, for the fields that can lead to a tensor
_FIELDS: dict[str, dict[int, str]] = {
    "ModelProto": {7: "GraphProto", 20: "TrainingInfoProto", 25: "FunctionProto"},
    "TrainingInfoProto": {1: "GraphProto", 2: "GraphProto"},
    "FunctionProto": {7: "NodeProto"},
    "GraphProto": {1: "NodeProto", 5: "TensorProto", 15: "SparseTensorProto"},
    "NodeProto": {5: "AttributeProto"},  # Constant's value, If / Loop / Scan subgraphs
    "AttributeProto": {5: "TensorProto", 6: "GraphProto", 10: "TensorProto", 11: "GraphProto",
                       22: "SparseTensorProto", 23: "SparseTensorProto"},
    "SparseTensorProto": {1: "TensorProto", 2: "TensorProto"},
    "TensorProto": {13: "StringStringEntryProto"},  # external_data: key/value entries
}
_KEY, _VALUE = 1, 2  # StringStringEntryProto's fields
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5  # protobuf wire types


class _Malformed(Exception):
    """Bytes that are not a protobuf message (the model's loader reports the file)."""


def external_data_locations(path: str | Path) -> tuple[str, ...]:
    """The ``location`` of every tensor's external data in the ONNX file ``path`` (initializers,
    Constant nodes, subgraphs, functions), each once, relative to the file's folder as written.

    ``()`` for a file without external data and for a path that is not a file; a file that is
    not a valid ONNX model gives what was read before the fault (its loader reports the file).
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return ()
    found: dict[str, None] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            _collect(view, "ModelProto", found)
        except (_Malformed, RecursionError):  # graphs nested deeper than Python recurses: a hostile file,
            pass                               # which its loader refuses
        finally:
            view.release()
    return tuple(found)


def external_data_paths(path: str | Path) -> tuple[Path, ...]:
    """The files :func:`external_data_locations` names, as paths (``path``'s folder / location)."""
    folder = Path(path).parent
    return tuple(folder / loc for loc in external_data_locations(path))


def _collect(message: memoryview, kind: str, found: dict[str, None]) -> None:
    for number, value in _length_delimited(message):
        inner = _FIELDS[kind].get(number)
        if inner == "StringStringEntryProto":
            entry = {n: bytes(v) for n, v in _length_delimited(value)}
            if entry.get(_KEY) == b"location" and entry.get(_VALUE):
                found[entry[_VALUE].decode("utf-8", errors="replace")] = None
        elif inner is not None:
            _collect(value, inner, found)


def _length_delimited(message: memoryview) -> Iterator[tuple[int, memoryview]]:
    """``(field number, bytes)`` of each length-delimited field of one message (sub-messages,
    strings, packed numbers); the other fields are skipped."""
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, pos = _varint(message, pos)
        elif wire == _FIXED64:
            pos += 8
        elif wire == _FIXED32:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            size, pos = _varint(message, pos)
            if pos + size > end:
                raise _Malformed
            yield number, message[pos : pos + size]
            pos += size
        else:  # groups (3, 4): not used by onnx.proto
            raise _Malformed
    if pos != end:
        raise _Malformed


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """The base-128 varint at ``pos`` and the position after it."""
    value = shift = 0
    while pos < len(buf) and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise _Malformed
