"""What the agent exposes only when asked: the metrics endpoint beyond loopback, and process
command lines (which can hold secrets) in the export."""

from __future__ import annotations

import socket
import subprocess

import pytest

from bridge.config import Overrides, build_config
from bridge.errors import UserError
from tests.agent.helpers import Sink
from tests.harness.agent_cli import (
    FLOWBRIDGE,
    LIVE,
    free_port,
    metrics,
    replay_file,
    start,
    stop,
    wait_for,
)


def accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("flag", "elsewhere"),
    [
        ("{port}", False),  # a bare port: loopback only
        ("127.0.0.1:{port}", False),
        ("0.0.0.0:{port}", True),  # reachable beyond 127.0.0.1 only when the operator says so
    ],
)
def test_metrics_listen_on_loopback_unless_a_host_is_given(tmp_path, flag, elsewhere):
    port = free_port()
    process = start(
        "--source", f"replay:{replay_file(tmp_path, LIVE)}",
        "--metrics", flag.format(port=port), "--state-socket", "",
    )  # fmt: skip
    try:
        wait_for(lambda: metrics(port).get("flowbridge_cache_flows") == 1)
        # 127.0.0.2 is loopback too, but a socket bound to 127.0.0.1 does not answer there:
        # the difference between "this host only" and "every address".
        assert accepts("127.0.0.2", port) is elsewhere
    finally:
        _, err = stop(process)
    shown = f"0.0.0.0:{port}" if elsewhere else f"127.0.0.1:{port}"
    assert f"metrics on http://{shown}/metrics" in err


def test_metrics_port_in_the_config_file_means_loopback(tmp_path):
    config = tmp_path / "flowbridge.toml"
    config.write_text("metrics = 9465\n")
    assert build_config(str(config), Overrides()).metrics == "127.0.0.1:9465"
    config.write_text('metrics = "[::1]:9465"\n')
    assert build_config(str(config), Overrides()).metrics == "[::1]:9465"
    config.write_text('metrics = ":9465"\n')
    with pytest.raises(UserError, match=r":1: metrics ':9465': expected HOST:PORT"):
        build_config(str(config), Overrides())


def command_line_profile(tmp_path) -> str:
    path = tmp_path / "with-cmdline.toml"
    path.write_text(
        'name = "with-cmdline"\nprotocols = ["ipfix"]\nfields = [\n'
        '    "sourceIPv4Address", "destinationIPv4Address", "octetDeltaCount",\n'
        '    "flowEndReason", "SRC_PROC_CMDLINE",\n]\n'
    )
    return str(path)


def test_profile_with_command_lines_is_refused_without_the_opt_in(tmp_path):
    profile = command_line_profile(tmp_path)
    result = subprocess.run(
        [
            FLOWBRIDGE, "run", "--source", f"replay:{replay_file(tmp_path, LIVE)}",
            "--collector", "127.0.0.1:4739", "--profile", profile,
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"flowbridge: error: profile {profile} lists SRC_PROC_CMDLINE: command lines can hold "
        "secrets; export them only with export_command_lines = true (or --export-command-lines)"
    )


def test_opt_in_by_flag_or_config_lets_the_profile_run(tmp_path):
    profile = command_line_profile(tmp_path)
    sink = Sink()
    port = free_port()
    process = start(
        "--source", f"replay:{replay_file(tmp_path, LIVE)}", "--metrics", str(port),
        "--collector", f"127.0.0.1:{sink.port}", "--profile", profile, "--export-command-lines",
    )  # fmt: skip
    try:
        wait_for(lambda: metrics(port).get("flowbridge_cache_flows") == 1)
        stop(process)
        records = sink.records(timeout=2)
        assert [(r["flowEndReason"], r["octetDeltaCount"]) for r in records] == [(4, 3000)]
        assert "SRC_PROC_CMDLINE" in records[0]
    finally:
        sink.close()
    config = tmp_path / "flowbridge.toml"
    body = f'[[collector]]\naddress = "127.0.0.1:4739"\nprofile = "{profile}"\n'
    config.write_text(body)
    with pytest.raises(UserError, match="lists SRC_PROC_CMDLINE"):
        build_config(str(config), Overrides())
    config.write_text("export_command_lines = true\n" + body)
    assert build_config(str(config), Overrides()).export_command_lines is True
    assert build_config(None, Overrides()).export_command_lines is False  # the default
