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


def test_kernel_says_who_connected_over_ports():
    # Ports alone make the local end of 2049 -> 45000 the server; the kernel says it connected.
    connected = key(2049, 45000)
    assert not local_is_client(obs(connected, 1, 1, T0, T0), EPHEMERAL)
    assert local_is_client(obs(connected, 1, 1, T0, T0, local_initiated=True), EPHEMERAL)
    accepted = key(45000, 443)  # ports say client; the socket was accepted
    assert not local_is_client(obs(accepted, 1, 1, T0, T0, local_initiated=False), EPHEMERAL)


def test_latency_sides_follow_the_kernel_through_the_cache():
    k = key(2049, 45000)
    # Ended and never cached (the observation stands in for the flow) ...
    ended = obs(k, 10, 1, T0, T0, tcp=RTT, end=EndCause.FIN, local_initiated=True)
    assert (build(ended)["CLIENT_NW_LATENCY_MS"], build(ended)["SERVER_NW_LATENCY_MS"]) == (0, 20)
    # ... and cached: a later observation that does not know keeps what an earlier one said.
    builder = RecordBuilder(NTOP, ephemeral=EPHEMERAL)
    cache = FlowCache()
    cache.update([obs(k, 10, 1, T0, T0, tcp=RTT, local_initiated=False)])
    cache.update([obs(k, 20, 2, T0, T0 + 1, tcp=RTT)])
    (record,) = builder.build(cache.flush_all())
    assert (record["CLIENT_NW_LATENCY_MS"], record["SERVER_NW_LATENCY_MS"]) == (20, 0)
    cache.update([obs(k, 30, 3, T0, T0 + 2, tcp=RTT, local_initiated=True)])
    (record,) = builder.build(cache.flush_all())
    assert (record["CLIENT_NW_LATENCY_MS"], record["SERVER_NW_LATENCY_MS"]) == (0, 20)


def test_biflow_forward_is_who_connected_as_the_kernel_says():
    egress = key(2049, 45000, src="192.0.2.10", dst="198.51.100.7")
    ingress = key(45000, 2049, src="198.51.100.7", dst="192.0.2.10", direction=Direction.INGRESS)
    builder = RecordBuilder(NTOP, biflow=True, ephemeral=EPHEMERAL)
    for told in (None, True, False):
        cache = FlowCache(biflow=True)
        # Only the ingress direction says: either direction may be the one that knows.
        cache.update([
            obs(egress, 500, 5, T0, T0 + 3, ifindex=3, tcp=RTT),
            obs(ingress, 70, 1, T0 + 1, T0 + 2, ifindex=3, tcp=RTT, local_initiated=told),
        ])  # fmt: skip
        (record,) = builder.build(cache.flush_all())
        local_connected = told is True  # None: ports make the local end (2049) the server
        assert record["flowDirection"] == (1 if local_connected else 0), told
        assert record["sourceTransportPort"] == (2049 if local_connected else 45000), told
        assert record["octetDeltaCount"] == (500 if local_connected else 70), told
        assert record["reverseOctetDeltaCount"] == (70 if local_connected else 500), told
        assert record["biflowDirection"] == 1
        latency = (record["CLIENT_NW_LATENCY_MS"], record["SERVER_NW_LATENCY_MS"])
        assert latency == ((0, 20) if local_connected else (20, 0)), told
