"""What an encoded message holds, read from its header: how many flow records (so a message that is
never sent is counted in records, RFC 7011 §4.3) and whether it carries templates; and the
renumbering of templates sent ahead of older queued messages on a new TCP connection."""

from __future__ import annotations

import struct
from collections.abc import Sequence

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# Offset of the first set id after the header.
_FIRST_SET = {"ipfix": 16, "v9": 20}
_TEMPLATE_SETS = {"ipfix": (2, 3), "v9": (0, 1)}
# Offsets of the sequence number and of the observation domain (v9: source id) in the header.
_SEQUENCE_AND_DOMAIN = {"ipfix": (8, 12), "v9": (12, 16)}


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


def numbered_before(protocol: str, preamble: Sequence[bytes], waiting: Sequence[bytes]
                    ) -> list[bytes]:
    """`preamble` (templates made now) renumbered to go ahead of `waiting` (messages encoded
    earlier, still queued): a collector must see each domain's sequence run on, not jump back
    from the preamble's current number to the queued ones (seen: one sequence error per TCP
    reconnect). IPFIX counts data records, so a template message takes the sequence number of
    the first waiting message of its domain; v9 counts messages, so the preamble takes the
    numbers just before it. Domains with nothing waiting keep their current numbers."""
    offsets = _SEQUENCE_AND_DOMAIN.get(protocol)
    if offsets is None or not waiting:
        return list(preamble)
    sequence_at, domain_at = offsets
    first: dict[int, int] = {}
    for message in waiting:
        domain = _U32.unpack_from(message, domain_at)[0]
        if domain not in first:
            first[domain] = _U32.unpack_from(message, sequence_at)[0]
    ahead: dict[int, int] = {}  # v9: preamble messages of each domain still to come
    for message in preamble:
        domain = _U32.unpack_from(message, domain_at)[0]
        ahead[domain] = ahead.get(domain, 0) + 1
    out = []
    for message in preamble:
        domain = _U32.unpack_from(message, domain_at)[0]
        if domain not in first:
            out.append(message)
            continue
        sequence = first[domain]
        if protocol == "v9":
            sequence = (sequence - ahead[domain]) % (1 << 32)
            ahead[domain] -= 1
        renumbered = bytearray(message)
        _U32.pack_into(renumbered, sequence_at, sequence)
        out.append(bytes(renumbered))
    return out
