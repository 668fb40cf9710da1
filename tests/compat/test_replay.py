"""The replay half of the matrix: `flowbridge replay` exports records that fill every field of
every profile (tests/collectors/streams.py) to nfcapd, nfacctd and a tshark capture, and every
field each collector shows must equal the record (tests/harness/collectors.compare).

The live half proves the agent's records equal a packet capture; this half proves the exact
values of fields live traffic cannot set (64-bit counters, 32-bit retransmission counts, process
names, latencies), through the same command line a user would run.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipfix.jsonform import record_to_json
from tests.collectors.streams import Stream, build_streams
from tests.compat.collector_set import parallel
from tests.compat.matrix import (
    FORMATS,
    NOT_INSTALLABLE,
    TESTED,
    UPDATE,
    Results,
    format_cell,
    stale_cells,
)
from tests.harness.collectors import Nfacctd, Nfcapd, TsharkCapture, compare, require_collector
from tests.live.agent_process import flowbridge_argv

pytestmark = pytest.mark.collectors


@dataclass
class ReplayRun:
    problems: dict[str, list[str]] = field(default_factory=dict)
    results: Results = field(default_factory=Results)


def replay(stream: Stream, port: int, workdir: Path) -> None:
    path = workdir / f"{stream.name}.jsonl"
    path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in stream.exported))
    done = subprocess.run(
        [*flowbridge_argv(), "replay", str(path), "--collector", f"127.0.0.1:{port}",
         "--protocol", stream.protocol, "--profile", stream.profile.name,
         "--domain-id", str(stream.observation_domain_id)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory, session_results: Results
             ) -> Iterator[ReplayRun]:
    for collector in TESTED:
        require_collector(collector)
    workdir = tmp_path_factory.mktemp("replay")
    streams = {(s.protocol, s.profile.name): s for s in build_streams()}
    nfcapd, nfacctd = Nfcapd(4), Nfacctd(4)
    tshark = TsharkCapture(4, port=nfcapd.port)
    run = ReplayRun()
    try:
        parallel([nfcapd.start, nfacctd.start, tshark.start])
        for spec in FORMATS:
            stream = streams[spec]
            for port in (nfcapd.port, nfacctd.port):
                replay(stream, port, workdir)
        total = sum(len(streams[spec].exported) for spec in FORMATS)
        parallel([nfcapd.stop, lambda: nfacctd.stop(expect_flows=total), tshark.stop])
        capture = tshark.result()
        decoded = {"nfdump": nfcapd.flows(), "nfacctd": nfacctd.flows(), "tshark": capture.flows}
        reports = {
            "nfdump": (nfcapd.sequence_errors(), nfcapd.bad_packets() + nfcapd.drops),
            "nfacctd": (nfacctd.sequence_errors(), nfacctd.drops),
            "tshark": (capture.sequence_errors(),
                       capture.missing_templates() + capture.malformed + tshark.kernel_drops()),
        }
        for protocol, profile in FORMATS:
            stream = streams[(protocol, profile)]
            for collector in TESTED:
                flows = [f for f in decoded[collector] if stream.owns(f)]
                problems = compare(flows, stream.exported, collector, protocol,
                                   stream.profile.fields)
                errors, warnings = reports[collector]
                if errors or warnings:
                    problems.append(f"{collector}: {errors} sequence errors, {warnings} "
                                    "template warnings / drops (whole run)")
                cell = format_cell("replay", protocol, profile, collector)
                run.problems[cell] = problems
                run.results.record(cell, problems, "every field the collector shows, exact "
                                   "(tests/harness/collector_fields.py)")
            run.results.not_applicable(format_cell("replay", protocol, profile, "goflow2"),
                                       NOT_INSTALLABLE["goflow2"])
        session_results.merge(run.results)
        yield run
    finally:
        for collector in (nfcapd, nfacctd, tshark):
            collector.close()


@pytest.mark.parametrize("collector", TESTED)
@pytest.mark.parametrize("protocol,profile", FORMATS, ids=[f"{p}-{f}" for p, f in FORMATS])
def test_replayed_fields_exact(replayed: ReplayRun, protocol: str, profile: str,
                               collector: str) -> None:
    problems = replayed.problems[format_cell("replay", protocol, profile, collector)]
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:40])


@pytest.mark.skipif(UPDATE, reason="FLOWBRIDGE_COMPAT_UPDATE=1 rewrites the committed results")
def test_results_are_committed(replayed: ReplayRun) -> None:
    stale = stale_cells(replayed.results)
    assert not stale, "the matrix is stale (FLOWBRIDGE_COMPAT_UPDATE=1 pytest tests/compat):\n" \
        + "\n".join(stale)
