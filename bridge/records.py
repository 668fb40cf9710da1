"""Flow records from cache exports: a dict keyed by IE name, with the keys the profile needs.

Semantics (collectors.md 3.2):
- flowDirection is relative to this host; the interface index goes to ingressInterface for
  ingress records and to egressInterface for egress records.
- Retransmissions are the socket's own, so they travel in the direction this host sends: an
  egress record carries them as RETRANSMITTED_IN_* (IN = the record's own direction). The peer's
  retransmissions are not observable here; they are reported as 0, never guessed.
- CLIENT/SERVER_NW_LATENCY_MS is half the RTT as seen from the probe, here the local host: on the
  client host the client side is ~0 and the server side is RTT/2, and the reverse on a server.
  Client or server: FlowObservation.local_initiated when the kernel knows, else a port guess.
- The local process goes into SRC_PROC_* when the local end is the source (egress), else DST_PROC_*;
  so does its container id (SRC/DST_PROC_CONTAINER_ID), when the agent gives a resolver, and its
  command line (SRC/DST_PROC_CMDLINE), only when the agent gives one (the operator's opt-in).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from bridge.cache import Export, Flow
from ebpf.observation import Direction, ProcessInfo

INGRESS = Direction.INGRESS
EGRESS = Direction.EGRESS
TCP = 6

# Reverse elements of a biflow record (RFC 5103): what differs per direction.
BIFLOW_REVERSE = (
    "reverseOctetDeltaCount",
    "reversePacketDeltaCount",
    "reverseTcpControlBits",
    "reverseFlowStartMilliseconds",
    "reverseFlowEndMilliseconds",
)
BIFLOW_EXTRA = (*BIFLOW_REVERSE, "biflowDirection")

_NTOP_RETRANS = {
    "RETRANSMITTED_IN_PKTS",
    "RETRANSMITTED_OUT_PKTS",
    "RETRANSMITTED_IN_BYTES",
    "RETRANSMITTED_OUT_BYTES",
}
_LATENCY = {"CLIENT_NW_LATENCY_MS", "SERVER_NW_LATENCY_MS"}
_LEGACY_LATENCY = {
    "CLIENT_NW_DELAY_SEC",
    "CLIENT_NW_DELAY_USEC",
    "SERVER_NW_DELAY_SEC",
    "SERVER_NW_DELAY_USEC",
}
_PROCESS = {
    "SRC_PROC_PID",
    "SRC_PROC_NAME",
    "SRC_PROC_UID",
    "DST_PROC_PID",
    "DST_PROC_NAME",
    "DST_PROC_UID",
}
_CONTAINER = {"SRC_PROC_CONTAINER_ID", "DST_PROC_CONTAINER_ID"}
ContainerIds = Callable[[int], str]  # cgroup id -> container id, "" for none (bridge.agent)
_CMDLINE = {"SRC_PROC_CMDLINE", "DST_PROC_CMDLINE"}
CommandLines = Callable[[int, str], str]  # (pid, comm) -> command line (bridge.command_lines)


def ephemeral_port_range() -> tuple[int, int]:
    """The local port range the kernel picks client ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def local_is_client(flow: Flow, ephemeral: tuple[int, int]) -> bool:
    """Whether this host initiated the connection: as the kernel saw it (the local socket
    connected or was accepted) when known. Otherwise the ports decide: the side using an
    ephemeral port while the other does not is the client; else the lower port is the service."""
    initiated = flow.local_initiated
    if initiated is not None:
        return initiated
    key = flow.key
    if key.direction == EGRESS:
        local, remote = key.src_port, key.dst_port
    else:
        local, remote = key.dst_port, key.src_port
    low, high = ephemeral
    local_eph = low <= local <= high
    remote_eph = low <= remote <= high
    if local_eph != remote_eph:
        return local_eph
    return local > remote


def biflow_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """The profile's fields plus the reverse elements a biflow record carries."""
    extra = [name for name in BIFLOW_EXTRA if name not in fields]
    return (*fields, *extra)


def biflow_profile(profile):  # type: ignore[no-untyped-def]
    """A copy of an ipfix.profile.Profile extended for RFC 5103 biflow records."""
    return replace(profile, name=f"{profile.name}+biflow", fields=biflow_fields(profile.fields))


