"""Fixtures of the independent-decoder tests: the export streams, built once per session."""

from __future__ import annotations

import pytest

from tests.collectors.streams import Stream, build_streams


@pytest.fixture(scope="session")
def streams() -> list[Stream]:
    return build_streams()
