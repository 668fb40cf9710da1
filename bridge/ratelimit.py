"""Log lines an operator can read: a failure that repeats (a collector down, a full buffer) is
logged once, then summarised at most once per interval, never once per datagram."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """One instance per source of repeated trouble (a collector). Keys separate kinds of trouble."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval_seconds
        self._clock = clock
        # key -> [time of the last line, occurrences suppressed since]
        self._state: dict[str, list[float]] = {}

    def warning(self, key: str, message: str) -> bool:
        """Logs `message` unless `key` was logged less than an interval ago; returns whether it
        logged. The next line that gets through says how many were suppressed meanwhile."""
        now = self._clock()
        state = self._state.get(key)
        if state is not None and now - state[0] < self._interval:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        if suppressed:
            message = f"{message} ({suppressed} more like this in the last {self._interval:g}s)"
        self._logger.warning("%s", message)
        self._state[key] = [now, 0]
        return True

    def resolved(self, key: str, message: str) -> bool:
        """The trouble under `key` is over: say so once, if it was ever reported (returns that)."""
        if self._state.pop(key, None) is None:
            return False
        self._logger.info("%s", message)
        return True
