"""`flowbridge replay`: export flow records read from JSON lines (the form `collect --json`
prints) to a collector over UDP."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator

import click

from bridge.errors import UserError
from bridge.transport import UdpTransport
from ipfix.errors import IpfixError
from ipfix.jsonform import record_from_json
from ipfix.profile import Profile, load_profile
from ipfix.session import ExportSession

PROTOCOLS = ("ipfix", "v9", "v5")
BATCH = 500  # records per encode call


def parse_host_port(value: str, option: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or IPV6 literal with a port after the last colon."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{option} '{value}': expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    return host.strip("[]"), int(port)


def udp_sender(host: str, port: int) -> Callable[[bytes], None]:
    """The agent's UDP transport: one connected socket with a stable source port for the whole
    run (collectors key templates on it); a refusing collector is counted, not fatal."""
    transport = UdpTransport(host, port)
    return transport.send


def profile_for(protocol: str, name: str | None) -> Profile:
    try:
        return load_profile(name or ("v5" if protocol == "v5" else "standard"))
    except IpfixError as exc:
        raise UserError(str(exc)) from None


def make_session(protocol: str, profile: Profile, domain_id: int, max_size: int) -> ExportSession:
    try:
        return ExportSession(protocol, profile, domain_id, max_message_size=max_size)
    except IpfixError as exc:
        raise UserError(f"--protocol {protocol} --profile {profile.name}: {exc}") from None


def read_records(lines: Iterable[str], source: str) -> Iterator[dict]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield record_from_json(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}:{number}: not JSON: {exc.msg}") from None
        except IpfixError as exc:
            raise UserError(f"{source}:{number}: {exc}") from None


def export(
    session: ExportSession,
    records: Iterable[dict],
    send: Callable[[bytes], None],
    rate: float = 0,
) -> tuple[int, int]:
    """Encode and send in batches, at most `rate` records per second (0: as fast as possible).
    Returns (records, messages)."""
    started = time.monotonic()
    sent_records = sent_messages = 0
    batch_size = BATCH if rate <= 0 else max(1, min(BATCH, int(rate // 20) or 1))
    batch: list[dict] = []

    def flush() -> None:
        nonlocal sent_records, sent_messages
        if rate > 0:
            due = started + sent_records / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        try:
            messages = session.encode(batch)
        except IpfixError as exc:
            raise UserError(str(exc)) from None
        for message in messages:
            send(message)
        sent_records += len(batch)
        sent_messages += len(messages)
        batch.clear()

    for record in records:
        batch.append(record)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return sent_records, sent_messages


@click.command("replay")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--collector", required=True, help="HOST:PORT to export to (UDP).")
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="ipfix", show_default=True)
@click.option("--profile", "profile_name", help="Profile name or path [standard; v5 for v5].")
@click.option(
    "--domain-id",
    type=int,
    default=1,
    show_default=True,
    help="Observation domain id (v9 source id; v5 engine type/id).",
)
@click.option("--max-message-size", type=int, default=1400, show_default=True)
@click.option("--rate", type=float, default=0, help="Records per second (0: unlimited).")
def replay(
    file: click.utils.LazyFile,
    collector: str,
    protocol: str,
    profile_name: str | None,
    domain_id: int,
    max_message_size: int,
    rate: float,
) -> None:
    """Export flow records read from JSON lines in FILE ('-' for stdin).

    \b
    Examples:
      flowbridge replay flows.jsonl --collector 127.0.0.1:4739
      flowbridge collect --json | flowbridge replay - --collector 10.0.0.5:2055
    """
    host, port = parse_host_port(collector, "--collector")
    profile = profile_for(protocol, profile_name)
    session = make_session(protocol, profile, domain_id, max_message_size)
    source = "<stdin>" if file.name == "<stdin>" else file.name
    # Read everything first: a bad line is reported before anything is sent.
    records = list(read_records(file, source))
    send = udp_sender(host, port)
    count, messages = export(session, records, send, rate)
    note = f", {session.refused_records} refused (IPv6 in v5)" if session.refused_records else ""
    click.echo(
        f"replay: {count} records in {messages} {protocol} messages to {host}:{port}{note}",
        err=True,
    )
