"""The live matrix: real traffic through the running agent, judged in every collector.

One module-scoped run (tests/compat/live_run.py) feeds every cell; each test asserts one cell has
no problem. `test_results_are_committed` compares this run's outcomes with the committed
docs/compat/results.json, so the README's matrix shows what the code does today.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.live_cells import LiveCells
from tests.compat.live_run import run_live
from tests.compat.matrix import (
    CASES,
    FORMATS,
    TESTED,
    UPDATE,
    Results,
    case_cell,
    format_cell,
    stale_cells,
)
from tests.live.conftest import require_live

pytestmark = [pytest.mark.root, pytest.mark.collectors]


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory, session_results: Results
          ) -> Iterator[LiveCells]:
    require_live("nfcapd", "nfdump", "nfacctd", "tshark", "tcpdump")
    judged = LiveCells(run_live(Path(tmp_path_factory.mktemp("compat"))))
    session_results.merge(judged.results)
    yield judged


def _assert_cell(cells: LiveCells, cell: str) -> None:
    problems = cells.problems[cell]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


@pytest.mark.parametrize("collector", TESTED)
@pytest.mark.parametrize("protocol,profile", FORMATS, ids=[f"{p}-{f}" for p, f in FORMATS])
def test_format(cells: LiveCells, protocol: str, profile: str, collector: str) -> None:
    _assert_cell(cells, format_cell("live", protocol, profile, collector))


CASE_CELLS = [(case, collector) for case in CASES for collector in TESTED
              if (case, collector) != ("restarted-collector", "tshark")]


@pytest.mark.parametrize("case,collector", CASE_CELLS, ids=[f"{a}-{b}" for a, b in CASE_CELLS])
def test_case(cells: LiveCells, case: str, collector: str) -> None:
    _assert_cell(cells, case_cell(case, collector))


def test_agent_ran_cleanly(cells: LiveCells) -> None:
    assert cells.run.agent_problems == [], "\n".join(cells.run.agent_problems)


def test_late_stations_started_long_enough_before_the_judged_traffic(cells: LiveCells) -> None:
    """The late/restarted cells judge the bulk connections only: they must start more than one
    template refresh interval after those collectors came up, else the cell proves nothing."""
    from tests.compat.live_run import TEMPLATE_REFRESH_S

    assert cells.run.late_started_s > TEMPLATE_REFRESH_S


@pytest.mark.skipif(UPDATE, reason="FLOWBRIDGE_COMPAT_UPDATE=1 rewrites the committed results")
def test_results_are_committed(cells: LiveCells) -> None:
    stale = stale_cells(cells.results)
    assert not stale, "the matrix is stale (FLOWBRIDGE_COMPAT_UPDATE=1 pytest tests/compat):\n" \
        + "\n".join(stale)
