"""`flowbridge collect`: receive IPFIX / NetFlow v9 / v5 over UDP, decode and print the flows, as
a table or as JSON lines (the form `flowbridge replay` reads).

Hostile input costs bounded resources: the socket listens on loopback unless told otherwise, one
datagram at a time is read (at most 65535 bytes; what the kernel buffer cannot hold is dropped by
the kernel and counted), decoding is linear in the datagram, the template cache is bounded
(ipfix.template_cache), and a rejected datagram is counted by reason and reported on one
rate-limited stderr line, so stdout carries only flows (pure JSON lines with --json)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable

import click

from bridge.cli.replay import parse_host_port
from bridge.errors import UserError
from bridge.ratelimit import RateLimitedLog
from ipfix.decoder import Decoder
from ipfix.errors import DecodeError
from ipfix.jsonform import record_to_json
from ipfix.template_cache import DEFAULT_MAX_FIELDS, DEFAULT_MAX_TEMPLATES

MAX_DATAGRAM = 65535
RECEIVE_BUFFER = 8 << 20  # exporters send bursts faster than we print
SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40)  # Linux: drops counted in ancillary data
WARNING_INTERVAL_SECONDS = 10.0  # per rejection reason, after the first line
TABLE_HEADER = (
    f"{'start':23} {'dur(s)':>8} {'proto':>5} {'source':>41} {'destination':>41} "
    f"{'packets':>9} {'bytes':>12} {'flags':>6}"
)
_PROTOCOL_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMP6"}
_FLAGS = "FSRPAUEC"


def open_listener(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # dual stack
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
        sock.bind(address)
    except OSError as exc:
        raise UserError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _int(record: dict, key: str) -> int | None:
    """The value if it is an integer; None for a field an exporter sent with an odd length."""
    value = record.get(key, 0)
    return value if isinstance(value, int) else None


def _shown(value: int | None) -> int | str:
    return "?" if value is None else value


def _address(record: dict, v4: str, v6: str) -> str:
    value = record.get(v6) or record.get(v4)
    if isinstance(value, bytes) and len(value) == 4:
        return str(ipaddress.ip_address(value))
    if isinstance(value, bytes) and len(value) == 16:
        return f"[{ipaddress.ip_address(value)}]"
    return "?"


def table_row(record: dict) -> str:
    """One table line for any decoded record, including garbage from a broken exporter."""
    start = _int(record, "flowStartMilliseconds")
    end = _int(record, "flowEndMilliseconds") if "flowEndMilliseconds" in record else start
    start_text, duration = "?", "?"
    if start is not None:
        try:
            when = datetime.datetime.fromtimestamp(start / 1000, datetime.UTC)
            start_text = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
        except (OverflowError, OSError, ValueError):
            start_text = str(start)
        if end is not None:
            duration = f"{(end - start) / 1000:8.3f}"
    proto = _int(record, "protocolIdentifier")
    flags = _int(record, "tcpControlBits") if proto == 6 else 0
    flag_text = (
        "?"
        if flags is None
        else "".join(c if flags >> i & 1 else "." for i, c in enumerate(_FLAGS))[:6]
    )
    src = f"{_address(record, 'sourceIPv4Address', 'sourceIPv6Address')}"
    dst = f"{_address(record, 'destinationIPv4Address', 'destinationIPv6Address')}"
    src += f":{_shown(_int(record, 'sourceTransportPort'))}"
    dst += f":{_shown(_int(record, 'destinationTransportPort'))}"
    proto_text = _PROTOCOL_NAMES.get(proto, _shown(proto)) if proto is not None else "?"
    return (
        f"{start_text:23} {duration:>8} {proto_text:>5} {src:>41} {dst:>41} "
        f"{_shown(_int(record, 'packetDeltaCount')):>9} "
        f"{_shown(_int(record, 'octetDeltaCount')):>12} {flag_text:>6}"
    )


def json_line(record: dict) -> str:
    # allow_nan=False: record_to_json already spells non-finite floats; stdout stays strict JSON.
    return json.dumps(record_to_json(record), allow_nan=False)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"collect: warning: {record.getMessage()}", err=True)


class Collection:
    """Decoder, counters and output form: one datagram in, its output lines out. The fuzzer
    (bench/fuzz.py) drives this same object, so what it proves holds for the command."""

    def __init__(
        self,
        as_json: bool,
        decoder: Decoder | None = None,
        render: Callable[[dict], str] | None = None,
    ) -> None:
        self.render = render or (json_line if as_json else table_row)
        self.decoder = decoder or Decoder()
        self.datagrams = self.accepted = self.records = self.options = self.no_template = 0
        self.rejected: Counter[str] = Counter()
        self.kernel_drops = 0
        logger = logging.Logger("flowbridge.collect")
        logger.addHandler(_StderrHandler())
        self.warnings = RateLimitedLog(logger, WARNING_INTERVAL_SECONDS)

    def receive(self, data: bytes, peer: tuple, limit: int | None = None) -> list[str]:
        """The output lines of one datagram's flow records (at most `limit`). A datagram the
        decoder refuses is counted by reason and its DecodeError raised again."""
        self.datagrams += 1
        try:
            messages = self.decoder.feed(data, peer[:2])
        except DecodeError as exc:
            self.rejected[exc.reason] += 1
            raise
        self.accepted += 1
        lines = []
        render = self.render
        for message in messages:
            self.options += len(message.options_records)
            self.no_template += message.unknown_template_sets
            for record in message.records[: None if limit is None else limit - len(lines)]:
                lines.append(render(record))
        self.records += len(lines)
        return lines

    def warn(self, peer: tuple, exc: DecodeError) -> None:
        where = f"[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"{peer[0]}:{peer[1]}"
        self.warnings.warning(exc.reason, f"{where}: rejected a datagram ({exc.reason}): {exc}")

    def summary(self) -> str:
        rejected = sum(self.rejected.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.rejected.items()))
        return (
            f"collect: {self.datagrams} datagrams, {self.records} flow records, "
            f"{self.options} options records, {self.no_template} data sets without template, "
            f"{rejected} rejected{f' ({reasons})' if reasons else ''}, "
            f"{self.decoder.templates.evictions} templates evicted, "
            f"{self.kernel_drops} dropped by the kernel (receive buffer full)"
        )


def _receive(sock: socket.socket) -> tuple[bytes, tuple, int | None]:
    """One datagram, its sender, and the kernel's count of datagrams dropped on this socket."""
    data, ancillary, _, peer = sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(4))
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_RXQ_OVFL and len(value) >= 4:
            return data, peer, struct.unpack("=I", value[:4])[0]
    return data, peer, None


