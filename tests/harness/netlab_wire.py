"""A userspace "wire" between two interfaces: forwards Ethernet frames both ways, adding a fixed
delay and dropping frames, as tc netem would (stdlib only; run inside the lab's wire namespace).

Why not netem: this kernel is built without CONFIG_NET_SCH_NETEM (and without act_gact), so
`tc qdisc add ... netem` fails with "Specified qdisc kind is unknown". Doing it in the middle of the
path also keeps both ends' packet captures exact: a frame dropped here was already captured on the
sender's veth, so the capture shows the original and its retransmission (same sequence number
twice), while the receiver's capture shows only what arrived.

Loss is either random (seeded, so reproducible) or deterministic (every Nth eligible frame); only
IPv4/IPv6 frames with a TCP payload or UDP/ICMP are eligible when `--loss-data-only` is given, so
handshakes and pure ACKs go through and the test's retransmission count stays in a useful range.
Prints "ready" on stdout when both sockets are bound; at exit (SIGTERM) prints a JSON line of
counters.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import select
import signal
import socket
import struct
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23
SOL_PACKET = 263


def open_port(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    return sock


def carries_data(frame: bytes) -> bool:
    """True for frames whose loss forces a retransmission: TCP with payload, UDP, ICMP."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        proto, l4 = frame[23], 14 + ihl
        ip_payload = total - ihl
    elif ethertype == 0x86DD:
        proto, l4 = frame[20], 54
        ip_payload = struct.unpack_from("!H", frame, 18)[0]
    else:
        return False
    if proto == 6:
        return ip_payload - (frame[l4 + 12] >> 4) * 4 > 0
    return proto in (17, 1, 58)


class Direction:
    def __init__(self, delay_s: float, loss: float, every: int, data_only: bool, seed: int):
        self.delay_s, self.loss, self.every, self.data_only = delay_s, loss, every, data_only
        self.random = random.Random(seed)
        self.eligible = self.forwarded = self.dropped = 0

    def drops(self, frame: bytes) -> bool:
        if self.data_only and not carries_data(frame):
            return False
        self.eligible += 1
        if self.every:
            return self.eligible % self.every == 0
        return self.loss > 0 and self.random.random() < self.loss


def run(args: argparse.Namespace) -> dict[str, object]:
    ports = [open_port(args.a), open_port(args.b)]
    directions = [
        Direction(args.delay_ms_ab / 1000, args.loss_ab, args.every_ab, args.loss_data_only,
                  args.seed),
        Direction(args.delay_ms_ba / 1000, args.loss_ba, args.every_ba, args.loss_data_only,
                  args.seed + 1),
    ]
    pending: list[tuple[float, int, int, bytes]] = []
    sequence = 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    print("ready", flush=True)
    while not stop:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, frame = heapq.heappop(pending)
            ports[out].send(frame)
        timeout = max(0.0, pending[0][0] - now) if pending else 0.2
        try:
            readable, _, _ = select.select(ports, [], [], timeout)
        except InterruptedError:
            continue
        for sock in readable:
            index = ports.index(sock)
            direction = directions[index]
            while True:
                try:
                    frame, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                if direction.drops(frame):
                    direction.dropped += 1
                    continue
                direction.forwarded += 1
                sequence += 1
                heapq.heappush(pending, (time.monotonic() + direction.delay_s, sequence,
                                         1 - index, frame))
    return {
        "ab": {"forwarded": directions[0].forwarded, "dropped": directions[0].dropped},
        "ba": {"forwarded": directions[1].forwarded, "dropped": directions[1].dropped},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="interface towards side A")
    parser.add_argument("b", help="interface towards side B")
    parser.add_argument("--delay-ms-ab", type=float, default=0.0)
    parser.add_argument("--delay-ms-ba", type=float, default=0.0)
    parser.add_argument("--loss-ab", type=float, default=0.0, help="probability, 0..1")
    parser.add_argument("--loss-ba", type=float, default=0.0)
    parser.add_argument("--every-ab", type=int, default=0, help="drop every Nth eligible frame")
    parser.add_argument("--every-ba", type=int, default=0)
    parser.add_argument("--loss-data-only", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    counters = run(args)
    sys.stdout.write(json.dumps(counters) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
