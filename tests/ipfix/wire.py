"""A tiny, independent reader of message framing, so rule tests check bytes, not our decoder."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


@dataclass
class Frame:
    version: int
    header: tuple
    sets: list[tuple[int, bytes]] = field(default_factory=list)  # (set id, body w/o header)
    set_lengths: list[int] = field(default_factory=list)


def frame(message: bytes) -> Frame:
    version = struct.unpack_from(">H", message)[0]
    if version == 10:
        header, offset = struct.unpack_from(">HHIII", message), 16
        assert header[1] == len(message)
    elif version == 9:
        header, offset = struct.unpack_from(">HHIIII", message), 20
    else:
        raise AssertionError(f"not framed: version {version}")
    result = Frame(version, header)
    while offset < len(message):
        set_id, length = struct.unpack_from(">HH", message, offset)
        assert length >= 4 and offset + length <= len(message)
        result.sets.append((set_id, message[offset + 4 : offset + length]))
        result.set_lengths.append(length)
        offset += length
    assert offset == len(message)
    return result


def ipfix_template_fields(body: bytes, options: bool = False) -> list[tuple[int, list[tuple]]]:
    """[(template id, [(id, length, pen), ...])] of an IPFIX (options) template set body."""
    out, offset = [], 0
    while offset < len(body):
        template_id, count = struct.unpack_from(">HH", body, offset)
        offset += 6 if options else 4
        fields = []
        for _ in range(count):
            ie, length = struct.unpack_from(">HH", body, offset)
            offset += 4
            pen = 0
            if ie & 0x8000:
                pen = struct.unpack_from(">I", body, offset)[0]
                offset += 4
            fields.append((ie & 0x7FFF, length, pen))
        out.append((template_id, fields))
    return out


def v9_template_fields(body: bytes) -> list[tuple[int, list[tuple[int, int]]]]:
    out, offset = [], 0
    while offset + 4 <= len(body):
        template_id, count = struct.unpack_from(">HH", body, offset)
        offset += 4
        fields = [struct.unpack_from(">HH", body, offset + 4 * i) for i in range(count)]
        offset += 4 * count
        out.append((template_id, fields))
    return out
