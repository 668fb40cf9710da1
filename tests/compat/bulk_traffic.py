"""Many TCP connections from one process, run inside a lab namespace (stdlib only).

netlab_traffic.py starts one process per connection: right for a handful, far too slow for the
thousands of short connections that exercise message packing and sequence numbers. Here one
server process accepts `--count` connections one after the other and one client process opens
them, `--gap-ms` apart; each connection carries `--request` bytes up and `--response` bytes
down, then the client closes first (FIN). With `--chunks N --interval-ms T` the client sends its
request in N pieces T ms apart: one connection longer than the agent's active timeout.

Both report as JSON lines on stdout ({"event": "ready" | "done", "pid", "comm", ...}), under the
`comm` the test chose (prctl PR_SET_NAME before any socket exists).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import sys
import time

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NAME)")


def emit(event: str, **fields: object) -> None:
    with open(f"/proc/{os.getpid()}/comm") as comm:
        fields.update(event=event, pid=os.getpid(), comm=comm.read().strip())
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def recv_exact(sock: socket.socket, count: int) -> None:
    while count:
        data = sock.recv(min(count, 65536))
        if not data:
            raise ConnectionError(f"EOF with {count} bytes still expected")
        count -= len(data)


def serve(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.address, 0))
    listener.listen(1024)
    listener.settimeout(args.timeout)
    emit("ready", port=listener.getsockname()[1])
    for _ in range(args.count):
        sock, _peer = listener.accept()
        with sock:
            recv_exact(sock, args.request)
            sock.sendall(b"s" * args.response)
            while sock.recv(65536):  # until the client's FIN
                pass
    emit("done", count=args.count)


def connect(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in args.address else socket.AF_INET
    ports = []
    for number in range(args.count):
        if number and args.gap_ms:
            time.sleep(args.gap_ms / 1000)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(args.timeout)
        sock.connect((args.address, args.port))
        ports.append(sock.getsockname()[1])
        piece = args.request // args.chunks
        for index in range(args.chunks):
            if index:
                time.sleep(args.interval_ms / 1000)
            last = index == args.chunks - 1
            sock.sendall(b"c" * (args.request - piece * index if last else piece))
        recv_exact(sock, args.response)
        sock.close()
    emit("done", count=args.count, ports=ports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("--name", required=True, help="comm of this process (<= 15 chars)")
    parser.add_argument("--address", required=True, help="server address (bind or connect)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--request", type=int, default=100)
    parser.add_argument("--response", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between connections")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    set_comm(args.name)
    serve(args) if args.role == "server" else connect(args)


if __name__ == "__main__":
    main()
