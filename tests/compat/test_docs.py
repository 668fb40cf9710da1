"""The generated documentation cannot go stale: the committed matrix.rst is what
docs/compat/results.json renders to, and fields.rst is what the profiles and the element
registry render to today. (Whether results.json matches the code is test_live/test_replay's
`test_results_are_committed`.) No root, no collectors: these run everywhere."""

from __future__ import annotations

from tests.compat.matrix import (
    CASES,
    COLLECTORS,
    FIELDS_RST,
    FORMATS,
    MATRIX_RST,
    NOT_APPLICABLE,
    SOURCES,
    case_cell,
    committed_results,
    format_cell,
)
from tests.compat.render import README, render_fields, render_matrix, render_readme

HINT = "regenerate: .venv/bin/python tests/compat/render.py"


def test_matrix_rst_is_rendered_from_the_committed_results() -> None:
    assert MATRIX_RST.read_text(encoding="utf-8") == render_matrix(committed_results()), HINT


def test_fields_rst_is_rendered_from_the_profiles() -> None:
    assert FIELDS_RST.read_text(encoding="utf-8") == render_fields(), HINT


def test_readme_embeds_the_rendered_tables() -> None:
    assert README.read_text(encoding="utf-8") == render_readme(committed_results()), HINT


def test_committed_results_cover_every_cell() -> None:
    """No cell of the matrix may be missing: a cell never judged would render as a gap."""
    results = committed_results()
    cells = [format_cell(s, p, f, c) for s in SOURCES for p, f in FORMATS for c in COLLECTORS]
    cells += [case_cell(case, c) for case in CASES for c in COLLECTORS]
    missing = [cell for cell in cells if cell not in results.status]
    assert missing == []
    goflow2 = {results.status[c] for c in cells if c.endswith("/goflow2")}
    assert goflow2 == {NOT_APPLICABLE}  # recorded as not installable here, never as passing


def test_field_reference_lists_every_profile_element() -> None:
    from ipfix.profile import load_profile

    text = render_fields()
    for profile in ("standard", "ntop", "nfdump-latency", "v5"):
        for name in load_profile(profile).fields:
            assert f"``{name}``" in text, name
