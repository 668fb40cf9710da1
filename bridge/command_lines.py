"""Process command lines for SRC/DST_PROC_CMDLINE, read only when the operator asked for them.

A command line can hold secrets (`mysql -pSECRET`, tokens in URLs), so the agent builds a
`CommandLines` only when the configuration says `export_command_lines = true`; without it nothing
reads /proc/<pid>/cmdline. The line is read once, the first time a process is seen, and cached per
(pid, comm): a pid the kernel reuses for another program (another comm) is read again, and so is
a process after its exec (the comm changes with it).

/proc/<pid>/cmdline holds the arguments NUL-separated; they are joined with spaces, as `ps -o
args` shows them, and cut to the element's length on a character boundary (IPFIX would carry a
variable-length string of any size; a message must still hold the record).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from ipfix.elements import BY_NAME, VARIABLE_LENGTH
from ipfix.errors import IpfixError
from ipfix.profile import Profile, load_profile

ELEMENTS = ("SRC_PROC_CMDLINE", "DST_PROC_CMDLINE")
# Processes remembered; past this many (processes come and go) start afresh.
CAPACITY = 4096


class CommandLines:
    """(pid, comm) -> the process's command line, "" when it cannot be read (the process has
    exited, a kernel thread, no permission). Thread-safe enough: a race reads a line twice."""

    def __init__(self, limit: int, proc: str = "/proc", capacity: int = CAPACITY) -> None:
        self.limit = limit
        self.proc = Path(proc)
        self.capacity = capacity
        self._known: dict[tuple[int, str], str] = {}
        self._lock = threading.Lock()
        self.reads = 0

    def __call__(self, pid: int, comm: str) -> str:
        key = (pid, comm)
        found = self._known.get(key)
        if found is not None:
            return found
        line = self._read(pid)
        with self._lock:
            if len(self._known) >= self.capacity:
                self._known.clear()
            self._known[key] = line
        return line

    def _read(self, pid: int) -> str:
        self.reads += 1
        try:
            with open(self.proc / str(pid) / "cmdline", "rb") as f:
                raw = f.read(self.limit + 1)  # one more: whether a trailing NUL ends it
        except OSError:
            return ""
        text = raw.rstrip(b"\0").replace(b"\0", b" ")[: self.limit]
        return text.decode("utf-8", errors="ignore")  # a character cut at the limit is dropped


def command_line_limit(profiles: Iterable[Profile]) -> int:
    """How many bytes of a command line the profiles can carry: an explicit fixed length, else
    the element's NetFlow v9 length (IPFIX sends what it gets, variable-length)."""
    limit = 0
    for profile in profiles:
        for name in ELEMENTS:
            if name not in profile.fields:
                continue
            length = profile.lengths.get(name, VARIABLE_LENGTH)
            limit = max(limit, BY_NAME[name].v9_length if length == VARIABLE_LENGTH else length)
    return limit or BY_NAME[ELEMENTS[0]].v9_length


def command_lines_for(enabled: bool, profile_names: Iterable[str]) -> CommandLines | None:
    """The agent's reader, or None, and so no reading at all, unless the operator opted in
    (`export_command_lines`). A profile that cannot load is left to its exporter to report."""
    if not enabled:
        return None
    profiles = []
    for name in profile_names:
        try:
            profiles.append(load_profile(name))
        except IpfixError:
            continue
    return CommandLines(command_line_limit(profiles))
