"""The TCP collector process (tcp_collector.py) seen from a test: start, stop, kill, restart on
the same port, and what it decoded so far."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from ipfix.jsonform import record_from_json
from tests.harness.collector_common import Flow

SCRIPT = Path(__file__).with_name("tcp_collector.py")


class TcpStation:
    def __init__(self, port: int, out: Path):
        self.port, self.out = port, out
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> TcpStation:
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--port", str(self.port), "--out", str(self.out)],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":
            self.process.wait(10)
            raise RuntimeError(f"tcp_collector.py exited {self.process.returncode}")
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the connection is reset, whatever was in flight is gone."""
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGKILL)
            self.process.wait(10)

    def messages(self) -> list[dict]:
        try:
            text = self.out.read_text()
        except FileNotFoundError:
            return []
        # The last line may be half written while the collector runs.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def flows(self) -> list[Flow]:
        return [record_from_json(r) for m in self.messages() for r in m["records"]]
