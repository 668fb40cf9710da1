"""Fills data sets into message bodies that never pass the configured maximum size."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from ipfix.errors import IpfixError
from ipfix.packer import Records

SET_HEADER = struct.Struct(">HH")
# A message body: (parts, their total length, how many records); parts[0] is the header's slot.
Body = tuple[list[bytes], int, int]


def make_set(set_id: int, payload: bytes, align: int) -> bytes:
    """A set (IPFIX) or FlowSet (v9). align=4 pads with zeros to a 4-byte boundary, as RFC 3954
    §5.3 asks of v9; IPFIX data sets go unpadded (align=1)."""
    padding = -(len(payload) + 4) % align
    return SET_HEADER.pack(set_id, 4 + len(payload) + padding) + payload + b"\0" * padding


def _fit(packed: Records, pos: int, room: int, align: int) -> tuple[int, int, int]:
    """(records from `pos` whose set fits in `room` bytes after its header, their length, the
    set's padding). The set header is 4 bytes, so padding the records pads the set (v9)."""
    k = packed.take(pos, room)
    length = packed.length(pos, k)
    padding = -length % align
    while k and length + padding > room:
        k -= 1  # v9: the padding did not fit
        length = packed.length(pos, k)
        padding = -length % align
    return k, length, padding


def data_bodies(
    runs: Iterable[tuple[int, Records]], max_body: int, align: int
) -> Iterator[Body]:
    """Message bodies, each as full as the size allows. parts[0] is an empty slot for the
    message header, so that a message is one join of one list. Runs are (template id, packed
    records) and keep their order; a body may hold several sets (an IPv4 set, then an IPv6
    set, ...). Never an empty set."""
    parts: list[bytes] = [b""]
    used = 0
    count = 0
    pack_header = SET_HEADER.pack
    for template_id, packed in runs:
        records = packed.records  # (start, count) -> those records' bytes
        pos, total = 0, len(packed)
        if not count and packed.record_length:
            # Fixed-length records from an empty body: whole bodies of one set, all alike, until
            # the last few records (which may share their body with the next run's set).
            k, length, padding = _fit(packed, 0, max_body - 4, align)
            head = [b"", pack_header(template_id, 4 + length + padding)]
            size = 4 + length + padding
            while k and total - pos > k:
                body = head + records(pos, k)
                if padding:
                    body.append(bytes(padding))
                yield body, size, k
                pos += k
        while pos < total:
            k, length, padding = _fit(packed, pos, max_body - used - 4, align)
            if k == 0:
                if not count:
                    raise IpfixError(
                        f"a record of template {template_id} does not fit in a message of "
                        f"{max_body} bytes after the header"
                    )
                yield parts, used, count
                parts, used, count = [b""], 0, 0
                continue
            parts.append(pack_header(template_id, 4 + length + padding))
            parts += records(pos, k)
            if padding:
                parts.append(bytes(padding))
            used += 4 + length + padding
            count += k
            pos += k
            if pos < total:  # the next record did not fit: this body is full
                yield parts, used, count
                parts, used, count = [b""], 0, 0
    if count:
        yield parts, used, count
