"""The export formats the shipped profiles declare, as (protocol, profile) pairs, in the order the
tests and the generated compatibility matrix list them. tests/ipfix/test_profile.py checks that
this is exactly what templates/*.toml declare."""

FORMATS = (
    ("ipfix", "standard"),
    ("ipfix", "ntop"),
    ("v9", "standard"),
    ("v9", "ntop"),
    ("v9", "nfdump-latency"),
    ("v5", "v5"),
)
