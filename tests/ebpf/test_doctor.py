"""`flowbridge doctor`: what works, what does not and the fix; non-zero exit when the agent
cannot run."""

from __future__ import annotations

import os

from click.testing import CliRunner

from bridge.cli import cli
from ebpf import preflight
from ebpf.errors import EbpfUnavailable


def run_doctor() -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["doctor"])
    return result.exit_code, result.output


def test_doctor_passes_on_a_capable_host(needs_root):
    code, output = run_doctor()
    assert code == 0, output
    for name in ("kernel", "privileges", "cgroup v2", "bcc", "kernel headers", "tracefs",
                 "hook sock_ops", "hook connect4", "hook sock_create", "hook sock_release",
                 "hook tracepoint tcp:tcp_destroy_sock", "hook TCX (interface counting)",
                 "run --user (drop privileges)"):
        line = next((ln for ln in output.splitlines() if f"  {name}  " in ln + "  "), None)
        assert line is not None and line.startswith("ok"), f"{name}: {line}\n{output}"
    assert "flowbridge can run here" in output


def test_doctor_without_root_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, output = run_doctor()
    assert code == 1
    line = next(ln for ln in output.splitlines() if "privileges" in ln)
    assert line.startswith("FAIL") and "fix: run as root" in line
    assert "cannot run here" in output


def test_doctor_without_headers_names_the_package(monkeypatch):
    def missing():
        raise EbpfUnavailable("no kernel headers found for 6.18 nor any other kernel; install x")

    monkeypatch.setattr(preflight, "find_headers", missing)
    code, output = run_doctor()
    assert code == 1
    line = next(ln for ln in output.splitlines() if "kernel headers" in ln)
    assert line.startswith("FAIL") and "linux-headers" in line


def test_doctor_on_an_old_kernel_fails(monkeypatch):
    monkeypatch.setattr(preflight.platform, "release", lambda: "5.10.0-20-amd64")
    checks = {c.name: c for c in preflight.run_checks()}
    assert not checks["kernel"].ok and "6.6" in checks["kernel"].fix
    assert not checks["BPF programs"].ok  # not tried after a failed requirement
