"""`flowbridge collect`: receive IPFIX / NetFlow v9 / v5 over UDP, decode and print the flows, as
a table or as JSON lines (the form `flowbridge replay` reads)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket

import click

from bridge.cli.replay import parse_host_port
from bridge.errors import UserError
from ipfix.decoder import Decoder
from ipfix.errors import DecodeError
from ipfix.jsonform import record_to_json

MAX_DATAGRAM = 65535
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
        # A big receive buffer: exporters send bursts faster than we print.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(address)
    except OSError as exc:
        raise UserError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _address(record: dict, v4: str, v6: str) -> str:
    value = record.get(v6) or record.get(v4)
    if isinstance(value, bytes) and len(value) == 4:
        return str(ipaddress.ip_address(value))
    if isinstance(value, bytes) and len(value) == 16:
        return f"[{ipaddress.ip_address(value)}]"
    return "?"


def table_row(record: dict) -> str:
    start = record.get("flowStartMilliseconds", 0)
    end = record.get("flowEndMilliseconds", start)
    try:
        when = datetime.datetime.fromtimestamp(start / 1000, datetime.UTC)
        start_text = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:23]
    except (OverflowError, OSError, ValueError):
        start_text = str(start)
    proto = record.get("protocolIdentifier", 0)
    flags = record.get("tcpControlBits", 0) if proto == 6 else 0
    flag_text = "".join(c if flags >> i & 1 else "." for i, c in enumerate(_FLAGS))[:6]
    src = f"{_address(record, 'sourceIPv4Address', 'sourceIPv6Address')}"
    dst = f"{_address(record, 'destinationIPv4Address', 'destinationIPv6Address')}"
    src += f":{record.get('sourceTransportPort', 0)}"
    dst += f":{record.get('destinationTransportPort', 0)}"
    return (
        f"{start_text:23} {(end - start) / 1000:8.3f} {_PROTOCOL_NAMES.get(proto, proto):>5} "
        f"{src:>41} {dst:>41} {record.get('packetDeltaCount', 0):9} "
        f"{record.get('octetDeltaCount', 0):12} {flag_text:>6}"
    )


@click.command("collect")
@click.option(
    "--listen",
    default="127.0.0.1:4739",
    show_default=True,
    help="HOST:PORT to receive on ([::]:PORT for IPv6 and IPv4).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of a table.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many flow records.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop after this many seconds without a datagram.",
)
def collect(listen: str, as_json: bool, count: int | None, timeout: float | None) -> None:
    """Receive IPFIX, NetFlow v9 and v5 over UDP and print the flows.

    \b
    Examples:
      flowbridge collect                               # 127.0.0.1:4739, a table
      flowbridge collect --listen [::]:2055 --json     # JSON lines (replay's input form)
      flowbridge collect --count 100 --timeout 5 > flows.jsonl
    """
    host, port = parse_host_port(listen, "--listen")
    sock = open_listener(host, port)
    sock.settimeout(timeout)
    decoder = Decoder()
    datagrams = records = options = malformed = no_template = 0
    click.echo(f"collect: listening on {host}:{port}", err=True)
    if not as_json:
        click.echo(TABLE_HEADER)
    try:
        while count is None or records < count:
            try:
                data, peer = sock.recvfrom(MAX_DATAGRAM)
            except TimeoutError:
                break
            datagrams += 1
            try:
                messages = decoder.feed(data, peer[:2])
            except DecodeError as exc:
                malformed += 1
                click.echo(
                    f"collect: warning: {peer[0]}:{peer[1]}: dropped a malformed datagram "
                    f"({malformed} so far): {exc}",
                    err=True,
                )
                continue
            for message in messages:
                options += len(message.options_records)
                no_template += message.unknown_template_sets
                for record in message.records:
                    if count is not None and records >= count:
                        break
                    records += 1
                    if as_json:
                        click.echo(json.dumps(record_to_json(record)))
                    else:
                        click.echo(table_row(record))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    click.echo(
        f"collect: {datagrams} datagrams, {records} flow records, {options} options records, "
        f"{malformed} malformed, {no_template} data sets without template",
        err=True,
    )
