"""What bench/fuzz.py feeds the decoder: valid IPFIX / v9 / v5 messages from our own encoders
(real templates and data, options templates, enterprise elements, the variable-length 255 escape)
plus hand-made withdrawals, and mutators that turn them into hostile datagrams: bit flips, byte
splices, length-field edits (zero, huge, off by one), truncation, duplicated / dropped / reordered
sets, template id changes and floods, and pure random bytes. Everything draws from one
random.Random, so a seed replays a run exactly."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from ipfix.profile import load_profile
from ipfix.session import ExportSession

NOW_MS = 1_760_000_000_000  # a fixed clock: the corpus is the same bytes in every run
_HEADER_SIZES = {10: 16, 9: 20}
_INTERESTING_16 = (0, 1, 2, 3, 4, 5, 255, 256, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_INTERESTING_8 = (0, 1, 0x7F, 0x80, 0xFE, 0xFF)


def _records() -> list[dict]:
    base = {
        "sourceIPv4Address": bytes([10, 0, 0, 1]),
        "destinationIPv4Address": bytes([10, 0, 0, 2]),
        "sourceTransportPort": 40000,
        "destinationTransportPort": 443,
        "protocolIdentifier": 6,
        "tcpControlBits": 0x1B,
        "octetDeltaCount": 5000,
        "packetDeltaCount": 9,
        "flowStartMilliseconds": NOW_MS - 3000,
        "flowEndMilliseconds": NOW_MS - 1,
        "SRC_PROC_NAME": "nginx",
        "SRC_PROC_PID": 4242,
    }
    v6 = {k: v for k, v in base.items() if "IPv4" not in k}
    v6 |= {"sourceIPv6Address": bytes(15) + b"\1", "destinationIPv6Address": bytes(range(16))}
    icmp = base | {"protocolIdentifier": 1, "icmpTypeCodeIPv4": 0x0800, "SRC_PROC_NAME": ""}
    long_name = base | {"SRC_PROC_NAME": "w" * 300}  # IPFIX: variable length with the 255 escape
    return [base, v6, icmp, long_name]


def _ipfix(domain: int, *sets: bytes) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), NOW_MS // 1000, 1, domain) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _hand_made() -> list[bytes]:
    """What our encoders never send but exporters may: withdrawals, padding, unknown elements."""
    enterprise = struct.pack(">HHHHI", 400, 2, 0x8000 | 7, 4, 99999) + struct.pack(">HH", 8, 4)
    varlen_unknown = struct.pack(">HHHH", 401, 1, 0x8000 | 9, 0xFFFF) + struct.pack(">I", 99999)
    options = struct.pack(">HHH", 402, 2, 1) + struct.pack(">HHHH", 149, 4, 41, 8)
    return [
        _ipfix(7, _set(2, enterprise), _set(400, bytes(range(8)) * 3)),
        _ipfix(7, _set(2, varlen_unknown), _set(401, b"\xff\x00\x03abc\x02xy\x00")),
        _ipfix(7, _set(3, options), _set(402, bytes(12) * 2 + bytes(2))),  # padded data set
        _ipfix(7, _set(2, struct.pack(">HH", 400, 0))),  # withdraw one template
        _ipfix(7, _set(3, struct.pack(">HH", 402, 0))),  # withdraw one options template
        _ipfix(7, _set(2, struct.pack(">HH", 2, 0)), _set(3, struct.pack(">HH", 3, 0))),  # all
        _ipfix(7, _set(2, enterprise + bytes(4))),  # template set padding
    ]


def corpus() -> list[bytes]:
    """Valid messages: what the fuzzer mutates."""
    messages = []
    records = _records()
    for protocol, profile in (
        ("ipfix", "ntop"),
        ("ipfix", "standard"),
        ("v9", "ntop"),
        ("v9", "standard"),
        ("v5", "v5"),
    ):
        session = ExportSession(
            protocol, load_profile(profile), 5, clock=lambda: NOW_MS / 1000, exporting_process_id=7
        )
        messages += session.encode(records * 4)
        messages += session.options_messages({}, interfaces={1: "lo", 2: "eth0"}, sampling=True)
    return messages + _hand_made()


# Mutators ----------------------------------------------------------------------------------
def _sets(data: bytes) -> tuple[int, list[tuple[int, int]]]:
    """Header size and (offset, length) of each set that fits: a lenient framing to aim at."""
    header = _HEADER_SIZES.get(int.from_bytes(data[:2], "big"), 0) if len(data) >= 2 else 0
    found, offset = [], header
    while header and offset + 4 <= len(data):
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if length < 4 or offset + length > len(data):
            break
        found.append((offset, length))
        offset += length
    return header, found


def fix_length(data: bytearray) -> bytearray:
    """An IPFIX header length that matches, so the mutation reaches the sets behind it."""
    if len(data) >= 4 and data[:2] == b"\x00\x0a":
        data[2:4] = (len(data) & 0xFFFF).to_bytes(2, "big")
    return data


def _put16(data: bytearray, offset: int, value: int) -> None:
    if offset + 2 <= len(data):
        data[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "big")


def bit_flips(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return data


def interesting_bytes(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        if data:
            data[rng.randrange(len(data))] = rng.choice(_INTERESTING_8)
    return data


def splice(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    other = rng.choice(pool)
    start = rng.randrange(len(other))
    chunk = other[start : start + rng.randint(1, 256)]
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.5:
        data[at:at] = chunk  # insert
    else:
        data[at : at + len(chunk)] = chunk  # overwrite
    return fix_length(data) if rng.random() < 0.7 else data


def length_edit(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """A length, count or field length set to zero, huge, off by one or random."""
    header, sets = _sets(data)
    targets = [2]  # IPFIX message length / v9, v5 count
    for offset, length in sets:
        targets.append(offset + 2)  # set length
        set_id = int.from_bytes(data[offset : offset + 2], "big")
        if set_id in (0, 1, 2, 3):  # template records: count, field specifier lengths
            targets += range(offset + 6, offset + min(length, 64), 2)
    target = rng.choice(targets)
    old = int.from_bytes(data[target : target + 2], "big") if target + 2 <= len(data) else 0
    new = rng.choice(_INTERESTING_16 + (old + 1, old - 1, old * 2, rng.randrange(0x10000)))
    _put16(data, target, new)
    return data


def truncate(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    del data[rng.randrange(len(data) + 1) :]
    return fix_length(data) if rng.random() < 0.5 else data


def rearrange_sets(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """Duplicate, drop or swap whole sets, keeping the framing valid."""
    header, sets = _sets(data)
    if not sets:
        return data
    chunks = [bytes(data[o : o + n]) for o, n in sets]
    choice = rng.randrange(3)
    i = rng.randrange(len(chunks))
    if choice == 0:
        chunks.insert(i, chunks[i] if rng.random() < 0.7 else chunks[rng.randrange(len(chunks))])
    elif choice == 1 and len(chunks) > 1:
        del chunks[i]
    else:
        rng.shuffle(chunks)
    return fix_length(bytearray(data[:header] + b"".join(chunks)))


def template_ids(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """Another set or template id (reserved, clashing, random), or a withdrawal in front."""
    header, sets = _sets(data)
    if not sets:
        return data
    offset, length = rng.choice(sets)
    if rng.random() < 0.3 and header == 16:
        template_id = int.from_bytes(data[offset : offset + 2], "big")
        withdrawal = _set(2, struct.pack(">HH", template_id if template_id >= 256 else 2, 0))
        data[header:header] = withdrawal
        return fix_length(data)
    at = offset if rng.random() < 0.5 or length < 8 else offset + 4
    _put16(data, at, rng.choice((0, 1, 2, 3, 255, 256, 257, rng.randrange(0x10000))))
    return data


def varlen_escape(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """A 255 escape with a 2-byte length (zero, small, past the end) inside a data set."""
    header, sets = _sets(data)
    data_sets = [(o, n) for o, n in sets if int.from_bytes(data[o : o + 2], "big") >= 256]
    if not data_sets:
        return data
    offset, length = rng.choice(data_sets)
    if length <= 7:
        return data
    at = offset + 4 + rng.randrange(length - 7)
    data[at : at + 3] = b"\xff" + rng.choice((0, 1, 3, 255, 0xFFFF, length)).to_bytes(2, "big")
    return data


def flood(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """A valid template under a random id and domain: what fills a template cache."""
    header, sets = _sets(data)
    templates = [(o, n) for o, n in sets if int.from_bytes(data[o : o + 2], "big") in (0, 2)]
    if not templates:
        return data
    offset, _ = templates[0]
    _put16(data, offset + 4, rng.randrange(256, 0x10000))
    data[header - 4 : header] = rng.getrandbits(32).to_bytes(4, "big")  # domain / source id
    return data


def random_bytes(rng: random.Random, data: bytearray, pool: list[bytes]) -> bytearray:
    """Pure noise, half of it behind a plausible version (and IPFIX length) to get past it."""
    noise = bytearray(rng.randbytes(rng.choice((0, 1, 2, 4, 16, 20, 24, 64, 500, 1500))))
    if rng.random() < 0.5 and len(noise) >= 2:
        noise[:2] = rng.choice((b"\x00\x0a", b"\x00\x09", b"\x00\x05"))
        fix_length(noise)
    return noise


Mutator = Callable[[random.Random, bytearray, list[bytes]], bytearray]
MUTATORS: tuple[Mutator, ...] = (
    bit_flips,
    interesting_bytes,
    splice,
    length_edit,
    truncate,
    rearrange_sets,
    template_ids,
    varlen_escape,
    flood,
    random_bytes,
)


def mutate(rng: random.Random, pool: list[bytes]) -> tuple[bytes, str]:
    """One hostile datagram from a random seed message, and the mutators that made it."""
    data = bytearray(rng.choice(pool))
    names = []
    for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4)):
        mutator = rng.choice(MUTATORS)
        data = mutator(rng, data, pool)
        names.append(mutator.__name__)
    return bytes(data), "+".join(names)


# Worst cases ----------------------------------------------------------------------------------
_MAX_SET_BODY = 65535 - 16 - 4  # one set filling the largest IPFIX message


def worst_cases() -> list[tuple[str, list[bytes]]]:
    """Datagrams built to cost the most per byte: (name, [template message, costly message]).
    The driver times the last message of each and checks the template cache bounds after."""
    one_byte = _set(2, struct.pack(">HHHH", 500, 1, 4, 1))  # protocolIdentifier, 1 byte
    one_varlen = _set(2, struct.pack(">HHHHI", 501, 1, 0x8000 | 5, 0xFFFF, 99999))
    fields = (_MAX_SET_BODY - 4) // 8
    wide = struct.pack(">HH", 502, fields) + b"".join(
        struct.pack(">HHI", 0x8000 | (i % 0x7FFF), 1, 1 + i // 0x7FFF) for i in range(fields)
    )
    withdrawals = struct.pack(">HH", 2, 0) * (_MAX_SET_BODY // 4)
    return [
        ("1-byte records", [_ipfix(9, one_byte), _ipfix(9, _set(500, bytes(_MAX_SET_BODY)))]),
        (
            "empty varlen records",
            [_ipfix(9, one_varlen), _ipfix(9, _set(501, bytes(_MAX_SET_BODY)))],
        ),
        ("widest template", [_ipfix(9, _set(2, wide)), _ipfix(9, _set(502, bytes(fields)))]),
        ("withdraw-all flood", [_ipfix(9, one_byte), _ipfix(9, _set(2, withdrawals))]),
    ]
