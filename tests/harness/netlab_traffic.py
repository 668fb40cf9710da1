"""Traffic generator run as its own process inside a lab namespace (stdlib only, no imports of
the project).

Each role renames itself (prctl PR_SET_NAME) before opening any socket, so the kernel's `comm`
for every packet and socket hook is the distinctive name the test chose. It reports what it did as
JSON lines on stdout: {"event": "ready"|"connected"|"holding"|"done", ...}. The test side of this
protocol is tests/harness/netlab_proc.py.

TCP exchange: `--rounds 1000:0,0:5000` means the client sends 1000 bytes, the server reads them
all, then sends 0; next round the client sends 0 and the server 5000. Then the connection ends as
`--ending` says: fin-client / fin-server (that side closes first, the other waits for EOF and
closes) or rst-client / rst-server (that side aborts with SO_LINGER 0 once everything it sent has
been acknowledged, so the reset discards no data and the byte counts stay deterministic).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import socket
import struct
import sys
import termios
import time

PR_SET_NAME = 15
CHUNK = 65536


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def emit(event: str, **fields: object) -> None:
    fields.update(event=event, pid=os.getpid(), comm=_comm())
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _comm() -> str:
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


def parse_rounds(text: str) -> list[tuple[int, int]]:
    rounds = []
    for part in text.split(","):
        up, down = part.split(":")
        rounds.append((int(up), int(down)))
    return rounds


def family_of(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def send_exact(sock: socket.socket, count: int) -> int:
    block = b"x" * min(count, CHUNK)
    left = count
    while left:
        left -= sock.send(block[: min(left, CHUNK)])
    return count


def recv_exact(sock: socket.socket, count: int) -> int:
    got = 0
    while got < count:
        data = sock.recv(min(CHUNK, count - got))
        if not data:
            raise ConnectionError(f"EOF after {got} of {count} bytes")
        got += len(data)
    return got


def wait_until_acked(sock: socket.socket, timeout_s: float = 10.0) -> None:
    """A linger-0 close drops unacknowledged data: wait until the send queue is empty first."""
    deadline = time.monotonic() + timeout_s
    while True:
        queued = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
        if queued == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queued} bytes still unacknowledged")
        time.sleep(0.001)


def finish(sock: socket.socket, side: str, ending: str) -> str:
    """End the connection; returns how it ended from this side's point of view."""
    how, who = ending.split("-")
    if who == side:
        if how == "rst":
            wait_until_acked(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        return "closed-first" if how == "fin" else "reset-sent"
    try:
        while sock.recv(CHUNK):
            pass  # the first closer sends nothing more; anything else is a protocol error
        result = "eof"
    except ConnectionResetError:
        result = "reset-received"
    sock.close()
    return result


def tcp_info(sock: socket.socket) -> dict[str, int]:
    """The kernel's own view of the connection (struct tcp_info, include/uapi/linux/tcp.h)."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    fields = {"rtt_us": ("I", 68), "total_retrans": ("I", 100), "segs_out": ("I", 136),
              "segs_in": ("I", 140), "min_rtt_us": ("I", 148), "bytes_retrans": ("Q", 208)}
    return {name: struct.unpack_from(fmt, raw, offset)[0]
            for name, (fmt, offset) in fields.items() if len(raw) >= offset + 8}


def endpoint_fields(sock: socket.socket) -> dict[str, object]:
    local, remote = sock.getsockname(), sock.getpeername()
    return {"local": [local[0], local[1]], "remote": [remote[0], remote[1]]}


def exchange(sock: socket.socket, side: str, rounds: list[tuple[int, int]], hold: bool) -> tuple:
    sent = received = 0
    for index, (up, down) in enumerate(rounds):
        if hold and index > 0 and side == "client":
            emit("holding", **endpoint_fields(sock), sent=sent, received=received)
            sys.stdin.readline()
        if side == "client":
            sent += send_exact(sock, up)
            received += recv_exact(sock, down)
        else:
            received += recv_exact(sock, up)
            sent += send_exact(sock, down)
    return sent, received


def tcp_server(args: argparse.Namespace) -> None:
    listener = socket.socket(family_of(args.bind), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.bind, args.port))
    listener.listen(16)
    emit("ready", port=listener.getsockname()[1])
    listener.settimeout(args.timeout)
    sock, _ = listener.accept()
    listener.close()
    sock.settimeout(args.timeout)
    fields = endpoint_fields(sock)
    emit("connected", **fields)
    sent, received = exchange(sock, "server", parse_rounds(args.rounds), hold=False)
    info = tcp_info(sock)
    result = finish(sock, "server", args.ending)
    emit("done", **fields, sent=sent, received=received, result=result, tcp_info=info)


def tcp_client(args: argparse.Namespace) -> None:
    sock = socket.socket(family_of(args.connect), socket.SOCK_STREAM)
    sock.settimeout(args.timeout)
    sock.connect((args.connect, args.port))
    fields = endpoint_fields(sock)
    emit("connected", **fields)
    sent, received = exchange(sock, "client", parse_rounds(args.rounds), hold=args.hold)
    info = tcp_info(sock)
    result = finish(sock, "client", args.ending)
    emit("done", **fields, sent=sent, received=received, result=result, tcp_info=info)


def udp_server(args: argparse.Namespace) -> None:
    sock = socket.socket(family_of(args.bind), socket.SOCK_DGRAM)
    sock.bind((args.bind, args.port))
    emit("ready", port=sock.getsockname()[1])
    sock.settimeout(args.timeout)
    sizes = []
    while len(sizes) < args.count:
        data, peer = sock.recvfrom(CHUNK)
        sizes.append(len(data))
        if args.echo:
            sock.sendto(data, peer)
    emit("done", local=[args.bind, sock.getsockname()[1]], remote=[peer[0], peer[1]],
         received_sizes=sizes, sent_sizes=sizes if args.echo else [])


def udp_client(args: argparse.Namespace) -> None:
    sock = socket.socket(family_of(args.connect), socket.SOCK_DGRAM)
    sock.settimeout(args.timeout)
    sock.connect((args.connect, args.port))
    fields = endpoint_fields(sock)
    emit("connected", **fields)
    sizes = [int(s) for s in args.sizes.split(",")]
    echoed = []
    for size in sizes:
        sock.send(b"u" * size)
        if args.echo:
            echoed.append(len(sock.recv(CHUNK)))
        elif args.gap_ms:
            time.sleep(args.gap_ms / 1000)
    sock.close()
    emit("done", **fields, sent_sizes=sizes, received_sizes=echoed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["tcp-server", "tcp-client", "udp-server", "udp-client"])
    parser.add_argument("--name", required=True, help="comm of this process (<= 15 chars)")
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--connect")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rounds", default="0:0")
    parser.add_argument("--ending", default="fin-client",
                        choices=["fin-client", "fin-server", "rst-client", "rst-server"])
    parser.add_argument("--hold", action="store_true", help="wait for a stdin line between rounds")
    parser.add_argument("--sizes", default="100", help="UDP payload sizes, comma separated")
    parser.add_argument("--count", type=int, default=1, help="UDP datagrams the server expects")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    set_comm(args.name)
    roles = {"tcp-server": tcp_server, "tcp-client": tcp_client,
             "udp-server": udp_server, "udp-client": udp_client}
    roles[args.role](args)


if __name__ == "__main__":
    main()
