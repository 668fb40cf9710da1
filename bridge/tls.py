"""IPFIX over TLS (RFC 7011 section 11): the TCP transport with a verified TLS session on top.

The collector's certificate is always verified (its CA from `tls_ca`, else the system's trust
store) and its name checked against `tls_server_name`, else the collector's host; there is no
switch to turn that off. A failed handshake is the collector's trouble, never the agent's: it is
logged once with the reason, counted (`tls_failures`), and retried with the TCP backoff while
messages wait in the same bounded backlog. The certificate files are read again for every new
connection, so rotated certificates are picked up on the next reconnect without a restart.
"""

from __future__ import annotations

import errno
import select
import ssl
from collections.abc import Callable

from bridge.config import CollectorConfig
from bridge.errors import UserError
from bridge.tcp_transport import TcpTransport

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TlsConfigError(UserError):
    """A TLS file the operator named cannot be used; the message names the key and the file."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        super().__init__(f"'{key}' {path}: {reason}")
        self.key = key


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    return b""


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server (CA file `ca`, else the system store) and offers
    `cert`/`key` when the collector asks for a client certificate. Raises TlsConfigError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = MINIMUM_VERSION
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:  # ssl.SSLError is an OSError too
            raise TlsConfigError("tls_ca", ca, _file_reason(exc, "no PEM certificate")) from None
    else:
        context.load_default_certs()
    if cert:
        _load_client_certificate(context, cert, key)
    elif key:
        raise TlsConfigError("tls_key", key, "needs 'tls_cert', the certificate it belongs to")
    return context


def _load_client_certificate(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    # OpenSSL says "PEM lib" whichever file is wrong: try the certificate alone first, so the
    # error names the right file.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except OSError as exc:
        raise TlsConfigError("tls_cert", cert, _file_reason(exc, "no PEM certificate")) from None
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except OSError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            mismatch = f"does not match 'tls_cert' {cert}"
            raise TlsConfigError("tls_key", key or cert, mismatch) from None
        if key is None:
            raise TlsConfigError(
                "tls_cert", cert, "holds no private key; name it with 'tls_key'"
            ) from None
        raise TlsConfigError(
            "tls_key", key, _file_reason(exc, "not an unencrypted PEM private key")
        ) from None


def _file_reason(exc: OSError, what_ssl_means: str) -> str:
    if isinstance(exc, ssl.SSLError):
        return what_ssl_means
    return f"cannot read: {exc.strerror or exc}"


def describe(exc: ssl.SSLError) -> str:
    """OpenSSL's reason in words an operator can search for, e.g. 'certificate verify failed:
    self-signed certificate' or 'tlsv1 alert unknown ca'."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {str(exc.verify_message).rstrip('.')}"
    text = str(exc)
    if "] " in text:  # "[SSL: CODE] words (_ssl.c:123)" -> "words"
        text = text.split("] ", 1)[1].rsplit(" (_ssl.c", 1)[0]
    return text


