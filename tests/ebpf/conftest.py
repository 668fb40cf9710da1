"""Fixtures of the eBPF end-to-end tests: a network lab, one collector per test module (bcc
compiles for seconds), and a FlowBook polling it in the background.

Order matters: the lab's namespaces exist before the module's collector attaches, the common case
of an agent started on a running host (test_e2e_flows also checks a namespace made afterwards).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Iterator

import pytest

from tests.conftest import skip_or_fail
from tests.harness.netlab import NetLab, missing_prerequisites
from tests.harness.netlab_flows import FlowBook


def require_lab() -> None:
    reason = missing_prerequisites()
    if reason:
        skip_or_fail(reason)


def open_collector(**kwargs: object):
    """A FlowCollector, or skip (fail in CI) with the reason it cannot load here."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (BPF)")
    try:
        collector_module = importlib.import_module("ebpf.collector")
        errors_module = importlib.import_module("ebpf.errors")
    except ImportError as exc:
        skip_or_fail(f"ebpf.collector is not importable: {exc}")
    try:
        return collector_module.FlowCollector(poll_interval_s=0.1, **kwargs)
    except errors_module.EbpfUnavailable as exc:
        skip_or_fail(f"eBPF collector unavailable: {exc}")


def poll_reading_the_map(collector) -> list:  # type: ignore[no-untyped-def]
    """A poll that reads the flow map: a poll reads it at most every LIVE_READ_INTERVAL_NS
    (ebpf/live_read.py), so one right after another would say nothing of the map."""
    from ebpf.live_read import LIVE_READ_INTERVAL_NS

    time.sleep(LIVE_READ_INTERVAL_NS / 1e9)
    return collector.poll(0)


@pytest.fixture(scope="module")
def loopback_collector() -> Iterator[object]:
    """A collector of the host's own flows (loopback traffic of the test process)."""
    source = open_collector()
    try:
        yield source
    finally:
        source.close()


@pytest.fixture(scope="module")
def lab() -> Iterator[NetLab]:
    require_lab()
    with NetLab() as built:
        yield built


@pytest.fixture(scope="module")
def collector(lab: NetLab) -> Iterator[object]:
    source = open_collector()
    try:
        yield source
    finally:
        source.close()


@pytest.fixture(scope="module")
def book(collector: object) -> Iterator[FlowBook]:
    flows = FlowBook(collector).start()
    try:
        yield flows
    finally:
        flows.stop()
