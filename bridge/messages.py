"""What an encoded message holds, read from its header: how many flow records (so a message that is
never sent is counted in records, RFC 7011 §4.3) and whether it carries templates."""

from __future__ import annotations

import struct
from collections.abc import Sequence

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# Offset of the first set id after the header.
_FIRST_SET = {"ipfix": 16, "v9": 20}
_TEMPLATE_SETS = {"ipfix": (2, 3), "v9": (0, 1)}


def carries_templates(protocol: str, message: bytes) -> bool:
    offset = _FIRST_SET.get(protocol)
    if offset is None or len(message) < offset + 2:
        return False
    return _U16.unpack_from(message, offset)[0] in _TEMPLATE_SETS[protocol]


def data_record_counts(protocol: str, messages: Sequence[bytes], total: int) -> list[int]:
    """Flow records in each message of one `encode` call that encoded `total` records.
    IPFIX: the sequence number counts data records sent before a message. v9/v5: the header's
    count, with template-only messages counting none."""
    if protocol == "ipfix":
        counts = []
        for message, following in zip(messages, messages[1:], strict=False):
            counts.append(
                (_U32.unpack_from(following, 8)[0] - _U32.unpack_from(message, 8)[0]) % (1 << 32)
            )
        if messages:
            counts.append(total - sum(counts))
        return counts
    counts = []
    for message in messages:
        if protocol == "v9" and carries_templates(protocol, message):
            counts.append(0)
        else:
            counts.append(_U16.unpack_from(message, 2)[0])
    return counts
