"""`flowbridge run` as a process from a test: observations to replay, start and stop, the
metrics endpoint read back."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

FLOWBRIDGE = str(Path(sys.executable).with_name("flowbridge"))

LIVE = {
    "direction": "egress",
    "protocol": 6,
    "src": "10.0.0.1",
    "dst": "10.0.0.2",
    "sport": 40000,
    "dport": 443,
    "octets": 3000,
    "packets": 4,
    "tcp_flags": 24,
    "first_ms": -1000,
    "last_ms": -10,
}
ENDED = {
    "direction": "ingress",
    "protocol": 17,
    "src": "10.0.0.2",
    "dst": "10.0.0.1",
    "sport": 53,
    "dport": 41000,
    "octets": 120,
    "packets": 1,
    "first_ms": -500,
    "last_ms": -500,
    "end": "closed",
}


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def replay_file(tmp_path: Path, *observations: dict) -> str:
    path = tmp_path / "observations.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in observations))
    return str(path)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [FLOWBRIDGE, "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def metrics(port: int, timeout: float = 10) -> dict[str, float]:
    """The agent's metrics as {name{labels}: value}, once the endpoint answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_for(predicate: Callable[[], object], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def stop(process: subprocess.Popen) -> tuple[str, str]:
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "Traceback" not in err
    return out, err
