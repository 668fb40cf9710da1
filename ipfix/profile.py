"""Export profiles: which information elements a collector gets, read from templates/*.toml.

A profile file:

    name = "standard"
    protocols = ["ipfix", "v9"]
    fields = [
        "sourceIPv4Address",
        { element = "tcpControlBits", length = 1 },   # reduced-size encoding
        { element = "samplingInterval", default = 1 }, # value when a record lacks the key
    ]

tomllib reports no line numbers for values, so errors find the offending line in the text.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ipfix.elements import BY_NAME, VARIABLE_LENGTH, Element
from ipfix.errors import ProfileError

PROTOCOLS = ("ipfix", "v9", "v5")
MAX_TEMPLATE_FIELDS = 60  # tshark ignores templates with more fields (collectors.md row 41)
V5_LAYOUT = (
    "sourceIPv4Address",
    "destinationIPv4Address",
    "ipNextHopIPv4Address",
    "ingressInterface",
    "egressInterface",
    "packetDeltaCount",
    "octetDeltaCount",
    "flowStartMilliseconds",
    "flowEndMilliseconds",
    "sourceTransportPort",
    "destinationTransportPort",
    "tcpControlBits",
    "protocolIdentifier",
    "ipClassOfService",
    "bgpSourceAsNumber",
    "bgpDestinationAsNumber",
    "sourceIPv4PrefixLength",
    "destinationIPv4PrefixLength",
)
_FIELD_KEYS = {"element", "length", "default"}


@dataclass(frozen=True)
class Profile:
    name: str
    protocols: tuple[str, ...]
    fields: tuple[str, ...]
    lengths: dict[str, int] = field(default_factory=dict)  # explicit lengths from the file
    defaults: dict[str, int] = field(default_factory=dict)
    description: str = ""
    path: str = ""

    def length_for(self, element: Element, protocol: str) -> int:
        if element.name in self.lengths:
            return self.lengths[element.name]
        return element.v9_length if protocol == "v9" else element.length


def template_dirs() -> list[Path]:
    """Where shipped profiles live: next to the packages (repository or editable install) first,
    then the data directory of a normal install (share/flowbridge/templates)."""
    dirs = [Path(__file__).resolve().parent.parent / "templates"]
    if env := os.environ.get("FLOWBRIDGE_TEMPLATES"):
        dirs.insert(0, Path(env))
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        dirs.append(Path(prefix) / "share" / "flowbridge" / "templates")
    return dirs


def shipped_profiles() -> list[str]:
    names: set[str] = set()
    for d in template_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def _resolve(name_or_path: str) -> Path:
    looks_like_path = "/" in name_or_path or name_or_path.endswith(".toml")
    if looks_like_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise ProfileError(f"{name_or_path}: profile file not found")
        return path
    for d in template_dirs():
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(shipped_profiles()) or "none found"
    raise ProfileError(f"profile '{name_or_path}': no such shipped profile (known: {known})")


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (`standard`, `ntop`, `nfdump-latency`, `v5`) or a file path."""
    path = _resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    return parse_profile(text, str(path))


def parse_profile(text: str, source: str) -> Profile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_of_message(str(exc), text)
        raise ProfileError(f"{source}:{line}: invalid TOML: {_first_clause(str(exc))}") from None
    return _Validator(text, source).profile(data)


def _line_of_message(message: str, text: str) -> int:
    # "Expected ... (at line 3, column 7)" or "... (at end of document)"
    if "at end of document" in message:
        return max(1, len(text.splitlines()))
    marker = "at line "
    if marker in message:
        digits = message.split(marker, 1)[1].split(",", 1)[0].split(")", 1)[0]
        if digits.strip().isdigit():
            return int(digits)
    return 1


def _first_clause(message: str) -> str:
    return message.split(" (at line", 1)[0]


