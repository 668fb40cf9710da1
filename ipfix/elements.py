"""The information-element registry: every element flowbridge can encode or decode, by name,
by IPFIX (enterprise number, id) and by NetFlow v9 id."""

from __future__ import annotations

from dataclasses import dataclass

from ipfix.element_data import (
    IANA,
    IANA_PEN,
    IPV4_ONLY,
    IPV6_ONLY,
    NFDUMP_LEGACY_V9,
    NTOP,
    NTOP_PEN,
    NTOP_V9_BASE,
    REVERSE_PEN,
    REVERSIBLE,
    V9_STRING_LENGTH,
    V9_STRING_LENGTHS,
)

VARIABLE_LENGTH = 65535  # RFC 7011 §7: this length in a template means "variable"

TYPE_LENGTHS = {
    "unsigned8": 1,
    "unsigned16": 2,
    "unsigned32": 4,
    "unsigned64": 8,
    "signed8": 1,
    "signed16": 2,
    "signed32": 4,
    "signed64": 8,
    "float32": 4,
    "float64": 8,
    "boolean": 1,
    "macAddress": 6,
    "ipv4Address": 4,
    "ipv6Address": 16,
    "dateTimeSeconds": 4,
    "dateTimeMilliseconds": 8,
    "string": VARIABLE_LENGTH,
    "octetArray": VARIABLE_LENGTH,
}
INTEGER_TYPES = frozenset(t for t in TYPE_LENGTHS if t.startswith(("unsigned", "signed")))
BYTES_TYPES = frozenset({"macAddress", "ipv4Address", "ipv6Address", "octetArray"})


@dataclass(frozen=True, slots=True)
class Element:
    name: str
    id: int  # IPFIX element id, without the enterprise bit
    pen: int  # 0 for IANA
    type: str  # IANA abstract data type
    length: int  # default IPFIX length (65535 = variable)
    v9_id: int | None  # None: v9 cannot carry it
    ipfix: bool = True  # False: a v9-only legacy id
    family: int | None = None  # 4 or 6 when the element belongs to one address family only

    @property
    def is_integer(self) -> bool:
        return self.type in INTEGER_TYPES

    @property
    def v9_length(self) -> int:
        """v9 has no variable length: strings and octet arrays go at a fixed length."""
        if self.length != VARIABLE_LENGTH:
            return self.length
        return V9_STRING_LENGTHS.get(self.name, V9_STRING_LENGTH)

    def allowed_lengths(self, protocol: str) -> frozenset[int]:
        """Lengths a template may give this element (RFC 7011 §6.2 reduced-size encoding:
        integers may shrink, float64 may become float32, nothing else may)."""
        if self.is_integer:
            return frozenset(n for n in (1, 2, 4, 8) if n <= self.length)
        if self.type == "float64":
            return frozenset({4, 8})
        if self.type in ("string", "octetArray"):
            fixed = frozenset(range(1, VARIABLE_LENGTH))
            return fixed | {VARIABLE_LENGTH} if protocol == "ipfix" else fixed
        return frozenset({self.length})


def _family(name: str) -> int | None:
    if name in IPV4_ONLY:
        return 4
    if name in IPV6_ONLY:
        return 6
    return None


def _build() -> list[Element]:
    elements = []
    for ie_id, name, ie_type in IANA:
        elements.append(
            Element(
                name, ie_id, IANA_PEN, ie_type, TYPE_LENGTHS[ie_type], ie_id, True, _family(name)
            )
        )
    iana_by_name = {e.name: e for e in elements}
    for name in REVERSIBLE:
        forward = iana_by_name[name]
        reverse_name = "reverse" + name[0].upper() + name[1:]
        elements.append(
            Element(reverse_name, forward.id, REVERSE_PEN, forward.type, forward.length, None)
        )
    for n, name, ie_type in NTOP:
        elements.append(
            Element(name, n, NTOP_PEN, ie_type, TYPE_LENGTHS[ie_type], NTOP_V9_BASE + n)
        )
    for v9_id, name, ie_type in NFDUMP_LEGACY_V9:
        elements.append(
            Element(
                name, v9_id - NTOP_V9_BASE, NTOP_PEN, ie_type, TYPE_LENGTHS[ie_type], v9_id, False
            )
        )
    return elements


ALL: tuple[Element, ...] = tuple(_build())
BY_NAME: dict[str, Element] = {e.name: e for e in ALL}
BY_IPFIX: dict[tuple[int, int], Element] = {(e.pen, e.id): e for e in ALL if e.ipfix}
BY_V9: dict[int, Element] = {
    e.v9_id: e for e in ALL if e.v9_id is not None and e.pen != REVERSE_PEN
}


def lookup(name: str) -> Element | None:
    return BY_NAME.get(name)


def unknown_ipfix(pen: int, ie_id: int) -> Element:
    """A stand-in for an element the registry lacks, so a decoder can still show its bytes."""
    name = f"ipfix_{pen}_{ie_id}" if pen else f"ipfix_{ie_id}"
    return Element(name, ie_id, pen, "octetArray", VARIABLE_LENGTH, None)


def unknown_v9(ie_id: int) -> Element:
    return Element(f"v9_{ie_id}", ie_id, IANA_PEN, "octetArray", VARIABLE_LENGTH, ie_id)
