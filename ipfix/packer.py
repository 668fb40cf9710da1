"""One precompiled packer per template: records (dicts keyed by IE name) to data-record bytes.

The hot path is a single struct call for a whole data set: the format of one record repeated n
times, fed by operator.itemgetter rows. Anything unusual (a missing key, a value out of range,
strings, v9's relative times) falls back to the careful per-record path, which fixes or refuses
the value, so the fast path never has to check anything.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import chain
from operator import itemgetter

from ipfix.errors import IpfixError
from ipfix.template import Template, TemplateField

_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
# Reduced-size flags lose their high bits (tcpControlBits at 1 byte drops NS); other integers
# saturate, so a too-large counter stays recognisably large instead of wrapping to small.
_MASKED = frozenset(
    {"tcpControlBits", "reverseTcpControlBits", "CLIENT_TCP_FLAGS", "SERVER_TCP_FLAGS"}
)


def _format_char(f: TemplateField) -> str:
    t = f.element.type
    if f.variable:
        return ""
    if t.startswith("unsigned") or t in ("dateTimeSeconds", "dateTimeMilliseconds", "boolean"):
        return _UNSIGNED.get(f.length, f"{f.length}s")
    if t.startswith("signed"):
        return _SIGNED.get(f.length, f"{f.length}s")
    if t.startswith("float"):
        return "f" if f.length == 4 else "d"
    return f"{f.length}s"


def encode_variable(value: bytes) -> bytes:
    """RFC 7011 §7: a 1-byte length below 255, else 255 and a 2-byte length."""
    n = len(value)
    if n < 255:
        return bytes((n,)) + value
    return b"\xff" + n.to_bytes(2, "big") + value


class RecordPacker:
    """Packs records for one template. `boot_ms` is read for v9 relative times."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.fields = template.fields
        self.variable = template.variable
        self.record_length = template.record_length
        self.boot_ms = 0
        self._keys = template.keys
        self._defaults = {f.key: f.default for f in self.fields}
        self._record_format = "".join(_format_char(f) for f in self.fields)
        self._structs: dict[int, struct.Struct] = {}
        self._one = struct.Struct(">" + self._record_format) if not self.variable else None
        # The fast path needs values struct takes as they are: no strings to encode.
        self._plain = not any(f.element.type == "string" or f.variable for f in self.fields)
        getter = itemgetter(*self._keys)
        rebased = [i for i, f in enumerate(self.fields) if f.relative_time]
        self._row: Callable[[dict], Sequence]
        if rebased:
            self._row = self._rebasing_row(getter, rebased)
        elif len(self._keys) > 1:
            self._row = getter
        else:
            self._row = lambda r, g=getter: (g(r),)

    def _rebasing_row(self, getter: Callable[[dict], tuple], rebased: list[int]) -> Callable:
        def row(record: dict) -> list:
            values = list(getter(record))
            for i in rebased:
                values[i] -= self.boot_ms
            return values

        return row

    def pack_set(self, records: Sequence[dict]) -> bytes:
        """The data records of one set, concatenated (fixed-length templates only)."""
        if self._plain:
            n = len(records)
            packer = self._structs.get(n)
            if packer is None:
                packer = self._structs[n] = struct.Struct(">" + self._record_format * n)
            try:
                return packer.pack(*chain.from_iterable(map(self._row, records)))
            except KeyError:
                # Records without the profile's defaulted keys: complete them, then retry.
                defaults = self._defaults
                completed = [{**defaults, **r} for r in records]
                try:
                    return packer.pack(*chain.from_iterable(map(self._row, completed)))
                except (KeyError, struct.error, TypeError):
                    pass
            except (struct.error, TypeError):
                pass
        return b"".join(map(self.pack_one, records))

    def pack_one(self, record: dict) -> bytes:
        """One record, carefully: defaults for missing keys, values made to fit, strings encoded."""
        values = [self._value(f, record) for f in self.fields]
        if self._one is not None:
            return self._one.pack(*values)
        parts = []
        for f, value in zip(self.fields, values, strict=True):
            if f.variable:
                parts.append(encode_variable(value))
            else:
                parts.append(struct.pack(">" + _format_char(f), value))
        return b"".join(parts)

    def _value(self, f: TemplateField, record: dict) -> object:
        value = record.get(f.key)
        if value is None:
            value = f.default
        t = f.element.type
        try:
            if t == "string":
                data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                if not f.variable:
                    return data[: f.length].ljust(f.length, b"\0")
                return data[:65535]
            if t in ("ipv4Address", "ipv6Address", "macAddress", "octetArray"):
                data = bytes(value) if value != 0 else b""
                if f.variable:
                    return data[:65535]
                if t == "octetArray":
                    return data[: f.length].ljust(f.length, b"\0")
                if len(data) not in (0, f.length):
                    raise IpfixError(
                        f"record field '{f.key}': {len(data)} bytes, expected {f.length}"
                    )
                return data.ljust(f.length, b"\0")
            if t.startswith("float"):
                return float(value)
            number = int(value)
        except (TypeError, ValueError, AttributeError) as exc:
            raise IpfixError(f"record field '{f.key}': bad value {value!r} ({exc})") from None
        if f.relative_time:
            number -= self.boot_ms
        bits = 8 * f.length
        if t.startswith("signed"):
            low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            return min(max(number, low), high)
        if f.key in _MASKED:
            return number & ((1 << bits) - 1)
        number = min(max(number, 0), (1 << bits) - 1)
        if f.length not in _UNSIGNED:
            return number.to_bytes(f.length, "big")
        return number
