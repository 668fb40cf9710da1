"""IPFIX over TLS (RFC 7011 section 11) at the transport: the certificate is verified, a refused
handshake is counted and retried while messages wait, templates go first on every connection."""

from __future__ import annotations

import logging
import ssl
import time
import warnings

import pytest

from bridge.config import CollectorConfig
from bridge.errors import UserError
from bridge.tls import TlsConfigError, TlsTransport, client_context
from bridge.transport import open_collector_transport
from tests.agent.helpers import FakeClock
from tests.harness.agent_cli import free_port

from .pki import SERVER_NAME, Pki, make_pki
from .tls_collector import TlsCollector


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("security-pki"))


def tls_transport(port: int, clock: FakeClock, **settings) -> TlsTransport:
    config = CollectorConfig(host="127.0.0.1", port=port, transport="tls", **settings)
    transport = open_collector_transport(config)
    assert isinstance(transport, TlsTransport)
    transport._clock = clock  # the backoff runs on the test's clock
    templates = iter([b"T1", b"T2", b"T3"])
    transport.on_connect = lambda: [next(templates)]
    return transport


def pump_until(transport: TlsTransport, done, clock: FakeClock, rounds: int = 200) -> None:  # type: ignore[no-untyped-def]
    for _ in range(rounds):
        if done():
            return
        clock.advance(60)  # past any backoff: every round may reconnect
        transport.flush(timeout=0.1)
        time.sleep(0.05)  # flush returns at once when nothing waits; the collector is a thread
    assert done(), transport.stats


def test_verified_collector_gets_templates_then_messages(pki):
    collector = TlsCollector(pki.server)
    clock = FakeClock()
    transport = tls_transport(collector.port, clock, tls_ca=str(pki.ca))
    try:
        transport.send(b"m1", 3)
        transport.send(b"m2", 4)
        pump_until(transport, lambda: transport.connected and not transport.backlog_messages, clock)
        collector.wait(lambda c: c.stream() == b"T1m1m2")
        assert transport.stats.connects == 1 and transport.stats.tls_failures == 0
        assert transport.stats.messages_sent == 3 and transport.stats.messages_dropped == 0
        assert collector.versions[0] in ("TLSv1.2", "TLSv1.3")
    finally:
        transport.close()
        collector.close()


def test_server_name_defaults_to_the_host_and_can_be_set(pki):
    collector = TlsCollector(pki.server)
    clock = FakeClock()
    transport = tls_transport(
        collector.port, clock, tls_ca=str(pki.ca), tls_server_name=SERVER_NAME
    )
    try:
        assert transport.server_name == SERVER_NAME
        transport.send(b"named")
        pump_until(transport, lambda: collector.stream() == b"T1named", clock)
    finally:
        transport.close()
        collector.close()


@pytest.mark.parametrize(
    ("server", "trust", "server_name", "reason"),
    [
        ("other_server", "ca", None, "certificate verify failed: unable to get local issuer"),
        ("self_signed", "ca", None, "certificate verify failed: self-signed certificate"),
        ("server", "ca", "elsewhere.test", "certificate verify failed: Hostname mismatch"),
        ("server", "other_ca", None, "certificate verify failed: unable to get local issuer"),
    ],
)
def test_unverified_collector_is_refused_counted_and_retried(
    pki, caplog, server, trust, server_name, reason
):
    collector = TlsCollector(getattr(pki, server))
    clock = FakeClock()
    transport = tls_transport(
        collector.port, clock, tls_ca=str(getattr(pki, trust)), tls_server_name=server_name
    )
    try:
        with caplog.at_level(logging.WARNING, logger="flowbridge.transport"):
            transport.send(b"secret", 5)
            pump_until(transport, lambda: transport.stats.tls_failures >= 3, clock)
        assert transport.stats.connects == 0 and not transport.connected
        assert transport.backlog_messages == 1  # waiting, not lost, not sent in the clear
        collector.wait(lambda c: len(c.handshake_errors) >= 1)
        assert collector.streams == []  # no session: not one byte of application data
        lines = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
        assert lines[0].startswith(f"collector tls://127.0.0.1:{collector.port}: ")
        assert reason in lines[0]
        assert len(lines) == 1  # rate limited: one line, not one per retry
    finally:
        transport.close()
        collector.close()
    assert transport.stats.records_dropped == 5  # never sent: counted at shutdown


def test_client_certificate_when_the_collector_demands_one(pki, caplog):
    collector = TlsCollector(pki.server, client_ca=pki.ca)
    clock = FakeClock()
    cert, key = pki.client
    with_cert = tls_transport(
        collector.port, clock, tls_ca=str(pki.ca), tls_cert=str(cert), tls_key=str(key)
    )
    without = tls_transport(collector.port, clock, tls_ca=str(pki.ca))
    try:
        with_cert.send(b"mine")
        pump_until(with_cert, lambda: collector.stream(0) == b"T1mine", clock)
        without.send(b"theirs")
        pump_until(without, lambda: without.stats.tls_failures >= 1, clock)
        assert collector.handshake_errors and all(
            "certificate" in error for error in collector.handshake_errors
        )
        assert [bytes(s) for s in collector.streams] == [b"T1mine"]
        assert with_cert.stats.tls_failures == 0
        assert (
            "TLS handshake failed: refused by the collector: tlsv13 alert certificate required"
            in caplog.text
        )
    finally:
        with_cert.close()
        without.close()
        collector.close()


