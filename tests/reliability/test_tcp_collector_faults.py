"""A TCP collector down at start, hung (SIGSTOP) and killed (SIGKILL) and restarted, while one
`flowbridge run` exports connection churn from a network lab to it.

The collector is tcp_collector.py, a process of its own (no real collector here takes IPFIX over
TCP), with a fresh decoder per connection. Phases:
  down     the agent starts with nothing listening: records wait in its bounded backlog;
  up       the collector starts: the agent connects (after its backoff) and sends templates,
           then the backlog;
  hung     the collector stops reading (SIGSTOP) during a churn: the agent's non-blocking socket
           and backlog take it, its loop goes on; on SIGCONT everything arrives;
  killed   SIGKILL, churn, a new collector process on the same port: a new connection,
           templates first, the churn's records from the backlog.
Every connection must arrive, no data set may come before its template in any connection, and
within a connection the sequence numbers must run without a gap.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.watcher import ExportWatcher
from tests.reliability.churn import Churn, exported, missing_connections
from tests.reliability.probes import free_tcp_port, per_collector, scrape, wait_for
from tests.reliability.tcp_station import TcpStation

pytestmark = [pytest.mark.root]

CONNECTIONS = {"down": 50, "hung": 300, "killed": 100}
EXPORT_WAIT_S = 90.0  # includes the agent's reconnect backoff (doubling from 0.5 s)


@dataclass
class TcpRun:
    churns: dict[str, Churn] = field(default_factory=dict)
    messages: dict[str, list[dict]] = field(default_factory=dict)  # by collector process
    backlog_while_down: float = 0.0
    observations_while_hung: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    port: int = 0
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""


@pytest.fixture(scope="module")
def tcp_faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TcpRun]:
    require_live()
    workdir: Path = tmp_path_factory.mktemp("tcp-faults")
    run = TcpRun(port=free_tcp_port())
    metrics_port = free_tcp_port()
    first = TcpStation(run.port, workdir / "first.jsonl")
    second = TcpStation(run.port, workdir / "second.jsonl")
    try:
        with NetLab() as lab, ExportWatcher(4) as watcher:
            config = write_config(workdir / "flowbridge.toml", [
                {"address": f"127.0.0.1:{run.port}", "transport": "tcp"},
                {"address": f"127.0.0.1:{watcher.port}"},
            ], options_interval=1, metrics=f"127.0.0.1:{metrics_port}")
            with AgentProcess(["--config", str(config)], workdir) as agent:
                agent.wait_ready()

                def churn(phase: str) -> Churn:
                    made = run.churns[phase] = Churn(lab, CONNECTIONS[phase])
                    made.wait()
                    wait_for(lambda: exported([made], watcher.flows()), EXPORT_WAIT_S,
                             f"the watcher to hold the '{phase}' connections")
                    return made

                def delivered(*phases: str) -> None:
                    churns = [run.churns[p] for p in phases]
                    wait_for(lambda: not missing_connections(
                                 churns, first.flows() + second.flows()),
                             EXPORT_WAIT_S, f"the TCP collector to get {', '.join(phases)}")

                churn("down")
                run.backlog_while_down = per_collector(scrape(metrics_port), "backlog_messages",
                                                       run.port)
                first.start()
                delivered("down")
                before = scrape(metrics_port)["flowbridge_observations_total"]
                first.signal(signal.SIGSTOP)
                try:
                    churn("hung")
                    run.observations_while_hung = (
                        scrape(metrics_port)["flowbridge_observations_total"] - before)
                finally:
                    first.signal(signal.SIGCONT)
                delivered("down", "hung")
                first.kill()
                churn("killed")
                second.start()
                delivered("down", "hung", "killed")
                run.metrics = scrape(metrics_port)
                run.agent_status = agent.stop()
                run.agent_problems = agent.problems()
                run.agent_log = agent.log()
        run.messages = {"first": first.messages(), "second": second.messages()}
        yield run
    finally:
        first.kill()
        second.kill()


def test_agent_exits_cleanly(tcp_faults: TcpRun) -> None:
    assert tcp_faults.agent_status == 0, tcp_faults.agent_log[-3000:]
    assert tcp_faults.agent_problems == [], "\n".join(tcp_faults.agent_problems)


def test_records_waited_while_the_collector_was_down(tcp_faults: TcpRun) -> None:
    assert tcp_faults.backlog_while_down > 0


def test_hung_collector_does_not_hold_the_agent(tcp_faults: TcpRun) -> None:
    assert tcp_faults.observations_while_hung >= CONNECTIONS["hung"]


def test_two_connections_nothing_dropped(tcp_faults: TcpRun) -> None:
    """One connection to each collector process; the backlog never overflowed, so nothing was
    given up on."""
    port = tcp_faults.port
    assert per_collector(tcp_faults.metrics, "tcp_connects", port) == 2
    assert per_collector(tcp_faults.metrics, "dropped_records", port) == 0
    for name, messages in tcp_faults.messages.items():
        assert {m["connection"] for m in messages} == {1}, name


def test_every_connection_arrived_templates_first(tcp_faults: TcpRun) -> None:
    for name, messages in tcp_faults.messages.items():
        unknown = sum(m["unknown_sets"] for m in messages)
        assert unknown == 0, f"{name}: {unknown} data sets before their template"
        assert messages[0]["templates"], f"{name}: the connection did not start with templates"


def test_sequence_numbers_run_without_a_gap_within_a_connection(tcp_faults: TcpRun) -> None:
    """RFC 7011: per observation domain, the count of data records (options records included)
    sent before this message. Across the kill a gap is right: what was in flight is lost."""
    gaps = []
    expected: dict[tuple[str, int], int] = {}
    for name, messages in tcp_faults.messages.items():
        for message in messages:
            stream = (name, message["domain"])
            want = expected.get(stream)
            if want is not None and message["sequence"] != want:
                gaps.append(f"{name} collector, domain {stream[1]}: sequence "
                            f"{message['sequence']}, want {want}")
            expected[stream] = (message["sequence"] + len(message["records"])
                                + len(message["options"]))
    assert not gaps, "\n".join(gaps[:20])
