"""Load for the kernel side of the agent, run inside a lab namespace (stdlib only).

    python kernel_load.py sockets N              create and close N UDP sockets: one
                                                 socket-release event each in the ring buffer
    python kernel_load.py datagrams ADDR PORT N  one 64-byte datagram to each of PORT..PORT+N-1,
                                                 each from its own socket: N flows at once
    python kernel_load.py hold N                 open N loopback TCP connections (2N sockets),
                                                 say so, and hold them until stdin closes

Prints one JSON line when done: {"event": "done", "count": N, "seconds": ...} (hold: when the
connections are open, then waits).
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import time


def sockets(count: int) -> None:
    for _ in range(count):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()


def datagrams(address: str, first_port: int, count: int) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    held = []  # open until the end: each socket's flow stays live meanwhile
    for port in range(first_port, first_port + count):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.sendto(b"x" * 64, (address, port))
        held.append(sock)
    for sock in held:
        sock.close()


def hold(count: int) -> list[socket.socket]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    held = [listener]
    for _ in range(count):
        held.append(socket.create_connection(listener.getsockname()))
        held.append(listener.accept()[0])
    return held


def main() -> None:
    started = time.monotonic()
    if sys.argv[1] == "sockets":
        count = int(sys.argv[2])
        sockets(count)
    elif sys.argv[1] == "datagrams":
        count = int(sys.argv[4])
        datagrams(sys.argv[2], int(sys.argv[3]), count)
    elif sys.argv[1] == "hold":
        count = int(sys.argv[2])
        held = hold(count)
    else:
        raise SystemExit(f"unknown load {sys.argv[1]!r}")
    print(json.dumps({"event": "done", "count": count,
                      "seconds": round(time.monotonic() - started, 3)}), flush=True)
    if sys.argv[1] == "hold":
        sys.stdin.read()
        for sock in held:
            sock.close()


if __name__ == "__main__":
    main()