class _Stop(Exception):
    """SIGTERM: leave the loop like Ctrl-C, so the summary is printed."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop


HELP = f"""Receive IPFIX, NetFlow v9 and v5 over UDP and print the flows.

Flows go to stdout; everything else to stderr: a datagram that cannot be decoded is rejected,
counted by reason and reported on one line (at most one per reason every
{WARNING_INTERVAL_SECONDS:g} s), and a summary with the counts is printed on exit (end of
--count/--timeout, Ctrl-C or SIGTERM). At most {DEFAULT_MAX_TEMPLATES} templates
({DEFAULT_MAX_FIELDS} fields) are kept, the least recently used evicted.

\b
Examples:
  flowbridge collect                               # 127.0.0.1:4739, a table
  flowbridge collect --listen [::]:2055 --json     # JSON lines (replay's input form)
  flowbridge collect --count 100 --timeout 5 > flows.jsonl
"""


@click.command("collect", help=HELP)
@click.option(
    "--listen",
    default="127.0.0.1:4739",
    show_default=True,
    help="HOST:PORT to receive on. Loopback only by default: 0.0.0.0:PORT for every IPv4 "
    "address, [::]:PORT for every IPv6 and IPv4 address (anyone who can reach the port can "
    "send to it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many flow records.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop after this many seconds without a datagram.",
)
def collect(listen: str, as_json: bool, count: int | None, timeout: float | None) -> None:
    # The help is HELP, built from the limits it states.
    host, port = parse_host_port(listen, "--listen")
    sock = open_listener(host, port)
    sock.settimeout(timeout)
    collection = Collection(as_json)
    click.echo(f"collect: listening on {host}:{port}", err=True)
    previous_handler = signal.signal(signal.SIGTERM, _stop)
    try:
        if not as_json:
            click.echo(TABLE_HEADER)
        while count is None or collection.records < count:
            try:
                data, peer, drops = _receive(sock)
            except TimeoutError:
                break
            if drops is not None:
                collection.kernel_drops = drops
            try:
                remaining = None if count is None else count - collection.records
                lines = collection.receive(data, peer, remaining)
            except DecodeError as exc:
                collection.warn(peer, exc)
                continue
            for line in lines:
                click.echo(line)
    except (KeyboardInterrupt, _Stop):
        pass
    except BrokenPipeError:  # `collect | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        sock.close()
        click.echo(collection.summary(), err=True)
