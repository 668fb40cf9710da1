"""The compatibility matrix's results: each test module adds the Results it judged; at the end of
a run with FLOWBRIDGE_COMPAT_UPDATE=1 they are written to docs/compat/results.json and rendered
(tests/compat/render.py). Without it, the tests compare them with the committed file."""

from __future__ import annotations

import pytest

from tests.compat.matrix import UPDATE, Results

_SESSION_RESULTS = Results()


@pytest.fixture(scope="session")
def session_results() -> Results:
    """Every module's judged cells, collected for the update at the end of the run."""
    return _SESSION_RESULTS


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if UPDATE and _SESSION_RESULTS.status:
        from tests.compat.render import write_all

        write_all(_SESSION_RESULTS)
