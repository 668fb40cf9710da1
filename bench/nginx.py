"""An nginx with a configuration of its own in a temporary directory, and wrk to load it.

Used by bench/overhead.py: nginx answers a small fixed body on loopback and logs the client port
of every request, so the benchmark can check that every connection appears in the collector's
flows.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import children_cpu_seconds, tree_cpu_seconds

CONFIG = """\
daemon off;
master_process on;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    log_format bench '$remote_port $connection $connection_requests $status';
    access_log {root}/access.log bench;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ return 200 "flowbridge overhead benchmark\\n"; }}
    }}
}}
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    requests_per_s: float
    socket_errors: int
    non_2xx: int
    cpu_s: float = 0.0  # wrk's own user + system CPU


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nginx:
    """nginx on 127.0.0.1:<free port>, a context manager; `logged_connections()` reads its
    access log."""

    def __init__(self, workers: int = 1):
        if shutil.which("nginx") is None:
            raise RuntimeError("nginx is not installed")
        self.workers = workers
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fb-nginx-"))
        self.config = self.root / "nginx.conf"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        self.config.write_text(CONFIG.format(workers=self.workers, root=self.root, port=self.port))
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.root), "-c", str(self.config)], stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.process.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("nginx did not start listening")
        self.truncate_log()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def cpu_seconds(self) -> float:
        """CPU of the master and its workers so far (workers do the work)."""
        assert self.process is not None
        return tree_cpu_seconds(self.process.pid)

    def truncate_log(self) -> None:
        (self.root / "access.log").write_bytes(b"")

    @property
    def log_path(self) -> Path:
        return self.root / "access.log"

    def logged_connections(self) -> tuple[int, Counter[int]]:
        """(requests, connections per client port) logged since the last truncate_log(); a
        connection is nginx's connection serial number, so keep-alive requests count once."""
        requests, connections = 0, set()
        for line in (self.root / "access.log").read_bytes().splitlines():
            port, serial, _ = line.split(b" ", 2)
            requests += 1
            connections.add((int(port), int(serial)))
        return requests, Counter(port for port, _ in connections)


def wrk_argv(url: str, seconds: int, connections: int, close: bool, threads: int = 1
             ) -> list[str]:
    """wrk against url; close=True sends `Connection: close` (one connection per request)."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    return argv


def run_wrk(url: str, seconds: int, connections: int, close: bool, threads: int = 1) -> WrkResult:
    """wrk against url, to its end; its result and CPU."""
    argv = wrk_argv(url, seconds, connections, close, threads)
    cpu_before = children_cpu_seconds()
    out = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=seconds + 30
    ).stdout
    cpu = children_cpu_seconds() - cpu_before
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"unexpected wrk output: {out}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        int(total.group(1)),
        float(rate.group(1)),
        sum(map(int, errors.groups())) if errors else 0,
        int(non_2xx.group(1)) if non_2xx else 0,
        cpu,
    )
