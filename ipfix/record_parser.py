"""Decoding one template's data records: a precompiled struct for fixed-length templates, a
field-by-field walk for variable-length ones. Every value conversion is total (never raises on
odd lengths or bad UTF-8), so garbage reaches the caller as values, not exceptions. Integers are
ints of at most 8 bytes; an integer element sent longer stays bytes."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from ipfix.elements import VARIABLE_LENGTH, Element
from ipfix.errors import DecodeError

_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
_UNSIGNED_TYPES = frozenset(
    {
        "unsigned8",
        "unsigned16",
        "unsigned32",
        "unsigned64",
        "boolean",
        "dateTimeSeconds",
        "dateTimeMilliseconds",
    }
)
_SIGNED_TYPES = frozenset({"signed8", "signed16", "signed32", "signed64"})


@dataclass(frozen=True, slots=True)
class WireField:
    element: Element
    length: int
    name: str  # the key of the decoded record


def _struct_char(element: Element, length: int) -> str:
    if element.type in _UNSIGNED_TYPES and length in _UNSIGNED:
        return _UNSIGNED[length]
    if element.type in _SIGNED_TYPES and length in _SIGNED:
        return _SIGNED[length]
    if element.type == "float32" and length == 4 or element.type == "float64" and length in (4, 8):
        return "f" if length == 4 else "d"
    return f"{length}s"


def _converter(element: Element, length: int, strip_nul: bool) -> Callable[[object], object] | None:
    """Turns the raw struct value (int, float or bytes) into the record value, or None: as is."""
    t = element.type
    if t in _UNSIGNED_TYPES or t in _SIGNED_TYPES:
        if length in _UNSIGNED:
            return None
        signed = t in _SIGNED_TYPES
        if length == VARIABLE_LENGTH:
            return lambda raw: int.from_bytes(raw, "big", signed=signed) if len(raw) <= 8 else raw
        if length > 8:
            # Longer than any integer type (RFC 7011 §6.2 only allows shorter): as raw bytes,
            # not an int too long to print (Python refuses str() beyond 4300 digits).
            return None
        return lambda raw: int.from_bytes(raw, "big", signed=signed)
    if t == "string":
        # A fixed-length string is NUL-padded (v9 always, IPFIX e.g. interfaceName at IFNAMSIZ).
        if strip_nul and length != VARIABLE_LENGTH:
            return lambda raw: raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        return lambda raw: raw.decode("utf-8", "replace")
    return None


class RecordParser:
    def __init__(self, fields: tuple[WireField, ...], strip_nul: bool) -> None:
        self.fields = fields
        self.names = tuple(f.name for f in fields)
        self.variable = any(f.length == VARIABLE_LENGTH for f in fields)
        self.min_length = sum(1 if f.length == VARIABLE_LENGTH else f.length for f in fields)
        empty = next((f for f in fields if f.length == 0), None)
        if empty is not None:
            # Every field must cost a byte per record, or decoding is records x fields: a 2000-
            # field template of empty fields made 20 KB of data cost 6 s and 40 M values.
            raise DecodeError(f"template field {empty.name} has length 0", "template")
        if self.min_length <= 0:
            raise DecodeError("template with zero-length records", "template")
        self._converters = [
            (i, c)
            for i, f in enumerate(fields)
            if (c := _converter(f.element, f.length, strip_nul)) is not None
        ]
        self._struct = None
        self._chars = [
            "" if f.length == VARIABLE_LENGTH else _struct_char(f.element, f.length) for f in fields
        ]
        if not self.variable:
            self._struct = struct.Struct(">" + "".join(self._chars))

    def parse(self, data: bytes) -> list[dict]:
        """All records in a data set's payload; trailing bytes shorter than a record are padding."""
        if self._struct is not None:
            size = self._struct.size
            usable = len(data) - len(data) % size
            rows = self._struct.iter_unpack(data[:usable])
            return [self._record(list(row)) for row in rows]
        records = []
        offset = 0
        while len(data) - offset >= self.min_length:
            values, offset = self._walk(data, offset)
            if values is None:
                break  # the rest cannot hold a record: padding (or a truncated record)
            records.append(self._record(values))
        return records

    def _walk(self, data: bytes, offset: int) -> tuple[list | None, int]:
        values = []
        end = len(data)
        for f, char in zip(self.fields, self._chars, strict=True):
            if f.length == VARIABLE_LENGTH:
                if offset >= end:
                    return None, offset
                n = data[offset]
                offset += 1
                if n == 255:
                    if offset + 2 > end:
                        return None, offset
                    n = int.from_bytes(data[offset : offset + 2], "big")
                    offset += 2
                if offset + n > end:
                    return None, offset
                values.append(bytes(data[offset : offset + n]))
                offset += n
            else:
                if offset + f.length > end:
                    return None, offset
                values.append(struct.unpack_from(">" + char, data, offset)[0])
                offset += f.length
        return values, offset

    def _record(self, values: list) -> dict:
        for i, convert in self._converters:
            values[i] = convert(values[i])
        return dict(zip(self.names, values, strict=True))
