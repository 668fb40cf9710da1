"""Hypothesis strategies: records as the agent builds them, for any profile."""

from __future__ import annotations

from hypothesis import strategies as st

from ipfix.elements import BY_NAME
from ipfix.profile import Profile

NOW_MS = 1_760_000_000_000  # a fixed clock, so failures replay exactly


def _value(name: str, length: int, v9: bool) -> st.SearchStrategy:
    element = BY_NAME[name]
    if name in ("flowStartMilliseconds", "flowEndMilliseconds"):
        return st.integers(NOW_MS - 40 * 86_400_000, NOW_MS)
    if element.type == "ipv4Address":
        return st.binary(min_size=4, max_size=4)
    if element.type == "ipv6Address":
        return st.binary(min_size=16, max_size=16)
    if element.type == "string":
        # v9 strings are NUL padded to a fixed length: no NULs inside, at most that many bytes.
        text = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FFF), max_size=40)
        if v9:
            return text.filter(lambda s: len(s.encode()) <= length)
        return text
    return st.integers(0, (1 << (8 * min(length, 8))) - 1)


def records(profile: Profile, protocol: str, family: int) -> st.SearchStrategy[dict]:
    """Complete records of one address family with values that fit the profile's lengths."""
    fields = {}
    for name in profile.fields:
        element = BY_NAME[name]
        if element.family not in (None, family):
            continue
        if protocol == "v5":
            from ipfix.v5_encoder import v5_template

            length = next(f.length for f in v5_template().fields if f.key == name)
        else:
            length = profile.length_for(element, protocol)
            if protocol == "v9" and element.type == "string":
                length = element.v9_length
        fields[name] = _value(name, length, protocol == "v9")
    return st.fixed_dictionaries(fields)
