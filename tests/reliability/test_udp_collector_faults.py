"""UDP collectors that are down, refusing or hung, while one `flowbridge run` exports real
connection churn from a network lab to them.

One agent exports IPFIX to three real collectors and a progress watcher:
  steady   nfacctd, up all along: must get every connection, with no sequence error;
  late     nfcapd, down when the agent starts: every export to it draws an ICMP port
           unreachable (a storm during the first churn); started later, it must decode every
           connection made one template refresh after it came up;
  stalled  nfcapd with a small socket buffer, stopped (SIGSTOP) during a churn: its buffer fills
           and the kernel drops datagrams; the agent must not wait for it, and the loss must show
           where an operator looks, as nfcapd's own sequence errors.
The agent must live through it all, count the refusals, and log them a few times, not per
datagram.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.collector_common import LARGE_SOCKET_BUFFER, Flow
from tests.harness.collectors import Nfacctd, Nfcapd
from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.watcher import ExportWatcher
from tests.reliability.churn import Churn, exported, missing_connections
from tests.reliability.probes import free_tcp_port, per_collector, scrape, wait_for
from tests.reliability.stations import pause, resume

pytestmark = [pytest.mark.root, pytest.mark.collectors]

TEMPLATE_REFRESH_S = 2
STORM_CONNECTIONS = 300  # ~2 export messages per connection, each refused while `late` is down
STALL_CONNECTIONS = 400
AFTER_CONNECTIONS = 100
STALLED_BUFFER = 16384  # bytes: a dozen 1400-byte datagrams, then the kernel drops
EXPORT_WAIT_S = 60.0


@dataclass
class FaultRun:
    storm: Churn | None = None
    recovered: Churn | None = None
    stall: Churn | None = None
    after: Churn | None = None
    flows: dict[str, list[Flow]] = field(default_factory=dict)
    sequence_errors: dict[str, int] = field(default_factory=dict)
    socket_drops: dict[str, int] = field(default_factory=dict)
    refused_during_storm: float = 0.0
    observations_during_stall: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""


def _churn_exported(watcher: ExportWatcher, churn: Churn) -> None:
    churn.wait()
    wait_for(lambda: exported([churn], watcher.flows()), EXPORT_WAIT_S,
             f"the watcher to hold the {churn.count} connections' records")


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultRun]:
    require_live("nfcapd", "nfdump", "nfacctd")
    workdir = tmp_path_factory.mktemp("udp-faults")
    run = FaultRun()
    late: Nfcapd = Nfcapd(4, socket_buffer=LARGE_SOCKET_BUFFER)
    stalled: Nfcapd = Nfcapd(4, socket_buffer=STALLED_BUFFER)
    metrics_port = free_tcp_port()
    with contextlib.ExitStack() as stack:
        stack.callback(late.close)  # started by the test, later
        lab = stack.enter_context(NetLab())
        steady = stack.enter_context(Nfacctd(4, socket_buffer=LARGE_SOCKET_BUFFER))
        stack.enter_context(stalled)
        watcher = stack.enter_context(ExportWatcher(4))
        run.ports = {"steady": steady.port, "late": late.port, "stalled": stalled.port}
        refresh = {"profile": "standard", "template_refresh": TEMPLATE_REFRESH_S}
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{steady.port}", "profile": "standard"},
            {"address": f"127.0.0.1:{late.port}", **refresh},
            {"address": f"127.0.0.1:{stalled.port}", **refresh},
            {"address": f"127.0.0.1:{watcher.port}", "profile": "standard"},
        ], options_interval=1, metrics=f"127.0.0.1:{metrics_port}")
        with AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            # 1. `late` is down: every export to it is refused (ICMP port unreachable).
            run.storm = Churn(lab, STORM_CONNECTIONS)
            _churn_exported(watcher, run.storm)
            run.refused_during_storm = per_collector(scrape(metrics_port), "send_refused",
                                                     late.port)
            # 2. `late` comes up; connections from one refresh interval on must all reach it.
            late.start()
            time.sleep(TEMPLATE_REFRESH_S + 0.5)
            run.recovered = Churn(lab, AFTER_CONNECTIONS)
            _churn_exported(watcher, run.recovered)
            # 3. `stalled` hangs during a churn, then reads again.
            before = scrape(metrics_port)["flowbridge_observations_total"]
            pause(stalled)
            try:
                run.stall = Churn(lab, STALL_CONNECTIONS)
                _churn_exported(watcher, run.stall)
                run.observations_during_stall = (
                    scrape(metrics_port)["flowbridge_observations_total"] - before)
            finally:
                resume(stalled)
            time.sleep(TEMPLATE_REFRESH_S + 0.5)
            run.after = Churn(lab, AFTER_CONNECTIONS)
            _churn_exported(watcher, run.after)
            time.sleep(1.5)  # nfacctd's print plugin writes every second
            run.metrics = scrape(metrics_port)
            run.agent_status = agent.stop()
            run.agent_problems = agent.problems()
            run.agent_log = agent.log()
        for name, collector in (("steady", steady), ("late", late), ("stalled", stalled)):
            collector.stop()
            run.flows[name] = collector.flows()
            run.sequence_errors[name] = collector.sequence_errors()
            run.socket_drops[name] = collector.drops
        yield run


def test_agent_lives_through_it_and_exits_cleanly(faults: FaultRun) -> None:
    assert faults.agent_status == 0, faults.agent_log[-3000:]
    assert faults.agent_problems == [], "\n".join(faults.agent_problems)


def test_steady_collector_gets_every_connection_without_sequence_errors(faults: FaultRun) -> None:
    churns = [faults.storm, faults.recovered, faults.stall, faults.after]
    problems = missing_connections(churns, faults.flows["steady"])  # type: ignore[arg-type]
    assert not problems, f"{len(problems)} connections incomplete at nfacctd:\n" + \
        "\n".join(problems[:20])
    assert (faults.sequence_errors["steady"], faults.socket_drops["steady"]) == (0, 0)
    assert per_collector(faults.metrics, "send_refused", faults.ports["steady"]) == 0


def test_refusal_storm_is_counted_and_logged_a_few_times(faults: FaultRun) -> None:
    """Hundreds of refused sends while `late` was down, each counted; the log says so once per
    minute (with how many were left out), not once per datagram. A refusal reports an earlier
    datagram's ICMP: the one in hand is retried and leaves, so nothing counts as dropped; UDP
    cannot tell the agent more (the refusals are the signal, send_refused in the metrics)."""
    assert faults.refused_during_storm >= STORM_CONNECTIONS / 10, faults.refused_during_storm
    refused_lines = [line for line in faults.agent_log.splitlines()
                     if f":{faults.ports['late']}" in line and "WARNING" in line]
    assert 1 <= len(refused_lines) <= 3, "\n".join(refused_lines[:10])


def test_collector_up_late_decodes_from_one_refresh_interval_on(faults: FaultRun) -> None:
    churns = [faults.recovered, faults.stall, faults.after]
    problems = missing_connections(churns, faults.flows["late"])  # type: ignore[arg-type]
    assert not problems, "\n".join(problems[:20])
    assert faults.sequence_errors["late"] == 0  # its first message starts its count


def test_hung_collector_does_not_hold_the_agent_and_its_loss_is_visible(faults: FaultRun) -> None:
    """While nfcapd was stopped the agent kept reading the kernel (observations went on) and the
    other collectors got everything (above). nfcapd lost datagrams at its full socket and says
    so through its sequence check; from one refresh after it resumed, nothing is missing."""
    assert faults.observations_during_stall >= STALL_CONNECTIONS
    assert faults.socket_drops["stalled"] > 0
    stalled_flows = faults.flows["stalled"]
    assert not exported([faults.stall], stalled_flows), "nothing was lost: the stall proves nothing"
    assert faults.sequence_errors["stalled"] >= 1
    problems = missing_connections([faults.after], stalled_flows)  # type: ignore[list-item]
    assert not problems, "\n".join(problems[:20])
