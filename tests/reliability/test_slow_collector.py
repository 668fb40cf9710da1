"""A TCP collector that does not read: the exporter's memory stays bounded and every record is
accounted for - delivered (decoded at the collector once it reads), dropped (counted in the
transport's stats and the IPFIX notSent counters) or still queued. Asserts bounds and counts,
never time."""

from __future__ import annotations

import socket
import struct
import tracemalloc

from bridge.cache import FlowCache
from bridge.config import CollectorConfig
from bridge.exporter import Exporter
from bridge.tcp_transport import TcpTransport
from ebpf.observation import Direction, EndCause, FlowKey, FlowObservation
from ipfix.decoder import Decoder

T0 = 1_700_000_000_000
BACKLOG = 256 << 10  # the transport's bound, small so the test is quick
BATCHES = 80
PER_BATCH = 2000  # ~100 kB of IPFIX per batch: ~30x the bound, after the socket buffers fill
PEER = ("127.0.0.1", 1)


def ended(batch: int) -> list[FlowObservation]:
    out = []
    for i in range(PER_BATCH):
        n = batch * PER_BATCH + i
        key = FlowKey(
            0,
            Direction.EGRESS,
            4,
            6,
            bytes([10, 1, n >> 8 & 255, n & 255]),
            bytes([10, 2, 0, 1]),
            1024 + n % 60000,
            443,
        )
        out.append(
            FlowObservation(key, 2, 100 + n % 50, 1 + n % 3, 0x1B, T0, T0 + 1, end=EndCause.FIN)
        )
    return out


class StreamReader:
    """The collector's side, reading only when told: IPFIX messages split by their length."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = bytearray()
        self.decoder = Decoder()
        self.options: list[dict] = []  # options records (exporter statistics) read so far

    def records(self) -> list[dict]:
        """The flow records that arrived since the last call."""
        self.conn.setblocking(False)
        while True:
            try:
                chunk = self.conn.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffer += chunk
        out, offset = [], 0
        while offset + 4 <= len(self.buffer):
            length = struct.unpack_from(">H", self.buffer, offset + 2)[0]
            if offset + length > len(self.buffer):
                break
            for message in self.decoder.feed(bytes(self.buffer[offset : offset + length]), PEER):
                out += message.records
                self.options += message.options_records
            offset += length
        del self.buffer[:offset]
        return out


def test_collector_that_does_not_read_bounds_memory_and_counts_every_drop() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a collector that lags
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    transport = TcpTransport("127.0.0.1", port, max_backlog_bytes=BACKLOG)
    exporter = Exporter(CollectorConfig("127.0.0.1", port, transport="tcp"), 7, transport=transport)
    conn = None
    pushed = 0
    settled = None  # traced memory once the backlog is full and dropping
    tracemalloc.start()
    try:
        for batch in range(BATCHES):
            exporter.export(FlowCache().update(ended(batch)))
            exporter.flush()
            pushed += PER_BATCH
            if conn is None:
                listener.settimeout(10)
                conn, _ = listener.accept()
            assert transport.backlog_bytes <= BACKLOG
            if settled is None and transport.stats.records_dropped:
                settled, settled_batch = tracemalloc.get_traced_memory()[0], batch
        assert settled is not None, "the backlog never filled: nothing was tested"
        grown = tracemalloc.get_traced_memory()[0] - settled
    finally:
        tracemalloc.stop()
    # Pushed many times the bound since the backlog filled; the exporter's memory did not follow.
    assert (BATCHES - settled_batch) * PER_BATCH * 50 > 10 * BACKLOG
    assert grown < BACKLOG // 4, f"memory grew {grown} bytes while the collector did not read"

    stats = transport.stats
    assert stats.records_dropped > 0 and stats.messages_dropped > 0
    assert exporter.records_exported == pushed
    queued = sum(records for _message, records in transport._queue)

    assert conn is not None
    reader = StreamReader(conn)
    delivered = len(reader.records())
    for _ in range(200):  # the collector reads now: the backlog drains
        transport.flush(timeout=0.05)
        delivered += len(reader.records())
        if not transport.backlog_messages and not reader.buffer:
            break
    assert transport.backlog_messages == 0
    assert delivered + stats.records_dropped == pushed
    assert delivered >= queued  # what was queued when the collector started reading arrived

    # The collector learns of the loss: the exporter statistics carry the dropped count.
    exporter.send_options()
    transport.flush(timeout=5)
    assert reader.records() == []
    reported = [r["notSentFlowTotalCount"] for r in reader.options if "notSentFlowTotalCount" in r]
    assert reported == [stats.records_dropped]
    exporter.close(0)
    conn.close()
    listener.close()
