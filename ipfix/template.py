"""Templates: the ordered fields of one record layout, and their IPFIX / NetFlow v9 wire form.

One profile gives two data templates per protocol (IPv4 and IPv6 address fields never share a
template). Template ids are derived from a hash of the layout, so a changed layout never reuses an
id, not even across restarts, and the ids of one collector's v9 and IPFIX streams differ.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ipfix.elements import BY_NAME, VARIABLE_LENGTH, Element
from ipfix.errors import ProfileError
from ipfix.profile import MAX_TEMPLATE_FIELDS, Profile

FIRST_TEMPLATE_ID = 256
ENTERPRISE_BIT = 0x8000
# v9 carries absolute times as sysUptime-relative 22/21 (FIRST/LAST_SWITCHED, 4 bytes).
V9_RELATIVE_TIMES = {
    "flowStartMilliseconds": "flowStartSysUpTime",
    "flowEndMilliseconds": "flowEndSysUpTime",
}
V9_SCOPE_TYPES = {
    1: "scopeSystem",
    2: "scopeInterface",
    3: "scopeLineCard",
    4: "scopeCache",
    5: "scopeTemplate",
}


@dataclass(frozen=True, slots=True)
class TemplateField:
    element: Element  # what goes on the wire
    length: int
    key: str  # the record key it is read from / decoded to
    relative_time: bool = False  # v9: epoch ms in the record, sysUptime ms on the wire
    default: int = 0  # value when the record lacks the key

    @property
    def variable(self) -> bool:
        return self.length == VARIABLE_LENGTH


@dataclass(frozen=True, slots=True)
class Template:
    template_id: int
    fields: tuple[TemplateField, ...]
    scope_count: int = 0  # > 0: an options template; the first scope_count fields are its scope
    family: int | None = None

    @property
    def variable(self) -> bool:
        return any(f.variable for f in self.fields)

    @property
    def record_length(self) -> int:
        """Length of one record; for variable-length templates the minimum (1-byte prefixes)."""
        return sum(1 if f.variable else f.length for f in self.fields)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.fields)

    def ipfix_record(self) -> bytes:
        """The Template Record (RFC 7011 §3.4.1) or Options Template Record (§3.4.2)."""
        if self.scope_count:
            head = struct.pack(">HHH", self.template_id, len(self.fields), self.scope_count)
        else:
            head = struct.pack(">HH", self.template_id, len(self.fields))
        specs = []
        for f in self.fields:
            if f.element.pen:
                specs.append(
                    struct.pack(">HHI", f.element.id | ENTERPRISE_BIT, f.length, f.element.pen)
                )
            else:
                specs.append(struct.pack(">HH", f.element.id, f.length))
        return head + b"".join(specs)

    def v9_record(self) -> bytes:
        """The Template record (RFC 3954 §5.2) or Options Template record (§6.1). Scope fields
        of an options template carry v9 scope types (1 System, 2 Interface, ...)."""
        if self.scope_count:
            scope = self.fields[: self.scope_count]
            options = self.fields[self.scope_count :]
            head = struct.pack(">HHH", self.template_id, 4 * len(scope), 4 * len(options))
        else:
            scope, options = (), self.fields
            head = struct.pack(">HH", self.template_id, len(self.fields))
        specs = [struct.pack(">HH", f.element.id, f.length) for f in scope]
        specs += [struct.pack(">HH", f.element.v9_id, f.length) for f in options]
        return head + b"".join(specs)


def layout_id(layout: bytes, taken: set[int]) -> int:
    """A template id from the layout's hash: stable across restarts, new for a new layout."""
    template_id = FIRST_TEMPLATE_ID + zlib.crc32(layout) % (65536 - FIRST_TEMPLATE_ID)
    while template_id in taken:
        template_id = FIRST_TEMPLATE_ID + (template_id + 1 - FIRST_TEMPLATE_ID) % (
            65536 - FIRST_TEMPLATE_ID
        )
    taken.add(template_id)
    return template_id


def _field(profile: Profile, name: str, protocol: str) -> TemplateField:
    element = BY_NAME[name]
    default = profile.defaults.get(name, 0)
    if protocol == "v9" and name in V9_RELATIVE_TIMES:
        return TemplateField(BY_NAME[V9_RELATIVE_TIMES[name]], 4, name, True, default)
    length = profile.length_for(element, protocol)
    if protocol == "v9" and length == VARIABLE_LENGTH:
        length = element.v9_length
    return TemplateField(element, length, name, False, default)


def flow_templates(profile: Profile, protocol: str, taken: set[int]) -> dict[int, Template]:
    """The IPv4 and IPv6 data templates of a profile for "ipfix" or "v9", keyed by family."""
    if protocol not in profile.protocols:
        raise ProfileError(
            f"{profile.path or profile.name}: profile '{profile.name}' is for "
            f"{', '.join(profile.protocols)}, not {protocol}"
        )
    templates = {}
    for family in (4, 6):
        fields = tuple(
            _field(profile, name, protocol)
            for name in profile.fields
            if BY_NAME[name].family in (None, family)
        )
        if len(fields) > MAX_TEMPLATE_FIELDS:
            raise ProfileError(f"{profile.path}: IPv{family} template has {len(fields)} fields")
        probe = Template(0, fields, 0, family)
        wire = probe.ipfix_record() if protocol == "ipfix" else probe.v9_record()
        layout = protocol.encode() + wire
        templates[family] = Template(layout_id(layout, taken), fields, 0, family)
    return templates


def options_template(
    names: list[str], scope_count: int, protocol: str, taken: set[int], lengths: dict[str, int]
) -> Template:
    """An options template over registry elements; lengths override the defaults."""
    fields = []
    for name in names:
        element = BY_NAME[name]
        length = lengths.get(name, element.v9_length if protocol == "v9" else element.length)
        fields.append(TemplateField(element, length, name))
    probe = Template(0, tuple(fields), scope_count)
    wire = probe.ipfix_record() if protocol == "ipfix" else probe.v9_record()
    return Template(layout_id(protocol.encode() + wire, taken), tuple(fields), scope_count)