class TlsTransport(TcpTransport):
    """TcpTransport whose connection counts as established once the TLS handshake is done."""

    kind = "tls"

    def __init__(
        self,
        host: str,
        port: int,
        source: str | None = None,
        *,
        context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        server_name: str | None = None,
        **tcp_options: object,
    ) -> None:
        super().__init__(host, port, source, **tcp_options)  # type: ignore[arg-type]
        # A factory is called for every connection (certificates re-read); the last context
        # that loaded stays in use when the files turn bad meanwhile.
        self._context_factory = context if callable(context) else None
        self._context = context if isinstance(context, ssl.SSLContext) else context()
        self.server_name = server_name or host.strip("[]")
        self._handshaking = False
        self._wants_read = False

    # -- handshake ---------------------------------------------------------------------------------

    def _fresh_context(self) -> ssl.SSLContext:
        if self._context_factory is not None:
            try:
                self._context = self._context_factory()
            except UserError as exc:
                self._log.warning(
                    "tls-files", f"collector {self.label}: {exc}; keeping the files loaded before"
                )
        return self._context

    def _tcp_connected(self) -> None:
        assert self.socket is not None
        try:
            self.socket = self._fresh_context().wrap_socket(
                self.socket, server_hostname=self.server_name, do_handshake_on_connect=False
            )
        except (ssl.SSLError, ValueError) as exc:
            self._tls_failed(str(exc))
            return
        self._handshaking = True
        self._wants_read = False
        self._continue_handshake(0.0)

    def _check_connect(self, wait: float) -> None:
        if self._handshaking:
            self._continue_handshake(wait)
        else:
            super()._check_connect(wait)

    def _continue_handshake(self, wait: float) -> None:
        sock = self.socket
        assert isinstance(sock, ssl.SSLSocket)
        if wait > 0:
            readers, writers = ([sock], []) if self._wants_read else ([], [sock])
            select.select(readers, writers, [], min(wait, 0.05))
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._wants_read = True
        except ssl.SSLWantWriteError:
            self._wants_read = False
        except ssl.SSLError as exc:
            self._tls_failed(describe(exc))
            return
        except OSError as exc:
            self._handshaking = False
            self._disconnect(exc)
            return
        else:
            self._handshaking = False
            self._established()
            return
        if self._clock() - self._connect_started > self._connect_timeout:
            self._handshaking = False
            self._disconnect(OSError(errno.ETIMEDOUT, "TLS handshake timed out"))

    def _tls_failed(self, reason: str) -> None:
        """Counted apart from send errors: a refused certificate needs the operator, not time."""
        self._handshaking = False
        self.stats.tls_failures += 1
        self._drop_connection()
        self._schedule_retry(f"TLS handshake failed: {reason}")

    # -- established connection ------------------------------------------------------------------

    def _send_some(self, data: memoryview) -> int | None:
        assert self.socket is not None
        try:
            return self.socket.send(data)  # SSLSocket takes no flags; Python ignores SIGPIPE
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
            return None  # retried later with the same bytes, as OpenSSL requires

    def _check_peer(self) -> None:
        """Readable means session tickets (TLS 1.3 sends them after the handshake), an alert
        (e.g. the collector refused our client certificate) or the end of the connection."""
        sock = self.socket
        assert isinstance(sock, ssl.SSLSocket)
        while select.select([sock], [], [], 0)[0] or sock.pending():
            try:
                data = sock.recv(4096)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except ssl.SSLError as exc:
                self._tls_failed(f"refused by the collector: {describe(exc)}")
                return
            except OSError as exc:
                self._disconnect(exc)
                return
            if not data:
                self._disconnect(None)
                return

    def _disconnect(self, exc: OSError | None) -> None:
        """With TLS 1.3 a collector refuses our client certificate after our handshake is done:
        its alert sits unread when the next write fails. Read it, to say why."""
        alert = self._unread_alert() if exc is not None else None
        if alert is not None:
            self._tls_failed(f"refused by the collector: {alert}")
        else:
            super()._disconnect(exc)

    def _unread_alert(self) -> str | None:
        sock = self.socket
        if not self._connected or not isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
            return None
        try:
            sock.recv(4096)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError):
            return None
        except ssl.SSLError as exc:
            return describe(exc)
        except (OSError, ValueError):
            return None
        return None

    def _drop_connection(self, take_back: bool = True) -> bool:
        self._handshaking = False
        return super()._drop_connection(take_back)

    def _close_socket(self) -> None:
        sock = self.socket
        if self._connected and isinstance(sock, ssl.SSLSocket):
            try:  # close_notify, so the collector sees an orderly end; never wait for its reply
                sock.setblocking(False)
                sock.unwrap()
            except (OSError, ValueError):
                pass
        super()._close_socket()


def open_tls_transport(config: CollectorConfig, **tcp_options: object) -> TlsTransport:
    """The collector's TLS transport; bad certificate files raise TlsConfigError at once."""

    def context() -> ssl.SSLContext:
        return client_context(config.tls_ca, config.tls_cert, config.tls_key)

    try:
        return TlsTransport(
            config.host,
            config.port,
            config.source,
            context=context,
            server_name=config.tls_server_name,
            **tcp_options,
        )
    except TlsConfigError as exc:
        raise UserError(f"collector tls://{config.address}: {exc}") from None
