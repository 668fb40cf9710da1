"""replay -> export -> collect gives the input back; collect survives garbage; bad input is one
line and exit status 2. Everything stays on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FLOWBRIDGE = [sys.executable, "-c", "from bridge.cli import main; main()"]
ROOT = Path(__file__).resolve().parents[2]


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FLOWBRIDGE, *args], input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60
    )


class Collector:
    def __init__(self, listen: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*FLOWBRIDGE, "collect", "--listen", listen, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()  # "listening on": the socket is bound
        assert "listening on" in line, line

    def finish(self) -> tuple[str, str]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return out, err


def generated(count: int, profile: str, protocol: str = "ipfix", seed: int = 7) -> str:
    result = run(
        "generate",
        "--count",
        str(count),
        "--profile",
        profile,
        "--seed",
        str(seed),
        "--protocol",
        protocol,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize(
    ("protocol", "profile", "family"),
    [
        ("ipfix", "ntop", socket.AF_INET),
        ("v9", "ntop", socket.AF_INET),
        ("v5", "v5", socket.AF_INET),
        ("ipfix", "standard", socket.AF_INET6),
    ],
)
def test_replay_then_collect_is_an_identity(
    tmp_path: Path, protocol: str, profile: str, family: int
) -> None:
    lines = generated(120, profile, protocol)
    source = tmp_path / "flows.jsonl"
    source.write_text(lines)
    port = free_port(family)
    host = "[::1]" if family == socket.AF_INET6 else "127.0.0.1"
    collector = Collector(f"{host}:{port}", "--json", "--count", "120", "--timeout", "10")
    result = run(
        "replay",
        str(source),
        "--collector",
        f"{host}:{port}",
        "--protocol",
        protocol,
        "--profile",
        profile,
    )
    assert result.returncode == 0, result.stderr
    out, err = collector.finish()
    sent = [json.loads(line) for line in lines.splitlines()]
    got = [json.loads(line) for line in out.splitlines()]
    assert len(got) == len(sent) == 120
    for want, have in zip(sent, got, strict=True):
        assert {k: have[k] for k in want} == want  # every input field comes back unchanged
    assert "0 rejected," in err


def test_generate_is_deterministic_and_realistic() -> None:
    first = [json.loads(x) for x in generated(400, "ntop").splitlines()]
    again = [json.loads(x) for x in generated(400, "ntop").splitlines()]
    other = [json.loads(x) for x in generated(400, "ntop", seed=8).splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if "Milliseconds" not in k} for r in rs]  # noqa: E731
    assert strip(first) == strip(again) and strip(first) != strip(other)
    protocols = {r["protocolIdentifier"] for r in first}
    assert {6, 17} <= protocols and protocols & {1, 58}
    assert {r["ipVersion"] for r in first} == {4, 6}
    assert all(r["flowStartMilliseconds"] <= r["flowEndMilliseconds"] for r in first)
    assert all(40 <= r["octetDeltaCount"] / r["packetDeltaCount"] <= 1500 for r in first)
    v5 = [json.loads(x) for x in generated(100, "v5", "v5").splitlines()]
    assert all("sourceIPv4Address" in r for r in v5)


def test_generate_exports_at_a_rate() -> None:
    port = free_port()
    collector = Collector(f"127.0.0.1:{port}", "--json", "--count", "200", "--timeout", "10")
    started = time.monotonic()
    result = run(
        "generate",
        "--collector",
        f"127.0.0.1:{port}",
        "--count",
        "200",
        "--rate",
        "400",
        "--protocol",
        "v9",
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    out, _ = collector.finish()
    assert len(out.splitlines()) == 200
    assert elapsed >= 0.4  # 200 records at 400/s cannot take less than half a second


def test_collect_survives_garbage() -> None:
    port = free_port()
    collector = Collector(f"127.0.0.1:{port}", "--json", "--count", "3", "--timeout", "10")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for garbage in (b"", b"\x00", b"\x00\x0a\xff\xff", b"\x00\x09" + bytes(30), b"junk" * 99):
            s.sendto(garbage, ("127.0.0.1", port))
    lines = generated(3, "standard")
    source = "\n".join(lines.splitlines())
    result = run("replay", "-", "--collector", f"127.0.0.1:{port}", stdin=source)
    assert result.returncode == 0, result.stderr
    out, err = collector.finish()
    assert len(out.splitlines()) == 3
    warnings = [line for line in err.splitlines() if "warning" in line]
    # One line per reason: the second and third short datagrams come within the same 10 s.
    assert [w.split("(")[1].split(")")[0] for w in warnings] == ["short", "set", "version"]
    assert "127.0.0.1:" in warnings[0] and "0 bytes: too short for a version" in warnings[0]
    assert "5 rejected (set 1, short 3, version 1)" in err


def test_table_output() -> None:
    port = free_port()
    collector = Collector(f"127.0.0.1:{port}", "--count", "2", "--timeout", "10")
    source = "\n".join(generated(2, "standard").splitlines())
    assert run("replay", "-", "--collector", f"127.0.0.1:{port}", stdin=source).returncode == 0
    out, _ = collector.finish()
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["start", "dur(s)", "proto"]
    assert len(rows) == 2 and all(row.split()[3] in ("TCP", "UDP", "ICMP", "ICMP6") for row in rows)


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["replay", "-", "--collector", "nowhere"], "", "expected HOST:PORT"),
        (
            ["replay", "-", "--collector", "127.0.0.1:9"],
            '{"octetDeltaCont": 1}\n',
            "<stdin>:1: key 'octetDeltaCont': unknown information element",
        ),
        (["replay", "-", "--collector", "127.0.0.1:9"], "{}\n[1,\n", "<stdin>:2: not JSON"),
        (
            ["replay", "-", "--collector", "127.0.0.1:9"],
            '{"sourceIPv4Address": "::1"}\n',
            "wrong address family",
        ),
        (["replay", "-", "--collector", "127.0.0.1:9", "--profile", "nope"], "", "no such shipped"),
        (
            ["replay", "-", "--collector", "127.0.0.1:9", "--protocol", "v5", "--profile", "ntop"],
            "",
            "not v5",
        ),
        (["collect", "--listen", "256.0.0.1:1", "--timeout", "1"], "", "--listen 256.0.0.1:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], stdin: str, message: str) -> None:
    result = run(*args, stdin=stdin)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_collect_listens_on_loopback_unless_told() -> None:
    result = run("collect", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "[default: 127.0.0.1:4739]" in text
    assert "0.0.0.0:PORT for every IPv4 address" in text and "[::]:PORT" in text
    assert "4096 templates" in text and "SIGTERM" in text


def test_collect_leaves_quietly_when_its_reader_does() -> None:
    """`collect --json | head -1`: a closed stdout ends collect with its summary, no traceback."""
    port = free_port()
    script = (
        f"{' '.join(FLOWBRIDGE[:2])} '{FLOWBRIDGE[2]}' collect --listen 127.0.0.1:{port} --json "
        "--timeout 120 | head -1"
    )
    shell = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert shell.stderr is not None and "listening on" in shell.stderr.readline()
    source = "\n".join(generated(5, "standard").splitlines())
    for _ in range(60):  # until collect writes after head has gone (then it must end)
        assert run("replay", "-", "--collector", f"127.0.0.1:{port}", stdin=source).returncode == 0
        if shell.poll() is not None:
            break
        time.sleep(0.5)
    out, err = shell.communicate(timeout=60)
    assert len(out.splitlines()) == 1 and json.loads(out)
    assert "Traceback" not in err and "flow records" in err
