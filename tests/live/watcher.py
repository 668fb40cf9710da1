"""A progress watcher: a loopback UDP sink that the agent exports to as one more collector, decoded
with the project's own decoder (ipfix.decoder) whenever a test asks. It tells a test *when* the
agent's records are out; what they contain is judged by the real collectors, never by this."""

from __future__ import annotations

from tests.harness.collector_common import LOOPBACK, Flow, UdpSink


class ExportWatcher:
    def __init__(self, ip_version: int = 4):
        self.host = LOOPBACK[ip_version]
        self._sink = UdpSink(self.host)
        self.port = self._sink.port
        self._decoded = 0
        self._flows: list[Flow] = []
        from ipfix.decoder import DecodedMessage, Decoder

        self._decoder = Decoder()
        self._messages: list[DecodedMessage] = []

    def start(self) -> ExportWatcher:
        self._sink.start()
        return self

    def stop(self) -> None:
        self._sink.stop()

    def __enter__(self) -> ExportWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flows(self) -> list[Flow]:
        """Every flow record received so far (decoding only what arrived since the last call)."""
        self._decode()
        return list(self._flows)

    def options(self) -> list[dict]:
        """Every options record received so far (exporter statistics, interface names)."""
        self._decode()
        return [r for m in self._messages for r in m.options_records]

    def messages(self) -> list:  # list[ipfix.decoder.DecodedMessage]
        """Every message received so far, decoded: headers, sets, templates."""
        self._decode()
        return list(self._messages)

    def _decode(self) -> None:
        datagrams = self._sink.datagrams[self._decoded:]
        self._decoded += len(datagrams)
        for datagram in datagrams:
            for message in self._decoder.feed(datagram, (self.host, 0)):
                self._messages.append(message)
                self._flows += message.records
