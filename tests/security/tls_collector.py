"""A TLS collector for tests: Python's ssl server on loopback, one thread, keeping every byte each
connection delivered, and decoding the IPFIX stream with our decoder as a fresh collector would."""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from pathlib import Path

from ipfix.decoder import DecodedMessage, Decoder
from tests.agent.helpers import split_ipfix


class TlsCollector:
    def __init__(
        self,
        cert: tuple[Path, Path],
        *,
        client_ca: Path | None = None,
        port: int = 0,
        maximum_version: ssl.TLSVersion | None = None,
    ) -> None:
        """`client_ca`: demand a client certificate signed by it. `maximum_version`: play an
        old collector (and allow the old protocol at OpenSSL's security level)."""
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*cert)
        if client_ca is not None:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(cafile=client_ca)
        if maximum_version is not None:
            self.context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            self.context.maximum_version = maximum_version
            self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.streams: list[bytearray] = []  # application data, one per accepted TLS session
        self.versions: list[str] = []  # the TLS version of each session
        self.handshake_errors: list[str] = []
        self._open: list[ssl.SSLSocket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        readers = selectors.DefaultSelector()
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                raw = None
            except OSError:
                return
            if raw is not None:
                self._handshake(raw, readers)
            for key, _ in readers.select(timeout=0.01) if readers.get_map() else ():
                self._read(key.fileobj, key.data, readers)  # type: ignore[arg-type]

    def _handshake(self, raw: socket.socket, readers: selectors.BaseSelector) -> None:
        raw.settimeout(5)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._lock:
                self.handshake_errors.append(str(exc))
            raw.close()
            return
        conn.setblocking(False)
        with self._lock:
            self.streams.append(bytearray())
            self.versions.append(conn.version() or "")
            self._open.append(conn)
            index = len(self.streams) - 1
        readers.register(conn, selectors.EVENT_READ, index)

    def _read(self, conn: ssl.SSLSocket, index: int, readers: selectors.BaseSelector) -> None:
        while True:
            try:
                data = conn.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                data = b""
            if not data:
                readers.unregister(conn)
                conn.close()
                return
            with self._lock:
                self.streams[index] += data

    def stream(self, index: int = -1) -> bytes:
        with self._lock:
            return bytes(self.streams[index]) if self.streams else b""

    def wait(self, predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate(self):
            assert time.monotonic() < deadline, "timed out waiting for the TLS collector"
            time.sleep(0.05)

    def close(self) -> None:
        """Stops like a collector process would: every connection and the listener go."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for conn in self._open:
                conn.close()
        self.listener.close()


def decode_stream(stream: bytes) -> list[DecodedMessage]:
    decoder = Decoder()  # a fresh collector: it knows only the templates this stream carries
    return [m for data in split_ipfix(stream) for m in decoder.feed(data, ("127.0.0.1", 1))]
