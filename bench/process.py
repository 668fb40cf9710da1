"""A benchmarked process (an exporter under load): its pid, CPU time, log and a graceful stop."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from bench.cpu import tree_cpu_seconds


class BenchProcess:
    """Subclasses start `self.process` in __enter__, writing its output to `self.log_path`."""

    stop_timeout_s = 30.0  # SIGTERM, then SIGKILL: an exporter may flush what it holds first

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
