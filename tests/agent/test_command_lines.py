"""Process command lines (SRC/DST_PROC_CMDLINE): read from /proc only after the operator's
opt-in (`export_command_lines`), once per process, cut to the element's length; and what real
collectors show of them."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import bridge.command_lines
from bridge.agent import Agent
from bridge.command_lines import CommandLines, command_line_limit
from bridge.config import AgentConfig, CollectorConfig
from bridge.synthetic import SyntheticSource
from ebpf.observation import Direction, EndCause, ProcessInfo
from ipfix.profile import load_profile, parse_profile
from tests.conftest import require_tools
from tests.harness.collectors import decode_with_nfacctd, decode_with_tshark

from .helpers import T0, FakeClock, Sink, key, obs

# argv[0] is ours (the interpreter runs as `fbworker`), so the line fits the default 64 bytes.
ARGV = ["fbworker", "-c", "import time;time.sleep(60)", "--token=s3cr3t"]
LINE = " ".join(ARGV)


@pytest.fixture
def worker() -> Iterator[ProcessInfo]:
    """A real process with a distinctive argv, as the eBPF side would report it."""
    process = subprocess.Popen(ARGV, executable=sys.executable)
    try:
        cmdline = Path(f"/proc/{process.pid}/cmdline")
        deadline = time.monotonic() + 30
        while b"--token" not in cmdline.read_bytes():  # until the exec is done
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        comm = Path(f"/proc/{process.pid}/comm").read_text().strip()
        yield ProcessInfo(pid=process.pid, comm=comm, uid=0, cgroup_id=0)
    finally:
        process.kill()
        process.wait()


def test_reads_a_real_command_line_once_per_process(worker: ProcessInfo) -> None:
    lines = CommandLines(limit=200)
    assert lines(worker.pid, worker.comm) == LINE
    assert [lines(worker.pid, worker.comm) for _ in range(50)] == [LINE] * 50
    assert lines.reads == 1
    assert lines(worker.pid, "other-comm") == LINE  # a reused pid (or an exec): read again
    assert lines.reads == 2


def test_cut_on_a_character_boundary_and_unreadable_is_empty(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes("abc\0ää\0".encode())
    assert CommandLines(limit=5, proc=str(tmp_path))(7, "x") == "abc "  # "ä" would need 2 more
    assert CommandLines(limit=6, proc=str(tmp_path))(7, "x") == "abc ä"
    assert CommandLines(limit=64, proc=str(tmp_path))(7, "x") == "abc ää"
    assert CommandLines(limit=64, proc=str(tmp_path))(8, "gone") == ""


def test_memory_is_bounded(tmp_path: Path) -> None:
    for pid in range(10):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"p%d\0" % pid)
    lines = CommandLines(limit=64, proc=str(tmp_path), capacity=4)
    assert [lines(pid, "p") for pid in range(10)] == [f"p{pid}" for pid in range(10)]
    assert lines(0, "p") == "p0"
    assert lines.reads == 11  # forgotten past the capacity, so read again


def test_limit_is_the_element_length_the_profiles_give() -> None:
    standard = load_profile("standard")
    assert command_line_limit([standard]) == 64  # v9's fixed length of the element
    listed = replace(standard, fields=(*standard.fields, "SRC_PROC_CMDLINE"))
    assert command_line_limit([listed]) == 64  # IPFIX: variable, bounded the same
    wide = replace(listed, lengths={"SRC_PROC_CMDLINE": 200})
    assert command_line_limit([standard, wide]) == 200


def profile_with_command_lines(directory: Path) -> str:
    """A user profile (a path): standard + the local process and its command line."""
    text = (Path(__file__).resolve().parents[2] / "templates" / "standard.toml").read_text()
    text = text.replace('name = "standard"', 'name = "with-cmdline"')
    fields = ("SRC_PROC_PID", "SRC_PROC_CMDLINE", "DST_PROC_PID", "DST_PROC_CMDLINE")
    text = text.rstrip().removesuffix("]") + "".join(f'    "{n}",\n' for n in fields) + "]\n"
    path = directory / "with-cmdline.toml"
    path.write_text(text)
    assert parse_profile(text, str(path)).fields[-4:] == fields
    return str(path)


def export(worker: ProcessInfo, collector: CollectorConfig, opted_in: bool) -> Sink:
    """One egress and one ingress flow of `worker` through a real Agent to `collector`'s
    address, received by a Sink bound there."""
    sink = Sink()
    collector = replace(collector, host=sink.host, port=sink.port)
    config = AgentConfig(collectors=(collector,), export_command_lines=opted_in)
    source = SyntheticSource()
    agent = Agent(config, source, clock=FakeClock(T0 + 1000))
    source.feed([
        obs(key(45000, 5201, src="10.9.0.1", dst="10.9.0.2"), 700, 6, T0, T0 + 9,
            process=worker, end=EndCause.FIN),
        obs(key(5201, 45000, src="10.9.0.2", dst="10.9.0.1", direction=Direction.INGRESS),
            900, 7, T0, T0 + 9, process=worker, end=EndCause.FIN),
    ])  # fmt: skip
    agent.step(poll_ms=0)
    sink.receive(timeout=1)
    agent.shutdown(drain_seconds=0)
    return sink


def test_without_the_opt_in_proc_is_never_read(
    worker: ProcessInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a command-line reader was made without the opt-in")

    monkeypatch.setattr(bridge.command_lines.CommandLines, "__init__", refuse)
    sink = export(worker, CollectorConfig(host="127.0.0.1", port=9, profile="ntop"), False)
    try:
        records = [r for m in sink.messages for r in m.records]
    finally:
        sink.close()
    assert {r["SRC_PROC_PID"] or r["DST_PROC_PID"] for r in records} == {worker.pid}
    assert not any("CMDLINE" in name for r in records for name in r)


@pytest.mark.parametrize("protocol", ["ipfix", "v9"])
def test_real_collectors_show_the_command_line(
    worker: ProcessInfo, protocol: str, tmp_path: Path
) -> None:
    """Our decoder, pmacct (custom primitives 556/557) and tshark (which has no name for them:
    read from its PDML) show the worker's command line on the local side of each flow."""
    require_tools("nfacctd", "tshark")
    profile = profile_with_command_lines(tmp_path)
    collector = CollectorConfig(host="127.0.0.1", port=9, protocol=protocol, profile=profile)
    sink = export(worker, collector, True)
    try:
        ours = [r for m in sink.messages for r in m.records]
        datagrams = list(sink.datagrams)
    finally:
        sink.close()
    pmacct, sequence_errors = decode_with_nfacctd(datagrams, expect_flows=2)
    tshark = decode_with_tshark(datagrams).flows
    assert sequence_errors == 0
    for name, flows in (("flowbridge", ours), ("nfacctd", pmacct), ("tshark", tshark)):
        by_port = {f["sourceTransportPort"]: f for f in flows}
        assert sorted(by_port) == [5201, 45000], name
        egress, ingress = by_port[45000], by_port[5201]
        assert egress["SRC_PROC_CMDLINE"] == LINE, name
        assert ingress["DST_PROC_CMDLINE"] == LINE, name
        assert egress.get("DST_PROC_CMDLINE", "") == ingress.get("SRC_PROC_CMDLINE", "") == ""
