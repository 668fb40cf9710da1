"""`flowbridge collect` (the real command, a subprocess) under hostile input over UDP on
loopback: garbage mixed with valid messages, and floods of template ids and exporter addresses.

The stream is sent in batches, each closed by a valid message whose record we wait for on
stdout: collect handles datagrams in order, so the batch before it was handled too, and the
kernel never has to drop one (which the summary would show). What collect prints is compared
with the same stream fed in-process to the Collection object it uses, and with the records sent.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

from bench.fuzz_corpus import corpus, mutate
from bridge.cli.collect import Collection
from ipfix.errors import DecodeError
from ipfix.jsonform import record_to_json
from tests.ipfix.test_cli import FLOWBRIDGE, ROOT, free_port

BATCH = 100  # datagrams between two waits: far less than the socket buffer holds
WAIT_SECONDS = 60


class CollectProcess:
    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [*FLOWBRIDGE, "collect", "--listen", f"127.0.0.1:{port}", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None and self.proc.stdout is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line
        self.lines: queue.Queue[str] = queue.Queue()
        self.printed: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, marker: str) -> None:
        """Collects stdout lines up to the one holding `marker`."""
        while True:
            line = self.lines.get(timeout=WAIT_SECONDS)
            self.printed.append(line)
            if marker in line:
                return

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1])

    def stop(self) -> str:
        """SIGTERM, as a service manager stops it: the summary must still come."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=WAIT_SECONDS)
        assert self.proc.returncode == 0, err
        while not self.lines.empty():
            self.printed.append(self.lines.get())
        return err


def _ipfix(domain: int, *sets: bytes) -> bytes:
    body = b"".join(sets)
    return struct.pack(">HHIII", 10, 16 + len(body), 1_760_000_000, 0, domain) + body


def _set(set_id: int, body: bytes) -> bytes:
    return struct.pack(">HH", set_id, 4 + len(body)) + body


def _marker_message(n: int) -> tuple[bytes, dict]:
    """A complete message (template and data) whose one record carries `n` as its port."""
    record = {"sourceIPv4Address": bytes([192, 0, 2, 77]), "sourceTransportPort": n & 0xFFFF,
              "octetDeltaCount": n, "packetDeltaCount": 1}  # fmt: skip
    template = struct.pack(">HHHHHHHHHH", 60000, 4, 8, 4, 7, 2, 1, 8, 2, 8)
    data = record["sourceIPv4Address"] + struct.pack(">HQQ", n & 0xFFFF, n, 1)
    return _ipfix(4_000_000_000, _set(2, template), _set(60000, data)), record


def _send_in_batches(collect: CollectProcess, port: int, stream: list[tuple[str, bytes]]) -> list:
    """Sends (source address, datagram) pairs; returns the marker records sent."""
    sockets: dict[str, socket.socket] = {}
    markers = []
    try:
        for i in range(0, len(stream), BATCH):
            for address, datagram in stream[i : i + BATCH]:
                if address not in sockets:
                    sockets[address] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sockets[address].bind((address, 0))
                sockets[address].sendto(datagram, ("127.0.0.1", port))
            message, record = _marker_message(len(markers))
            sockets.setdefault("127.0.0.1", socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sockets["127.0.0.1"].sendto(message, ("127.0.0.1", port))
            markers.append((sockets["127.0.0.1"].getsockname()[0], message, record))
            n = len(markers) - 1
            collect.wait_for(f'"192.0.2.77", "sourceTransportPort": {n}, "octetDeltaCount": {n},')
    finally:
        for s in sockets.values():
            s.close()
    return markers


def _reference(stream: list[tuple[str, bytes]], markers: list) -> tuple[list[str], Collection]:
    """What collect must print: the same datagrams, in the same order, through Collection."""
    collection = Collection(as_json=True)
    lines = []
    for i in range(0, len(stream), BATCH):
        batch = stream[i : i + BATCH] + [(markers[i // BATCH][0], markers[i // BATCH][1])]
        for address, datagram in batch:
            with contextlib.suppress(DecodeError):
                lines += collection.receive(datagram, (address, 1))
    return lines, collection


def test_garbage_between_valid_messages() -> None:
    rng = random.Random(20261126)
    pool = corpus()
    stream = [("127.0.0.1", mutate(rng, pool)[0]) for _ in range(3000)]
    stream += [("127.0.0.1", message) for message in pool]  # every valid message, once more
    port = free_port()
    collect = CollectProcess(port)
    markers = _send_in_batches(collect, port, stream)
    err = collect.stop()
    expected, reference = _reference(stream, markers)
    assert collect.printed == expected  # the same records, in the same order, nothing else
    for line in collect.printed:
        json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    sent = [json.dumps(record_to_json(record)) for _, _, record in markers]
    assert sorted(sent) == sorted(line for line in collect.printed if '"192.0.2.77"' in line)
    summary = reference.summary()
    assert summary in err.splitlines()  # counts by reason, and 0 dropped by the kernel
    assert sum(reference.rejected.values()) > 1000 and reference.rejected["unexpected"] == 0
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert {w.split("rejected a datagram (")[1].split(")")[0] for w in warnings} == set(
        reference.rejected
    )
    assert len(warnings) < 100  # rate-limited per reason, not one per datagram
    assert "Traceback" not in err


def _flood_template(rng: random.Random) -> bytes:
    """60 enterprise fields nobody knows: the most memory a cached field can take."""
    fields = b"".join(
        struct.pack(">HHI", 0x8000 | rng.randrange(1, 0x8000), rng.randrange(1, 64), 99999)
        for _ in range(60)
    )
    template_id = rng.randrange(256, 0x10000)
    return _ipfix(rng.getrandbits(32), _set(2, struct.pack(">HH", template_id, 60) + fields))


def test_template_and_exporter_flood_costs_bounded_memory() -> None:
    rng = random.Random(4739)
    addresses = [f"127.0.{n // 250}.{2 + n % 250}" for n in range(300)]
    stream = [(rng.choice(addresses), _flood_template(rng)) for _ in range(20_000)]
    port = free_port()
    collect = CollectProcess(port)
    _send_in_batches(collect, port, stream[:2000])  # 120k fields: the cache is full already
    warm_kb = collect.rss_kb()
    _send_in_batches(collect, port, stream[2000:])
    flooded_kb = collect.rss_kb()
    err = collect.stop()
    # 1.2 million fields were defined; unbounded, that is some 500 MB.
    assert flooded_kb - warm_kb < 32 * 1024, (warm_kb, flooded_kb)
    summary = next(line for line in err.splitlines() if "templates evicted" in line)
    evicted = int(summary.split(" templates evicted")[0].rsplit(" ", 1)[1])
    assert evicted > 18_000 and "0 rejected" in summary and "0 dropped by the kernel" in summary
