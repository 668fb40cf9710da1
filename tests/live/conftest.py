"""Live tests of `flowbridge run`: the agent as a process, real traffic in a network lab, real
collectors. They need root, BPF and the collectors: they run in CI and skip elsewhere."""

from __future__ import annotations

import os

from tests.conftest import require_tools, skip_or_fail
from tests.harness.netlab import missing_prerequisites


def require_live(*tools: str) -> None:
    """Skip outside CI (fail in CI) unless this host can run the agent, a lab and `tools`."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (BPF, network namespaces)")
    reason = missing_prerequisites()
    if reason:
        skip_or_fail(reason)
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        skip_or_fail(f"bcc is not importable: {exc}")
    require_tools(*tools)
