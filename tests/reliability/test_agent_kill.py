"""`flowbridge run` killed with SIGKILL and started again, exporting to nfcapd, nfacctd and a
tshark capture (IPFIX, standard profile) and to a progress watcher.

A killed agent exports nothing more: the flows in its cache and its kernel maps are gone with it
(its BPF programs are attached through links owned by the process, so nothing stays attached).
The restarted agent must be what a collector sees when a router reboots: a new transport
session (a new source port), templates before any data, the same observation domain id (derived
from the machine id, not from the process), sequence numbers from 0 again. What each collector
says about that new stream is pinned in KILL_RESTART_SEQUENCE_ERRORS and asserted; every
connection made after the restart must be decoded by all of them.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.collector_common import LARGE_SOCKET_BUFFER, Flow
from tests.harness.collectors import Nfacctd, Nfcapd, TsharkCapture
from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.watcher import ExportWatcher
from tests.reliability.churn import Churn, exported, missing_connections
from tests.reliability.probes import wait_for

pytestmark = [pytest.mark.root, pytest.mark.collectors]

CONNECTIONS = 100
EXPORT_WAIT_S = 60.0
# A restarted exporter starts a new stream at sequence 0 (RFC 7011 §10.3.1 for a new transport
# session). nfcapd keys sequence state on the exporter address and domain, not the source port,
# and counts the jump back as one failure (it leaves the statistics in domain 0 out of its
# check); nfacctd logs one "expecting" line per domain, the flow domain and domain 0
# (collectors.md 1.1 row 36); tshark keys on the source port too: a new stream, no complaint.
# A clean restart gives the same (tests/compat: agent-restart): SIGKILL costs no more.
KILL_RESTART_SEQUENCE_ERRORS = {"nfdump": 1, "nfacctd": 2, "tshark": 0}


@dataclass
class KillRun:
    before: Churn | None = None
    after: Churn | None = None
    flows: dict[str, list[Flow]] = field(default_factory=dict)
    sequence_errors: dict[str, int] = field(default_factory=dict)
    socket_drops: dict[str, int] = field(default_factory=dict)
    nfacctd_lines: list[str] = field(default_factory=list)
    missing_templates: int = 0
    malformed: int = 0
    runs: list[list] = field(default_factory=list)  # the watcher's messages of each agent run
    killed_status: int | None = None
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KillRun]:
    require_live("nfcapd", "nfdump", "nfacctd", "tshark", "tcpdump")
    workdir = tmp_path_factory.mktemp("agent-kill")
    run = KillRun()
    nfcapd = Nfcapd(4, socket_buffer=LARGE_SOCKET_BUFFER)
    nfacctd = Nfacctd(4, socket_buffer=LARGE_SOCKET_BUFFER)
    with NetLab() as lab, nfcapd, nfacctd, TsharkCapture(4) as tshark, \
            ExportWatcher(4) as watcher:
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{nfcapd.port}"},
            {"address": f"127.0.0.1:{nfacctd.port}"},
            {"address": f"127.0.0.1:{tshark.port}"},
            {"address": f"127.0.0.1:{watcher.port}"},
        ], options_interval=1)
        for number, phase in enumerate(("before", "after")):
            (workdir / phase).mkdir()
            agent = AgentProcess(["--config", str(config)], workdir / phase)
            with agent:
                agent.wait_ready()
                churn = Churn(lab, CONNECTIONS)
                setattr(run, phase, churn)
                churn.wait()
                wait_for(lambda c=churn: exported([c], watcher.flows()), EXPORT_WAIT_S,
                         f"the connections {phase} the kill")
                if number == 0:
                    run.killed_status = agent.stop(signal.SIGKILL)
                    run.runs.append(watcher.messages())
                else:
                    time.sleep(1.5)  # nfacctd's print plugin writes every second
                    run.agent_status = agent.stop()
                    run.agent_problems = agent.problems()
                    run.agent_log = agent.log()
                    run.runs.append(watcher.messages()[len(run.runs[0]):])
        for collector in (nfcapd, nfacctd, tshark):
            collector.stop()
        result = tshark.result()
        run.flows = {"nfdump": nfcapd.flows(), "nfacctd": nfacctd.flows(), "tshark": result.flows}
        run.sequence_errors = {"nfdump": nfcapd.sequence_errors(),
                               "nfacctd": nfacctd.sequence_errors(),
                               "tshark": result.sequence_errors()}
        run.socket_drops = {"nfdump": nfcapd.drops, "nfacctd": nfacctd.drops,
                            "tshark": tshark.kernel_drops()}
        run.nfacctd_lines = nfacctd.sequence_messages()
        run.missing_templates, run.malformed = result.missing_templates(), result.malformed
        yield run


def test_killed_then_restarted_agent_exits_cleanly(killed: KillRun) -> None:
    assert killed.killed_status == -signal.SIGKILL
    assert killed.agent_status == 0, killed.agent_log[-3000:]
    assert killed.agent_problems == [], "\n".join(killed.agent_problems)


def test_restart_sends_templates_first_in_the_same_domain(killed: KillRun) -> None:
    first, second = killed.runs
    assert first and second
    for domain in {m.domain_id for m in second}:
        opening = next(m for m in second if m.domain_id == domain)
        assert opening.templates or opening.options_templates, (
            f"domain {domain}: the restarted agent's first message carries no template")
        assert opening.sequence == 0, f"domain {domain}: a new stream starts at {opening.sequence}"
    domains = [{m.domain_id for m in run if m.records} for run in killed.runs]
    assert domains[0] == domains[1] and len(domains[0]) == 1, domains
    assert 0 not in domains[0]


@pytest.mark.parametrize("collector", ["nfdump", "nfacctd", "tshark"])
def test_every_connection_decoded_by_each_collector(killed: KillRun, collector: str) -> None:
    problems = missing_connections([killed.before, killed.after],  # type: ignore[list-item]
                                   killed.flows[collector])
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("collector", ["nfdump", "nfacctd", "tshark"])
def test_sequence_errors_are_those_of_a_router_restart(killed: KillRun, collector: str) -> None:
    assert killed.socket_drops[collector] == 0, "the collector lost datagrams: errors unjudgeable"
    assert killed.sequence_errors[collector] == KILL_RESTART_SEQUENCE_ERRORS[collector], \
        "\n".join(killed.nfacctd_lines)


def test_tshark_decoded_every_message(killed: KillRun) -> None:
    assert (killed.missing_templates, killed.malformed) == (0, 0)
