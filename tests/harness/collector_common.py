"""Plumbing shared by the real-collector drivers: free ports, socket-queue probes, sending
datagrams without overrunning a collector, pcap writing and daemon lifetime.

Only loopback is ever used: collectors bind 127.0.0.1 or ::1 and datagrams go there.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

Flow = dict[str, object]

LOOPBACK = {4: "127.0.0.1", 6: "::1"}
# A collector socket buffer as the collectors' documentation advises for bursty exporters, at
# net.core.rmem_max here (4 MiB, which caps it): the kernel's default 208 KiB overflows when a
# loaded 2-core VM delays the collector (an exporter's burst, other traffic on the host).
LARGE_SOCKET_BUFFER = 4 << 20


class CollectorError(RuntimeError):
    """A collector did not start, did not answer in time, or produced unreadable output."""


def family_of(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that is free right now on `host` (bind port 0, read it, release it)."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _proc_net_udp_rows(port: int) -> list[tuple[int, int]]:
    """(rx_queue bytes, drops) of every UDP socket bound to `port`, IPv4 and IPv6."""
    rows = []
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                cols = line.split()
                local_port = int(cols[1].rsplit(":", 1)[1], 16)
                if local_port == port:
                    rx_queue = int(cols[4].split(":")[1], 16)
                    rows.append((rx_queue, int(cols[12])))
    return rows


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` every 10 ms; raise CollectorError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise CollectorError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)


def wait_udp_bound(port: int, timeout: float = 10.0) -> None:
    wait_until(lambda: bool(_proc_net_udp_rows(port)), timeout, f"a listener on UDP port {port}")


def wait_udp_drained(port: int, timeout: float = 10.0) -> None:
    """Wait until the collector has read every datagram queued on its socket."""
    wait_until(
        lambda: all(rx == 0 for rx, _ in _proc_net_udp_rows(port)),
        timeout,
        f"the collector on UDP port {port} to read its queue",
    )


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped because the collector's socket buffer was full."""
    return sum(drops for _, drops in _proc_net_udp_rows(port))


def send_datagrams(
    datagrams: Iterable[bytes],
    host: str,
    port: int,
    *,
    burst: int = 32,
    source: socket.socket | None = None,
) -> int:
    """Send from one socket (a stable source port, as collectors key on it), pausing after every
    `burst` datagrams until the collector has drained its queue, so a slow collector never loses
    data to a full socket buffer. Returns the number sent."""
    own = source is None
    sock = source or socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.connect((host, port))
        sent = 0
        for datagram in datagrams:
            sock.send(datagram)
            sent += 1
            if sent % burst == 0:
                wait_udp_drained(port)
        wait_udp_drained(port)
        return sent
    finally:
        if own:
            sock.close()


class UdpSink:
    """A loopback UDP socket read by a thread: it keeps the datagrams (`keep=True`) or just
    swallows them, so an exporter sending to it sees no ICMP port-unreachable and
    `wait_udp_drained` works."""

    def __init__(self, host: str, port: int = 0, keep: bool = True):
        self._sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self._sock.bind((host, port))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self.keep = keep
        self.datagrams: list[bytes] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._receive, daemon=True)

    def _receive(self) -> None:
        while not self._stopping:
            try:
                datagram = self._sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.keep:
                self.datagrams.append(datagram)

    def start(self) -> UdpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(CollectorError):
                wait_udp_drained(self.port)
            self._stopping = True
            self._thread.join(5)
        self._sock.close()


# --- pcap writing (for tshark): classic libpcap, LINKTYPE_RAW (bare IPv4/IPv6 packets) ---

_PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 or IPv6 packet carrying `payload` in UDP, with valid checksums."""
    src_ip, dst_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    length = 8 + len(payload)
    if src_ip.version == 4:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!BBH", 0, 17, length)
    else:
        pseudo = src_ip.packed + dst_ip.packed + struct.pack("!I3xB", length, 17)
    udp = struct.pack("!HHHH", src[1], dst[1], length, 0) + payload
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    if src_ip.version == 6:
        return struct.pack("!IHBB", 6 << 28, length, 17, 64) + src_ip.packed + dst_ip.packed + udp
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64, 17, 0, src_ip.packed, dst_ip.packed
    )
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def write_pcap(
    path: Path,
    datagrams: Sequence[bytes],
    src: tuple[str, int] = ("127.0.0.1", 40000),
    dst: tuple[str, int] = ("127.0.0.1", 2055),
    start: float | None = None,
) -> None:
    """Write `datagrams` as one UDP stream src -> dst, 1 ms apart (tshark keys templates on
    addresses and ports, so one stream keeps them all usable)."""
    when = time.time() if start is None else start
    with open(path, "wb") as out:
        out.write(_PCAP_HEADER)
        for index, datagram in enumerate(datagrams):
            packet = udp_packet(src, dst, datagram)
            usec_total = int(when * 1_000_000) + index * 1000
            sec, usec = divmod(usec_total, 1_000_000)
            out.write(struct.pack("<IIII", sec, usec, len(packet), len(packet)) + packet)


# --- daemons ---


class Daemon:
    """A collector process started in its own process group and always stopped: `stop()` is
    idempotent, and a context manager or pytest finalizer calls it."""

    def __init__(self, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env},
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the daemon's main process (it tells its children: pmacct's plugins purge only
        when their core asks), wait for it to exit, and kill its whole process group if it does
        not exit in time or leaves children behind. Returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        # pmacct plugins are children in the same group: make sure none outlives the core.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self, what: str) -> None:
        if not self.running():
            raise CollectorError(f"{what} exited early: {self.log()[-2000:]}")


def run_tool(argv: Sequence[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    """Run a one-shot tool (nfdump, tshark) and return its stdout; its stderr on failure."""
    done = subprocess.run(
        list(argv),
        capture_output=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )
    if done.returncode != 0:
        raise CollectorError(
            f"{argv[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}"
        )
    return done.stdout.decode(errors="replace")


def pack_address(text: str) -> bytes:
    """Collector address text -> the packed bytes the agent's records use."""
    return ipaddress.ip_address(text.strip()).packed


def address_key(version: int) -> tuple[str, str]:
    return (
        ("sourceIPv4Address", "destinationIPv4Address")
        if version == 4
        else ("sourceIPv6Address", "destinationIPv6Address")
    )


def set_address(flow: Flow, which: int, text: str) -> None:
    """Store an address under the IPv4 or IPv6 IE name that fits it (which: 0 source, 1 dest)."""
    if not text:
        return
    packed = pack_address(text)
    flow[address_key(4 if len(packed) == 4 else 6)[which]] = packed
