"""Soak: `flowbridge run` under connection churn plus long-lived flows, exporting to nfcapd
(IPFIX) and nfacctd (NetFlow v9).

For FLOWBRIDGE_SOAK_SECONDS (default 150 s in CI; the documented long run is 1800):
  - batches of short TCP connections run back to back in a network lab;
  - LONG_FLOWS connections send a little every half second for the whole run, so the active
    timeout splits them again and again.
Judged at the end:
  - the agent's memory (RSS) and file descriptors are flat: after a warm-up, the last quarter
    of the run is no higher than the quarter after the warm-up (within a margin; descriptors
    may follow namespaces and interfaces that other tests create meanwhile, which the agent
    attaches to);
  - every connection reached nfcapd (one record per direction and side, or more);
  - the long flows were exported in active-timeout slices;
  - the collectors report zero sequence errors and their sockets dropped nothing.

    FLOWBRIDGE_SOAK_SECONDS=1800 CI=true .venv/bin/pytest -q tests/reliability/test_soak.py -s
(`-s` shows the measured summary line.)
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import pytest

from tests.harness.collector_common import LARGE_SOCKET_BUFFER
from tests.harness.collectors import Nfacctd, Nfcapd
from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.reliability.churn import Churn
from tests.reliability.probes import ProcessSample, free_tcp_port, sample, scrape
from tests.reliability.stations import nfdump_tcp_keys

pytestmark = [pytest.mark.root, pytest.mark.collectors]

SOAK_SECONDS = float(os.environ.get("FLOWBRIDGE_SOAK_SECONDS", "150"))
WARM_UP = 0.2  # of the run: bcc, caches and the allocator settle
SAMPLE_EVERY_S = 2.0
BATCH = 500  # connections per churn process pair
GAP_MS = 4.0  # between connections: ~150 a second, a steady load for this 2-core VM
LONG_FLOWS = 4
ACTIVE_TIMEOUT_S = 10
IDLE_TIMEOUT_S = 5
SLICE_STRETCH = 1.25  # how much longer than the active timeout a slice may be
RSS_MARGIN_KIB = 8 * 1024  # Python's allocator keeps arenas; a leak grows past this
RSS_MARGIN_RATIO = 0.10
FD_MARGIN = 8
FDS_PER_NAMESPACE = 8  # its counting programs and namespace handle
FDS_PER_INTERFACE = 2  # ingress and egress links


@dataclass
class Soak:
    seconds: float = SOAK_SECONDS
    churns: list[Churn] = field(default_factory=list)
    long_flows: list[Churn] = field(default_factory=list)
    samples: list[tuple[ProcessSample, float, float]] = field(default_factory=list)
    records: Counter = field(default_factory=Counter)  # nfdump's, by record_key
    sequence_errors: dict[str, int] = field(default_factory=dict)
    socket_drops: dict[str, int] = field(default_factory=dict)
    collector_warnings: dict[str, list[str]] = field(default_factory=dict)
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""

    def connections(self) -> int:
        return sum(len(c.ports) for c in self.churns)


def _attachments(port: int) -> tuple[float, float]:
    metrics = scrape(port)
    return (metrics.get('flowbridge_kernel{name="namespaces"}', 0.0),
            metrics.get('flowbridge_kernel{name="interfaces_attached"}', 0.0))


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    require_live("nfcapd", "nfdump", "nfacctd")
    workdir = tmp_path_factory.mktemp("soak")
    run = Soak()
    metrics_port = free_tcp_port()
    nfcapd = Nfcapd(4, socket_buffer=LARGE_SOCKET_BUFFER)
    nfacctd = Nfacctd(4, socket_buffer=LARGE_SOCKET_BUFFER)
    with NetLab() as lab, nfcapd, nfacctd:
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{nfcapd.port}", "protocol": "ipfix"},
            {"address": f"127.0.0.1:{nfacctd.port}", "protocol": "v9"},
        ], active_timeout=ACTIVE_TIMEOUT_S, idle_timeout=IDLE_TIMEOUT_S, options_interval=5,
            metrics=f"127.0.0.1:{metrics_port}")
        with AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            assert agent.process is not None
            pid = agent.process.pid
            chunks = int(run.seconds * 2)
            run.long_flows = [Churn(lab, 1, request=chunks * 100, response=100, chunks=chunks,
                                    interval_ms=500, timeout_s=run.seconds + 120)
                              for _ in range(LONG_FLOWS)]
            started = time.monotonic()
            next_sample = started
            while time.monotonic() - started < run.seconds:
                batch = Churn(lab, BATCH, gap_ms=GAP_MS)
                run.churns.append(batch)
                while batch.running():
                    if time.monotonic() >= next_sample:
                        run.samples.append((sample(pid), *_attachments(metrics_port)))
                        with open(workdir / "samples.jsonl", "a") as record:  # survives us
                            record.write(json.dumps([asdict(run.samples[-1][0]),
                                                     *run.samples[-1][1:]]) + "\n")
                        next_sample += SAMPLE_EVERY_S
                    time.sleep(0.2)
                batch.wait()
            for flow in run.long_flows:
                flow.wait(timeout_s=120)
            time.sleep(IDLE_TIMEOUT_S + 2)  # the last connections' records are out
            run.agent_status = agent.stop()
            run.agent_problems = agent.problems()
            run.agent_log = agent.log()
        for name, collector in (("nfdump", nfcapd), ("nfacctd", nfacctd)):
            collector.stop()
            run.sequence_errors[name] = collector.sequence_errors()
            run.socket_drops[name] = collector.drops
            run.collector_warnings[name] = [line for line in collector.log().splitlines()
                                            if "WARN" in line or "ERROR" in line]
        run.records = nfdump_tcp_keys(nfcapd, lab.host.addr(4))
        yield run


def _quarters(run: Soak) -> tuple[list, list]:
    """Samples of the quarter after the warm-up, and of the last quarter."""
    samples = run.samples
    start = int(len(samples) * WARM_UP)
    span = max(1, (len(samples) - start) // 4)
    return samples[start:start + span], samples[-span:]


def test_summary(soak: Soak) -> None:
    """Not a judgement: the numbers of this run, for the report (`pytest -s`)."""
    first, last = soak.samples[0][0], soak.samples[-1][0]
    cpu = last.cpu_s - first.cpu_s
    print(f"\nsoak {soak.seconds:g}s: {soak.connections()} connections, "
          f"RSS {first.rss_kib // 1024}->{last.rss_kib // 1024} MiB, fds {first.fds}->{last.fds},"
          f" threads {last.threads}, agent CPU {cpu:.1f}s "
          f"({1000 * cpu / max(1, soak.connections()):.1f} ms per connection)")
    assert len(soak.samples) >= 8, "too few samples to judge anything"


def test_agent_exits_cleanly(soak: Soak) -> None:
    assert soak.agent_status == 0, soak.agent_log[-3000:]
    assert soak.agent_problems == [], "\n".join(soak.agent_problems)


def test_memory_is_flat(soak: Soak) -> None:
    early, late = _quarters(soak)
    before = statistics.median(s.rss_kib for s, _, _ in early)
    after = statistics.median(s.rss_kib for s, _, _ in late)
    allowed = before * (1 + RSS_MARGIN_RATIO) + RSS_MARGIN_KIB
    assert after <= allowed, (
        f"RSS median {before:.0f} KiB -> {after:.0f} KiB (allowed {allowed:.0f})")


def test_file_descriptors_are_flat(soak: Soak) -> None:
    early, late = _quarters(soak)
    before = max(early, key=lambda x: x[0].fds)
    after = max(late, key=lambda x: x[0].fds)
    grown_namespaces = max(0.0, after[1] - before[1])
    grown_interfaces = max(0.0, after[2] - before[2])
    allowed = (before[0].fds + FD_MARGIN + FDS_PER_NAMESPACE * grown_namespaces
               + FDS_PER_INTERFACE * grown_interfaces)
    assert after[0].fds <= allowed, (
        f"fds {before[0].fds} -> {after[0].fds} (namespaces {before[1]:g} -> {after[1]:g}, "
        f"interfaces {before[2]:g} -> {after[2]:g})")
    # The metrics server answers each scrape on a thread of its own: one may be alive.
    threads_before = statistics.median(s.threads for s, _, _ in early)
    threads_after = statistics.median(s.threads for s, _, _ in late)
    assert threads_after <= threads_before + 1, f"threads {threads_before} -> {threads_after}"


def test_every_connection_exported(soak: Soak) -> None:
    """Client ports are reused over a long run: each record key must have at least as many
    records as connections that used it. Judged at nfdump: nfacctd's core hands records to its
    print plugin through a pipe that drops them under load without a log line or a sequence
    error (tests/compat/live_cells.py; seen here: half of a minute's records when the VM was
    busy), so nfacctd is judged on its sequence check and socket only."""
    have = soak.records
    want: Counter = Counter()
    for churn in soak.churns:
        for keys in churn.keys().values():
            want.update(keys)
    short = [(key, have[key], count) for key, count in want.items() if have[key] < count]
    assert not short, (f"{len(short)} of {len(want)} record keys short at nfdump "
                       f"({soak.connections()} connections), e.g. {short[:5]}\n"
                       + "\n".join(soak.collector_warnings["nfdump"][:10]))


def test_long_flows_exported_in_active_timeout_slices(soak: Soak) -> None:
    """A slice ends at the first sweep after the active timeout: slices are a little longer than
    the timeout on a busy VM (seen: 115 slices in 1200 s at 10 s), never much longer."""
    have = soak.records
    slices = int(soak.seconds // (ACTIVE_TIMEOUT_S * SLICE_STRETCH))
    for flow in soak.long_flows:
        for keys in flow.keys().values():
            counts = [have[k] for k in keys]
            assert min(counts) >= slices, f"records per direction {counts}, want >= {slices}"


@pytest.mark.parametrize("collector", ["nfdump", "nfacctd"])
def test_no_sequence_errors_no_drops(soak: Soak, collector: str) -> None:
    assert (soak.sequence_errors[collector], soak.socket_drops[collector]) == (0, 0)
