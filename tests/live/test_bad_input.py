"""Bad flags, config files and profiles given to `flowbridge run`: exit status 2 and one line on
stderr that names what is wrong and where, never a traceback. The agent runs as a process, as a
user would run it. Config and flag errors come before any BPF is loaded; profile errors come when
the exporters are built, after the eBPF programs are loaded, so those cases need root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.live.agent_process import run_cli
from tests.live.conftest import require_live

CONFIG_TYPO = "active_timeout = 60\nactiv_timeout = 5\n"
COLLECTOR_TYPO = '[[collector]]\naddress = "127.0.0.1:9"\n\n[[collector]]\nadress = "127.0.0.1:9"\n'
PROFILE_TYPO = (
    'name = "typo"\nprotocols = ["ipfix"]\nfields = [\n    "sourceIPv4Address",\n'
    '    "octetDeltaCountt",\n]\n'
)


def one_error_line(args: list[str]) -> str:
    done = run_cli(["run", *args])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, f"exit {done.returncode}: {done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{done.stderr}"
    assert lines[0].startswith("flowbridge: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "args,names",
    [
        (["--collector", "nohost"], ["--collector", "'nohost'", "HOST:PORT"]),
        (["--collector", "127.0.0.1:70000"], ["--collector", "70000", "1-65535"]),
        (["--active-timeout", "abc"], ["--active-timeout", "'abc'", "number"]),
        (["--active-timeout", "10", "--idle-timeout", "30"], ["idle timeout", "30", "10"]),
        (["--protocol", "v7", "--collector", "127.0.0.1:9"], ["--protocol", "'v7'"]),
        (["--transport", "sctp", "--collector", "127.0.0.1:9"], ["--transport", "'sctp'"]),
    ],
    ids=["no-port", "port-range", "timeout-text", "idle-over-active", "protocol", "transport"],
)
def test_bad_flag(args: list[str], names: list[str]) -> None:
    line = one_error_line(args)
    missing = [n for n in names if n not in line]
    assert not missing, f"{line!r} does not name {missing}"


@pytest.mark.parametrize(
    "text,where",
    [
        (CONFIG_TYPO, [":2:", "unknown key 'activ_timeout'"]),
        (COLLECTOR_TYPO, [":5:", "collector #2", "unknown key 'adress'"]),
        ("active_timeout = -1\n", [":1:", "active_timeout", "-1"]),
        ("[[collector]]\naddress = 4739\n", [":2:", "collector #1", "4739"]),
        ("active_timeout = \n", [":1:", "invalid TOML"]),
        ("idle_timeout = 5\nkernel_max_flows = 8\n", [":2:", "kernel_max_flows", "16..", "8"]),
    ],
    ids=["agent-key", "collector-key", "negative-timeout", "address-type", "syntax",
         "kernel-map-size"],
)
def test_bad_config(tmp_path: Path, text: str, where: list[str]) -> None:
    path = tmp_path / "flowbridge.toml"
    path.write_text(text)
    line = one_error_line(["--config", str(path)])
    missing = [n for n in [str(path), *where] if n not in line]
    assert not missing, f"{line!r} does not name {missing}"


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    line = one_error_line(["--config", str(path)])
    assert str(path) in line and "cannot read" in line, line


@pytest.mark.root
@pytest.mark.parametrize(
    "content,where",
    [
        (None, ["profile file not found"]),
        (PROFILE_TYPO, [":5:", "'octetDeltaCountt'", "unknown information element"]),
    ],
    ids=["missing", "unknown-element"],
)
def test_bad_profile(tmp_path: Path, content: str | None, where: list[str]) -> None:
    require_live()
    path = tmp_path / "profile.toml"
    if content is not None:
        path.write_text(content)
    line = one_error_line(["--collector", "127.0.0.1:9", "--profile", str(path)])
    missing = [n for n in [str(path), "127.0.0.1:9", *where] if n not in line]
    assert not missing, f"{line!r} does not name {missing}"
