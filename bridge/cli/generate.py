"""`flowbridge generate`: synthetic but realistic flows, exported to load-test a collector (as
nflow-generator does for v5), or printed as JSON lines for `flowbridge replay`."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

import click

from bridge.cli.replay import (
    PROTOCOLS,
    export,
    make_session,
    parse_host_port,
    profile_for,
    udp_sender,
)
from ipfix.jsonform import record_to_json

# (protocol, server port, weight, typical packets, typical bytes per packet)
SERVICES = (
    (6, 443, 40, 30, 900),
    (6, 80, 10, 20, 700),
    (6, 22, 4, 200, 120),
    (6, 5432, 4, 50, 400),
    (6, 3306, 3, 50, 400),
    (6, 6379, 3, 10, 90),
    (6, 8080, 5, 15, 600),
    (17, 53, 15, 1, 80),
    (17, 123, 3, 1, 76),
    (17, 443, 6, 40, 1100),  # QUIC
    (17, 514, 2, 5, 200),
    (1, 0, 3, 4, 84),
    (58, 0, 2, 4, 104),
)
COMMANDS = ("nginx", "curl", "postgres", "sshd", "python3", "envoy", "redis-server", "java")


def _address(rng: random.Random, ipv6: bool) -> bytes:
    if ipv6:  # 2001:db8::/32, the documentation prefix
        return bytes.fromhex("20010db8") + rng.getrandbits(96).to_bytes(12, "big")
    return bytes((10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)))


def synthetic_records(
    seed: int, count: int, now_ms: int, allow_ipv6: bool = True
) -> Iterator[dict]:
    """`count` flow records, the same for the same seed and now_ms. Each TCP/UDP connection
    gives two uniflow records (client->server and back) with that direction's 5-tuple."""
    rng = random.Random(seed)
    weights = [s[2] for s in SERVICES]
    made = 0
    while made < count:
        proto, server_port, _, typical_packets, typical_size = rng.choices(SERVICES, weights)[0]
        ipv6 = proto == 58 or (allow_ipv6 and proto != 1 and rng.random() < 0.3)
        if proto == 58 and not allow_ipv6:
            proto = 1
            ipv6 = False
        client, server = _address(rng, ipv6), _address(rng, ipv6)
        client_port = rng.randrange(32768, 61000) if proto in (6, 17) else 0
        duration = int(rng.expovariate(1 / 4000)) if typical_packets > 1 else rng.randrange(50)
        end = now_ms - rng.randrange(0, 15_000)
        start = end - duration
        ended_by = rng.choices((3, 1, 2, 3), (60, 20, 10, 10))[0] if proto == 6 else 1
        pid, command = rng.randrange(100, 4_000_000), rng.choice(COMMANDS)
        for forward in (True, False):
            if made >= count:
                break
            packets = max(1, int(rng.lognormvariate(0, 0.8) * typical_packets))
            size = min(1500, max(40, int(rng.gauss(typical_size, typical_size / 4))))
            record = {
                "sourceTransportPort": client_port if forward else server_port,
                "destinationTransportPort": server_port if forward else client_port,
                "protocolIdentifier": proto,
                "ipVersion": 6 if ipv6 else 4,
                "ipClassOfService": rng.choice((0, 0, 0, 0x28, 0xB8)),
                "octetDeltaCount": packets * size,
                "packetDeltaCount": packets,
                "flowStartMilliseconds": start,
                "flowEndMilliseconds": end,
                "ingressInterface": 0 if forward else 2,
                "egressInterface": 2 if forward else 0,
                "flowDirection": 1 if forward else 0,
                "flowEndReason": ended_by,
            }
            src, dst = (client, server) if forward else (server, client)
            family = "IPv6" if ipv6 else "IPv4"
            record[f"source{family}Address"] = src
            record[f"destination{family}Address"] = dst
            if proto == 6:
                flags = 0x02 | 0x10 | 0x08 | (0x01 if ended_by == 3 else 0)
                record["tcpControlBits"] = flags if rng.random() < 0.95 else flags | 0x04
                record["RETRANSMITTED_IN_PKTS"] = rng.choice((0, 0, 0, 1, 2))
                record["RETRANSMITTED_IN_BYTES"] = record["RETRANSMITTED_IN_PKTS"] * size
                rtt_ms = max(1, int(rng.lognormvariate(2.5, 0.7)))
                record["SERVER_NW_LATENCY_MS" if forward else "CLIENT_NW_LATENCY_MS"] = rtt_ms
            elif proto in (1, 58):
                type_code = (8 << 8) if forward else 0  # echo request / reply
                if proto == 58:
                    type_code = (128 << 8) if forward else (129 << 8)
                record["icmpTypeCodeIPv6" if ipv6 else "icmpTypeCodeIPv4"] = type_code
                record["destinationTransportPort"] = type_code
            side = "SRC" if forward else "DST"
            record[f"{side}_PROC_PID"] = pid
            record[f"{side}_PROC_NAME"] = command
            record[f"{side}_PROC_UID"] = rng.choice((0, 33, 1000, 999))
            yield record
            made += 1


@click.command("generate")
@click.option("--collector", help="HOST:PORT to export to (UDP); without it, print JSON lines.")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="ipfix", show_default=True)
@click.option("--count", type=click.IntRange(min=1), required=True, help="Flow records to make.")
@click.option("--rate", type=float, default=0, help="Records per second (0: unlimited).")
@click.option("--profile", "profile_name", help="Profile name or path [standard; v5 for v5].")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--domain-id", type=int, default=1, show_default=True)
@click.option("--max-message-size", type=int, default=1400, show_default=True)
def generate(
    collector: str | None,
    protocol: str,
    count: int,
    rate: float,
    profile_name: str | None,
    seed: int,
    domain_id: int,
    max_message_size: int,
) -> None:
    """Export synthetic flows (TCP/UDP/ICMP, IPv4/IPv6) to load-test a collector.

    \b
    Examples:
      flowbridge generate --collector 127.0.0.1:4739
      flowbridge generate --collector 127.0.0.1:9995 --protocol v9
    """
    now_ms = int(time.time() * 1000)
    profile = profile_for(protocol, profile_name)
    wanted = set(profile.fields)
    records = (
        {k: v for k, v in r.items() if k in wanted}
        for r in synthetic_records(seed, count, now_ms, allow_ipv6=protocol != "v5")
    )
    if collector is None:
        for record in records:
            click.echo(json.dumps(record_to_json(record)))
        return
    host, port = parse_host_port(collector, "--collector")
    session = make_session(protocol, profile, domain_id, max_message_size)
    send = udp_sender(host, port)
    started = time.monotonic()
    sent, messages = export(session, records, send, rate)
    elapsed = max(time.monotonic() - started, 1e-9)
    click.echo(
        f"generate: {sent} records in {messages} {protocol} messages to {host}:{port} "
        f"in {elapsed:.2f} s ({sent / elapsed:,.0f} records/s)",
        err=True,
    )
