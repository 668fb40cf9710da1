"""The state socket protocol: a real unix socket, a synthetic flow table."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bridge.errors import UserError
from bridge.state import MAX_REQUEST, StateClient, StateError, StateServer
from bridge.top.view import CacheView
from tests.conftest import skip_or_fail
from tests.live.agent_process import flowbridge_argv
from tests.operator.test_top_model import view_of_observations, web_and_db


@pytest.fixture
def table() -> CacheView:
    return view_of_observations(web_and_db())


@pytest.fixture
def server(tmp_path: Path, table: CacheView):  # type: ignore[no-untyped-def]
    path = tmp_path / "run" / "state.sock"
    srv = StateServer(str(path), table, lambda: {"observations": 5, "source": {"events_lost": 0}})
    try:
        yield srv
    finally:
        srv.close()


def raw_exchange(path: str, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(5)
        conn.connect(path)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_snapshot_round_trip(server: StateServer) -> None:
    client = StateClient(server.path)
    try:
        hello = client.request("hello")
        assert hello["pid"] == os.getpid() and hello["flowbridge"] == 1
        snap = client.snapshot()
        again = client.snapshot()  # one connection, many requests
    finally:
        client.close()
    assert snap.agent == {"observations": 5}
    assert snap.source == {"events_lost": 0}
    by_port = {(f.direction, f.sport): f for f in snap.flows}
    assert len(by_port) == 5
    assert by_port[("out", 40000)].octets == 2_000
    assert by_port[("in", 443)].comm == "curl"
    assert len(again.flows) == 5
    assert server.requests == 3


def test_socket_is_root_only(server: StateServer) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(server.path)).st_mode) == 0o700


def test_bad_requests_get_one_error_line_each(server: StateServer) -> None:
    answers = raw_exchange(server.path, b'not json\n[1]\n{"request": "flows"}\n\n'
                           b'{"request": "hello"}\n')
    assert [a.get("error", "")[:24] for a in answers] == [
        "request is not JSON: Exp",
        "request must be a JSON o",
        "unknown request 'flows' ",
        "",
    ]
    assert answers[-1]["pid"] == os.getpid()


def test_overlong_request_closes_the_connection(server: StateServer) -> None:
    answers = raw_exchange(server.path, b"x" * (MAX_REQUEST + 10))
    assert answers == [{"flowbridge": 1, "error": f"request longer than {MAX_REQUEST} bytes"}]
    # The server is still there for the next client.
    assert raw_exchange(server.path, b'{"request":"hello"}\n')[0]["pid"] == os.getpid()


def test_second_agent_on_a_live_path_is_refused(server: StateServer, table: CacheView) -> None:
    with pytest.raises(UserError, match="another agent is serving it"):
        StateServer(server.path, table)


def test_stale_socket_file_is_replaced(tmp_path: Path, table: CacheView) -> None:
    path = tmp_path / "state.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens: an agent that died
    srv = StateServer(str(path), table)
    try:
        assert len(StateClient(str(path)).snapshot().flows) == 5
    finally:
        srv.close()
    assert not path.exists()  # removed at close


def test_client_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=r"no such socket: is `flowbridge run` running\?"):
        StateClient(str(tmp_path / "nothing.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "mute.sock"
    listener.bind(str(path))
    listener.listen(1)
    try:
        client = StateClient(str(path), timeout=5)
        conn, _ = listener.accept()
        conn.sendall(b'{"something": "else"}\n')
        with pytest.raises(StateError, match="not a flowbridge 1 state socket answer"):
            client.request("hello")
        conn.sendall(b'{"flowbridge": 1, "time_ms": 1, "flows": [{"netns": 1}]}\n')
        with pytest.raises(StateError, match="malformed snapshot"):
            client.snapshot()
        conn.close()
        with pytest.raises(StateError, match="closed the connection"):
            client.request("hello")
    finally:
        listener.close()


def test_other_users_are_refused_by_peer_credentials(table: CacheView) -> None:
    """Even if the file mode were loosened, a peer that is neither root nor the agent's user
    gets an error and nothing else."""
    if os.geteuid() != 0:
        skip_or_fail("needs root (connects as another user)")
    with tempfile.TemporaryDirectory(prefix="fb-state-") as directory:
        os.chmod(directory, 0o755)
        server = StateServer(os.path.join(directory, "state.sock"), table)
        try:
            os.chmod(server.path, 0o666)
            answer = _connect_as_nobody(server.path)
        finally:
            server.close()
    assert answer == {"flowbridge": 1, "error": "uid 65534 may not read the agent's state"}


def _connect_as_nobody(path: str) -> dict:
    # The agent refuses at accept and closes, possibly before the request is written: a
    # broken pipe then is expected, and the refusal is still there to read (as StateClient does).
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
        "try:\n    s.sendall(b'{\"request\":\"snapshot\"}\\n')\n"
        "except BrokenPipeError:\n    pass\n"
        "print(s.recv(65536).decode())\n"
    )
    # The real interpreter: a virtualenv may sit in a directory nobody cannot enter (tox: 0700).
    out = subprocess.run([os.path.realpath(sys.executable), "-S", "-c", code, path], user=65534,
                         group=65534, extra_groups=[], capture_output=True, text=True,
                         timeout=20, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_client_reads_a_refusal_sent_before_its_request(tmp_path: Path) -> None:
    """An agent that refuses a peer answers at once and closes: the client's request then
    meets a closed socket, and the refusal must still be what the user sees."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = tmp_path / "refusing.sock"
    listener.bind(str(path))
    listener.listen(1)
    try:
        client = StateClient(str(path), timeout=5)
        conn, _ = listener.accept()
        conn.sendall(b'{"flowbridge": 1, "error": "uid 1000 may not read the agent\'s state"}\n')
        conn.close()  # before the client sends anything: its send gets EPIPE
        with pytest.raises(StateError, match="the agent says: uid 1000 may not read"):
            client.request("snapshot")
        client.close()
    finally:
        listener.close()


def test_top_once_reads_an_agent(server: StateServer) -> None:
    """`flowbridge top --once` as a process, against the state socket."""
    out = subprocess.run(
        [*flowbridge_argv(), "top", "--once", "--interval", "0.2", "--view", "hosts",
         "--state-socket", server.path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"agent pid {os.getpid()} via {server.path}" in out.stdout
    assert "3 connections, 2 processes, 2 remote hosts" in out.stdout
    hosts = [line.split()[0] for line in out.stdout.splitlines()
             if line.startswith(("93.", "10."))]
    assert hosts == ["93.184.216.34", "10.0.0.9"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--svg", "x.svg"], "flowbridge: error: --svg FILE: only with --once"),
        (["--cgroup", "x"], "flowbridge: error: --cgroup: only with --local"),
        (["--once", "--state-socket", "/nonexistent/state.sock"],
         "flowbridge: error: state socket /nonexistent/state.sock: no such socket"),
    ],
)
def test_top_bad_input_is_one_line(args: list[str], message: str) -> None:
    out = subprocess.run([*flowbridge_argv(), "top", *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith(message)
    assert len(out.stderr.strip().splitlines()) == 1
