"""Fixtures of the independent-decoder tests: the export streams, built once per session, and
the live-collector factory of the harness."""

from __future__ import annotations

import pytest

from tests.collectors.streams import Stream, build_streams
from tests.harness.collectors import collector_factory  # noqa: F401 (a fixture)


@pytest.fixture(scope="session")
def streams() -> list[Stream]:
    return build_streams()
