"""Idle loopback TCP connections held open, for bench.scale: many, in one network namespace.

    python -m bench.idle_connections CONNECTIONS   (run it in a fresh namespace)

Says "netns", waits for "go" on stdin (the agent attaches its counting programs meanwhile),
opens the connections, sends one byte each way on each, says "ready N" and holds them until
stdin closes. One process may hold as many as its hard open-file limit allows (20,000 in the
project's sandbox, which lacks CAP_SYS_RESOURCE to raise it): the connections are shared out
among child processes (`--part N`), each with a listener of its own.
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import subprocess
import sys
import time

PER_LISTENER = 25_000  # below the 28,232 ephemeral ports of one (address, port) destination


def hold(connections: int) -> None:
    """In a fresh network namespace: say so, wait for "go" on stdin (the agent has attached its
    counting programs here by then), open `connections` loopback TCP connections from as many
    child processes as the open-file limit asks for, say so, and keep them until stdin closes."""
    print("netns", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    per_process = min(PER_LISTENER, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1024) // 2)
    shares = [min(per_process, connections - at) for at in range(0, connections, per_process)]
    parts = [
        subprocess.Popen([sys.executable, "-m", "bench.idle_connections", "--part", str(share)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for share in shares
    ]
    held = 0
    for part in parts:
        ready = part.stdout.readline().split()  # type: ignore[union-attr]
        held += int(ready[1]) if len(ready) == 2 else 0
    print(f"ready {held}", flush=True)
    sys.stdin.read()
    for part in parts:
        part.stdin.close()  # type: ignore[union-attr]
        part.wait(60)


def hold_part(connections: int) -> None:
    """Open `connections` loopback TCP connections to a listener of its own, send a byte each
    way on each, say so, and keep them until stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * connections + 64)), hard))
    listeners = []
    for _ in range(-(-connections // PER_LISTENER)):  # one, as hold() shares them out
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        listener.setblocking(False)
        listeners.append(listener)
    clients, servers = [], []

    def accept_all() -> None:
        for listener in listeners:
            while True:
                try:
                    servers.append(listener.accept()[0])
                except BlockingIOError:
                    break

    for i in range(connections):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(listeners[i // PER_LISTENER].getsockname())
        clients.append(client)
        if i % 1000 == 999:
            accept_all()
    selector = selectors.DefaultSelector()
    for listener in listeners:
        selector.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + 60
    while len(servers) < connections and time.monotonic() < deadline:
        selector.select(0.5)
        accept_all()
    for server, client in zip(servers, clients, strict=False):  # a packet of data each way
        server.send(b"s")
        client.send(b"c")
    print(f"ready {len(servers)}", flush=True)
    sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int)
    parser.add_argument("--part", action="store_true", help="one share, in this process")
    args = parser.parse_args()
    if args.part:
        hold_part(args.connections)
    else:
        hold(args.connections)


if __name__ == "__main__":
    main()
