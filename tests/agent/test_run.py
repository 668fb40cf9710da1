"""`flowbridge run` as a process: replayed observations, real sockets, signals, exit status."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.harness.agent_cli import (
    ENDED,
    FLOWBRIDGE,
    LIVE,
    free_port,
    metrics,
    replay_file,
    start,
    stop,
    wait_for,
)

from .helpers import Sink


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def test_exports_then_forced_end_on_sigterm(tmp_path, sink):
    port = free_port()
    process = start(
        "--source",
        f"replay:{replay_file(tmp_path, LIVE, ENDED)}",
        "--collector",
        f"127.0.0.1:{sink.port}",
        "--metrics",
        f"127.0.0.1:{port}",
        "--observation-domain-id",
        "77",
    )
    try:
        wait_for(lambda: metrics(port).get("flowbridge_observations_total", 0) == 2)
        ended = [r for r in sink.records(timeout=2) if r["protocolIdentifier"] == 17]
        assert [(r["flowEndReason"], r["packetDeltaCount"]) for r in ended] == [(3, 1)]
        values = metrics(port)
        assert values["flowbridge_cache_flows"] == 1
        assert values['flowbridge_flows_total{reason="end_of_flow"}'] == 1
    finally:
        out, err = stop(process)
    forced = sink.records(timeout=2)
    assert [(r["flowEndReason"], r["octetDeltaCount"], r["packetDeltaCount"]) for r in forced] == [
        (4, 3000, 4)
    ]
    assert all(m.domain_id in (0, 77) for m in sink.messages)
    assert "1 live flows exported as forced end" in err


def test_sighup_reloads_and_keeps_flow_state(tmp_path, sink):
    second = Sink()
    port = free_port()
    config = tmp_path / "flowbridge.toml"
    config.write_text(f'[[collector]]\naddress = "127.0.0.1:{sink.port}"\n')
    process = start(
        "--source",
        f"replay:{replay_file(tmp_path, LIVE)}",
        "--config",
        str(config),
        "--metrics",
        f"127.0.0.1:{port}",
    )
    try:
        wait_for(lambda: metrics(port).get("flowbridge_cache_flows") == 1)
        sink.receive(timeout=1)  # options, before the reload
        config.write_text(
            f'idle_timeout = 30\n[[collector]]\naddress = "127.0.0.1:{sink.port}"\n'
            f'[[collector]]\naddress = "127.0.0.1:{second.port}"\nprotocol = "v9"\n'
        )
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: metrics(port).get("flowbridge_reloads_total") == 1)
        assert metrics(port)["flowbridge_cache_flows"] == 1
    finally:
        out, err = stop(process)
    try:
        for collector in (sink, second):
            records = collector.records(timeout=2)
            assert [(r["flowEndReason"], r["packetDeltaCount"]) for r in records] == [(4, 4)]
        # the unchanged collector kept its exporter: one socket, one source port throughout
        senders = {m.exporter for m in sink.messages}
        assert len(senders) == 1, senders
        assert "configuration reloaded: 2 collector(s), 1 flows kept" in err
    finally:
        second.close()


def test_bad_reload_keeps_running(tmp_path, sink):
    port = free_port()
    config = tmp_path / "flowbridge.toml"
    config.write_text(f'[[collector]]\naddress = "127.0.0.1:{sink.port}"\n')
    process = start(
        "--source",
        f"replay:{replay_file(tmp_path, LIVE)}",
        "--config",
        str(config),
        "--metrics",
        f"127.0.0.1:{port}",
    )
    try:
        wait_for(lambda: metrics(port).get("flowbridge_cache_flows") == 1)
        config.write_text("active_timeout = 'soon'\n")
        process.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert process.poll() is None
    finally:
        out, err = stop(process)
    assert "reload refused, keeping the running configuration" in err
    assert [r["flowEndReason"] for r in sink.records(timeout=2)] == [4]


def test_builtin_collector_prints_flows(tmp_path):
    process = start("--source", f"replay:{replay_file(tmp_path, LIVE, ENDED)}")
    time.sleep(1.5)
    out, err = stop(process)
    lines = out.splitlines()
    assert len(lines) == 2
    assert "UDP  10.0.0.2:53 -> 10.0.0.1:41000  1 pkts  120 B" in lines[0]
    assert "end=end" in lines[0]
    assert "TCP  10.0.0.1:40000 -> 10.0.0.2:443  4 pkts  3000 B" in lines[1]
    assert "end=forced" in lines[1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--collector", "::1:4739"], "--collector '::1:4739': write an IPv6 address in brackets"),
        (
            ["--collector", "127.0.0.1:4739", "--active-timeout", "soon"],
            "--active-timeout 'soon': expected a number",
        ),
        (
            ["--collector", "127.0.0.1:4739", "--profile", "nosuch"],
            "profile 'nosuch': no such shipped profile",
        ),
        (
            ["--collector", "127.0.0.1:4739", "--protocol", "v5", "--profile", "ntop"],
            "profile 'ntop' is for ipfix, v9, not v5",
        ),
        (["--collector", "127.0.0.1:4739", "--protocol", "v8"], "'protocol' must be one of"),
        (["--config", "/nonexistent/flowbridge.toml"], "config /nonexistent/flowbridge.toml"),
        (
            ["--collector", "127.0.0.1:4739", "--source-address", "192.0.2.1"],
            "cannot use source address '192.0.2.1'",
        ),
        (["--source", "replay:/nonexistent.jsonl"], "replay:/nonexistent.jsonl"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path):
    if "--source" not in args:
        args = [*args, "--source", f"replay:{replay_file(tmp_path, LIVE)}"]
    result = subprocess.run([FLOWBRIDGE, "run", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("flowbridge: error: ")
    assert message in errors[0]
    assert "Traceback" not in result.stderr


def test_bad_config_file_line(tmp_path):
    config = tmp_path / "flowbridge.toml"
    config.write_text('[[collector]]\naddress = "127.0.0.1:4739"\ntransport = "sctp"\n')
    result = subprocess.run(
        [FLOWBRIDGE, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"flowbridge: error: {config}:3: collector #1: 'transport' must be udp, tcp or tls, "
        "not 'sctp'"
    )
