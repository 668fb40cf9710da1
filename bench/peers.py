"""Packet-capture flow exporters to compare with flowbridge on the same load (issue 6): softflowd
and pmacctd (its nfprobe plugin), both from Debian, both capturing on lo with libpcap and
exporting IPFIX to an nfcapd of their own.

Settings beyond their defaults, each for a reason: TCP flows end 1 s after a FIN or RST and the
expiry runs every second (their defaults, 300/120/60 s, would hold every flow of a short run
until the final flush); room for 65536 flows like flowbridge's default map (their default 8192
would force early expiry, which is not loss but not the same load either); their own export
port is filtered out of the capture (they would otherwise count their own datagrams).
After the load each is asked to export what it holds (softflowd needs `softflowctl
expire-all`; pmacctd's nfprobe expires on its timeouts and flushes on SIGTERM).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from abc import ABC, abstractmethod
from pathlib import Path

from bench.process import BenchProcess


class CaptureExporter(BenchProcess, ABC):
    """One packet-capture exporter as a context manager; `pid` is its main process."""

    name = ""
    binary = ""

    def __init__(self, collector: tuple[str, int], workdir: Path) -> None:
        self.collector = collector
        self.workdir = workdir / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(self.workdir / "log")

    @classmethod
    def available(cls) -> bool:
        return shutil.which(cls.binary) is not None

    @abstractmethod
    def argv(self) -> list[str]:
        """The command line (writing any configuration file it names)."""

    def flush(self) -> None:  # noqa: B027 - most exporters flush on their own
        """Export what it still holds (after the load; its CPU for that still counts)."""

    def capture_filter(self) -> str:
        return f"not (udp and port {self.collector[1]})"

    def __enter__(self) -> CaptureExporter:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=log)
        time.sleep(1.0)  # pcap open and filter compile; a failure shows as an exit
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited at start: {self.log()[-1500:]}")
        return self


class Softflowd(CaptureExporter):
    name = binary = "softflowd"

    def argv(self) -> list[str]:
        host, port = self.collector
        return [
            "softflowd",
            "-d",
            "-i",
            "lo",
            "-v",
            "10",
            "-n",
            f"{host}:{port}",
            "-m",
            "65536",
            "-t",
            "tcp.fin=1",
            "-t",
            "tcp.rst=1",
            "-t",
            "expint=1",
            "-p",
            str(self.workdir / "pid"),
            "-c",
            str(self.workdir / "ctl"),
            self.capture_filter(),
        ]

    def flush(self) -> None:
        # softflowd 1.1.0 capturing on lo expired none of these closed connections by itself
        # (tcp.fin=1, expint=1: 0 expired after seconds) and exported nothing on SIGTERM or
        # `softflowctl shutdown`; `expire-all` exports them.
        ctl = ["softflowctl", "-c", str(self.workdir / "ctl")]
        with open(self.log_path, "ab") as log:
            for command in ("expire-all", "statistics"):
                subprocess.run([*ctl, command], stdout=log, stderr=log, timeout=60, check=False)


class Pmacctd(CaptureExporter):
    name = binary = "pmacctd"

    def argv(self) -> list[str]:
        host, port = self.collector
        config = self.workdir / "pmacctd.conf"
        config.write_text(
            "daemonize: false\n"
            "pcap_interface: lo\n"
            f"pcap_filter: {self.capture_filter()}\n"
            "plugins: nfprobe\n"
            f"nfprobe_receiver: {host}:{port}\n"
            "nfprobe_version: 10\n"
            "nfprobe_maxflows: 65536\n"
            "nfprobe_timeouts: tcp.fin=1:tcp.rst=1:expint=1\n"
            "aggregate: src_host, dst_host, src_port, dst_port, proto\n"
            f"pidfile: {self.workdir / 'pid'}\n"
        )
        return ["pmacctd", "-f", str(config)]


PEERS = (Softflowd, Pmacctd)
