"""Fills data sets into message bodies that never pass the configured maximum size."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from ipfix.errors import IpfixError
from ipfix.packer import PackedRecords

SET_HEADER = struct.Struct(">HH")


def make_set(set_id: int, payload: bytes, align: int) -> bytes:
    """A set (IPFIX) or FlowSet (v9). align=4 pads with zeros to a 4-byte boundary, as RFC 3954
    §5.3 asks of v9; IPFIX data sets go unpadded (align=1)."""
    padding = -(len(payload) + 4) % align
    return SET_HEADER.pack(set_id, 4 + len(payload) + padding) + payload + b"\0" * padding


def _set_size(span: tuple[int, int], align: int) -> int:
    length = span[1] - span[0]
    return 4 + length + (-(length + 4) % align)


def data_bodies(
    runs: Iterable[tuple[int, PackedRecords]], max_body: int, align: int
) -> Iterator[tuple[list[bytes], int, int]]:
    """Message bodies: (parts to concatenate, their total length, how many records). Runs are
    (template id, packed records) and keep their order; a body may hold several sets (an IPv4
    set, then an IPv6 set, ...). Never an empty set."""
    parts: list[bytes] = []
    used = 0
    count = 0
    pack_header = SET_HEADER.pack
    for template_id, packed in runs:
        data = packed.data
        pos, total = 0, packed.count
        while pos < total:
            room = max_body - used
            k = packed.take(pos, room - 4)
            if align > 1:
                while k and _set_size(packed.span(pos, k), align) > room:
                    k -= 1  # v9: the padding did not fit
            if k == 0:
                if not parts:
                    raise IpfixError(
                        f"a record of template {template_id} does not fit in a message of "
                        f"{max_body} bytes after the header"
                    )
                yield parts, used, count
                parts, used, count = [], 0, 0
                continue
            start, end = packed.span(pos, k)
            length = end - start
            padding = -(length + 4) % align
            parts.append(pack_header(template_id, 4 + length + padding))
            parts.append(data[start:end])
            if padding:
                parts.append(bytes(padding))
            used += 4 + length + padding
            count += k
            pos += k
    if parts:
        yield parts, used, count
