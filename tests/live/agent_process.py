"""`flowbridge run` as a real process for the live tests: start it, wait until it exports, stop it.

    with AgentProcess(["--config", str(path), "--active-timeout", "2"]) as agent:
        agent.wait_ready()        # "exporting to ..." logged: eBPF attached, exporters exist
        ...real traffic...
        agent.stop()              # SIGTERM: live flows exported as forced end, exit 0

stderr goes to a file read by `log()`, so a long run never blocks on a full pipe and a failing
test can show the agent's own words. `write_config` renders the TOML of bridge/config.py.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ebpf.compiler import COMPILE_TIMEOUT_S

READY_LINE = "exporting to "
# A deadline only (the wait ends at the ready line, or at once if the agent exits): the agent
# itself allows its bcc compile COMPILE_TIMEOUT_S. Start-up measured ~3 s on a quiet machine,
# 18-23 s with four busy loops on this 2-core VM, once 147 s with other benchmarks loading it
# as well; a 60 s deadline failed there.
READY_TIMEOUT_S = COMPILE_TIMEOUT_S + 60.0


def flowbridge_argv() -> list[str]:
    """The console script next to this interpreter (the project venv), else the same entry
    point through `-c` (there is no `python -m bridge.cli`)."""
    script = Path(sys.executable).parent / "flowbridge"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from bridge.cli import main; main()"]


def run_cli(args: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """One `flowbridge` command to completion (for bad-input tests)."""
    return subprocess.run([*flowbridge_argv(), *args], capture_output=True, text=True,
                          timeout=timeout)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, collectors: Sequence[Mapping[str, object]],
                 **agent: object) -> Path:
    """A config file: agent-wide keys first, then one [[collector]] table each."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in agent.items()]
    for collector in collectors:
        lines += ["", "[[collector]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in collector.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentError(RuntimeError):
    """The agent did not start, exited early, or did not stop cleanly."""


class AgentProcess:
    def __init__(self, args: Sequence[str], workdir: Path | None = None):
        self.args = list(args)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fb-agent-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.stderr_path = self.workdir / "agent.stderr"
        self.stdout_path = self.workdir / "agent.stdout"
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.stopped_at: float | None = None  # time.time() when the stop signal was sent

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> AgentProcess:
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.process = subprocess.Popen(
                [*flowbridge_argv(), "run", *self.args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> AgentProcess:
        """Until the agent logs that it exports (bcc compiles for seconds before that)."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log():
            if not self.running():
                raise AgentError(f"flowbridge run exited {self.process.returncode} "  # type: ignore[union-attr]
                                 f"before exporting:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AgentError(f"flowbridge run not ready in {timeout:g}s:\n"
                                 f"{self.log()[-3000:]}")
            time.sleep(0.05)
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the agent and wait for it; returns its exit status (idempotent)."""
        if self.process is None:
            raise AgentError("the agent was never started")
        if self.returncode is not None:
            return self.returncode
        if self.process.poll() is None:
            self.stopped_at = time.time()
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AgentError(f"flowbridge run ignored signal {sig} for {timeout:g}s:\n"
                                 f"{self.log()[-3000:]}") from None
        self.returncode = self.process.returncode
        return self.returncode

    def close(self) -> None:
        """Stop whatever happened (a test failure must not leave an agent attached)."""
        if self.process is not None and self.returncode is None:
            with contextlib.suppress(AgentError):
                self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it said --------------------------------------------------------------------------
    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def problems(self) -> list[str]:
        """Tracebacks and ERROR lines in the agent's log: a clean run has none."""
        text = self.log()
        found = [line for line in text.splitlines() if " ERROR " in line or "CRITICAL" in line]
        if "Traceback" in text:
            found.append("Traceback in the agent's stderr:\n" + text[text.index("Traceback"):])
        return found
