"""IPFIX over TCP (RFC 7011 section 10.4): one connection at a time to a collector, a bounded
backlog while it is down or slow, templates first on every new connection, and nothing lost to a
connection that dies: whatever the collector's kernel never acknowledged is written again.

TCP says a write succeeded once the bytes are in our send buffer, and a collector that was killed
or restarted answers the bytes already sent with a reset: without the acknowledged count those
messages would vanish. SIOCOUTQ gives the bytes written but not yet acknowledged, even after the
reset, so the connection keeps the messages it wrote until their acknowledgement is seen.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable

from bridge.errors import UserError
from bridge.transport import Transport

log = logging.getLogger("flowbridge.transport")

TCP_BACKLOG_BYTES = 8 << 20
_INT = struct.Struct("i")


def unacknowledged_bytes(sock: socket.socket) -> int | None:
    """Bytes written to a TCP socket that its peer has not acknowledged (SIOCOUTQ = TIOCOUTQ);
    None when the socket cannot say (closed)."""
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * _INT.size))[0]
    except (OSError, ValueError):
        return None


class UnacknowledgedWindow:
    """The messages written whole to the current connection that may still be unacknowledged,
    oldest first. With TLS the counted bytes are ciphertext, larger than the messages: the window
    then takes back at least every unacknowledged message (maybe one that arrived, never fewer).
    Its bytes count against the backlog bound: beyond it the oldest are forgotten (`incomplete`)."""

    def __init__(self) -> None:
        self.messages: deque[tuple[bytes, int]] = deque()  # (message, data records in it)
        self.bytes = 0
        self.incomplete = False  # messages were forgotten before their acknowledgement was seen

    def __len__(self) -> int:
        return len(self.messages)

    def add(self, message: bytes, records: int) -> None:
        self.messages.append((message, records))
        self.bytes += len(message)

    def forget_acknowledged(self, unacknowledged: int) -> None:
        """Drops the oldest messages that lie wholly before the last `unacknowledged` bytes."""
        messages = self.messages
        while messages and self.bytes - len(messages[0][0]) >= unacknowledged:
            self.bytes -= len(messages.popleft()[0])

    def keep_within(self, limit: int) -> None:
        messages = self.messages
        while messages and self.bytes > limit:
            self.bytes -= len(messages.popleft()[0])
            self.incomplete = True

    def take_unacknowledged(self, unacknowledged: int) -> list[tuple[bytes, int]]:
        """The messages that reach into the last `unacknowledged` bytes, oldest first; empties the
        window for the next connection."""
        self.forget_acknowledged(unacknowledged)
        taken = list(self.messages) if unacknowledged > 0 else []
        self.clear()
        return taken

    def clear(self) -> None:
        self.messages.clear()
        self.bytes = 0
        self.incomplete = False


class TcpTransport(Transport):
    """Non-blocking: the agent's loop never waits on a slow or absent collector. Messages queue in a
    bounded backlog (oldest dropped first, counted); on every (re)connect the `on_connect` hook's
    messages (the session's templates) go first, since a new connection starts with no templates."""

    kind = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        source: str | None = None,
        *,
        max_backlog_bytes: int = TCP_BACKLOG_BYTES,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(host, port, source)
        self.on_connect: Callable[[], list[bytes]] | None = None
        self.max_backlog_bytes = max_backlog_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._backoff = backoff_initial
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._queue: deque[tuple[bytes, int]] = deque()  # (message, data records in it)
        self._queued_bytes = 0
        self._head_offset = 0  # bytes of the queue's head already written to this connection
        self._unacknowledged = UnacknowledgedWindow()
        self._connected = False
        self._connect_started = 0.0
        self._next_attempt = 0.0
        if source:  # a bad source address is the operator's error: report it now, not in a retry
            self._new_socket(socket.SOCK_STREAM).close()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def backlog_messages(self) -> int:
        return len(self._queue)

    @property
    def backlog_bytes(self) -> int:
        return self._queued_bytes - self._head_offset

    def waiting(self) -> list[bytes]:
        """The queued messages, oldest first: on a new connection they follow `on_connect`'s."""
        return [message for message, _records in self._queue]

    def send(self, message: bytes, records: int = 0) -> bool:
        self._queue.append((message, records))
        self._queued_bytes += len(message)
        dropped_own = self._bound()
        self._pump()
        return not dropped_own

    def flush(self, timeout: float = 0.0) -> None:
        if self._connected:
            self._check_peer()
        self._pump(timeout)
        if self._connected and self._unacknowledged:
            assert self.socket is not None
            unacknowledged = unacknowledged_bytes(self.socket)
            if unacknowledged is not None:
                self._unacknowledged.forget_acknowledged(unacknowledged - self._head_offset)

    def _bound(self) -> bool:
        """Drops the oldest messages beyond the bound; returns whether the newest went too."""
        dropped = 0
        newest = self._queue[-1] if self._queue else None
        went_newest = False
        while self._queued_bytes > self.max_backlog_bytes and len(self._queue) > 1:
            # A partly written head must be finished, or the stream's framing breaks.
            index = 1 if self._head_offset else 0
            message, records = self._queue[index]
            del self._queue[index]
            self._queued_bytes -= len(message)
            self._drop(len(message), records)
            dropped += 1
            went_newest = went_newest or (message, records) is newest
        if dropped:
            self._log.warning(
                "backlog",
                f"collector {self.label}: backlog full ({self.max_backlog_bytes} bytes), "
                f"dropped {dropped} oldest message(s); {self.stats.messages_dropped} so far",
            )
        return went_newest

    def _pump(self, timeout: float = 0.0) -> None:
        """Connects when the backoff allows and writes what the socket takes. Waits (real time,
        whatever the backoff clock) up to `timeout` for the backlog to empty."""
        deadline = time.monotonic() + timeout
        while True:
            if self.socket is None and self._clock() >= self._next_attempt:
                self._start_connect()
            if self.socket is not None and not self._connected:
                self._check_connect(max(0.0, deadline - time.monotonic()))
            if self._connected:
                self._write()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._connected and not self._queue):
                return
            if self.socket is None:
                time.sleep(min(remaining, 0.05))
            elif self._connected:
                select.select([], [self.socket], [], min(remaining, 0.05))

    def _start_connect(self) -> None:
        try:
            sock = self._new_socket(socket.SOCK_STREAM)
        except (UserError, OSError) as exc:
            self._schedule_retry(str(exc))
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._connect_started = self._clock()
        code = sock.connect_ex(self.address)
        if code == 0:
            self._tcp_connected()
        elif code not in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
            self._disconnect(OSError(code, os.strerror(code)))

    def _check_connect(self, wait: float) -> None:
        assert self.socket is not None
        _, writable, _ = select.select([], [self.socket], [], min(wait, 0.05))
        if writable:
            code = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                self._tcp_connected()
            else:
                self._disconnect(OSError(code, os.strerror(code)))
        elif self._clock() - self._connect_started > self._connect_timeout:
            self._disconnect(OSError(errno.ETIMEDOUT, "connect timed out"))

    def _tcp_connected(self) -> None:
        """The TCP handshake is done; TLS starts its own handshake here."""
        self._established()

    def _established(self) -> None:
        self._connected = True
        self._backoff = self._backoff_initial
        self.stats.connects += 1
        self._head_offset = 0
        preamble = self.on_connect() if self.on_connect is not None else []
        for message in reversed(preamble):
            self._queue.appendleft((message, 0))
            self._queued_bytes += len(message)
        if not self._log.resolved("down", f"collector {self.label}: connected"):
            log.info("collector %s: connected", self.label)

    def _send_some(self, data: memoryview) -> int | None:
        """Bytes the socket took, None when it would block."""
        assert self.socket is not None
        try:
            return self.socket.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return None

    def _write(self) -> None:
        while self._queue:
            message, _records = self._queue[0]
            try:
                written = self._send_some(memoryview(message)[self._head_offset :])
            except OSError as exc:
                self._disconnect(exc)
                return
            if written is None:
                return
            self._head_offset += written
            if self._head_offset < len(message):
                return
            self._unacknowledged.add(*self._queue.popleft())
            self._queued_bytes -= len(message)
            self._head_offset = 0
            self._unacknowledged.keep_within(self.max_backlog_bytes - self._queued_bytes)
            self.stats.messages_sent += 1
            self.stats.bytes_sent += len(message)

    def _check_peer(self) -> None:
        if self._peer_closed():
            self._disconnect(None)

    def _peer_closed(self) -> bool:
        """Collectors never talk back, so readable means EOF or a reset: reconnect now rather
        than lose the next message into a dead connection."""
        assert self.socket is not None
        readable, _, _ = select.select([self.socket], [], [], 0)
        if not readable:
            return False
        try:
            return self.socket.recv(4096, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _drop_connection(self, take_back: bool = True) -> bool:
        """Closes the socket; returns whether the connection had been established. `take_back`:
        the messages the collector's kernel never acknowledged go back to the queue's front."""
        if self.socket is not None:
            if take_back and self._connected:
                self._take_back_unacknowledged()
            self._close_socket()
        self._unacknowledged.clear()
        self.socket = None
        was_connected = self._connected
        self._connected = False
        # A partly written message is resent whole on the next connection.
        self._head_offset = 0
        return was_connected

    def _close_socket(self) -> None:
        assert self.socket is not None
        self.socket.close()

    def _take_back_unacknowledged(self) -> None:
        assert self.socket is not None
        unacknowledged = unacknowledged_bytes(self.socket)
        if unacknowledged is None:
            return
        # The partly written head is resent whole anyway; only whole messages are taken back.
        unacknowledged -= self._head_offset
        if self._unacknowledged.incomplete and unacknowledged > self._unacknowledged.bytes:
            self._log.warning(
                "unacknowledged",
                f"collector {self.label}: {unacknowledged - self._unacknowledged.bytes} bytes "
                "the collector never acknowledged were beyond the backlog bound: not resent",
            )
        taken = self._unacknowledged.take_unacknowledged(unacknowledged)
        for message, records in reversed(taken):
            self._queue.appendleft((message, records))
            self._queued_bytes += len(message)
        self._head_offset = 0
        self.stats.messages_resent += len(taken)

    def _disconnect(self, exc: OSError | None) -> None:
        was_connected = self._drop_connection()
        if isinstance(exc, ConnectionRefusedError) or (exc and exc.errno == errno.ECONNREFUSED):
            self.stats.refused += 1
        else:
            self.stats.send_errors += 1
        reason = "closed by the collector" if exc is None else (exc.strerror or str(exc))
        self._schedule_retry(reason if not was_connected else f"connection lost: {reason}")

    def _schedule_retry(self, reason: str) -> None:
        self._next_attempt = self._clock() + self._backoff
        self._log.warning(
            "down",
            f"collector {self.label}: {reason}; retrying in {self._backoff:g}s, "
            f"{len(self._queue)} message(s) waiting",
        )
        self._backoff = min(self._backoff * 2, self._backoff_max)

    def close(self, drain_seconds: float = 0.0) -> None:
        """Tries for up to `drain_seconds` to send what is queued; the rest is counted dropped."""
        if drain_seconds > 0 and self._queue:
            self._next_attempt = min(self._next_attempt, self._clock())
            self._pump(drain_seconds)
        if self._queue:
            lost = len(self._queue)
            for message, records in self._queue:
                self._drop(len(message), records)
            log.warning("collector %s: %d message(s) never sent at shutdown", self.label, lost)
            self._queue.clear()
            self._queued_bytes = 0
        self._drop_connection(take_back=False)
