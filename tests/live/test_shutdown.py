"""SIGTERM while connections are open loses no flow.

Two connections (IPv4 and IPv6) send their first round and then hold, open, under the captures.
Once the agent has polled the kernel after the last packet, it gets SIGTERM: it must exit 0 and
export every direction of both connections as a forced end (reason 4) with exactly the capture's
counts. Holding the traffic makes this exact: the capture and the export cover the same packets
(an agent stopped mid-burst exports what its last poll saw, which no capture can pin down).
The connections are completed only after the agent and the captures have stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.collector_common import Flow
from tests.harness.collectors import Nfcapd
from tests.harness.netlab import NetLab
from tests.harness.netlab_proc import Exchange, ProcReport, TcpSession
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.expect import FORCED_END, Expected, diff_single, expected_records

pytestmark = [pytest.mark.root, pytest.mark.collectors]

KIB = 1024
FIRST_ROUND = (200 * KIB, 20 * KIB)
# The agent polls every 200 ms: after this much quiet its cache holds every packet.
QUIET_BEFORE_STOP_S = 1.0


@dataclass
class Shutdown:
    expected: list[Expected] = field(default_factory=list)
    flows: list[Flow] = field(default_factory=list)
    status: int | None = None
    log: str = ""
    problems: list[str] = field(default_factory=list)


def _held(session: TcpSession) -> Exchange:
    """An Exchange for a held session: its endpoints are known before the processes finish."""
    client = ProcReport(session.client_pid, "", session.local, session.remote, 0, 0, "held")
    server = ProcReport(0, "", session.remote, session.local, 0, 0, "held")
    return Exchange(session.version, client, server)


@pytest.fixture(scope="module")
def shutdown(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shutdown]:
    require_live("nfcapd", "nfdump", "tcpdump")
    workdir = tmp_path_factory.mktemp("shutdown")
    result = Shutdown()
    with NetLab() as lab, Nfcapd(4) as nfcapd:
        config = write_config(workdir / "flowbridge.toml",
                              [{"address": f"127.0.0.1:{nfcapd.port}", "profile": "standard"}])
        with AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            with lab.capture(lab.host, "client") as client_cap, \
                    lab.capture(lab.peer, "server") as server_cap:
                sessions = [lab.start_tcp(client=lab.host, server=lab.peer, version=version,
                                          rounds=[FIRST_ROUND, (1000, 1000)])
                            for version in (4, 6)]
                time.sleep(QUIET_BEFORE_STOP_S)
                result.status = agent.stop()
            result.log = agent.log()
            result.problems = agent.problems()
        client_flows, server_flows = client_cap.flows(), server_cap.flows()
        for session in sessions:
            result.expected += expected_records(_held(session), lab.host, lab.peer,
                                                client_flows, server_flows)
            session.resume()
        nfcapd.stop()
        result.flows = nfcapd.flows()
        yield result


def test_agent_exits_zero_on_sigterm(shutdown: Shutdown) -> None:
    assert shutdown.status == 0, shutdown.log[-3000:]
    assert shutdown.problems == [], "\n".join(shutdown.problems)
    assert "live flows exported as forced end" in shutdown.log


def test_every_open_flow_is_exported_as_forced_end(shutdown: Shutdown) -> None:
    assert len(shutdown.expected) == 8, [w.label() for w in shutdown.expected]
    # Sequence space, not bytes on the wire: a loaded machine retransmits now and then.
    payload = sorted(w.truth.payload - w.truth.retrans_payload for w in shutdown.expected)
    assert payload == sorted([FIRST_ROUND[0]] * 4 + [FIRST_ROUND[1]] * 4), payload
    problems = diff_single("nfdump", shutdown.flows, shutdown.expected, reason=FORCED_END)
    assert not problems, "\n".join(problems)
