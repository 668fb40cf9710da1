"""Observations -> records: direction, interfaces, retransmissions, latency, process side."""

from __future__ import annotations

from bridge.cache import FlowCache
from bridge.records import RecordBuilder, local_is_client
from ebpf.observation import Direction, EndCause, ProcessInfo, TcpHealth

from .helpers import T0, key, obs

EPHEMERAL = (32768, 60999)
NTOP = [
    "RETRANSMITTED_IN_PKTS",
    "RETRANSMITTED_OUT_PKTS",
    "RETRANSMITTED_IN_BYTES",
    "RETRANSMITTED_OUT_BYTES",
    "CLIENT_NW_LATENCY_MS",
    "SERVER_NW_LATENCY_MS",
    "SRC_PROC_PID",
    "SRC_PROC_NAME",
    "SRC_PROC_UID",
    "DST_PROC_PID",
    "DST_PROC_NAME",
    "DST_PROC_UID",
    "CLIENT_NW_DELAY_SEC",
    "CLIENT_NW_DELAY_USEC",
    "SERVER_NW_DELAY_SEC",
    "SERVER_NW_DELAY_USEC",
    "icmpTypeCodeIPv4",
    "icmpTypeCodeIPv6",
]
CURL = ProcessInfo(pid=4242, comm="curl", uid=1000, cgroup_id=7)
RTT = TcpHealth(
    retrans_packets=3, retrans_bytes=4344, srtt_us=40_000, min_rtt_us=39_000, snd_cwnd=10, state=1
)


def build(observation, builder=None) -> dict:
    builder = builder or RecordBuilder(NTOP, ephemeral=EPHEMERAL)
    cache = FlowCache()
    (record,) = builder.build(cache.update([observation]) + cache.flush_all())
    return record


def test_client_egress_record():
    k = key(45000, 443, src="192.0.2.10", dst="198.51.100.7")  # this host is the client
    record = build(
        obs(k, 5000, 6, T0, T0 + 80, flags=0x1B, ifindex=3, process=CURL, tcp=RTT, end=EndCause.FIN)
    )
    assert record["sourceIPv4Address"] == bytes([192, 0, 2, 10])
    assert record["destinationIPv4Address"] == bytes([198, 51, 100, 7])
    assert (record["sourceTransportPort"], record["destinationTransportPort"]) == (45000, 443)
    assert (record["octetDeltaCount"], record["packetDeltaCount"]) == (5000, 6)
    assert (record["flowStartMilliseconds"], record["flowEndMilliseconds"]) == (T0, T0 + 80)
    assert record["flowDirection"] == 1
    assert (record["ingressInterface"], record["egressInterface"]) == (0, 3)
    assert record["flowEndReason"] == 3 and record["ipVersion"] == 4
    assert record["tcpControlBits"] == 0x1B
    # egress carries the socket's own retransmissions, as IN (= this record's direction)
    assert (record["RETRANSMITTED_IN_PKTS"], record["RETRANSMITTED_IN_BYTES"]) == (3, 4344)
    assert record["RETRANSMITTED_OUT_PKTS"] == 0
    # on the client host: client latency ~0, server latency = RTT/2
    assert (record["CLIENT_NW_LATENCY_MS"], record["SERVER_NW_LATENCY_MS"]) == (0, 20)
    assert (record["SERVER_NW_DELAY_SEC"], record["SERVER_NW_DELAY_USEC"]) == (0, 20_000)
    assert (record["SRC_PROC_PID"], record["SRC_PROC_NAME"], record["SRC_PROC_UID"]) == (
        4242,
        "curl",
        1000,
    )
    assert "DST_PROC_PID" not in record


def test_server_ingress_record():
    k = key(51000, 22, src="198.51.100.7", dst="192.0.2.10", direction=Direction.INGRESS)
    sshd = ProcessInfo(pid=800, comm="sshd", uid=0, cgroup_id=1)
    record = build(obs(k, 900, 9, T0, T0 + 5, ifindex=2, process=sshd, tcp=RTT))
    assert record["flowDirection"] == 0
    assert (record["ingressInterface"], record["egressInterface"]) == (2, 0)
    assert record["RETRANSMITTED_IN_PKTS"] == 0  # the peer's retransmissions are not seen here
    # this host serves port 22: the client side has the RTT/2
    assert (record["CLIENT_NW_LATENCY_MS"], record["SERVER_NW_LATENCY_MS"]) == (20, 0)
    assert (record["DST_PROC_PID"], record["DST_PROC_NAME"]) == (800, "sshd")
    assert "SRC_PROC_PID" not in record


def test_ipv6_and_icmp():
    k = key(0, 8 << 8, src="fd00::1", dst="fd00::2", protocol=58)
    record = build(obs(k, 104, 1, T0, T0, flags=0, end=EndCause.CLOSED))
    assert record["sourceIPv6Address"] == bytes.fromhex("fd00" + "00" * 13 + "01")
    assert record["ipVersion"] == 6 and "sourceIPv4Address" not in record
    assert record["icmpTypeCodeIPv6"] == 8 << 8
    assert record["tcpControlBits"] == 0


def test_standard_profile_gets_no_vendor_keys():
    builder = RecordBuilder(["sourceIPv4Address", "octetDeltaCount"], ephemeral=EPHEMERAL)
    record = build(obs(key(), 100, 1, T0, T0, process=CURL, tcp=RTT, end=EndCause.FIN), builder)
    assert not any(name in record for name in NTOP)


def test_who_is_client_by_ports():
    assert local_is_client(obs(key(45000, 443), 1, 1, T0, T0), EPHEMERAL)
    assert not local_is_client(obs(key(443, 45000), 1, 1, T0, T0), EPHEMERAL)
    ingress = key(45000, 8080, direction=Direction.INGRESS)  # remote ephemeral -> local serves
    assert not local_is_client(obs(ingress, 1, 1, T0, T0), EPHEMERAL)
    assert local_is_client(obs(key(5000, 80), 1, 1, T0, T0), EPHEMERAL)  # neither: lower serves
