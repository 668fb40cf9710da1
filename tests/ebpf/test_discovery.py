"""Namespace discovery: it fails loudly when no namespace can be entered, and stop_discovery()
freezes what is attached (the agent calls it after dropping privileges)."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from ebpf import interfaces, netns
from ebpf.errors import EbpfUnavailable
from tests.ebpf.conftest import open_collector

NETNS_NAME = "fb-ebpf-discovery"


def test_entering_no_namespace_at_all_is_an_error(monkeypatch) -> None:
    # setns(2) refuses a file that is not a namespace (EINVAL): the same path every failure
    # takes (EPERM for an unprivileged agent), without needing one.
    monkeypatch.setattr(netns, "discover",
                        lambda: {1: netns.Namespace(1, "/dev/null"),
                                 2: netns.Namespace(2, "/proc/self/stat")})
    attacher = interfaces.InterfaceAttacher(lambda cookie: pytest.fail("nothing to load"))
    with pytest.raises(EbpfUnavailable, match="could not enter any of 2 network namespaces"):
        attacher.sync()


def test_some_namespaces_failing_is_not_an_error(monkeypatch) -> None:
    real = netns.discover()
    here = netns.current_inode()
    monkeypatch.setattr(netns, "discover",
                        lambda: {here: real[here], 1: netns.Namespace(1, "/dev/null")})
    loaded: list[int] = []

    def programs_for(cookie: int) -> interfaces.Programs:
        loaded.append(cookie)
        return interfaces.Programs(-1, -1, -1, -1, -1)

    attacher = interfaces.InterfaceAttacher(programs_for)
    monkeypatch.setattr(attacher, "_attach", lambda *args: [])
    attacher.sync()
    assert list(attacher.namespaces) == [here]
    assert loaded == [netns.cookie_here()]


@pytest.fixture
def named_netns():
    subprocess.run(["ip", "netns", "delete", NETNS_NAME], capture_output=True)
    yield NETNS_NAME
    subprocess.run(["ip", "netns", "delete", NETNS_NAME], capture_output=True)


def test_stop_discovery_keeps_what_is_attached_and_adds_nothing(named_netns) -> None:
    collector = open_collector()
    try:
        collector.sync_interfaces()
        before = collector.stats().extra
        collector.stop_discovery()
        subprocess.run(["ip", "netns", "add", named_netns], check=True)
        subprocess.run(["ip", "-n", named_netns, "link", "set", "lo", "up"], check=True)
        collector.sync_interfaces()
        time.sleep(0.3)  # three periods of the (stopped) periodic scan
        after = collector.stats().extra
        assert after["namespaces"] == before["namespaces"]
        assert after["interfaces_attached"] == before["interfaces_attached"] > 0
    finally:
        collector.close()
    # Without stop_discovery the same namespace is picked up (the test above means something).
    collector = open_collector()
    try:
        collector.sync_interfaces()
        inodes = {state.ns.inode for state in collector._attacher.namespaces.values()}
        assert os.stat(f"/run/netns/{named_netns}").st_ino in inodes
    finally:
        collector.close()
