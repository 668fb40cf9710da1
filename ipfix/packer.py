"""One precompiled packer per template: rows (tuples in the template's field order) to the bytes
of data records.

A row holds the values a record dict would hold, in `template.keys` order: addresses as packed
bytes, strings as str, times as epoch milliseconds (v9/v5 rebase them to sysUptime here). The hot
path is `struct` work with no Python per field:
- a template of plain numbers and bytes packs with `starmap(Struct.pack, rows)`;
- anything else (v9/v5 relative times, strings) gets one generated function per template that
  unpacks a row and makes one struct call per fixed-length stretch; a string is encoded once per
  distinct value (process names repeat for every flow of a process) and looked up after that.
Anything unusual (a value out of range, a wrong type, None) makes the fast path raise; the careful
per-row path then fixes or refuses each value, so the fast path never has to check anything.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import accumulate, repeat, starmap
from operator import itemgetter

from ipfix.elements import BYTES_TYPES
from ipfix.errors import IpfixError
from ipfix.template import Template, TemplateField

_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SIGNED = {1: "b", 2: "h", 4: "i", 8: "q"}
# Reduced-size flags lose their high bits (tcpControlBits at 1 byte drops NS); other integers
# saturate, so a too-large counter stays recognisably large instead of wrapping to small.
_MASKED = frozenset(
    {"tcpControlBits", "reverseTcpControlBits", "CLIENT_TCP_FLAGS", "SERVER_TCP_FLAGS"}
)
# Distinct strings remembered per field; past this the cache starts over (a bound, not an LRU:
# process names and interface names are few, so it is almost never reached).
STRING_CACHE_LIMIT = 4096
# What the fast path raises on a value it cannot take as it is.
_FAST_PATH_ERRORS = (struct.error, TypeError, ValueError, OverflowError)


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


def row_default(f: TemplateField) -> object:
    """The value a row carries for a key the record lacks: encodes like the careful path's."""
    t = f.element.type
    if t == "string":
        return ""
    if t in BYTES_TYPES:
        return b"" if f.variable else bytes(f.length)
    return f.default


def fit_value(f: TemplateField, value: object, boot_ms: int = 0) -> object:
    """One value made to fit its field: defaults for None, strings encoded, numbers saturated
    (flags masked), v9/v5 times rebased. Raises IpfixError for what cannot be fixed."""
    if value is None:
        value = f.default
    t = f.element.type
    try:
        if t == "string":
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            if not f.variable:
                return data[: f.length].ljust(f.length, b"\0")
            return data[:65535]
        if t in BYTES_TYPES:
            data = bytes(value) if value != 0 else b""
            if f.variable:
                return data[:65535]
            if t == "octetArray":
                return data[: f.length].ljust(f.length, b"\0")
            if len(data) not in (0, f.length):
                raise IpfixError(f"record field '{f.key}': {len(data)} bytes, expected {f.length}")
            return data.ljust(f.length, b"\0")
        if t.startswith("float"):
            return float(value)
        number = int(value)
    except (TypeError, ValueError, AttributeError) as exc:
        raise IpfixError(f"record field '{f.key}': bad value {value!r} ({exc})") from None
    if f.relative_time:
        number -= boot_ms
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


class _Encoded(dict):
    """value -> its wire bytes, computed on first sight; `cache[value]` is a C dict lookup."""

    def __init__(self, convert: Callable[[object], bytes]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, value: object) -> bytes:
        data = self.convert(value)
        if len(self) >= STRING_CACHE_LIMIT:
            self.clear()
        self[value] = data
        return data


