"""The strict PyPI decoder `netflow` (bitkeks python-netflow-v9-v5-ipfix 0.12) as an independent
decoder, in process.

Its limits shape what it can check (FIELDS_SHOWN in collectors.py):
- IPFIX: fixed-length IANA elements only. An enterprise element is looked up as the IANA element
  with the same number, and variable-length fields are not supported, so the ntop profile cannot
  be decoded in IPFIX. Templates are keyed by template id only.
- v9: its id table lacks 136 (flowEndReason), 139 (icmpTypeCodeIPv6) and every vendor id, which
  it would all collapse into one "UNKNOWN_FIELD_TYPE". While decoding we register the ids we need
  under their IE names (the library still does all the parsing); fields other than 1, 2 or 4
  bytes come back as big-endian integers, strings are turned back into text here.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterator, Sequence

from tests.harness.collector_common import LOOPBACK, Flow, UdpSink

# v9 id -> IE name for ids netflow 0.12 does not know.
EXTRA_V9_IDS = {
    136: "flowEndReason",
    139: "icmpTypeCodeIPv6",
    **{
        57472 + n: name
        for name, n in {
            "RETRANSMITTED_IN_PKTS": 109,
            "RETRANSMITTED_OUT_PKTS": 110,
            "RETRANSMITTED_IN_BYTES": 127,
            "RETRANSMITTED_OUT_BYTES": 128,
            "CLIENT_NW_LATENCY_MS": 123,
            "SERVER_NW_LATENCY_MS": 124,
            "APPL_LATENCY_MS": 125,
            "SRC_PROC_PID": 168,
            "SRC_PROC_NAME": 169,
            "SRC_PROC_UID": 425,
            "DST_PROC_PID": 375,
            "DST_PROC_NAME": 376,
            "DST_PROC_UID": 426,
            "SRC_PROC_CONTAINER_ID": 558,
            "DST_PROC_CONTAINER_ID": 559,
        }.items()
    },
    57554: "CLIENT_NW_DELAY_SEC",
    57555: "CLIENT_NW_DELAY_USEC",
    57556: "SERVER_NW_DELAY_SEC",
    57557: "SERVER_NW_DELAY_USEC",
}
STRING_ELEMENTS = {
    "SRC_PROC_NAME",
    "DST_PROC_NAME",
    "SRC_PROC_CONTAINER_ID",
    "DST_PROC_CONTAINER_ID",
}

# netflow's v9 / v5 field names -> IE names.
V9_NAMES = {
    "IPV4_SRC_ADDR": "sourceIPv4Address",
    "IPV4_DST_ADDR": "destinationIPv4Address",
    "IPV6_SRC_ADDR": "sourceIPv6Address",
    "IPV6_DST_ADDR": "destinationIPv6Address",
    "L4_SRC_PORT": "sourceTransportPort",
    "L4_DST_PORT": "destinationTransportPort",
    "SRC_PORT": "sourceTransportPort",
    "DST_PORT": "destinationTransportPort",
    "PROTOCOL": "protocolIdentifier",
    "PROTO": "protocolIdentifier",
    "TCP_FLAGS": "tcpControlBits",
    "SRC_TOS": "ipClassOfService",
    "TOS": "ipClassOfService",
    "IP_PROTOCOL_VERSION": "ipVersion",
    "IN_BYTES": "octetDeltaCount",
    "IN_OCTETS": "octetDeltaCount",
    "IN_PKTS": "packetDeltaCount",
    "IN_PACKETS": "packetDeltaCount",
    "INPUT_SNMP": "ingressInterface",
    "OUTPUT_SNMP": "egressInterface",
    "INPUT": "ingressInterface",
    "OUTPUT": "egressInterface",
    "DIRECTION": "flowDirection",
    "ICMP_TYPE": "icmpTypeCodeIPv4",
    "SAMPLING_INTERVAL": "samplingInterval",
    "NEXT_HOP": "ipNextHopIPv4Address",
    "SRC_AS": "bgpSourceAsNumber",
    "DST_AS": "bgpDestinationAsNumber",
    "SRC_MASK": "sourceIPv4PrefixLength",
    "DST_MASK": "destinationIPv4PrefixLength",
}
_ADDRESS_SIZES = {
    "sourceIPv4Address": 4,
    "destinationIPv4Address": 4,
    "ipNextHopIPv4Address": 4,
    "sourceIPv6Address": 16,
    "destinationIPv6Address": 16,
}


@contextlib.contextmanager
def _extra_v9_ids() -> Iterator[None]:
    from netflow import v9

    added = {k: v for k, v in EXTRA_V9_IDS.items() if k not in v9.V9_FIELD_TYPES}
    v9.V9_FIELD_TYPES.update(added)
    try:
        yield
    finally:
        for key in added:
            v9.V9_FIELD_TYPES.pop(key, None)


def _address(value: object, size: int) -> bytes:
    if isinstance(value, str):
        return ipaddress.ip_address(value).packed
    assert isinstance(value, int)
    return value.to_bytes(size, "big")


def _text(value: object) -> str:
    if isinstance(value, int):  # netflow turned a fixed-length v9 string into an integer
        raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
        return raw.rstrip(b"\0").decode()
    if isinstance(value, bytes):
        return value.rstrip(b"\0").decode()
    return str(value)


def _normalize(data: dict, boot_ms: int | None) -> Flow:
    flow: Flow = {}
    for key, value in data.items():
        name = V9_NAMES.get(key, key)
        if name in _ADDRESS_SIZES:
            flow[name] = _address(value, _ADDRESS_SIZES[name])
        elif name in STRING_ELEMENTS:
            flow[name] = _text(value)
        elif key in ("FIRST_SWITCHED", "LAST_SWITCHED") and boot_ms is not None:
            ie = "flowStartMilliseconds" if key == "FIRST_SWITCHED" else "flowEndMilliseconds"
            flow[ie] = boot_ms + value
        else:
            flow[name] = value
    return flow


def decode_with_netflow(datagrams: Sequence[bytes]) -> list[Flow]:
    """Decode every datagram in order with `netflow.parse_packet`; templates are kept per
    (version, observation domain / source id). Raises whatever the library raises."""
    from netflow.utils import parse_packet

    templates: dict[tuple[int, int], dict] = {}
    flows: list[Flow] = []
    with _extra_v9_ids():
        for datagram in datagrams:
            version = int.from_bytes(datagram[:2], "big")
            domain = _domain(datagram, version)
            state = templates.setdefault((version, domain), {"netflow": {}, "ipfix": {}})
            packet = parse_packet(datagram, state)
            header = packet.header
            boot_ms = None
            if version == 9:
                boot_ms = header.timestamp * 1000 - header.uptime
            elif version == 5:
                boot_ms = header.timestamp * 1000 + header.timestamp_nano // 1_000_000
                boot_ms -= header.uptime
            for record in packet.flows:
                flow = _normalize(record.data, boot_ms)
                # IPFIX options data comes out among the flows: keep flows only.
                if any(name in flow for name in _ADDRESS_SIZES):
                    flows.append(flow)
    return flows


def _domain(datagram: bytes, version: int) -> int:
    if version == 9:
        return int.from_bytes(datagram[16:20], "big")
    if version == 10:
        return int.from_bytes(datagram[12:16], "big")
    return int.from_bytes(datagram[20:22], "big")  # v5: engine type/id


class NetflowReceiver:
    """A loopback UDP socket that keeps every datagram, decoded with `netflow` on demand: the
    start/stop form of this decoder, for live exporters. It checks no sequence numbers."""

    def __init__(self, ip_version: int = 4):
        self.host = LOOPBACK[ip_version]
        self._sink = UdpSink(self.host)
        self.port = self._sink.port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def datagrams(self) -> list[bytes]:
        return self._sink.datagrams

    def start(self) -> NetflowReceiver:
        self._sink.start()
        return self

    def stop(self) -> None:
        self._sink.stop()

    close = stop

    def __enter__(self) -> NetflowReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flows(self) -> list[Flow]:
        return decode_with_netflow(self.datagrams)

    def sequence_errors(self) -> None:
        return None  # netflow does not check sequences
