"""The virtual boot epoch of NetFlow v9 and v5: sysUptime and First/Last are milliseconds since it.

nfdump computes boot = unix_secs*1000 (+ unix_nsecs/1e6 in v5) - sysUptime for every packet, so
the header's sysUptime and its export time come from one clock reading (collectors.md item 2), and
flow times stay exact to the millisecond. Flow times must not exceed sysUptime (pmacct and goflow2
subtract unsigned), and sysUptime must stay below 2**32 ms: the epoch starts a day before the first
records and is moved (templates resent) when it would overflow or when older records come.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter

UPTIME_LIMIT_MS = (1 << 32) - 1
BOOT_MARGIN_MS = 86_400_000
_START = itemgetter("flowStartMilliseconds")
_END = itemgetter("flowEndMilliseconds")


class UptimeClock:
    def __init__(self, whole_seconds: bool) -> None:
        # v9 has no nsecs field: its header time is a whole second.
        self.whole_seconds = whole_seconds
        self.boot_ms: int | None = None

    def stamp(self, now_ms: int, records: Sequence[dict]) -> tuple[int, list[dict], int, bool]:
        """(header time in ms, records that fit, records refused, epoch moved).

        The header time is rounded up to the next whole second for v9 so that no flow ends after
        sysUptime; records ending later than the clock (replayed data) move it forward too."""
        earliest = latest = None
        if records:
            try:
                starts = list(map(_START, records))
                ends = list(map(_END, records))
            except KeyError:
                starts = [r.get("flowStartMilliseconds", now_ms) for r in records]
                ends = [r.get("flowEndMilliseconds", now_ms) for r in records]
            latest = max(ends)
            earliest = min(min(starts), min(ends))
        header_ms, moved = self.advance(now_ms, earliest, latest)
        boot = self.boot_ms
        if earliest is None or earliest >= boot:
            return header_ms, list(records), 0, moved
        kept = [
            r
            for r in records
            if r.get("flowStartMilliseconds", header_ms) >= boot
            and r.get("flowEndMilliseconds", header_ms) >= boot
        ]
        return header_ms, kept, len(records) - len(kept), moved

    def advance(self, now_ms: int, earliest: int | None, latest: int | None) -> tuple[int, bool]:
        """(header time in ms, epoch moved) for records whose times span earliest..latest (None:
        no records). Afterwards `boot_ms` is set; records before it cannot be carried."""
        header_ms = now_ms if latest is None else max(now_ms, latest)
        if earliest is None:
            earliest = now_ms
        if self.whole_seconds:
            header_ms = -(-header_ms // 1000) * 1000
        moved = False
        boot = self.boot_ms
        if boot is None or earliest < boot or header_ms - boot > UPTIME_LIMIT_MS:
            boot = max(min(earliest, header_ms - BOOT_MARGIN_MS), header_ms - UPTIME_LIMIT_MS)
            moved = self.boot_ms is not None and boot != self.boot_ms
            self.boot_ms = boot
        return header_ms, moved
