"""`flowbridge run` exporting over TLS: records decoded exactly from the TLS stream, a collector
that fails verification counted while the others keep getting records, bad TLS files exit 2."""

from __future__ import annotations

import ipaddress
import subprocess

import pytest

from tests.agent.helpers import Sink
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

from .pki import Pki, make_pki
from .tls_collector import TlsCollector, decode_stream


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("security-agent-pki"))


def test_records_arrive_over_tls_exactly(pki, tmp_path):
    collector = TlsCollector(pki.server)
    port = free_port()
    process = start(
        "--source", f"replay:{replay_file(tmp_path, LIVE, ENDED)}",
        "--collector", f"127.0.0.1:{collector.port}",
        "--transport", "tls", "--tls-ca", str(pki.ca),
        "--metrics", str(port), "--observation-domain-id", "88",
    )  # fmt: skip
    try:
        wait_for(lambda: metrics(port).get("flowbridge_observations_total", 0) == 2)
        collector.wait(lambda c: any(r.get("protocolIdentifier") == 17 for r in records_of(c)))
    finally:
        _, err = stop(process)
    collector.wait(lambda c: len(records_of(c)) == 2)
    messages = decode_stream(collector.stream())
    collector.close()
    assert collector.versions == ["TLSv1.3"] and len(collector.streams) == 1
    # A fresh collector decodes everything: templates came first on the connection.
    assert messages[0].templates and all(m.unknown_template_sets == 0 for m in messages)
    assert {m.domain_id for m in messages if m.records} == {88}
    records = [r for m in messages for r in m.records]
    got = [
        (
            r["flowEndReason"], r["protocolIdentifier"], address(r["sourceIPv4Address"]),
            address(r["destinationIPv4Address"]), r["sourceTransportPort"],
            r["destinationTransportPort"],
            r["octetDeltaCount"], r["packetDeltaCount"],
        )
        for r in records
    ]  # fmt: skip
    assert got == [
        (3, 17, "10.0.0.2", "10.0.0.1", 53, 41000, 120, 1),  # ended: end of flow
        (4, 6, "10.0.0.1", "10.0.0.2", 40000, 443, 3000, 4),  # live: forced end at SIGTERM
    ]
    assert "TLS handshake failed" not in err


def address(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def records_of(collector: TlsCollector) -> list[dict]:
    return [r for m in decode_stream(collector.stream()) for r in m.records]


@pytest.mark.parametrize(
    ("trust", "server_name", "reason"),
    [
        ("other_ca", None, "certificate verify failed: unable to get local issuer certificate"),
        ("ca", "elsewhere.test", "certificate verify failed: Hostname mismatch"),
    ],
)
def test_refused_collector_is_counted_and_the_others_keep_exporting(
    pki, tmp_path, trust, server_name, reason
):
    collector = TlsCollector(pki.server)
    sink = Sink()
    port = free_port()
    config = tmp_path / "flowbridge.toml"
    name = f'tls_server_name = "{server_name}"\n' if server_name else ""
    config.write_text(
        f"metrics = {port}\n"
        f'[[collector]]\naddress = "127.0.0.1:{collector.port}"\ntransport = "tls"\n'
        f'tls_ca = "{getattr(pki, trust)}"\n{name}'
        f'[[collector]]\naddress = "127.0.0.1:{sink.port}"\n'
    )
    process = start("--source", f"replay:{replay_file(tmp_path, LIVE, ENDED)}", "--config",
                    str(config))  # fmt: skip
    label = f'flowbridge_tls_handshake_failures_total{{collector="tls://127.0.0.1:{collector.port}'
    try:
        wait_for(lambda: any(k.startswith(label) and v >= 2 for k, v in metrics(port).items()))
        assert process.poll() is None  # still running
        ended = [r for r in sink.records(timeout=2) if r["protocolIdentifier"] == 17]
        assert [(r["flowEndReason"], r["octetDeltaCount"]) for r in ended] == [(3, 120)]
        name = f"tls://127.0.0.1:{collector.port}/ipfix/standard"
        assert metrics(port)[f'flowbridge_tcp_connects_total{{collector="{name}"}}'] == 0
    finally:
        _, err = stop(process)
        collector.close()
        sink.close()
    assert collector.streams == []
    lines = [line for line in err.splitlines() if "TLS handshake failed" in line]
    assert len(lines) == 1, err  # once, not once per retry
    assert f"collector tls://127.0.0.1:{collector.port}: TLS handshake failed: {reason}" in lines[0]


def run_exit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLOWBRIDGE, "run", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--tls-ca", "{tmp}/missing.pem"],
            "--tls-ca: 'tls_ca' {tmp}/missing.pem: cannot read: No such file or directory",
        ),
        (
            ["--tls-ca", "{ca}", "--tls-cert", "{client}", "--tls-key", "{tmp}/bad.key"],
            "--tls-key: 'tls_key' {tmp}/bad.key: not an unencrypted PEM private key",
        ),
        (
            ["--tls-ca", "{ca}", "--tls-cert", "{client}", "--tls-key", "{server_key}"],
            "--tls-key: 'tls_key' {server_key}: does not match 'tls_cert' {client}",
        ),
    ],
)
def test_bad_tls_flags_exit_2_naming_the_flag_and_file(pki, tmp_path, flags, message):
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n")
    names = {"tmp": tmp_path, "ca": pki.ca, "client": pki.client[0], "server_key": pki.server[1]}
    args = [flag.format(**names) for flag in flags]
    result = run_exit(
        "--source", f"replay:{replay_file(tmp_path, LIVE)}",
        "--collector", "127.0.0.1:4740", "--transport", "tls", *args,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == f"flowbridge: error: {message.format(**names)}"


def test_bad_tls_file_in_config_names_file_line_and_key(pki, tmp_path):
    config = tmp_path / "flowbridge.toml"
    config.write_text(
        '[[collector]]\naddress = "127.0.0.1:4740"\ntransport = "tls"\n'
        f'tls_ca = "{tmp_path}/nope.pem"\n'
    )
    result = run_exit("--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"flowbridge: error: {config}:4: collector #1: 'tls_ca' {tmp_path}/nope.pem: cannot "
        "read: No such file or directory"
    )


def test_tls_setting_without_tls_transport_is_refused(pki, tmp_path):
    result = run_exit("--collector", "127.0.0.1:4739", "--tls-ca", str(pki.ca))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "flowbridge: error: --tls-ca: 'tls_ca' is a TLS setting, but transport is 'udp' "
        '(set transport = "tls")'
    )
