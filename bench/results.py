"""The one JSON line a benchmark prints per result: name, value, unit, peer, its value, ratio."""

from __future__ import annotations

import json


def _rounded(number: float, digits: int) -> float | int:
    return round(number) if digits == 0 else round(number, digits)


def emit(
    name: str,
    value: float,
    unit: str,
    peer: str | None = None,
    peer_value: float | None = None,
    *,
    digits: int = 3,
    ratio_digits: int = 4,
) -> None:
    """`ratio` is value / peer_value (None without a peer value); `digits` rounds both values."""
    line = {
        "name": name,
        "value": _rounded(value, digits),
        "unit": unit,
        "peer": peer,
        "peer_value": None if peer_value is None else _rounded(peer_value, digits),
        "ratio": round(value / peer_value, ratio_digits) if peer_value else None,
    }
    print(json.dumps(line), flush=True)
