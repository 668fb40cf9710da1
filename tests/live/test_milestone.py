"""The first milestone: "A real TCP connection on this host appears in nfdump, nfacctd and tshark
with bytes and packets equal to a packet capture."

One `flowbridge run` exports at once to nfcapd (IPFIX, standard profile), nfacctd (NetFlow v9,
ntop profile) and a tshark capture (IPFIX, ntop profile). Two connections of known size run in
the lab (client namespace -> server namespace over a veth pair), one IPv4 and one IPv6, each
closed with FINs, under a tcpdump on both veth ends. Every collector must show the four records
of each connection (both directions, both namespaces) with octets, packets and TCP flags equal to
the capture, times within a few ms (whole seconds for nfacctd v9), end reason 3, no sequence
error; the ntop profile also carries the owning process on the local side.

Collectors and the capture start before the agent, so the first templates reach all of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.collector_common import LARGE_SOCKET_BUFFER, Flow
from tests.harness.collectors import Nfacctd, Nfcapd, TsharkCapture, TsharkResult
from tests.harness.netlab import NetLab
from tests.live.agent_process import AgentProcess, write_config
from tests.live.conftest import require_live
from tests.live.expect import END_OF_FLOW, Expected, diff_single, expected_records, records_of

pytestmark = [pytest.mark.root, pytest.mark.collectors]

KIB = 1024
UP, DOWN = 300 * KIB, 50 * KIB
VERSIONS = (4, 6)
EXPORT_WAIT_S = 15.0
# Options data (statistics, interface names, sampling) every second instead of every minute, so
# that options messages always come between data messages during the run: the sequence check of
# every collector then covers them, whatever other traffic the host has at start-up.
OPTIONS_INTERVAL_S = 1


@dataclass
class MilestoneRun:
    expected: dict[int, list[Expected]] = field(default_factory=dict)  # by IP version
    flows: dict[str, list[Flow]] = field(default_factory=dict)  # by collector
    sequence_errors: dict[str, int] = field(default_factory=dict)
    socket_drops: dict[str, int] = field(default_factory=dict)
    tshark: TsharkResult | None = None
    agent_status: int | None = None
    agent_problems: list[str] = field(default_factory=list)
    agent_log: str = ""


def _exported(nfacctd: Nfacctd, expected: list[Expected]) -> bool:
    flows = nfacctd.flows()
    return all(any(f.get("flowEndReason") == END_OF_FLOW for f in records_of(flows, want))
               for want in expected)


@pytest.fixture(scope="module")
def milestone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilestoneRun]:
    require_live("nfcapd", "nfdump", "nfacctd", "tshark", "tcpdump")
    workdir = tmp_path_factory.mktemp("milestone")
    result = MilestoneRun()
    # Large collector buffers: the agent exports every flow of the host, and other traffic there
    # must not overflow a collector into sequence errors that are not the agent's.
    with NetLab() as lab, Nfcapd(4, socket_buffer=LARGE_SOCKET_BUFFER) as nfcapd, \
            Nfacctd(4, socket_buffer=LARGE_SOCKET_BUFFER) as nfacctd, TsharkCapture(4) as tshark:
        config = write_config(workdir / "flowbridge.toml", [
            {"address": f"127.0.0.1:{nfcapd.port}", "protocol": "ipfix", "profile": "standard"},
            {"address": f"127.0.0.1:{nfacctd.port}", "protocol": "v9", "profile": "ntop"},
            {"address": f"127.0.0.1:{tshark.port}", "protocol": "ipfix", "profile": "ntop"},
        ], options_interval=OPTIONS_INTERVAL_S)
        with AgentProcess(["--config", str(config)], workdir) as agent:
            agent.wait_ready()
            for version in VERSIONS:
                with lab.capture(lab.host, "client") as client_cap, \
                        lab.capture(lab.peer, "server") as server_cap:
                    exchange = lab.tcp(client=lab.host, server=lab.peer, version=version,
                                       rounds=[(UP, DOWN)], ending="fin-client")
                assert (exchange.client.sent, exchange.server.sent) == (UP, DOWN)
                result.expected[version] = expected_records(
                    exchange, lab.host, lab.peer, client_cap.flows(), server_cap.flows())
            everything = [w for ws in result.expected.values() for w in ws]
            # End-of-flow records reach nfacctd's print output within a second or two; waiting
            # for them keeps SIGTERM from turning a slow end into a forced end (reason 4).
            deadline = time.monotonic() + EXPORT_WAIT_S
            while not _exported(nfacctd, everything) and time.monotonic() < deadline:
                time.sleep(0.25)
            result.agent_status = agent.stop()
            result.agent_problems = agent.problems()
            result.agent_log = agent.log()
        nfcapd.stop()
        nfacctd.stop()
        tshark.stop()
        result.flows = {"nfdump": nfcapd.flows(), "nfacctd": nfacctd.flows(),
                        "tshark": tshark.flows()}
        result.tshark = tshark.result()
        result.sequence_errors = {"nfdump": nfcapd.sequence_errors(),
                                  "nfacctd": nfacctd.sequence_errors(),
                                  "tshark": result.tshark.sequence_errors()}
        result.socket_drops = {"nfdump": nfcapd.drops, "nfacctd": nfacctd.drops,
                               "tshark": tshark.kernel_drops()}
        yield result


def test_captures_hold_the_connections(milestone: MilestoneRun) -> None:
    """The ground truth itself: both directions on both ends, the sizes the processes sent."""
    for version, expected in milestone.expected.items():
        assert len(expected) == 4, f"IPv{version}: {[w.label() for w in expected]}"
        # Sequence space, not bytes on the wire: a loaded machine retransmits now and then.
        payload = sorted(w.truth.payload - w.truth.retrans_payload for w in expected)
        assert payload == [DOWN, DOWN, UP, UP], f"IPv{version}: TCP payload {payload}"


# (collector, how it keeps times, whether its profile carries the process)
COLLECTORS = [("nfdump", False, False), ("nfacctd", True, True), ("tshark", False, True)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("collector,whole_seconds,process", COLLECTORS,
                         ids=[c[0] for c in COLLECTORS])
def test_records_equal_the_capture(milestone: MilestoneRun, collector: str, whole_seconds: bool,
                                   process: bool, version: int) -> None:
    problems = diff_single(collector, milestone.flows[collector], milestone.expected[version],
                           reason=END_OF_FLOW, whole_seconds=whole_seconds, process=process)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("collector", ["nfdump", "nfacctd", "tshark"])
def test_no_sequence_errors(milestone: MilestoneRun, collector: str) -> None:
    errors = milestone.sequence_errors[collector]
    drops = milestone.socket_drops[collector]
    assert errors == 0, f"{collector}: {errors} sequence errors ({drops} datagrams dropped by " \
                        "the collector's socket or capture)"


def test_tshark_decoded_every_message(milestone: MilestoneRun) -> None:
    """The capture started before the agent: every data set has its template, none malformed."""
    result = milestone.tshark
    assert result is not None and result.messages > 0
    assert (result.missing_templates(), result.malformed) == (0, 0), result.expert[:10]


def test_agent_exited_cleanly(milestone: MilestoneRun) -> None:
    assert milestone.agent_status == 0, milestone.agent_log[-3000:]
    assert milestone.agent_problems == [], "\n".join(milestone.agent_problems)
