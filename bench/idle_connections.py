"""Idle TCP connections held open, for bench.scale: many, over loopback or over a veth pair.

    python -m bench.idle_connections CONNECTIONS           (run it in a fresh namespace)
    python -m bench.idle_connections CONNECTIONS --veth    (root: makes two namespaces)

Says "netns" (with --veth: "netns PATH PATH", the two namespaces' files), waits for "go" on
stdin (the agent attaches its counting programs meanwhile), opens the connections, sends one
byte each way on each, says "ready N" and holds them until stdin closes. One process may hold
as many as its hard open-file limit allows (20,000 in the project's sandbox, which lacks
CAP_SYS_RESOURCE to raise it): the connections are shared out among child processes, each with
a listener of its own.

Loopback: both ends in one namespace, on `lo` (`--part N`). Veth: clients in one namespace,
servers in another, a veth pair between (`--serve N` / `--connect N --to ADDR:PORT`): each
socket's traffic crosses an interface of its own namespace both ways, as with a remote peer,
where on `lo` the kernel may count a connection once for both of its ends.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import subprocess
import sys
import time

PER_LISTENER = 25_000  # below the 28,232 ephemeral ports of one (address, port) destination
CLIENT_ADDR, SERVER_ADDR = "10.203.0.1", "10.203.0.2"


def per_process() -> int:
    """Connections one process holds (two sockets each on loopback, one with --veth)."""
    return min(PER_LISTENER, (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 1024) // 2)


def raise_open_files(sockets: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, sockets + 64)), hard))


def hold(connections: int) -> None:
    """In a fresh network namespace: say so, wait for "go" on stdin (the agent has attached its
    counting programs here by then), open `connections` loopback TCP connections from as many
    child processes as the open-file limit asks for, say so, and keep them until stdin closes."""
    print("netns", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    each = per_process()
    shares = [min(each, connections - at) for at in range(0, connections, each)]
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
    raise_open_files(2 * connections)
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


# -- over a veth pair ---------------------------------------------------------------------------


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def hold_veth(connections: int) -> None:
    """Two fresh named namespaces joined by a veth pair; the servers in one, the clients in the
    other, in child processes entered there (`ip netns exec`). Removed when stdin closes."""
    names = [f"fbscale-{os.getpid()}-clients", f"fbscale-{os.getpid()}-servers"]
    try:
        for name in names:
            ip("netns", "add", name)
            # No IPv6: its neighbour discovery would add flows the bench does not expect.
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True)
            ip("-n", name, "link", "set", "lo", "up")
        ip("link", "add", "fbs-c", "netns", names[0], "type", "veth", "peer", "name", "fbs-s",
           "netns", names[1])
        for name, dev, addr in ((names[0], "fbs-c", CLIENT_ADDR), (names[1], "fbs-s", SERVER_ADDR)):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
        print("netns " + " ".join(f"/run/netns/{name}" for name in names), flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        each = per_process()
        parts = []
        for at in range(0, connections, each):
            share = str(min(each, connections - at))
            server = subprocess.Popen(
                ["ip", "netns", "exec", names[1], sys.executable, "-m", "bench.idle_connections",
                 "--serve", share], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            port = server.stdout.readline().split()[-1].decode()  # type: ignore[union-attr]
            client = subprocess.Popen(
                ["ip", "netns", "exec", names[0], sys.executable, "-m", "bench.idle_connections",
                 "--connect", share, "--to", f"{SERVER_ADDR}:{port}"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            parts += [server, client]
        held = [part.stdout.readline().split() for part in parts]  # type: ignore[union-attr]
        servers = sum(int(ready[1]) for ready in held[::2] if len(ready) == 2)
        clients = sum(int(ready[1]) for ready in held[1::2] if len(ready) == 2)
        print(f"ready {min(servers, clients)}", flush=True)
        sys.stdin.read()
        for part in parts:
            part.stdin.close()  # type: ignore[union-attr]
            part.wait(60)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def serve(connections: int) -> None:
    """Say the listener's port; accept `connections`, read a byte and send one on each, say
    "ready N", hold them until stdin closes."""
    raise_open_files(connections + 1)
    listener = socket.socket()
    listener.bind((SERVER_ADDR, 0))
    listener.listen(4096)
    print(f"port {listener.getsockname()[1]}", flush=True)
    listener.settimeout(60)
    servers = []
    try:
        while len(servers) < connections:
            servers.append(listener.accept()[0])
    except TimeoutError:
        pass
    for server in servers:
        server.settimeout(60)
        server.recv(1)
        server.send(b"s")
    print(f"ready {len(servers)}", flush=True)
    sys.stdin.read()


def connect(connections: int, to: str) -> None:
    """Connect `connections` times to `to`, send a byte and read one on each, say "ready N",
    hold them until stdin closes."""
    raise_open_files(connections)
    host, port = to.rsplit(":", 1)
    clients = [socket.create_connection((host, int(port)), timeout=60)
               for _ in range(connections)]
    for client in clients:
        client.send(b"c")
    for client in clients:
        client.recv(1)
    print(f"ready {len(clients)}", flush=True)
    sys.stdin.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("connections", type=int)
    parser.add_argument("--part", action="store_true", help="one share, in this process")
    parser.add_argument("--veth", action="store_true", help="over a veth pair (root)")
    parser.add_argument("--serve", action="store_true", help="one share's servers (veth)")
    parser.add_argument("--connect", action="store_true", help="one share's clients (veth)")
    parser.add_argument("--to", help="--connect: the servers' ADDR:PORT")
    args = parser.parse_args()
    if args.part:
        hold_part(args.connections)
    elif args.serve:
        serve(args.connections)
    elif args.connect:
        connect(args.connections, args.to)
    elif args.veth:
        hold_veth(args.connections)
    else:
        hold(args.connections)


if __name__ == "__main__":
    main()
