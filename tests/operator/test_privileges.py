"""Least privilege, for real as root: the map-access probe, the drop itself, and an agent that
attaches, drops to `nobody`, and still counts, serves `top` and exports."""

from __future__ import annotations

import ipaddress
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bridge.errors import UserError
from bridge.privileges import effective_capabilities, lookup_user, map_access_after_drop
from ipfix.decoder import Decoder
from tests.conftest import skip_or_fail
from tests.live.agent_process import AgentProcess, flowbridge_argv
from tests.live.conftest import require_live


def kernel_at_least(major: int, minor: int) -> bool:
    numbers = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2])
    return numbers >= (major, minor)


def test_lookup_user_refuses_root_and_unknown_names() -> None:
    with pytest.raises(UserError, match="that is root"):
        lookup_user("root")
    with pytest.raises(UserError, match="no such user"):
        lookup_user("flowbridge-no-such-user")
    assert lookup_user("nobody").uid == lookup_user(str(lookup_user("nobody").uid)).uid


def test_map_access_probe_matches_the_kernel() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (creates a BPF map)")
    result = map_access_after_drop()
    # Linux 6.5 moved the unprivileged check to map/program creation; before it, with
    # unprivileged BPF disabled, every bpf(2) command failed without CAP_BPF.
    unpriv = Path("/proc/sys/kernel/unprivileged_bpf_disabled").read_text().strip()
    expected = kernel_at_least(6, 5) or unpriv == "0"
    assert result.ok is expected, result.detail
    assert "nobody" in result.detail


def test_drop_is_complete_and_irreversible() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (drops privileges)")
    code = (
        "import os\n"
        "from bridge.privileges import drop_privileges, lookup_user, effective_capabilities\n"
        "drop_privileges(lookup_user('nobody'))\n"
        "print(os.getresuid(), os.getresgid(), os.getgroups(), effective_capabilities())\n"
        "try:\n    os.setuid(0)\nexcept PermissionError:\n    print('no way back')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    nobody = lookup_user("nobody")
    assert out.stdout.splitlines() == [
        f"({nobody.uid}, {nobody.uid}, {nobody.uid}) ({nobody.gid}, {nobody.gid}, "
        f"{nobody.gid}) [] 0",
        "no way back",
    ]


def test_run_user_needs_an_unprivileged_account() -> None:
    out = subprocess.run([*flowbridge_argv(), "run", "--user", "root", "--source",
                          "replay:/dev/null"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip() == ("flowbridge: error: --user 'root': that is root; name an "
                                  "unprivileged account")


class UdpCollector:
    """Datagrams of the agent's export, decoded as they arrive."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.records: list[dict] = []
        self._decoder = Decoder()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                continue
            self.records.extend(self._decoder.records(data, peer))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def serve_bytes(payload: int, hold: threading.Event) -> tuple[int, threading.Thread]:
    """A loopback TCP server that sends `payload` bytes to its first client, then keeps the
    connection open until `hold` is set (so that it is still live while `top` looks)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"x" * payload)
        hold.wait(timeout=300)
        conn.close()
        listener.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def receive(client: socket.socket, expected: int) -> int:
    """Reads `expected` bytes, or to the end of the stream when expected is 0."""
    got = 0
    while expected == 0 or got < expected:
        chunk = client.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    return got


def top_until_shown(state_path: str, wanted: str, seconds: float) -> str:
    """`flowbridge top --once` until its frame shows `wanted`: starting a CLI process takes
    seconds on a loaded machine, so the wait is a deadline, not a number of tries."""
    shown = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*flowbridge_argv(), "top", "--once", "--interval", "0.3", "--limit", "200",
             "--state-socket", state_path], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        shown = out.stdout
        if wanted in shown:
            break
        time.sleep(0.5)
    return shown


def address(value: object) -> str:
    return str(ipaddress.ip_address(value)) if isinstance(value, bytes | str) else ""


def test_agent_dropped_to_nobody_still_counts_serves_and_exports(tmp_path: Path) -> None:
    require_live()
    if not map_access_after_drop().ok:
        skip_or_fail("this kernel refuses map access after a privilege drop")
    collector = UdpCollector()
    state_path = str(tmp_path / "state" / "state.sock")
    args = ["--collector", f"127.0.0.1:{collector.port}", "--user", "nobody",
            "--state-socket", state_path, "--idle-timeout", "60", "--active-timeout", "300"]
    try:
        with AgentProcess(args) as agent:
            agent.wait_ready()
            assert agent.process is not None
            status = Path(f"/proc/{agent.process.pid}/status").read_text()
            uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()  # type: ignore[union-attr]
            assert set(uids) == {str(lookup_user("nobody").uid)}
            assert effective_capabilities(agent.process.pid) == 0
            assert "dropped privileges: now uid" in agent.log()

            # The connection stays open until `top` has seen it: a flow leaves top's table
            # 3 s after it ends, less than a `top` process may need to start under load.
            payload = 300_000
            hold = threading.Event()
            port, server = serve_bytes(payload, hold)
            with socket.create_connection(("127.0.0.1", port), timeout=60) as client:
                assert receive(client, payload) == payload
                shown = top_until_shown(state_path, f"127.0.0.1:{port}", seconds=120)
                hold.set()
                assert receive(client, 0) == 0  # the server's FIN and nothing more
            server.join(timeout=30)
            assert f"127.0.0.1:{port}" in shown, shown
            assert f"agent pid {agent.process.pid}" in shown

            # The export: the server's direction of the connection, counted after the drop.
            deadline = time.monotonic() + 60
            sent: list[dict] = []
            while time.monotonic() < deadline and not sent:
                sent = [r for r in collector.records if r.get("sourceTransportPort") == port
                        and r.get("protocolIdentifier") == 6 and r.get("flowDirection") == 1
                        and address(r.get("destinationIPv4Address")) == "127.0.0.1"]
                time.sleep(0.3)
            assert agent.stop() == 0, agent.log()
        assert sent, f"no record of port {port} among {len(collector.records)} records"
        octets = sum(r["octetDeltaCount"] for r in sent)
        packets = sum(r["packetDeltaCount"] for r in sent)
        # IP-layer bytes: the payload plus at least a 40-byte IP+TCP header per packet.
        assert octets >= payload + 40 * packets
        assert packets >= 2
    finally:
        collector.close()