class RecordBuilder:
    """Builds records for one profile. Keys every profile needs are always set; the costlier
    vendor keys only when the profile lists them."""

    def __init__(
        self,
        fields: Iterable[str],
        *,
        biflow: bool = False,
        ephemeral: tuple[int, int] | None = None,
        container_ids: ContainerIds | None = None,
        command_lines: CommandLines | None = None,
    ) -> None:
        """`container_ids`, `command_lines`: without them, the container and command-line
        elements are left unset (their default)."""
        wanted = set(fields)
        self.biflow = biflow
        self._retrans = bool(wanted & _NTOP_RETRANS)
        self._latency = bool(wanted & _LATENCY)
        self._legacy_latency = bool(wanted & _LEGACY_LATENCY)
        self._process = bool(wanted & _PROCESS)
        self._container_ids = container_ids if wanted & _CONTAINER else None
        self._command_lines = command_lines if wanted & _CMDLINE else None
        self._icmp = bool(wanted & {"icmpTypeCodeIPv4", "icmpTypeCodeIPv6"})
        self._ephemeral = ephemeral or ephemeral_port_range()

    def build(self, exports: Sequence[Export]) -> list[dict]:
        if self.biflow:
            return [self._biflow_record(e) for e in exports]
        base = self._base
        if not (
            self._retrans
            or self._latency
            or self._legacy_latency
            or self._process
            or self._container_ids
            or self._command_lines
        ):
            return [base(e) for e in exports]
        records = []
        for export in exports:
            record = base(export)
            self._vendor(record, export, export[0])
            records.append(record)
        return records

    def _base(self, export: Export) -> dict:
        flow, octets, packets, start_ms, end_ms, reason = export[:6]
        key = flow.key
        protocol = key.protocol
        ifindex = flow.ifindex
        egress = key.direction == EGRESS
        # One dict literal per record: the cheapest way to build it in CPython.
        record = {
            "sourceTransportPort": key.src_port,
            "destinationTransportPort": key.dst_port,
            "protocolIdentifier": protocol,
            "tcpControlBits": flow.tcp_flags & 0xFF if protocol == TCP else 0,
            "octetDeltaCount": octets,
            "packetDeltaCount": packets,
            "flowStartMilliseconds": start_ms,
            "flowEndMilliseconds": end_ms,
            "flowDirection": 1 if egress else 0,
            "ingressInterface": 0 if egress else ifindex,
            "egressInterface": ifindex if egress else 0,
            "flowEndReason": reason,
        }
        if len(key.src_addr) == 4:
            record["sourceIPv4Address"] = key.src_addr
            record["destinationIPv4Address"] = key.dst_addr
            record["ipVersion"] = 4
        else:
            record["sourceIPv6Address"] = key.src_addr
            record["destinationIPv6Address"] = key.dst_addr
            record["ipVersion"] = 6
        if self._icmp and (protocol == 1 or protocol == 58):
            record["icmpTypeCodeIPv4" if protocol == 1 else "icmpTypeCodeIPv6"] = key.dst_port
        return record

    def _vendor(self, record: dict, export: Export, flow: Flow, client: bool | None = None) -> None:
        """`client`: whether the local end connected, when the caller knows better than `flow`."""
        egress = flow.key.direction == EGRESS
        if self._retrans:
            retrans, retrans_bytes = (export[6], export[7]) if egress else (0, 0)
            record["RETRANSMITTED_IN_PKTS"] = retrans
            record["RETRANSMITTED_IN_BYTES"] = retrans_bytes
            record["RETRANSMITTED_OUT_PKTS"] = 0
            record["RETRANSMITTED_OUT_BYTES"] = 0
        tcp = flow.tcp
        if (self._latency or self._legacy_latency) and tcp is not None and tcp.srtt_us:
            half_rtt_us = tcp.srtt_us // 2
            if client is None:
                client = local_is_client(flow, self._ephemeral)
            if client:
                client_us, server_us = 0, half_rtt_us
            else:
                client_us, server_us = half_rtt_us, 0
            if self._latency:
                record["CLIENT_NW_LATENCY_MS"] = (client_us + 500) // 1000
                record["SERVER_NW_LATENCY_MS"] = (server_us + 500) // 1000
            if self._legacy_latency:
                record["CLIENT_NW_DELAY_SEC"], record["CLIENT_NW_DELAY_USEC"] = divmod(
                    client_us, 1_000_000
                )
                record["SERVER_NW_DELAY_SEC"], record["SERVER_NW_DELAY_USEC"] = divmod(
                    server_us, 1_000_000
                )
        process = flow.process
        if process is not None:
            self._process_side(record, process, "SRC" if egress else "DST")

    def _process_side(self, record: dict, process: ProcessInfo, side: str) -> None:
        if self._process:
            record[f"{side}_PROC_PID"] = process.pid
            record[f"{side}_PROC_NAME"] = process.comm
            record[f"{side}_PROC_UID"] = process.uid
        if self._container_ids is not None:
            container = self._container_ids(process.cgroup_id)
            if container:
                record[f"{side}_PROC_CONTAINER_ID"] = container
        if self._command_lines is not None:
            command_line = self._command_lines(process.pid, process.comm)
            if command_line:
                record[f"{side}_PROC_CMDLINE"] = command_line

    def _biflow_record(self, export: Export) -> dict:
        """Forward = the initiator's direction when both are known (biflowDirection 1)."""
        peer = export[8]
        known = export[0]
        if peer is not None and known.local_initiated is None:
            known = peer[0]  # either direction may be the one the kernel told who connected
        client = local_is_client(known, self._ephemeral)
        if peer is not None and client != (export[0].key.direction == EGRESS):
            export, peer = peer, export
        flow = export[0]
        record = self._base(export)
        self._vendor(record, export, flow, client)
        if peer is None:
            record["reverseOctetDeltaCount"] = 0
            record["reversePacketDeltaCount"] = 0
            record["reverseTcpControlBits"] = 0
            record["reverseFlowStartMilliseconds"] = 0
            record["reverseFlowEndMilliseconds"] = 0
            record["biflowDirection"] = 0
            return record
        peer_flow = peer[0]
        record["reverseOctetDeltaCount"] = peer[1]
        record["reversePacketDeltaCount"] = peer[2]
        is_tcp = flow.key.protocol == TCP
        record["reverseTcpControlBits"] = peer_flow.tcp_flags & 0xFF if is_tcp else 0
        record["reverseFlowStartMilliseconds"] = peer[3]
        record["reverseFlowEndMilliseconds"] = peer[4]
        record["biflowDirection"] = 1 if flow.key.protocol == TCP else 0
        # The connection's interfaces: where it comes in and where it goes out.
        if flow.key.direction == EGRESS:
            record["ingressInterface"] = peer_flow.ifindex
        else:
            record["egressInterface"] = peer_flow.ifindex
        if self._retrans and flow.key.direction == INGRESS:
            record["RETRANSMITTED_OUT_PKTS"] = peer[6]
            record["RETRANSMITTED_OUT_BYTES"] = peer[7]
        process = peer_flow.process
        if process is not None and flow.process is None:
            # One socket owns both directions: the local end is the source when forward is egress.
            self._process_side(record, process, "SRC" if flow.key.direction == EGRESS else "DST")
        return record