@dataclass(frozen=True, slots=True)
class PackedRecords:
    """Data records packed back to back. Fixed-length templates: record i is at
    i * record_length. Variable-length: `ends[i]` is where record i ends."""

    data: bytes
    count: int
    record_length: int
    ends: list[int] | None = None

    def take(self, start: int, room: int) -> int:
        """How many records from `start` fit in `room` bytes (at most all that are left)."""
        if self.ends is None:
            return min(self.count - start, max(room, 0) // self.record_length)
        offset = self.ends[start - 1] if start else 0
        return bisect_right(self.ends, offset + room, start) - start

    def span(self, start: int, count: int) -> tuple[int, int]:
        """Byte offsets of records [start, start + count)."""
        if self.ends is None:
            return start * self.record_length, (start + count) * self.record_length
        return (self.ends[start - 1] if start else 0), self.ends[start + count - 1]


class RecordPacker:
    """Packs rows (or record dicts, converted once) for one template."""

    def __init__(self, template: Template) -> None:
        self.template = template
        self.fields = template.fields
        self.variable = template.variable
        self.record_length = template.record_length
        self.keys = template.keys
        self.row_defaults = tuple(row_default(f) for f in self.fields)
        self._defaults = dict(zip(self.keys, self.row_defaults, strict=True))
        getter = itemgetter(*self.keys)
        self._getter: Callable[[dict], tuple] = (
            getter if len(self.keys) > 1 else (lambda r, g=getter: (g(r),))
        )
        self._one = struct.Struct(">" + "".join(map(_format_char, self.fields)))
        self._plain = not any(
            f.variable or f.relative_time or f.element.type == "string" for f in self.fields
        )
        self._pack_row = _compile(self.fields)

    # -- dicts --------------------------------------------------------------------------------

    def rows(self, records: Sequence[dict]) -> list[tuple]:
        """Record dicts as rows; keys a record lacks take the template's defaults."""
        try:
            return list(map(self._getter, records))
        except KeyError:
            defaults = self._defaults
            return [self._getter({**defaults, **r}) for r in records]

    def pack_one(self, record: dict) -> bytes:
        """One record dict, carefully (options data, a few records)."""
        return self.pack_careful(tuple(map(record.get, self.keys)), 0)

    # -- rows ---------------------------------------------------------------------------------

    def pack(self, rows: Sequence[tuple], boot_ms: int = 0) -> PackedRecords:
        """All rows, back to back. `boot_ms`: the v9/v5 virtual boot epoch (relative times)."""
        try:
            if self._plain:
                records = list(starmap(self._one.pack, rows))
            else:
                records = list(map(self._pack_row, rows, repeat(boot_ms)))
        except _FAST_PATH_ERRORS:
            records = [self._pack_or_fix(row, boot_ms) for row in rows]
        if self.variable:
            ends = list(accumulate(map(len, records)))
            return PackedRecords(b"".join(records), len(records), 0, ends)
        return PackedRecords(b"".join(records), len(records), self.record_length)

    def _pack_or_fix(self, row: tuple, boot_ms: int) -> bytes:
        try:
            if self._plain:
                return self._one.pack(*row)
            return self._pack_row(row, boot_ms)
        except _FAST_PATH_ERRORS:
            return self.pack_careful(row, boot_ms)

    def check_length(self, row: Sequence) -> None:
        if len(row) != len(self.fields):
            raise IpfixError(
                f"template {self.template.template_id}: a row of {len(row)} values for "
                f"{len(self.fields)} fields"
            )

    def pack_careful(self, row: Sequence, boot_ms: int = 0) -> bytes:
        """One row, every value checked and made to fit (or refused with IpfixError)."""
        self.check_length(row)
        values = [fit_value(f, v, boot_ms) for f, v in zip(self.fields, row, strict=True)]
        if not self.variable:
            return self._one.pack(*values)
        parts = []
        for f, value in zip(self.fields, values, strict=True):
            if f.variable:
                parts.append(encode_variable(value))  # type: ignore[arg-type]
            else:
                parts.append(struct.pack(">" + _format_char(f), value))
        return b"".join(parts)


def _compile(fields: tuple[TemplateField, ...]) -> Callable[[tuple, int], bytes]:
    """A function (row, boot_ms) -> record bytes for this template, generated once: it unpacks
    the row into locals and makes a single struct call. Fixed-length strings come from a cache of
    their encoded form. Variable-length fields (IPFIX) make the record's layout depend on their
    lengths: the tuple of their values picks, from a cache, a Struct with each one's encoded
    bytes (length prefix included) as a fixed "Ns" field, and those bytes. Relative times
    subtract the boot epoch."""
    namespace: dict[str, object] = {}
    arguments = []
    variable = [i for i, f in enumerate(fields) if f.variable]
    for i, f in enumerate(fields):
        value = f"a{i}"
        if f.variable:
            value = f"v{i}"
        elif f.element.type == "string":
            namespace[f"text{i}"] = _Encoded(lambda v, f=f: fit_value(f, v))
            value = f"text{i}[{value}]"
        elif f.relative_time:
            value = f"{value} - boot_ms"
        arguments.append(value)
    unpack = ", ".join(f"a{i}" for i in range(len(fields)))
    lines = ["def pack_row(row, boot_ms):", f"    ({unpack},) = row"]
    if variable:
        namespace["layouts"] = _Encoded(partial(_variable_layout, fields, variable))
        chosen = ", ".join(f"v{i}" for i in variable)
        by = ", ".join(f"a{i}" for i in variable)
        lines.append(f"    pack, {chosen} = layouts[{by},]")
    else:
        namespace["pack"] = struct.Struct(">" + "".join(map(_format_char, fields))).pack
    lines.append(f"    return pack({', '.join(arguments)})")
    source = "\n".join(lines) + "\n"
    exec(compile(source, f"<packer of {len(fields)} fields>", "exec"), namespace)
    return namespace["pack_row"]  # type: ignore[return-value]


def _variable_layout(
    fields: tuple[TemplateField, ...], variable: list[int], values: tuple
) -> tuple[Callable[..., bytes], ...]:
    """For these values of the variable-length fields: a Struct's pack taking their encoded
    bytes as fixed-length fields, then those bytes in field order."""
    encoded = {
        i: encode_variable(fit_value(fields[i], v)) for i, v in zip(variable, values, strict=True)
    }
    layout = "".join(
        f"{len(encoded[i])}s" if i in encoded else _format_char(f) for i, f in enumerate(fields)
    )
    return (struct.Struct(">" + layout).pack, *(encoded[i] for i in variable))
