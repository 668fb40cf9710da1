"""NetFlow v5 (Cisco) packets: 24-byte header, at most 30 fixed 48-byte records."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from ipfix.elements import BY_NAME, Element
from ipfix.packer import RecordPacker
from ipfix.profile import V5_LAYOUT
from ipfix.template import Template, TemplateField
from ipfix.uptime import UptimeClock

VERSION = 5
HEADER = struct.Struct(">HHIIIIBBH")
MAX_RECORDS = 30
RECORD_LENGTH = 48
SEQUENCE_MODULO = 1 << 32
_PAD = Element("pad", 210, 0, "octetArray", 1, None)
# Widths where v5 differs from the IANA defaults.
_LENGTHS = {
    "ingressInterface": 2,
    "egressInterface": 2,
    "packetDeltaCount": 4,
    "octetDeltaCount": 4,
    "flowStartMilliseconds": 4,
    "flowEndMilliseconds": 4,
    "tcpControlBits": 1,
    "bgpSourceAsNumber": 2,
    "bgpDestinationAsNumber": 2,
}


def v5_template() -> Template:
    """The v5 record as a template, so the same packer (and decoder) serves it."""
    fields = []
    for name in V5_LAYOUT:
        if name == "tcpControlBits":
            fields.append(TemplateField(_PAD, 1, "_pad1"))
        element = BY_NAME[name]
        relative = name in ("flowStartMilliseconds", "flowEndMilliseconds")
        fields.append(TemplateField(element, _LENGTHS.get(name, element.length), name, relative))
    fields.append(TemplateField(_PAD, 2, "_pad2"))
    template = Template(0, tuple(fields), 0, 4)
    assert template.record_length == RECORD_LENGTH
    return template


class V5Encoder:
    protocol = "v5"
    header_length = HEADER.size

    def __init__(self, engine_type: int, engine_id: int) -> None:
        self.engine_type = engine_type
        self.engine_id = engine_id
        self.uptime = UptimeClock(whole_seconds=False)
        self.packer = RecordPacker(v5_template())
        self.sequence = 0  # flows sent before this packet

    def packets(self, rows: Sequence[tuple], header_ms: int) -> list[bytes]:
        """The packets for rows of the v5 template; `uptime` has been stamped for them. Records
        are packed a packet at a time: a value that cannot be encoded raises before the sequence
        number has counted any packet of the batch."""
        boot_ms = self.uptime.boot_ms
        assert boot_ms is not None
        uptime = header_ms - boot_ms
        secs, msecs = divmod(header_ms, 1000)
        packed = self.packer.pack(rows, boot_ms)
        sequence = self.sequence
        packets = []
        for start in range(0, len(rows), MAX_RECORDS):
            count = min(MAX_RECORDS, len(rows) - start)
            header = HEADER.pack(
                VERSION,
                count,
                uptime,
                secs,
                msecs * 1_000_000,
                sequence,
                self.engine_type,
                self.engine_id,
                0,  # sampling_interval 0: unsampled
            )
            packets.append(b"".join([header, *packed.records(start, count)]))
            sequence = (sequence + count) % SEQUENCE_MODULO
        self.sequence = sequence
        return packets
