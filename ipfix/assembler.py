"""Fills data sets into message bodies that never pass the configured maximum size."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence

from ipfix.errors import IpfixError
from ipfix.packer import RecordPacker

SET_HEADER = struct.Struct(">HH")


def make_set(set_id: int, payload: bytes, align: int) -> bytes:
    """A set (IPFIX) or FlowSet (v9). align=4 pads with zeros to a 4-byte boundary, as RFC 3954
    §5.3 asks of v9; IPFIX data sets go unpadded (align=1)."""
    padding = -(len(payload) + 4) % align
    return SET_HEADER.pack(set_id, 4 + len(payload) + padding) + payload + b"\0" * padding


def _set_size(payload_length: int, align: int) -> int:
    return 4 + payload_length + (-(payload_length + 4) % align)


def data_bodies(
    runs: Iterable[tuple[RecordPacker, Sequence[dict]]], max_body: int, align: int
) -> Iterator[tuple[bytes, int]]:
    """Message bodies (concatenated sets) and how many records each holds. Runs keep the input
    order; a body may hold several sets (an IPv4 set, then an IPv6 set, ...). Never an empty set."""
    sets: list[bytes] = []
    used = 0
    count = 0
    for packer, records in runs:
        template_id = packer.template.template_id
        payloads = [packer.pack_one(r) for r in records] if packer.variable else None
        pos, total = 0, len(records)
        while pos < total:
            room = max_body - used
            if payloads is None:
                size = packer.record_length
                k = min(total - pos, max(room - 4, 0) // size)
                while k and _set_size(k * size, align) > room:
                    k -= 1
            else:
                k, length = 0, 0
                while pos + k < total and _set_size(length + len(payloads[pos + k]), align) <= room:
                    length += len(payloads[pos + k])
                    k += 1
            if k == 0:
                if not sets:
                    raise IpfixError(
                        f"a record of template {template_id} does not fit in a message of "
                        f"{max_body} bytes after the header"
                    )
                yield b"".join(sets), count
                sets, used, count = [], 0, 0
                continue
            chunk = records[pos : pos + k]
            payload = (
                packer.pack_set(chunk) if payloads is None else b"".join(payloads[pos : pos + k])
            )
            data_set = make_set(template_id, payload, align)
            sets.append(data_set)
            used += len(data_set)
            count += k
            pos += k
    if sets:
        yield b"".join(sets), count
