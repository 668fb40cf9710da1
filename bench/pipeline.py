"""Agent pipeline throughput: synthetic observations -> cache -> records -> ExportSession -> UDP
socket to a loopback sink, on one core. Prints one JSON line per result:
{"name", "value", "unit", "peer", "peer_value", "ratio"}.

    .venv/bin/python -m bench.pipeline [--flows 100000] [--rounds 3]

The budget (issue 6): >= 1M records/s end to end, a sweep over 100,000 flows < 1 s. Peers are
not run here (softflowd measures packets, not records); peer fields are null.
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from bridge.cache import FlowCache
from bridge.config import CollectorConfig
from bridge.exporter import Exporter
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation, TcpHealth

T0 = int(time.time() * 1000)


def observations(count: int, *, end: bool, tcp: bool = False) -> list[FlowObservation]:
    health = TcpHealth(1, 1448, 250, 200, 10, 1) if tcp else None
    out = []
    for i in range(count):
        key = FlowKey(
            0,
            Direction(i & 1),
            4,
            6,
            (0x0A000000 + (i >> 16)).to_bytes(4, "big"),
            (0x0A800000 + (i & 0xFFFF)).to_bytes(4, "big"),
            1024 + i % 60000,
            443,
        )
        out.append(
            FlowObservation(
                key=key,
                ifindex=2,
                octets=1500 * (1 + i % 7),
                packets=1 + i % 7,
                tcp_flags=0x1B,
                first_ms=T0,
                last_ms=T0 + i % 1000,
                tcp=health,
                end=EndCause.FIN if end else EndCause.NONE,
            )
        )
    return out


def result(name: str, value: float, unit: str) -> None:
    line = {"name": name, "value": round(value, 1), "unit": unit}
    line.update(peer=None, peer_value=None, ratio=None)
    print(json.dumps(line), flush=True)


def pipeline(protocol: str, profile: str, flows: int, rounds: int) -> float:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sink.bind(("127.0.0.1", 0))
    config = CollectorConfig(
        host="127.0.0.1", port=sink.getsockname()[1], protocol=protocol, profile=profile
    )
    exporter = Exporter(config, 1234)
    batch = observations(flows, end=True, tcp=profile == "ntop")
    best = 0.0
    for _ in range(rounds):
        cache = FlowCache(max_flows=flows + 1)
        start = time.process_time()
        for i in range(0, flows, 10_000):  # polls of 10,000 observations
            exporter.export(cache.update(batch[i : i + 10_000]))
        elapsed = time.process_time() - start
        best = max(best, flows / elapsed)
    exporter.close()
    sink.close()
    assert exporter.records_exported == flows * rounds
    return best


def sweep_seconds(flows: int) -> tuple[float, float]:
    cache = FlowCache(idle_timeout=15, max_flows=flows)
    cache.update(observations(flows, end=False))
    start = time.process_time()
    kept = cache.sweep(T0 + 1000)  # none idle yet: must stop at once
    live = time.process_time() - start
    assert not kept
    start = time.process_time()
    expired = cache.sweep(T0 + 60_000)  # all idle
    everything = time.process_time() - start
    assert len(expired) == flows
    return live, everything


def live_updates_per_second(flows: int) -> float:
    """Polls of live flows whose counters grew: the cache's steady-state work per observation."""
    cache = FlowCache(max_flows=flows)
    first = observations(flows, end=False)
    cache.update(first)
    grown = [
        FlowObservation(
            o.key, o.ifindex, o.octets * 2, o.packets * 2, o.tcp_flags, o.first_ms, o.last_ms + 1000
        )
        for o in first
    ]
    start = time.process_time()
    cache.update(grown)
    return flows / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for protocol, profile in (
        ("ipfix", "standard"),
        ("v9", "standard"),
        ("ipfix", "ntop"),
        ("v5", "v5"),
    ):
        rate = pipeline(protocol, profile, args.flows, args.rounds)
        result(f"pipeline_{protocol}_{profile}", rate, "records/s")
    result("cache_update_live_flows", live_updates_per_second(args.flows), "observations/s")
    live, everything = sweep_seconds(args.flows)
    result(f"sweep_{args.flows}_flows_none_expire", live * 1000, "ms")
    result(f"sweep_{args.flows}_flows_all_expire", everything * 1000, "ms")


if __name__ == "__main__":
    main()
