"""The decoder's template cache is bounded: floods of template ids, domains and exporter
addresses evict the least recently used templates (counted) instead of growing memory."""

from __future__ import annotations

import struct

import pytest

from ipfix.decoder import Decoder
from ipfix.template_cache import LARGEST_TEMPLATE_FIELDS, TemplateCache

EXPORTER = ("192.0.2.30", 4739)


def _ipfix(domain: int, *sets: bytes) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), 0, 0, domain) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _template(template_id: int, fields: int = 1) -> bytes:
    """protocolIdentifier (1 byte) `fields` times."""
    return _set(2, struct.pack(">HH", template_id, fields) + struct.pack(">HH", 4, 1) * fields)


def _known(decoder: Decoder, template_id: int, exporter=EXPORTER, domain: int = 1) -> bool:
    [message] = decoder.feed(_ipfix(domain, _set(template_id, b"\x06")), exporter)
    return message.unknown_template_sets == 0


def test_template_ids_beyond_the_bound_evict_the_least_recently_used() -> None:
    decoder = Decoder(max_templates=3)
    for template_id in (256, 257, 258):
        decoder.feed(_ipfix(1, _template(template_id)), EXPORTER)
    assert _known(decoder, 256)  # used: now the most recent
    decoder.feed(_ipfix(1, _template(259)), EXPORTER)
    assert decoder.templates.evictions == 1 and len(decoder.templates) == 3
    assert not _known(decoder, 257)  # the least recently used went
    assert all(_known(decoder, t) for t in (256, 258, 259))


def test_the_field_budget_bounds_wide_templates() -> None:
    decoder = Decoder(max_fields=LARGEST_TEMPLATE_FIELDS)
    wide = 6000
    for template_id in (256, 257, 258):  # 18000 fields: more than the budget
        decoder.feed(_ipfix(1, _template(template_id, wide)), EXPORTER)
    assert decoder.templates.fields == 2 * wide <= LARGEST_TEMPLATE_FIELDS
    assert decoder.templates.evictions == 1 and not _known(decoder, 256)


def test_an_exporter_and_domain_flood_stays_within_the_bound() -> None:
    decoder = Decoder(max_templates=100)
    for n in range(5000):
        exporter = (f"10.{n >> 8 & 255}.{n & 255}.1", 4739)
        decoder.feed(_ipfix(n, _template(256 + n % 7)), exporter)
    templates = decoder.templates
    assert (len(templates), templates.sources(), templates.evictions) == (100, 100, 4900)
    assert _known(decoder, 256 + 4999 % 7, ("10.19.135.1", 4739), 4999)  # the latest: kept
    assert not _known(decoder, 256, ("10.0.0.1", 4739), 0)


def test_redefining_a_template_replaces_it_without_eviction() -> None:
    decoder = Decoder(max_templates=2)
    for _ in range(10):
        decoder.feed(_ipfix(1, _template(256, 3)), EXPORTER)
    assert (len(decoder.templates), decoder.templates.fields, decoder.templates.evictions) == (
        1,
        3,
        0,
    )


def test_bounds_below_one_template_are_refused() -> None:
    with pytest.raises(ValueError, match="the largest template"):
        TemplateCache(max_templates=10, max_fields=100)
    with pytest.raises(ValueError, match="at least 1 template"):
        TemplateCache(max_templates=0)
