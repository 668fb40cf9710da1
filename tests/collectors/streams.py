"""The export streams every independent decoder gets: one ExportSession per (protocol, profile),
each with its own records (told apart by the second address byte), several encode() calls, template
refreshes on the way, and exporter statistics in IPFIX's observation domain 0.

The records are deterministic (seeded) and carry every field any profile uses, with values that
fill their widths (64-bit counters, 32-bit retransmission counts, millisecond times), so a
truncated, swapped or mis-scaled field shows up as a difference.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, field

from ipfix.profile import Profile, load_profile
from ipfix.session import ExportSession
from tests.harness.formats import FORMATS

STREAM_SPECS = FORMATS  # (protocol, profile): what the shipped profiles declare
IPV4_RECORDS = 70  # > 30: several v5 packets; with IPv6, several 1400-byte IPFIX/v9 messages
IPV6_RECORDS = 40
BATCH = 23  # records per encode() call: messages of a batch end part-full, like a live export
TEMPLATE_REFRESH_PACKETS = 4  # small, so templates are resent mid-stream
PROCESS_NAMES = ("curl", "nginx", "python3.11", "sshd", "a-15-char-name!", "")
# Container ids as the agent sends them: a runtime's 64 hex digits, "" for a host process. v9
# carries their first 16 characters (the first and third differ only after those).
CONTAINER_IDS = (
    "3f4e1a9c0b2d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f",
    "",
    "3f4e1a9c0b2d8e7f" + "0" * 48,
    "f" * 64,
)


@dataclass
class Stream:
    index: int
    protocol: str
    profile: Profile
    observation_domain_id: int
    records: list[dict]
    datagrams: list[bytes] = field(default_factory=list)
    refused: int = 0
    messages_before_stats: int | None = None  # where the exporter statistics went

    @property
    def name(self) -> str:
        return f"{self.protocol}-{self.profile.name}"

    @property
    def exported(self) -> list[dict]:
        """The records the protocol can carry (v5 refuses IPv6)."""
        if self.protocol != "v5":
            return self.records
        return [r for r in self.records if "sourceIPv6Address" not in r]

    def owns(self, flow: dict) -> bool:
        return stream_index(flow) == self.index


def stream_index(flow: dict) -> int | None:
    """Records of stream i have source 10.(i+1).x.y or fd00:(i+1)::/32."""
    if isinstance(flow.get("sourceIPv4Address"), bytes):
        return flow["sourceIPv4Address"][1] - 1
    if isinstance(flow.get("sourceIPv6Address"), bytes):
        return int.from_bytes(flow["sourceIPv6Address"][2:4], "big") - 1
    return None


def make_record(rng: random.Random, stream: int, n: int, ip_version: int, now_ms: int) -> dict:
    wide = 0xFFFFFFFF  # v5 carries 32-bit counters and 16-bit interfaces
    is_v5 = stream == STREAM_SPECS.index(("v5", "v5"))
    protocol = (6, 6, 6, 17, 1 if ip_version == 4 else 58)[n % 5]
    start = now_ms - rng.randrange(1_000, 600_000)
    end = start + rng.randrange(0, 120_000)
    end = min(end, now_ms - 1)
    record: dict = {
        "protocolIdentifier": protocol,
        "ipVersion": ip_version,
        "ipClassOfService": rng.randrange(256),
        "octetDeltaCount": rng.randrange(1, wide if is_v5 else 1 << 48),
        "packetDeltaCount": rng.randrange(1, wide if is_v5 else 1 << 40),
        "flowStartMilliseconds": start,
        "flowEndMilliseconds": end,
        "ingressInterface": rng.randrange(1, 0xFFFF if is_v5 else 1 << 31),
        "egressInterface": rng.randrange(0, 0xFFFF if is_v5 else 1 << 31),
        "flowDirection": n % 2,
        "flowEndReason": rng.randrange(1, 6),
        "samplingInterval": 1,
        "RETRANSMITTED_IN_PKTS": rng.randrange(1 << 32),
        "RETRANSMITTED_OUT_PKTS": rng.randrange(1 << 32),
        "RETRANSMITTED_IN_BYTES": rng.randrange(1 << 32),
        "RETRANSMITTED_OUT_BYTES": rng.randrange(1 << 32),
        "CLIENT_NW_LATENCY_MS": rng.randrange(1 << 16),
        "SERVER_NW_LATENCY_MS": rng.randrange(1 << 16),
        "SRC_PROC_PID": rng.randrange(1, 1 << 22),
        "SRC_PROC_NAME": PROCESS_NAMES[n % len(PROCESS_NAMES)],
        "SRC_PROC_UID": rng.randrange(1 << 32),
        "DST_PROC_PID": rng.randrange(0, 1 << 22),
        "DST_PROC_NAME": PROCESS_NAMES[(n + 3) % len(PROCESS_NAMES)],
        "DST_PROC_UID": rng.randrange(1 << 32),
        "SRC_PROC_CONTAINER_ID": CONTAINER_IDS[n % len(CONTAINER_IDS)],
        "DST_PROC_CONTAINER_ID": CONTAINER_IDS[(n + 1) % len(CONTAINER_IDS)],
        "CLIENT_NW_DELAY_SEC": rng.randrange(4),
        "CLIENT_NW_DELAY_USEC": rng.randrange(1_000_000),
        "SERVER_NW_DELAY_SEC": rng.randrange(4),
        "SERVER_NW_DELAY_USEC": rng.randrange(1_000_000),
    }
    if protocol in (1, 58):  # ICMP: no ports; type/code in the destination port, as exporters do
        icmp = rng.choice((0x0800, 0x0000, 0x0303, 0x0B00) if ip_version == 4 else (0x8000, 0x8100))
        record.update(sourceTransportPort=0, destinationTransportPort=icmp)
        record["icmpTypeCodeIPv4" if ip_version == 4 else "icmpTypeCodeIPv6"] = icmp
        record["tcpControlBits"] = 0
    else:
        record.update(
            sourceTransportPort=rng.randrange(1024, 65536),
            destinationTransportPort=rng.choice((53, 80, 443, 8443, 5201)),
            tcpControlBits=rng.randrange(1, 256) if protocol == 6 else 0,
        )
    if ip_version == 4:
        record["sourceIPv4Address"] = bytes((10, stream + 1, n // 250, n % 250 + 1))
        record["destinationIPv4Address"] = bytes((192, 0, 2, rng.randrange(1, 255)))
    else:
        prefix = ipaddress.IPv6Address(f"fd00:{stream + 1:x}::").packed
        record["sourceIPv6Address"] = prefix[:14] + n.to_bytes(2, "big")
        record["destinationIPv6Address"] = ipaddress.IPv6Address(
            f"2001:db8::{rng.randrange(1, 0xFFFF):x}"
        ).packed
    return record


def build_streams(seed: int = 20240601) -> list[Stream]:
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    streams = []
    for index, (protocol, profile_name) in enumerate(STREAM_SPECS):
        records = [make_record(rng, index, n, 4, now_ms) for n in range(IPV4_RECORDS)]
        records += [make_record(rng, index, n, 6, now_ms) for n in range(IPV6_RECORDS)]
        rng.shuffle(records)  # IPv4 and IPv6 interleaved: template switches inside a batch
        stream = Stream(index, protocol, load_profile(profile_name), 100 + index, records)
        session = ExportSession(
            protocol,
            stream.profile,
            stream.observation_domain_id,
            template_refresh_packets=TEMPLATE_REFRESH_PACKETS,
        )
        for start in range(0, len(records), BATCH):
            stream.datagrams += session.encode(records[start : start + BATCH])
            if profile_name == "standard" and start == BATCH:
                # Exporter statistics between data messages (IPFIX: in observation domain 0, so
                # one IPFIX stream only: several exporters sharing domain 0 from one address is
                # not a real setup).
                stream.messages_before_stats = len(stream.datagrams)
                # Interface names too, as the agent sends them: pmacct once miscounted them.
                stream.datagrams += session.options_messages(
                    {"notSentFlowTotalCount": 3, "notSentPacketTotalCount": 30},
                    interfaces={1: "lo", 2: "eth0", 7: "veth-fb0123456"},
                )
        stream.refused = session.refused_records
        streams.append(stream)
    return streams
