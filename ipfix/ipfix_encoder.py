"""IPFIX (RFC 7011) messages: header, template sets, data sets, options."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from ipfix.assembler import Body, make_set
from ipfix.options import (
    INTERFACE_FIELDS,
    SAMPLING_FIELDS,
    SAMPLING_VALUES,
    STATS_FIELDS,
    STATS_SCOPE,
)
from ipfix.packer import RecordPacker
from ipfix.profile import Profile
from ipfix.template import Template, flow_templates, options_template

VERSION = 10
HEADER = struct.Struct(">HHIII")
TEMPLATE_SET_ID = 2
OPTIONS_TEMPLATE_SET_ID = 3
SEQUENCE_MODULO = 1 << 32


class IpfixEncoder:
    protocol = "ipfix"
    header_length = HEADER.size
    align = 1  # no padding in data sets

    def __init__(self, profile: Profile, observation_domain_id: int, max_message_size: int) -> None:
        self.domain_id = observation_domain_id
        self.max_message_size = max_message_size
        taken: set[int] = set()
        self.templates: dict[int, Template] = flow_templates(profile, "ipfix", taken)
        self.packers = {family: RecordPacker(t) for family, t in self.templates.items()}
        self._template_records = [t.ipfix_record() for t in self.templates.values()]
        self.sequence = 0  # data records sent before the next message, flow domain
        self.stats_sequence = 0  # the same for observation domain 0
        self._stats = RecordPacker(
            options_template([STATS_SCOPE, *STATS_FIELDS], 1, "ipfix", taken, {})
        )
        # Fixed 16 bytes (Linux IFNAMSIZ), not variable length: pmacct 1.7.7 miscounts records
        # of variable length in options data sets and reports false sequence errors (measured).
        self._interfaces = RecordPacker(
            options_template(list(INTERFACE_FIELDS), 1, "ipfix", taken, {"interfaceName": 16})
        )
        self._sampling = RecordPacker(
            options_template(list(SAMPLING_FIELDS), 1, "ipfix", taken, {})
        )

    def header(self, body_length: int, export_time: int, sequence: int, domain_id: int) -> bytes:
        return HEADER.pack(VERSION, HEADER.size + body_length, export_time, sequence, domain_id)

    def wrap(self, body: bytes, records: int, now_ms: int) -> bytes:
        return self.wrap_bodies([([b"", body], len(body), records)], now_ms)[0]

    def wrap_bodies(self, bodies: Iterable[Body], now_ms: int) -> list[bytes]:
        """One message per body from `data_bodies` (parts consumed), in sequence. The hot loop
        of export: everything it needs is a local."""
        pack_header, join = HEADER.pack, b"".join
        seconds, sequence, domain_id = now_ms // 1000, self.sequence, self.domain_id
        messages = []
        for parts, length, records in bodies:
            parts[0] = pack_header(VERSION, HEADER.size + length, seconds, sequence, domain_id)
            sequence = (sequence + records) % SEQUENCE_MODULO
            messages.append(join(parts))
        self.sequence = sequence
        return messages

    def template_messages(self, now_ms: int) -> list[bytes]:
        """All data templates, in as few template-only messages as the size limit allows."""
        room = self.max_message_size - HEADER.size - 4
        messages, group, size = [], [], 0
        for record in self._template_records:
            if group and size + len(record) > room:
                messages.append(self._template_message(group, now_ms))
                group, size = [], 0
            group.append(record)
            size += len(record)
        if group:
            messages.append(self._template_message(group, now_ms))
        return messages

    def _template_message(self, records: list[bytes], now_ms: int) -> bytes:
        body = make_set(TEMPLATE_SET_ID, b"".join(records), 1)
        return self.header(len(body), now_ms // 1000, self.sequence, self.domain_id) + body

    def options_messages(
        self, stats: dict[str, int], now_ms: int, interfaces: dict[int, str] | None, sampling: bool
    ) -> list[bytes]:
        record = {STATS_SCOPE: 0, **stats}
        record.setdefault(STATS_SCOPE, 0)
        messages = self._exporter_options(self._stats, [record], now_ms)
        # Interface names describe the exporter's host, not one flow: like the statistics they go
        # in observation domain 0. In the flow domain every options message costs one nfdump
        # "sequence failure" (it does not count options records), seen with nfdump 1.7.1.
        if interfaces:
            rows = [
                {"ingressInterface": i, "interfaceName": n} for i, n in sorted(interfaces.items())
            ]
            messages += self._exporter_options(self._interfaces, rows, now_ms)
        # Sampling describes the flow domain, so it can only go there; the profiles carry
        # samplingInterval in every record instead, and this stays opt-in.
        if sampling:
            messages += self._domain_options(self._sampling, [dict(SAMPLING_VALUES)], now_ms)
        return messages

    def _options_body(self, packer: RecordPacker, rows: list[dict]) -> bytes:
        template = packer.template
        return make_set(OPTIONS_TEMPLATE_SET_ID, template.ipfix_record(), 1) + make_set(
            template.template_id, b"".join(map(packer.pack_one, rows)), 1
        )

    def _domain_options(self, packer: RecordPacker, rows: list[dict], now_ms: int) -> list[bytes]:
        messages = []
        for chunk in _fit(packer, rows, self.max_message_size - HEADER.size):
            body = self._options_body(packer, chunk)
            messages.append(self.wrap(body, len(chunk), now_ms))
        return messages

    def _exporter_options(
        self, packer: RecordPacker, rows: list[dict], now_ms: int
    ) -> list[bytes]:
        """Options messages in observation domain 0, with that domain's own sequence."""
        messages = []
        for chunk in _fit(packer, rows, self.max_message_size - HEADER.size):
            body = self._options_body(packer, chunk)
            messages.append(self.header(len(body), now_ms // 1000, self.stats_sequence, 0) + body)
            self.stats_sequence = (self.stats_sequence + len(chunk)) % SEQUENCE_MODULO
        return messages


def _fit(packer: RecordPacker, rows: list[dict], max_body: int) -> Iterator[list[dict]]:
    """Rows grouped so that template set + data set stay within max_body."""
    room = max_body - 8 - len(packer.template.ipfix_record())
    chunk: list[dict] = []
    size = 0
    for row, length in _sizes(packer, rows):
        if chunk and size + length > room:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += length
    if chunk:
        yield chunk


def _sizes(packer: RecordPacker, rows: Iterable[dict]) -> Iterator[tuple[dict, int]]:
    for row in rows:
        yield row, len(packer.pack_one(row))
