"""The compatibility matrix: which cells exist, and the per-cell results the tests produce.

A cell is (source, protocol, profile, collector) for the export formats, or (case, collector) for
the situations that break real exporters. The tests judge every cell and keep the outcome in a
`Results`; docs/compat/results.json is the committed copy, rendered by tests/compat/render.py
into docs/compat/matrix.rst. A test compares this run's outcomes with the committed file, so the
README's table cannot claim what the current code does not do.

    FLOWBRIDGE_COMPAT_UPDATE=1 pytest tests/compat   # rewrite results.json and the .rst files
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.formats import FORMATS  # noqa: F401 (the matrix's rows; re-exported)

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "compat"
RESULTS_JSON = DOCS / "results.json"
MATRIX_RST = DOCS / "matrix.rst"
FIELDS_RST = DOCS / "fields.rst"
UPDATE = os.environ.get("FLOWBRIDGE_COMPAT_UPDATE", "") not in ("", "0")

COLLECTORS = ("nfdump", "nfacctd", "tshark", "goflow2")
TESTED = ("nfdump", "nfacctd", "tshark")
COLLECTOR_TITLES = {
    "nfdump": "nfcapd + nfdump 1.7.1",
    "nfacctd": "pmacct nfacctd 1.7.7",
    "tshark": "tshark 4.0.17",
    "goflow2": "goflow2",
}
NOT_INSTALLABLE = {
    "goflow2": "not installable here: not in Debian 12, PyPI or npm; it needs a Go toolchain",
}
SOURCES = ("live", "replay")
# The situations that break real exporters, in the order the README lists them.
CASES = {
    "ipv6": "IPv6 (TCP, UDP, ICMPv6)",
    "long-flow": "flow longer than the active timeout",
    "reset": "connection reset instead of closed",
    "udp": "UDP",
    "icmp": "ICMP / ICMPv6",
    "late-collector": "collector started after the agent",
    "restarted-collector": "collector restarted",
    "ipfix-and-v9": "IPFIX and v9 from one host",
    "many-connections": "2000 short connections",
    "agent-restart": "agent restart",
}
# Statuses, as rendered.
PASS, FAIL, NOT_APPLICABLE = "pass", "fail", "n/a"


@dataclass
class Results:
    """cell id -> status, and cell id -> what was checked (a short, run-independent text)."""

    status: dict[str, str] = field(default_factory=dict)
    checked: dict[str, str] = field(default_factory=dict)

    def record(self, cell: str, problems: list[str], checked: str) -> None:
        self.status[cell] = FAIL if problems else PASS
        self.checked[cell] = checked

    def not_applicable(self, cell: str, why: str) -> None:
        self.status[cell] = NOT_APPLICABLE
        self.checked[cell] = why

    def merge(self, other: Results) -> None:
        self.status.update(other.status)
        self.checked.update(other.checked)

    def to_json(self) -> str:
        cells = {c: {"status": self.status[c], "checked": self.checked.get(c, "")}
                 for c in sorted(self.status)}
        return json.dumps({"cells": cells}, indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Results:
        results = cls()
        for cell, value in json.loads(text)["cells"].items():
            results.status[cell] = value["status"]
            results.checked[cell] = value["checked"]
        return results

    def subset(self, prefix: str) -> dict[str, tuple[str, str]]:
        return {c: (s, self.checked.get(c, "")) for c, s in self.status.items()
                if c.startswith(prefix)}


def format_cell(source: str, protocol: str, profile: str, collector: str) -> str:
    return f"{source}/{protocol}/{profile}/{collector}"


def case_cell(case: str, collector: str) -> str:
    return f"case/{case}/{collector}"


def committed_results() -> Results:
    try:
        return Results.from_json(RESULTS_JSON.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Results()


def stale_cells(results: Results) -> list[str]:
    """Cells whose outcome in this run differs from docs/compat/results.json, one line each."""
    committed = committed_results()
    lines = []
    for cell, status in sorted(results.status.items()):
        now = (status, results.checked.get(cell, ""))
        before = (committed.status.get(cell), committed.checked.get(cell))
        if now != before:
            lines.append(f"{cell}: this run {now}, docs/compat/results.json {before}")
    return lines
