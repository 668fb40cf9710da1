"""NetFlow v9 (RFC 3954) packets: header, template FlowSets, padded data FlowSets, options."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from ipfix.assembler import Body, make_set
from ipfix.elements import BY_NAME
from ipfix.options import (
    STATS_FIELDS,
    V9_SAMPLING_FIELDS,
    V9_SAMPLING_VALUES,
    V9_SCOPE_INTERFACE,
    V9_SCOPE_SYSTEM,
)
from ipfix.packer import RecordPacker
from ipfix.profile import Profile
from ipfix.template import Template, TemplateField, flow_templates, layout_id
from ipfix.uptime import UptimeClock

VERSION = 9
HEADER = struct.Struct(">HHIIII")
TEMPLATE_FLOWSET_ID = 0
OPTIONS_TEMPLATE_FLOWSET_ID = 1
SEQUENCE_MODULO = 1 << 32


def _v9_options_template(scope: TemplateField, names: tuple[str, ...], taken: set[int]) -> Template:
    fields = [scope]
    for name in names:
        element = BY_NAME[name]
        fields.append(TemplateField(element, element.v9_length, name))
    probe = Template(0, tuple(fields), 1)
    return Template(layout_id(b"v9" + probe.v9_record(), taken), tuple(fields), 1)


class V9Encoder:
    protocol = "v9"
    header_length = HEADER.size
    align = 4  # RFC 3954 §5.3: FlowSets padded to 4-byte boundaries

    def __init__(self, profile: Profile, source_id: int, max_message_size: int) -> None:
        self.domain_id = source_id
        self.max_message_size = max_message_size
        self.uptime = UptimeClock(whole_seconds=True)
        taken: set[int] = set()
        self.templates: dict[int, Template] = flow_templates(profile, "v9", taken)
        self.packers = {family: RecordPacker(t) for family, t in self.templates.items()}
        self._template_records = [t.v9_record() for t in self.templates.values()]
        self.sequence = 0  # packets sent before this one (v9 counts packets, not records)
        system = TemplateField(V9_SCOPE_SYSTEM, 4, "scopeSystem")
        interface = TemplateField(V9_SCOPE_INTERFACE, 4, "scopeInterface")
        self._stats = RecordPacker(_v9_options_template(system, STATS_FIELDS, taken))
        self._sampling = RecordPacker(_v9_options_template(system, V9_SAMPLING_FIELDS, taken))
        self._interfaces = RecordPacker(_v9_options_template(interface, ("interfaceName",), taken))

    def _packet(self, body: bytes, count: int, header_ms: int) -> bytes:
        return self.wrap_bodies([([b"", body], len(body), count)], header_ms)[0]

    def wrap_bodies(self, bodies: Iterable[Body], header_ms: int) -> list[bytes]:
        """One packet per body from `data_bodies` (parts consumed), in sequence; v9's header
        holds the count of records, not the length."""
        # One clock reading: unix_secs is header_ms in whole seconds (header_ms is rounded up to
        # one), and sysUptime is the same instant measured from the virtual boot.
        boot_ms = self.uptime.boot_ms
        assert boot_ms is not None
        pack_header, join = HEADER.pack, b"".join
        uptime, seconds = header_ms - boot_ms, header_ms // 1000
        sequence, source_id = self.sequence, self.domain_id
        packets = []
        for parts, _, records in bodies:
            parts[0] = pack_header(VERSION, records, uptime, seconds, sequence, source_id)
            sequence = (sequence + 1) % SEQUENCE_MODULO
            packets.append(join(parts))
        self.sequence = sequence
        return packets

    def template_messages(self, header_ms: int) -> list[bytes]:
        if self.uptime.boot_ms is None:
            self.uptime.stamp(header_ms, [])
        room = self.max_message_size - HEADER.size - 4
        messages, group, size = [], [], 0
        for record in self._template_records:
            if group and size + len(record) > room:
                messages.append(
                    self._packet(make_set(0, b"".join(group), 4), len(group), header_ms)
                )
                group, size = [], 0
            group.append(record)
            size += len(record)
        if group:
            messages.append(self._packet(make_set(0, b"".join(group), 4), len(group), header_ms))
        return messages

    def options_messages(
        self,
        stats: dict[str, int],
        header_ms: int,
        interfaces: dict[int, str] | None,
        sampling: bool,
    ) -> list[bytes]:
        if self.uptime.boot_ms is None:
            self.uptime.stamp(header_ms, [])
        rows = [{"scopeSystem": self.domain_id, **stats}]
        messages = [self._options_packet(self._stats, rows, header_ms)]
        if sampling:
            rows = [{"scopeSystem": self.domain_id, **V9_SAMPLING_VALUES}]
            messages.append(self._options_packet(self._sampling, rows, header_ms))
        if interfaces:
            rows = [
                {"scopeInterface": i, "interfaceName": n} for i, n in sorted(interfaces.items())
            ]
            per_packet = max(1, (self.max_message_size - HEADER.size - 64) // 20)
            for start in range(0, len(rows), per_packet):
                chunk = rows[start : start + per_packet]
                messages.append(self._options_packet(self._interfaces, chunk, header_ms))
        return messages

    def _options_packet(self, packer: RecordPacker, rows: list[dict], header_ms: int) -> bytes:
        template = packer.template
        body = make_set(OPTIONS_TEMPLATE_FLOWSET_ID, template.v9_record(), 4) + make_set(
            template.template_id, b"".join(map(packer.pack_one, rows)), 4
        )
        return self._packet(body, 1 + len(rows), header_ms)