class _Validator:
    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def line_of(self, *needles: str, occurrence: int = 1) -> int:
        for needle in needles:
            seen = 0
            for number, line in enumerate(self.lines, 1):
                code = line.split("#", 1)[0]
                if needle in code:
                    seen += 1
                    if seen == occurrence:
                        return number
        return 1

    def fail(self, line: int, what: str) -> ProfileError:
        return ProfileError(f"{self.source}:{line}: {what}")

    def element_error(self, name: str, what: str, occurrence: int = 1) -> ProfileError:
        needles = (f'"{name}"', f"'{name}'", name)
        line = self.line_of(*needles, occurrence=occurrence)
        return self.fail(line, f"element '{name}': {what}")

    def profile(self, data: dict) -> Profile:
        unknown = sorted(set(data) - {"name", "description", "protocols", "fields"})
        if unknown:
            raise self.fail(
                self.line_of(f"{unknown[0]} ", f"{unknown[0]}="), f"unknown key '{unknown[0]}'"
            )
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise self.fail(self.line_of("name"), "'name' must be a non-empty string")
        protocols = data.get("protocols")
        if not isinstance(protocols, list) or not protocols:
            raise self.fail(self.line_of("protocols"), "'protocols' must list ipfix, v9 and/or v5")
        for p in protocols:
            if p not in PROTOCOLS:
                raise self.fail(self.line_of(f'"{p}"', "protocols"), f"unknown protocol '{p}'")
        raw_fields = data.get("fields")
        if not isinstance(raw_fields, list) or not raw_fields:
            raise self.fail(self.line_of("fields"), "'fields' must be a non-empty list")
        names, lengths, defaults = self.fields(raw_fields, tuple(protocols))
        profile = Profile(
            name=name,
            protocols=tuple(protocols),
            fields=tuple(names),
            lengths=lengths,
            defaults=defaults,
            description=str(data.get("description", "")),
            path=self.source,
        )
        self.check_protocols(profile)
        return profile

    def fields(
        self, raw_fields: list, protocols: tuple[str, ...]
    ) -> tuple[list[str], dict[str, int], dict[str, int]]:
        names: list[str] = []
        lengths: dict[str, int] = {}
        defaults: dict[str, int] = {}
        for entry in raw_fields:
            if isinstance(entry, str):
                name, spec = entry, {}
            elif isinstance(entry, dict):
                name, spec = entry.get("element"), entry
                if not isinstance(name, str):
                    raise self.fail(
                        self.line_of("element", "{"), "field table needs element = NAME"
                    )
                extra = sorted(set(spec) - _FIELD_KEYS)
                if extra:
                    raise self.element_error(name, f"unknown field key '{extra[0]}'")
            else:
                raise self.fail(self.line_of("fields"), f"field {entry!r} is not a name or a table")
            element = BY_NAME.get(name)
            if element is None:
                raise self.element_error(name, "unknown information element")
            if name in names:
                raise self.element_error(name, "listed twice", occurrence=2)
            if "length" in spec:
                length = spec["length"]
                for protocol in protocols:
                    if not isinstance(length, int) or length not in element.allowed_lengths(
                        protocol
                    ):
                        raise self.element_error(
                            name, f"length {length!r} not allowed for {element.type} in {protocol}"
                        )
                lengths[name] = length
            if "default" in spec:
                default = spec["default"]
                if not element.is_integer or not isinstance(default, int) or default < 0:
                    raise self.element_error(name, "default must be a non-negative integer")
                defaults[name] = default
            names.append(name)
        return names, lengths, defaults

    def check_protocols(self, profile: Profile) -> None:
        if "v5" in profile.protocols:
            if profile.protocols != ("v5",):
                raise self.fail(self.line_of("protocols"), "a v5 profile cannot serve ipfix or v9")
            for name in profile.fields:
                if name not in V5_LAYOUT:
                    raise self.element_error(name, "not part of the fixed NetFlow v5 record")
            return
        for name in profile.fields:
            element = BY_NAME[name]
            if "ipfix" in profile.protocols and not element.ipfix:
                raise self.element_error(
                    name, "exists in NetFlow v9 only (drop ipfix from protocols)"
                )
            if "v9" in profile.protocols and element.v9_id is None:
                raise self.element_error(
                    name, "NetFlow v9 cannot carry it (drop v9 from protocols)"
                )
            if (
                "ipfix" in profile.protocols
                and profile.lengths.get(name, element.length) == VARIABLE_LENGTH
                and element.type not in ("string", "octetArray")
            ):
                raise self.element_error(name, "only strings and octet arrays may be variable")
        for family in (4, 6):
            count = sum(1 for n in profile.fields if BY_NAME[n].family in (None, family))
            if count > MAX_TEMPLATE_FIELDS:
                raise self.fail(
                    self.line_of("fields"),
                    f"the IPv{family} template would have {count} fields; at most "
                    f"{MAX_TEMPLATE_FIELDS} (tshark ignores larger templates)",
                )
