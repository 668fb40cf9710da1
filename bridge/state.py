"""The agent's local state socket: what `flowbridge top` reads from a running `flowbridge run`.

A unix stream socket (default /run/flowbridge/state.sock, mode 0600, in a 0700 directory, so
root only; the peer's uid is checked again with SO_PEERCRED). JSON lines both ways: the client
sends one request object per line, the server answers each with one object on one line.

    -> {"request": "hello"}
    <- {"flowbridge": 1, "pid": 4242, "version": "0.1.0"}
    -> {"request": "snapshot"}
    <- {"flowbridge": 1, "time_ms": 1700000000000, "agent": {...}, "source": {...},
        "flows": [{"netns": ..., "direction": "out", "protocol": 6, "src": "10.0.0.1", ...}]}
    -> {"request": "nonsense"}
    <- {"flowbridge": 1, "error": "unknown request 'nonsense' (hello, snapshot)"}

A flow is `bridge.top.view.FlowRow` as a JSON object. A request line longer than
MAX_REQUEST bytes, or not a JSON object, gets an error answer and the connection is closed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from bridge.errors import UserError
from bridge.top.view import CacheView, FlowRow

log = logging.getLogger("flowbridge.state")

PROTOCOL_VERSION = 1
DEFAULT_PATH = "/run/flowbridge/state.sock"
MAX_REQUEST = 4096
MAX_CLIENTS = 8


def _version() -> str:
    try:
        return metadata.version("flowbridge")
    except metadata.PackageNotFoundError:
        return "unknown"


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class StateServer:
    """Serves the flows (and facts about the agent) on a unix socket, on threads of its own."""

    def __init__(self, path: str, flows: CacheView,
                 agent_info: Callable[[], dict] = dict) -> None:
        self.path = path
        self.flows = flows
        self.agent_info = agent_info
        self.requests = 0
        self._sock = _listen(path)
        self._inode = os.stat(path).st_ino
        self._closing = threading.Event()
        self._clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._thread = threading.Thread(target=self._accept, name="flowbridge-state", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            if not self._clients.acquire(blocking=False):
                _send(conn, {"error": f"too many clients (at most {MAX_CLIENTS})"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="flowbridge-state-client",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            uid = _peer_uid(conn)
            if uid not in (0, os.geteuid()):
                _send(conn, {"error": f"uid {uid} may not read the agent's state"})
                return
            conn.settimeout(60)
            buffered = b""
            while not self._closing.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    if line.strip() and not _send(conn, self.answer(line)):
                        return
                if len(buffered) > MAX_REQUEST:
                    _send(conn, {"error": f"request longer than {MAX_REQUEST} bytes"})
                    return
        except OSError:
            return
        finally:
            conn.close()
            self._clients.release()

    def answer(self, line: bytes) -> dict:
        """The answer object to one request line (no trailing newline)."""
        self.requests += 1
        if len(line) > MAX_REQUEST:
            return {"error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return {"error": f"request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"error": "request must be a JSON object"}
        kind = request.get("request")
        if kind == "hello":
            return {"pid": os.getpid(), "version": _version()}
        if kind == "snapshot":
            return self.snapshot()
        return {"error": f"unknown request {kind!r} (hello, snapshot)"}

    def snapshot(self) -> dict:
        try:
            agent = self.agent_info()
        except Exception as exc:  # a racing reload must not kill the socket
            agent = {"error": str(exc)}
        source = agent.pop("source", None) if isinstance(agent, dict) else None
        return {
            "time_ms": int(time.time() * 1000),
            "agent": agent,
            "source": source,
            "flows": [row.to_json() for row in self.flows.rows()],
        }

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=2)
        # Only our own socket file: a newer agent may have taken the path meanwhile. After a
        # privilege drop the directory is not ours to write: the next start removes the file.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def _send(conn: socket.socket, obj: dict) -> bool:
    obj = {"flowbridge": PROTOCOL_VERSION, **obj}
    try:
        conn.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    except OSError:
        return False
    return True


def _listen(path: str) -> socket.socket:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"--state-socket {path}: cannot create {directory}: {exc.strerror}"
        ) from None
    if os.path.exists(path):
        if _is_live(path):
            raise UserError(f"--state-socket {path}: another agent is serving it")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by an agent that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise UserError(f"--state-socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    return sock


def _is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


# -- the client: `flowbridge top` -------------------------------------------------------------


@dataclass
class Snapshot:
    time_ms: int
    agent: dict
    source: dict | None
    flows: list[FlowRow]


class StateError(UserError):
    """No agent at the path, or an answer top cannot read."""


class StateClient:
    def __init__(self, path: str = DEFAULT_PATH, timeout: float = 10.0) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            why = {
                errno.ENOENT: "no such socket: is `flowbridge run` running?",
                errno.ECONNREFUSED: "nobody listens: the agent that made it has stopped",
                errno.EACCES: "permission denied: the state socket is root's",
            }.get(exc.errno or 0, exc.strerror)
            raise StateError(f"state socket {path}: {why}") from None
        self._buffer = b""

    def request(self, kind: str) -> dict:
        closed = StateError(f"state socket {self.path}: the agent closed the connection")
        try:
            self._sock.sendall(json.dumps({"request": kind}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The agent may answer and close before any request (a refused peer): what it
            # said is still queued here and is the answer, so read it rather than the pipe.
            pass
        except OSError as exc:
            raise StateError(f"state socket {self.path}: {exc.strerror or exc}") from None
        try:
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    raise closed
                self._buffer += chunk
        except ConnectionResetError:
            raise closed from None
        except OSError as exc:
            raise StateError(f"state socket {self.path}: {exc.strerror or exc}") from None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise StateError(f"state socket {self.path}: answer is not JSON: {exc}") from None
        if not isinstance(answer, dict) or answer.get("flowbridge") != PROTOCOL_VERSION:
            raise StateError(f"state socket {self.path}: not a flowbridge {PROTOCOL_VERSION} "
                             "state socket answer")
        if "error" in answer:
            raise StateError(f"state socket {self.path}: the agent says: {answer['error']}")
        return answer

    def snapshot(self) -> Snapshot:
        answer = self.request("snapshot")
        try:
            flows = [FlowRow.from_json(obj) for obj in answer["flows"]]
            return Snapshot(int(answer["time_ms"]), answer.get("agent") or {},
                            answer.get("source"), flows)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"state socket {self.path}: malformed snapshot: {exc!r}") from None

    def close(self) -> None:
        self._sock.close()


# -- the agent's side: hooks called by `flowbridge run` ----------------------------------------


def view_of(agent) -> CacheView:  # type: ignore[no-untyped-def]
    """Top's view of the agent's cache (to be handed the records that leave it)."""
    from bridge.containers import CgroupResolver

    return CacheView(agent.cache, agent.cache_lock, resolver=CgroupResolver(),
                     clock_ms=lambda: int(agent.clock() * 1000))  # the clock records are timed by


def agent_info(agent) -> dict:  # type: ignore[no-untyped-def]
    """What top shows about the running agent (read from its public attributes)."""
    stats = agent.source_stats
    return {
        "pid": os.getpid(),
        "uid": os.geteuid(),
        "observations": agent.observations,
        "cache_flows": len(agent.cache),
        "exporters": [{"name": e.name, "records": e.records_exported} for e in agent.exporters],
        "source": dataclasses.asdict(stats) if stats is not None else None,
    }


def serve_for_agent(path: str, agent, explicit: bool) -> StateServer | None:  # type: ignore[no-untyped-def]
    """Starts the state socket; a default path that cannot be served only warns, since
    exporting flows matters more than `top`."""
    view = view_of(agent)
    try:
        server = StateServer(path, view, lambda: agent_info(agent))
    except UserError as exc:
        if explicit:
            raise
        log.warning("no state socket for `flowbridge top`: %s", exc)
        return None
    agent.on_records = view.records_left
    log.info("state for `flowbridge top` on %s", path)
    return server
