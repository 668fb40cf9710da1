"""The JSON form of a record: keys are IE names, addresses strings, times epoch milliseconds.

`flowbridge replay` reads it and `flowbridge collect --json` writes it, so replay -> export ->
collect gives the input back.
"""

from __future__ import annotations

import ipaddress
import math

from ipfix.elements import BY_NAME, INTEGER_TYPES
from ipfix.errors import IpfixError

_ADDRESS_LENGTHS = {"ipv4Address": 4, "ipv6Address": 16}
_NON_FINITE = ("nan", "inf", "-inf")  # how record_to_json spells floats JSON cannot hold
_INTEGER_LIKE = INTEGER_TYPES | {"dateTimeSeconds", "dateTimeMilliseconds", "boolean"}


def record_to_json(record: dict) -> dict:
    """Plain JSON values for any decoded record, including garbage from a broken exporter."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (bytes, bytearray)):
            element = BY_NAME.get(key)
            kind = element.type if element else "octetArray"
            if _ADDRESS_LENGTHS.get(kind) == len(value):
                value = str(ipaddress.ip_address(bytes(value)))
            elif kind == "macAddress" and len(value) == 6:
                value = ":".join(f"{b:02x}" for b in value)
            else:
                value = bytes(value).hex()
        elif isinstance(value, float) and not math.isfinite(value):
            value = str(value)  # "nan", "inf", "-inf": JSON has no such numbers
        out[key] = value
    return out


def record_from_json(obj: object) -> dict:
    """A record from its JSON form. Raises IpfixError naming the key and what is wrong."""
    if not isinstance(obj, dict):
        raise IpfixError(f"a record must be a JSON object, not {type(obj).__name__}")
    record = {}
    for key, value in obj.items():
        element = BY_NAME.get(key)
        if element is None:
            raise IpfixError(f"key '{key}': unknown information element")
        record[key] = _value(key, element.type, value)
    return record


def _value(key: str, kind: str, value: object) -> object:
    def bad(expected: str) -> IpfixError:
        return IpfixError(f"key '{key}': {value!r} is not {expected}")

    if kind in _ADDRESS_LENGTHS:
        if not isinstance(value, str):
            raise bad(f"an {kind} string")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise bad(f"an {kind}") from None
        packed = address.packed
        if len(packed) != _ADDRESS_LENGTHS[kind]:
            raise bad(f"an {kind} (wrong address family)")
        return packed
    if kind == "macAddress":
        try:
            data = bytes.fromhex(str(value).replace(":", "").replace("-", ""))
        except ValueError:
            raise bad("a MAC address") from None
        if len(data) != 6:
            raise bad("a MAC address")
        return data
    if kind == "octetArray":
        try:
            return bytes.fromhex(str(value))
        except ValueError:
            raise bad("a hex string") from None
    if kind == "string":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind.startswith("float"):
        if value in _NON_FINITE:
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind in _INTEGER_LIKE:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < 0 and not kind.startswith("signed"):
            raise bad("a non-negative integer")
        return value
    raise bad(f"supported ({kind})")
