"""The collectors of one compatibility run: one set per export format and per case, started and
stopped in parallel (nfacctd takes seconds to come up), each an agent [[collector]] entry.

A `Station` is the collectors that watch one UDP port: nfcapd listens there and a tshark capture
decodes the very same packets; nfacctd listens on a port of its own. Stations of the late and
restarted cases are built before the agent starts (their ports go into its configuration) but
started later.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tests.harness.collector_common import LARGE_SOCKET_BUFFER, Flow
from tests.harness.collectors import Nfacctd, Nfcapd, TsharkCapture


def nfcapd_on(port: int | None = None) -> Nfcapd:
    """An nfcapd with a large socket buffer (one agent feeding thirty collectors on two cores
    sends faster than a default buffer absorbs), bound to `port` (where the agent already
    exports) when given."""
    return Nfcapd(4, port=port, socket_buffer=LARGE_SOCKET_BUFFER)


def nfacctd_on(port: int | None = None) -> Nfacctd:
    return Nfacctd(4, port=port, socket_buffer=LARGE_SOCKET_BUFFER)


def parallel(calls: Iterable[Callable[[], object]]) -> list[object]:
    """Run the calls at once (collector start-up and shut-down wait on timers, not CPU)."""
    calls = list(calls)
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@dataclass
class Decoded:
    """What one collector showed at the end, and what its own report says."""

    flows: list[Flow] = field(default_factory=list)
    sequence_errors: int = 0
    dropped: int = 0  # datagrams the collector's socket (or the capture) lost
    template_warnings: int = 0  # tshark "no template found"; nfdump bad packets
    malformed: int = 0


@dataclass
class Station:
    """Collectors fed by the agent with one (protocol, profile) per address."""

    name: str
    entries: list[tuple[str, str]]  # (protocol, profile) exported to every collector here
    template_refresh: float | None = None
    # split: the first entry goes to nfcapd (and its capture) only, the second to nfacctd only
    split: bool = False
    nfcapd: Nfcapd = field(init=False)
    tshark: TsharkCapture = field(init=False)
    nfacctd: Nfacctd = field(init=False)

    def __post_init__(self) -> None:
        self.nfcapd = nfcapd_on()
        self.tshark = TsharkCapture(4, port=self.nfcapd.port)
        self.nfacctd = nfacctd_on()

    def config_entries(self) -> list[dict[str, object]]:
        extra = {} if self.template_refresh is None else {
            "template_refresh": self.template_refresh}
        ports = (self.nfcapd.port, self.nfacctd.port)
        pairs = (list(zip(self.entries, ports, strict=True)) if self.split
                 else [(entry, port) for entry in self.entries for port in ports])
        return [{"address": f"127.0.0.1:{port}", "protocol": protocol, "profile": profile,
                 **extra} for (protocol, profile), port in pairs]

    def starters(self) -> list[Callable[[], object]]:
        return [self.tshark.start, self.nfcapd.start, self.nfacctd.start]

    def restarters(self) -> list[Callable[[], object]]:
        """Stop nfcapd and nfacctd and start new ones on the same ports (tshark goes on)."""
        def nfcapd() -> None:
            old = self.nfcapd
            old.stop()
            self.nfcapd = nfcapd_on(old.port)
            old.close()
            self.nfcapd.start()

        def nfacctd() -> None:
            old = self.nfacctd
            old.stop()
            self.nfacctd = nfacctd_on(old.port)
            old.close()
            self.nfacctd.start()

        return [nfcapd, nfacctd]

    def stoppers(self) -> list[Callable[[], object]]:
        return [self.nfcapd.stop, self.nfacctd.stop, self.tshark.stop]

    def decode(self) -> dict[str, Decoded]:
        tshark = self.tshark.result()
        return {
            "nfdump": Decoded(self.nfcapd.flows(), self.nfcapd.sequence_errors(),
                              self.nfcapd.drops, self.nfcapd.bad_packets()),
            "nfacctd": Decoded(self.nfacctd.flows(), self.nfacctd.sequence_errors(),
                               self.nfacctd.drops, _pmacct_template_warnings(self.nfacctd)),
            "tshark": Decoded(tshark.flows, tshark.sequence_errors(),
                              self.tshark.kernel_drops(), tshark.missing_templates(),
                              tshark.malformed),
        }

    def close(self) -> None:
        for collector in (self.nfcapd, self.nfacctd, self.tshark):
            with contextlib.suppress(Exception):
                collector.close()


def _pmacct_template_warnings(nfacctd: Nfacctd) -> int:
    """nfacctd's complaints about templates: malformed ones, or data it had no template for."""
    log = nfacctd.log()
    return sum(log.count(text) for text in ("unable to read", "malformed", "unknown template"))
