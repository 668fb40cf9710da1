"""The refresh loop of `flowbridge top`: a feed of flow rows, the keyboard, a rich Live screen.

Two feeds give the same rows: `AgentFeed` asks a running agent over its state socket,
`LocalFeed` runs top's own eBPF collector into a flow cache of its own, read through the same
view as the agent's (its idle flows' kernel state is released as the agent's is; the records
the cache makes go nowhere but to the view).
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live

from bridge.cache import FlowCache
from bridge.state import StateClient
from bridge.top.model import SORTS, VIEWS, Frame, RateMeter, build_frame, connections
from bridge.top.render import render
from bridge.top.view import CacheView, FlowRow

VIEW_KEYS = {"f": "flows", "p": "processes", "h": "hosts"}
SORT_KEYS = {"b": "bytes", "a": "rate", "r": "retrans", "t": "rtt", "k": "packets"}
QUIT_KEYS = {"q", "Q", "\x1b"}


@dataclass
class Sample:
    rows: list[FlowRow]
    time_ms: int
    origin: str
    notes: list[str] = field(default_factory=list)


def source_notes(stats: dict | None) -> list[str]:
    """Kernel-side losses worth a line above the table: every loss is counted, none silent."""
    if not stats:
        return []
    notes = []
    if stats.get("map_full_drops"):
        notes.append(f"kernel flow map full: {stats['map_full_drops']} packets not tracked "
                     f"({stats.get('flows_in_map', '?')}/{stats.get('map_capacity', '?')} flows)")
    if stats.get("events_lost"):
        notes.append(f"kernel ring buffer: {stats['events_lost']} end-of-flow events lost")
    return notes


class AgentFeed:
    def __init__(self, path: str) -> None:
        self.client = StateClient(path)
        hello = self.client.request("hello")
        self.origin = f"agent pid {hello.get('pid')} via {path}"

    def sample(self) -> Sample:
        snap = self.client.snapshot()
        notes = source_notes(snap.source)
        return Sample(snap.flows, snap.time_ms, self.origin, notes)

    def close(self) -> None:
        self.client.close()


# Top's own cache: flows held at most, and no active timeout, as its records go nowhere.
LOCAL_MAX_FLOWS = 200_000
NO_ACTIVE_TIMEOUT_S = 10.0**9


class LocalFeed:
    def __init__(self, cgroup: str | None = None, idle_timeout_s: float = 15.0) -> None:
        from bridge.cli.run import open_source
        from bridge.containers import CgroupResolver

        self.source = open_source("ebpf", cgroup)
        self.cache = FlowCache(active_timeout=NO_ACTIVE_TIMEOUT_S, idle_timeout=idle_timeout_s,
                               max_flows=LOCAL_MAX_FLOWS)
        # Top's one thread both writes and reads: the lock is never contended.
        self.view = CacheView(self.cache, threading.Lock(), resolver=CgroupResolver(),
                              watched=True)
        self.origin = "own eBPF collector" + (f" (cgroup {cgroup})" if cgroup else "")

    def sample(self) -> Sample:
        observations = self.source.poll(0)
        now_ms = int(time.time() * 1000)
        records = self.cache.update(observations)
        records += self.cache.sweep(now_ms)
        self.view.records_left(records, now_ms)
        released = self.cache.take_released()
        if released:
            self.source.release(released)
        stats = self.source.stats()
        notes = source_notes(
            {"map_full_drops": stats.map_full_drops, "events_lost": stats.events_lost,
             "flows_in_map": stats.flows_in_map, "map_capacity": stats.map_capacity})
        if self.cache.evictions:
            notes.append(f"top's flow cache is full: {self.cache.evictions} flows evicted")
        return Sample(self.view.rows(), now_ms, self.origin, notes)

    def close(self) -> None:
        self.source.close()


class Keyboard:
    """Single key presses from a terminal (cbreak mode, restored on exit); nothing otherwise."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self._saved = None

    def __enter__(self) -> Keyboard:
        if self.fd is not None:
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None and self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout: float) -> str | None:
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return None
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return None
        return os.read(self.fd, 1).decode(errors="replace")


@dataclass
class Settings:
    view: str = "flows"
    sort: str = "bytes"
    interval: float = 1.0
    limit: int | None = None  # rows; None: as many as the terminal has lines for

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view {self.view!r}")
        if self.sort not in SORTS:
            raise ValueError(f"sort {self.sort!r}")

    def apply_key(self, key: str) -> bool:
        """Changes the view or the sort for a key; True when the key meant something."""
        if key in VIEW_KEYS:
            self.view = VIEW_KEYS[key]
        elif key in SORT_KEYS:
            self.sort = SORT_KEYS[key]
        else:
            return False
        return True


class Viewer:
    """Samples -> frames, keeping the rate meter between them."""

    def __init__(self, feed: AgentFeed | LocalFeed, settings: Settings) -> None:
        self.feed = feed
        self.settings = settings
        self.meter = RateMeter()
        self._last: tuple[dict, Sample] | None = None

    def next_frame(self, rows_room: int | None = None) -> Frame:
        sample = self.feed.sample()
        conns = connections(sample.rows)
        self.meter.apply(conns, sample.time_ms)
        self._last = (conns, sample)
        return self.frame(rows_room)

    def frame(self, rows_room: int | None = None) -> Frame:
        """The last sample in the current view and sort (after a key press: no new sample)."""
        assert self._last is not None
        conns, sample = self._last
        limit = self.settings.limit or rows_room
        return build_frame(conns, self.settings.view, self.settings.sort, sample.time_ms,
                           sample.origin, limit, sample.notes)


def frames(viewer: Viewer, count: int) -> Iterator[Frame]:
    """`count` frames, interval apart (the first one's rates are unknown: top just started)."""
    for index in range(count):
        if index:
            time.sleep(viewer.settings.interval)
        yield viewer.next_frame()


def run_interactive(viewer: Viewer, console: Console) -> None:
    """Until q, Escape or Ctrl-C; the terminal is restored whichever way it ends."""
    with Keyboard() as keys, Live(console=console, screen=True, auto_refresh=False,
                                  transient=True) as live:
        while True:
            room = max(3, console.height - 8)
            live.update(render(viewer.next_frame(room)), refresh=True)
            deadline = time.monotonic() + viewer.settings.interval
            while (remaining := deadline - time.monotonic()) > 0:
                key = keys.read(remaining)
                if key is None:
                    continue
                if key in QUIT_KEYS:
                    return
                if viewer.settings.apply_key(key):
                    live.update(render(viewer.frame(room)), refresh=True)


@contextlib.contextmanager
def opened(feed: AgentFeed | LocalFeed) -> Iterator[AgentFeed | LocalFeed]:
    try:
        yield feed
    finally:
        feed.close()
