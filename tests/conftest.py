"""Shared test policy: tests that need root, BPF or the real collectors run in CI (CI=true, root)
and must not skip there; elsewhere they skip with the reason."""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure, never a silent skip."""
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (BPF, network namespaces)")


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        skip_or_fail(f"missing tools: {', '.join(missing)}")