def test_collector_restart_reconnects_and_resends_templates(pki):
    port = free_port()
    first = TlsCollector(pki.server, port=port)
    clock = FakeClock()
    transport = tls_transport(port, clock, tls_ca=str(pki.ca))
    try:
        transport.send(b"m1", 1)
        pump_until(transport, lambda: first.stream() == b"T1m1", clock)
        first.close()  # the collector restarts and forgets its templates
        pump_until(transport, lambda: not transport.connected, clock)
        assert transport.stats.send_errors == 1 and transport.stats.tls_failures == 0
        second = TlsCollector(pki.server, port=port)
        try:
            transport.send(b"m2", 1)
            pump_until(transport, lambda: second.stream() == b"T2m2", clock)
            assert transport.stats.connects == 2 and transport.stats.messages_dropped == 0
        finally:
            second.close()
    finally:
        transport.close()


def test_tls_1_1_collector_is_refused(pki, caplog):
    with warnings.catch_warnings():  # naming TLS 1.1 is deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        collector = TlsCollector(pki.server, maximum_version=ssl.TLSVersion.TLSv1_1)
    clock = FakeClock()
    transport = tls_transport(collector.port, clock, tls_ca=str(pki.ca))
    try:
        transport.send(b"old")
        with caplog.at_level(logging.WARNING, logger="flowbridge.transport"):
            pump_until(transport, lambda: transport.stats.tls_failures >= 1, clock)
        assert transport.stats.connects == 0 and collector.streams == []
        assert "TLS handshake failed: tlsv1 alert protocol version" in caplog.text
    finally:
        transport.close()
        collector.close()


def test_certificates_are_read_again_on_reconnect(pki, tmp_path):
    """Rotated files are used by the next connection; files gone bad keep the last good ones."""
    trust = tmp_path / "trust.pem"
    trust.write_bytes(pki.other_ca.read_bytes())  # the wrong CA first
    collector = TlsCollector(pki.server)
    clock = FakeClock()
    transport = tls_transport(collector.port, clock, tls_ca=str(trust))
    try:
        transport.send(b"later")
        pump_until(transport, lambda: transport.stats.tls_failures >= 1, clock)
        trust.write_bytes(pki.ca.read_bytes())  # the operator fixes the CA file
        pump_until(transport, lambda: collector.stream() == b"T1later", clock)
        trust.write_text("truncated")
        collector.close()
        pump_until(transport, lambda: not transport.connected, clock)
        second = TlsCollector(pki.server, port=collector.port)
        try:
            transport.send(b"again")
            pump_until(transport, lambda: second.stream() == b"T2again", clock)
        finally:
            second.close()
    finally:
        transport.close()


def test_context_verifies_and_needs_tls_1_2(pki):
    context = client_context(str(pki.ca))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


@pytest.mark.parametrize(
    ("files", "key", "reason"),
    [
        ({"ca": "missing.pem"}, "tls_ca", "cannot read: No such file or directory"),
        ({"ca": "garbage.pem"}, "tls_ca", "no PEM certificate"),
        ({"cert": "garbage.pem", "key": "client.key"}, "tls_cert", "no PEM certificate"),
        ({"cert": "client.pem", "key": "garbage.pem"}, "tls_key", "not an unencrypted PEM"),
        ({"cert": "client.pem", "key": "server.key"}, "tls_key", "does not match 'tls_cert'"),
        ({"cert": "client.pem"}, "tls_cert", "holds no private key"),
        ({"key": "client.key"}, "tls_key", "needs 'tls_cert'"),
    ],
)
def test_bad_files_name_the_key_and_the_file(pki, tmp_path, files, key, reason):
    (tmp_path / "garbage.pem").write_text("-----BEGIN NOTHING-----\n")
    where = {"client.pem": pki.client[0], "client.key": pki.client[1], "server.key": pki.server[1]}
    paths = {k: str(where.get(v, tmp_path / v)) for k, v in files.items()}
    with pytest.raises(TlsConfigError) as error:
        client_context(paths.get("ca", str(pki.ca)), paths.get("cert"), paths.get("key"))
    named = paths["ca" if key == "tls_ca" else key.removeprefix("tls_")]
    assert str(error.value).startswith(f"'{key}' {named}: ")
    assert reason in str(error.value)
    assert isinstance(error.value, UserError)


def test_transport_with_bad_files_is_a_user_error(pki, tmp_path):
    config = CollectorConfig(
        host="127.0.0.1", port=4740, transport="tls", tls_ca=str(tmp_path / "none.pem")
    )
    with pytest.raises(UserError, match=r"collector tls://127.0.0.1:4740: 'tls_ca' .*none.pem"):
        open_collector_transport(config)


def test_no_certificate_files_means_the_system_store(pki):
    # An IPFIX stream must never go to a collector nobody vouched for: the default trusts the
    # system's CAs, which never signed this test collector.
    collector = TlsCollector(pki.server)
    clock = FakeClock()
    transport = tls_transport(collector.port, clock)
    try:
        transport.send(b"x")
        pump_until(transport, lambda: transport.stats.tls_failures >= 1, clock)
        assert collector.streams == []
    finally:
        transport.close()
        collector.close()
