"""Decoder for IPFIX, NetFlow v9 and NetFlow v5 datagrams, with a template cache per
(exporter address, observation domain / source id, protocol), bounded (ipfix.template_cache).
Malformed input raises DecodeError (with a reason to count it by) and nothing else; every loop
advances by at least four bytes, so no length can make it spin, and the work per datagram is
linear in its size."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NoReturn

from ipfix.elements import BY_IPFIX, BY_NAME, BY_V9, VARIABLE_LENGTH, unknown_ipfix, unknown_v9
from ipfix.errors import DecodeError
from ipfix.record_parser import RecordParser, WireField
from ipfix.template import V9_RELATIVE_TIMES, V9_SCOPE_TYPES
from ipfix.template_cache import (
    DEFAULT_MAX_FIELDS,
    DEFAULT_MAX_TEMPLATES,
    CachedTemplate,
    Source,
    TemplateCache,
)
from ipfix.v5_encoder import v5_template

_IPFIX_HEADER = struct.Struct(">HHIII")
_V9_HEADER = struct.Struct(">HHIIII")
_V5_HEADER = struct.Struct(">HHIIIIBBH")
_SET_HEADER = struct.Struct(">HH")
_V9_RELATIVE = {BY_NAME[v].id: k for k, v in V9_RELATIVE_TIMES.items()}  # 22/21 -> epoch keys
_V5_PARSER = RecordParser(
    tuple(WireField(f.element, f.length, f.key) for f in v5_template().fields), strip_nul=False
)


@dataclass
class DecodedMessage:
    protocol: str  # "ipfix", "v9" or "v5"
    exporter: tuple[str, int]
    export_time: int  # Unix seconds
    sequence: int
    domain_id: int  # IPFIX observation domain, v9 source id, v5 engine_type << 8 | engine_id
    length: int  # datagram length
    count: int | None = None  # v9 and v5 header count
    sys_uptime_ms: int | None = None
    records: list[dict] = field(default_factory=list)  # flow (data) records
    options_records: list[dict] = field(default_factory=list)
    templates: list[int] = field(default_factory=list)  # template ids (re)defined here
    options_templates: list[int] = field(default_factory=list)
    sets: list[tuple[int, int]] = field(default_factory=list)  # (set id, set length) in order
    unknown_template_sets: int = 0  # data sets whose template is not (yet) known


class Decoder:
    def __init__(
        self, max_templates: int = DEFAULT_MAX_TEMPLATES, max_fields: int = DEFAULT_MAX_FIELDS
    ) -> None:
        self.templates = TemplateCache(max_templates, max_fields)

    def feed(self, datagram: bytes, exporter: tuple[str, int]) -> list[DecodedMessage]:
        """The message(s) in one datagram. Raises DecodeError only."""
        data = bytes(datagram)
        if len(data) < 2:
            raise DecodeError(f"datagram of {len(data)} bytes: too short for a version", "short")
        version = int.from_bytes(data[:2], "big")
        try:
            if version == 10:
                return [self._ipfix(data, exporter)]
            if version == 9:
                return [self._v9(data, exporter)]
            if version == 5:
                return [self._v5(data, exporter)]
        except DecodeError:
            raise
        except (struct.error, IndexError, ValueError, KeyError, TypeError, OverflowError) as exc:
            # Every check has its own reason: landing here is a decoder bug the fuzzer looks for.
            message = f"malformed version {version} datagram: {exc!r}"
            raise DecodeError(message, "unexpected") from None
        raise DecodeError(f"unsupported version {version}", "version")

    def records(self, datagram: bytes, exporter: tuple[str, int]) -> list[dict]:
        return [r for m in self.feed(datagram, exporter) for r in m.records]

    # IPFIX ---------------------------------------------------------------------------------
    def _ipfix(self, data: bytes, exporter: tuple[str, int]) -> DecodedMessage:
        if len(data) < _IPFIX_HEADER.size:
            raise DecodeError(
                f"IPFIX message of {len(data)} bytes: shorter than its header", "short"
            )
        _, length, export_time, sequence, domain = _IPFIX_HEADER.unpack_from(data)
        if length != len(data):
            raise DecodeError(
                f"IPFIX length field {length} but datagram has {len(data)} bytes", "length"
            )
        message = DecodedMessage("ipfix", exporter, export_time, sequence, domain, length)
        source = (exporter[0], domain, "ipfix")
        for set_id, body in _sets(data, _IPFIX_HEADER.size, "IPFIX"):
            message.sets.append((set_id, len(body) + 4))
            if set_id in (2, 3):
                self._ipfix_templates(body, set_id == 3, source, message)
            elif set_id >= 256:
                _data_set(self.templates.get(source, set_id), body, message)
            else:
                raise DecodeError(f"IPFIX set id {set_id} is reserved", "set")
        return message

    def _ipfix_templates(
        self, body: bytes, options: bool, source: Source, message: DecodedMessage
    ) -> None:
        offset, end = 0, len(body)
        while end - offset >= 4:
            template_id, count = struct.unpack_from(">HH", body, offset)
            if count == 0:  # a withdrawal is 4 bytes in options template sets too (§8.1)
                if template_id == 0:  # padding (tolerated although never emitted)
                    break
                if template_id == (3 if options else 2):
                    self.templates.withdraw_all(source, options)
                elif template_id >= 256:
                    self.templates.withdraw(source, template_id)
                else:
                    _template_error(f"IPFIX withdrawal of template id {template_id}")
                offset += 4
                continue
            if template_id < 256:
                _template_error(f"IPFIX template id {template_id} below 256")
            scope = 0
            if options:
                if end - offset < 6:
                    _template_error(f"options template {template_id} truncated")
                scope = struct.unpack_from(">H", body, offset + 4)[0]
                if not 0 < scope <= count:
                    _template_error(f"options template {template_id}: scope count {scope} invalid")
            offset += 6 if options else 4
            fields = []
            for _ in range(count):
                if offset + 4 > end:
                    _template_error(f"template {template_id} truncated")
                raw_id, length = struct.unpack_from(">HH", body, offset)
                offset += 4
                pen = 0
                if raw_id & 0x8000:
                    if offset + 4 > end:
                        _template_error(f"template {template_id} truncated")
                    pen = struct.unpack_from(">I", body, offset)[0]
                    offset += 4
                ie_id = raw_id & 0x7FFF
                element = BY_IPFIX.get((pen, ie_id)) or unknown_ipfix(pen, ie_id)
                fields.append(WireField(element, length, element.name))
            parser = RecordParser(tuple(fields), True)
            self.templates.put(source, template_id, CachedTemplate(parser, scope))
            (message.options_templates if options else message.templates).append(template_id)

    # NetFlow v9 ----------------------------------------------------------------------------
    def _v9(self, data: bytes, exporter: tuple[str, int]) -> DecodedMessage:
        if len(data) < _V9_HEADER.size:
            raise DecodeError(f"v9 packet of {len(data)} bytes: shorter than its header", "short")
        _, count, uptime, unix_secs, sequence, source_id = _V9_HEADER.unpack_from(data)
        message = DecodedMessage("v9", exporter, unix_secs, sequence, source_id, len(data))
        message.count, message.sys_uptime_ms = count, uptime
        boot_ms = unix_secs * 1000 - uptime
        source = (exporter[0], source_id, "v9")
        for set_id, body in _sets(data, _V9_HEADER.size, "v9"):
            message.sets.append((set_id, len(body) + 4))
            if set_id == 0:
                self._v9_templates(body, source, message)
            elif set_id == 1:
                self._v9_options_templates(body, source, message)
            elif set_id >= 256:
                _data_set(self.templates.get(source, set_id), body, message)
            else:
                raise DecodeError(f"v9 FlowSet id {set_id} is reserved", "set")
        found = len(message.templates) + len(message.options_templates)
        found += len(message.records) + len(message.options_records)
        if found < count and not message.unknown_template_sets:
            # v9 has no length field: count (all records, RFC 3954 §5.1) is the only way to
            # see a packet cut at a FlowSet boundary.
            raise DecodeError(f"v9 count {count} but {found} records: truncated packet", "count")
        for record in message.records:
            for key in ("flowStartMilliseconds", "flowEndMilliseconds"):
                relative = record.get(_relative_key(key))
                if isinstance(relative, int):  # an over-long field stays bytes: left as sent
                    record[key] = boot_ms + record.pop(_relative_key(key))
        return message

    def _v9_templates(self, body: bytes, source: Source, message: DecodedMessage) -> None:
        offset, end = 0, len(body)
        while end - offset >= 4:
            template_id, count = struct.unpack_from(">HH", body, offset)
            offset += 4
            if template_id == 0 and count == 0:
                break  # padding
            if template_id < 256:
                _template_error(f"v9 template id {template_id} below 256")
            if offset + 4 * count > end:
                _template_error(f"v9 template {template_id} truncated")
            fields = [
                _v9_field(*struct.unpack_from(">HH", body, offset + 4 * i)) for i in range(count)
            ]
            offset += 4 * count
            if fields:
                parser = RecordParser(tuple(fields), True)
                self.templates.put(source, template_id, CachedTemplate(parser, 0))
                message.templates.append(template_id)

    def _v9_options_templates(self, body: bytes, source: Source, message: DecodedMessage) -> None:
        offset, end = 0, len(body)
        while end - offset >= 6:
            template_id, scope_length, option_length = struct.unpack_from(">HHH", body, offset)
            offset += 6
            if template_id == 0:
                break  # padding
            if template_id < 256 or scope_length % 4 or option_length % 4:
                _template_error(f"v9 options template {template_id} malformed")
            if offset + scope_length + option_length > end:
                _template_error(f"v9 options template {template_id} truncated")
            fields = []
            for i in range(scope_length // 4):
                scope_type, length = struct.unpack_from(">HH", body, offset + 4 * i)
                name = V9_SCOPE_TYPES.get(scope_type, f"scope{scope_type}")
                fields.append(WireField(unknown_v9(scope_type), length, name))
            offset += scope_length
            for i in range(option_length // 4):
                fields.append(_v9_field(*struct.unpack_from(">HH", body, offset + 4 * i)))
            offset += option_length
            if fields:
                parser = RecordParser(tuple(fields), True)
                scope = max(1, scope_length // 4)
                self.templates.put(source, template_id, CachedTemplate(parser, scope))
                message.options_templates.append(template_id)

    # NetFlow v5 ----------------------------------------------------------------------------
    def _v5(self, data: bytes, exporter: tuple[str, int]) -> DecodedMessage:
        if len(data) < _V5_HEADER.size:
            raise DecodeError(f"v5 packet of {len(data)} bytes: shorter than its header", "short")
        _, count, uptime, secs, nsecs, sequence, engine_type, engine_id, _ = _V5_HEADER.unpack_from(
            data
        )
        if not 1 <= count <= 30:
            raise DecodeError(f"v5 count {count}: must be 1..30", "length")
        if len(data) != _V5_HEADER.size + 48 * count:
            raise DecodeError(f"v5 count {count} but {len(data)} bytes", "length")
        message = DecodedMessage(
            "v5", exporter, secs, sequence, engine_type << 8 | engine_id, len(data), count, uptime
        )
        boot_ms = secs * 1000 + nsecs // 1_000_000 - uptime
        for record in _V5_PARSER.parse(data[_V5_HEADER.size :]):
            del record["_pad1"], record["_pad2"]
            record["flowStartMilliseconds"] += boot_ms
            record["flowEndMilliseconds"] += boot_ms
            message.records.append(record)
        return message


def _relative_key(key: str) -> str:
    return V9_RELATIVE_TIMES[key]


def _template_error(message: str) -> NoReturn:
    raise DecodeError(message, "template")


def _v9_field(type_id: int, length: int) -> WireField:
    if length == VARIABLE_LENGTH:
        _template_error(f"v9 field {type_id} with length 65535: v9 has no variable length")
    element = BY_V9.get(type_id) or unknown_v9(type_id)
    return WireField(element, length, element.name)


def _sets(data: bytes, offset: int, what: str):
    end = len(data)
    while offset < end:
        if end - offset < 4:
            raise DecodeError(f"{what}: {end - offset} stray bytes after the last set", "set")
        set_id, length = _SET_HEADER.unpack_from(data, offset)
        if length < 4 or offset + length > end:
            raise DecodeError(
                f"{what} set {set_id}: length {length} does not fit the message", "set"
            )
        yield set_id, data[offset + 4 : offset + length]
        offset += length


def _data_set(template: CachedTemplate | None, body: bytes, message: DecodedMessage) -> None:
    if template is None:
        message.unknown_template_sets += 1
        return
    records = template.parser.parse(body)
    (message.options_records if template.scope_count else message.records).extend(records)
