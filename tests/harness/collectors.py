"""Decode exported datagrams with REAL collectors and compare, field by field, with the records.

Four independent decoders, each as a start/stop class (for a live exporter) and a one-shot:

    nfdump   Nfcapd            decode_with_nfdump(datagrams, ip_version) -> (flows, seq errors)
    nfacctd  Nfacctd           decode_with_nfacctd(datagrams, ...)       -> (flows, seq errors)
    tshark   TsharkCapture     decode_with_tshark(datagrams, ...)        -> TsharkResult
    netflow  NetflowReceiver   decode_with_netflow(datagrams)            -> flows

The classes share: start() (returns self; also a context manager), .address (host, port) for the
exporter, stop() (waits until the collector has read everything, then ends it), flows(),
sequence_errors() (None for netflow, which checks none), close(). `open_collector(name)` makes
one by name; the `collector_factory` fixture also closes them, whatever the test did.

Every decoded flow is a dict keyed by IE name, in the agent's record form (addresses packed bytes,
times epoch ms). FIELDS_SHOWN says which elements each collector shows per protocol, with the
caveats that become the README compatibility notes; `expected_view` applies those caveats to an
input record, and `compare` matches decoded flows to records and lists every difference.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence

import pytest

from ipfix.elements import BY_NAME
from tests.harness.collector_common import (
    CollectorError,
    Flow,
    free_udp_port,
    send_datagrams,
    write_pcap,
)
from tests.harness.collector_fields import (
    CANNOT_DECODE,
    COLLECTORS,
    FIELDS_SHOWN,
    NFDUMP_LATENCY,
    NOT_SHOWN,
    PORTS,
    REQUIRED_TOOLS,
    TIMES,
    TUPLE_V4,
    TUPLE_V6,
    render_notes,
)
from tests.harness.collector_netflow import NetflowReceiver, decode_with_netflow
from tests.harness.collector_nfdump import Nfcapd, decode_with_nfdump
from tests.harness.collector_pmacct import (
    DEFAULT_PRIMITIVES,
    Nfacctd,
    Primitive,
    decode_with_nfacctd,
)
from tests.harness.collector_tshark import TsharkCapture, TsharkResult, decode_with_tshark

__all__ = [
    "CANNOT_DECODE",
    "COLLECTORS",
    "FIELDS_SHOWN",
    "NOT_SHOWN",
    "CollectorError",
    "DEFAULT_PRIMITIVES",
    "Flow",
    "Nfacctd",
    "NetflowReceiver",
    "Nfcapd",
    "Primitive",
    "REQUIRED_TOOLS",
    "TsharkCapture",
    "TsharkResult",
    "collector_factory",
    "compare",
    "decode_with_netflow",
    "decode_with_nfacctd",
    "decode_with_nfdump",
    "decode_with_tshark",
    "expected_view",
    "render_notes",
    "require_collector",
    "flow_key",
    "free_udp_port",
    "open_collector",
    "send_datagrams",
    "write_pcap",
]

IPV6_ONLY = frozenset({*TUPLE_V6, "icmpTypeCodeIPv6"})
IPV4_ONLY = frozenset(
    {
        *TUPLE_V4,
        "icmpTypeCodeIPv4",
        "ipNextHopIPv4Address",
        "sourceIPv4PrefixLength",
        "destinationIPv4PrefixLength",
    }
)
STRINGS = frozenset(
    {
        "SRC_PROC_NAME",
        "DST_PROC_NAME",
        "SRC_PROC_USER_NAME",
        "DST_PROC_USER_NAME",
        "SRC_PROC_CONTAINER_ID",
        "DST_PROC_CONTAINER_ID",
        "SRC_PROC_CMDLINE",
        "DST_PROC_CMDLINE",
    }
)
ICMP_PROTOCOLS = (1, 58)


def _ceil_seconds_ms(ms: int) -> int:
    return -(-ms // 1000) * 1000


def _zero(name: str) -> object:
    """How a field the record lacks is encoded (and so decoded): zero, empty, 0.0.0.0."""
    if name in STRINGS:
        return ""
    if name.endswith("IPv4Address"):
        return bytes(4)
    if name.endswith("IPv6Address"):
        return bytes(16)
    return 0


def expected_view(record: Flow, collector: str, protocol: str, fields: Sequence[str]) -> Flow:
    """What `collector` should show for `record` exported over `protocol` with a template of
    `fields` (the profile's): the shown fields of the record's address family, a missing field
    as zero / empty (that is how it is encoded), and each collector's documented caveats."""
    shown = FIELDS_SHOWN[collector][protocol]
    is_v6 = "sourceIPv6Address" in record
    other_family = IPV4_ONLY if is_v6 else IPV6_ONLY
    view: Flow = {}
    for name in fields:
        if name in shown and name not in other_family:
            view[name] = record.get(name, _zero(name))
    is_icmp = record.get("protocolIdentifier") in ICMP_PROTOCOLS
    if collector == "nfdump":
        if is_icmp:
            for name in (*PORTS, "ipClassOfService"):
                view.pop(name, None)
        else:
            view.pop("icmpTypeCodeIPv4", None)
            view.pop("icmpTypeCodeIPv6", None)
        if protocol == "v9" and "CLIENT_NW_DELAY_USEC" in fields:
            for side, key in (("CLIENT", NFDUMP_LATENCY[0]), ("SERVER", NFDUMP_LATENCY[1])):
                view[key] = int(record.get(f"{side}_NW_DELAY_SEC", 0)) * 1_000_000 + int(
                    record.get(f"{side}_NW_DELAY_USEC", 0)
                )
    if protocol == "v9":  # no variable length: a string is cut at the element's fixed length
        for name in STRINGS.intersection(view):
            data = str(view[name]).encode()[: BY_NAME[name].v9_length]
            view[name] = data.decode(errors="ignore")
    if collector == "nfacctd" and protocol == "v9":
        # unix_secs - (sysUptime - t)/1000 with integer division; v9 headers are whole seconds
        # (sysUptime from the same instant), so this is t rounded up to a whole second.
        for name in TIMES:
            if name in view:
                view[name] = _ceil_seconds_ms(int(view[name]))  # type: ignore[arg-type]
    if collector == "nfacctd" and protocol == "v5":
        # The same formula, but pmacct ignores unix_nsecs: rounded down or up, depending on the
        # export instant's milliseconds.
        for name in TIMES:
            if name in view:
                ms = int(view[name])  # type: ignore[arg-type]
                view[name] = OneOf((ms // 1000 * 1000, _ceil_seconds_ms(ms)))
    return view


class OneOf(tuple):
    """An expected value a collector may show in more than one documented way."""

    def __eq__(self, other: object) -> bool:
        return other in tuple(self)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return " or ".join(map(repr, self))


KEY_FIELDS = (*TUPLE_V4, *TUPLE_V6, *PORTS, "protocolIdentifier")


def flow_key(flow: Flow) -> tuple:
    """Records in these tests differ in addresses, ports or protocol: that is the match key."""
    return tuple(flow.get(name) for name in KEY_FIELDS)


def _show(value: object) -> str:
    if isinstance(value, bytes) and len(value) in (4, 16):
        return str(ipaddress.ip_address(value))
    return repr(value)


def compare(
    decoded: Sequence[Flow],
    records: Sequence[Flow],
    collector: str,
    protocol: str,
    fields: Sequence[str],
) -> list[str]:
    """Every difference between what `collector` decoded and what it should show for `records`:
    missing records, unexpected records, duplicates, and each field that differs. Empty = exact."""
    problems: list[str] = []
    expected = [expected_view(r, collector, protocol, fields) for r in records]
    by_key: dict[tuple, list[Flow]] = {}
    for flow in decoded:
        view_key = flow_key({k: v for k, v in flow.items() if k in KEY_FIELDS})
        by_key.setdefault(view_key, []).append(flow)
    for view in expected:
        key = flow_key(view)
        matches = by_key.pop(key, [])
        label = ", ".join(_show(v) for v in key if v is not None)
        if not matches:
            problems.append(f"{collector}/{protocol}: record ({label}) missing")
            continue
        if len(matches) > 1:
            problems.append(f"{collector}/{protocol}: record ({label}) decoded {len(matches)}x")
        got = matches[0]
        for name, want in view.items():
            have = got.get(name, "" if name in STRINGS and want == "" else None)
            if have != want:
                problems.append(
                    f"{collector}/{protocol}: ({label}) {name}: got {_show(have)}, "
                    f"want {_show(want)}"
                )
    for key, flows in by_key.items():
        label = ", ".join(_show(v) for v in key if v is not None)
        problems.append(f"{collector}/{protocol}: unexpected record ({label}) x{len(flows)}")
    return problems


Collector = Nfcapd | Nfacctd | TsharkCapture | NetflowReceiver


def open_collector(name: str, ip_version: int = 4) -> Collector:
    """A started collector by name ("nfdump", "nfacctd", "tshark", "netflow") on 127.0.0.1 or
    ::1. The caller closes it (or uses `collector_factory`)."""
    kinds: dict[str, Callable[[int], Collector]] = {
        "nfdump": Nfcapd,
        "nfacctd": Nfacctd,
        "tshark": TsharkCapture,
        "netflow": NetflowReceiver,
    }
    if name not in kinds:
        raise ValueError(f"collector '{name}': expected one of {', '.join(COLLECTORS)}")
    collector = kinds[name](ip_version)
    try:
        return collector.start()
    except BaseException:
        collector.close()
        raise


def require_collector(name: str, live: bool = True) -> None:
    """Skip outside CI, fail in CI, when `name` cannot run here: its tools are missing, or (live
    tshark) capturing on `lo` needs root."""
    from tests.conftest import require_tools, skip_or_fail

    require_tools(*REQUIRED_TOOLS[name])
    if name == "tshark" and live and os.geteuid() != 0:
        skip_or_fail("capturing on lo (tcpdump) needs root")


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    """`make(name, ip_version=4)` -> a started collector (skipped outside CI, failed inside, when
    its tools are missing); all of them are closed at teardown. Import it into a conftest."""
    opened: list[Collector] = []

    def make(name: str, ip_version: int = 4) -> Collector:
        require_collector(name)
        collector = open_collector(name, ip_version)
        opened.append(collector)
        return collector

    yield make
    for collector in opened:
        collector.close()
