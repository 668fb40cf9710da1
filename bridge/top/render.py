"""One top frame as rich renderables: a header line, the table, the key help."""

from __future__ import annotations

import time

from rich.console import Group as RichGroup
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from bridge.top.model import PROTOCOL_NAMES, TCP_STATES, Connection, Frame, Group

KEYS_HELP = ("[b]f[/]lows  [b]p[/]rocesses  [b]h[/]osts   sort: [b]b[/]ytes  r[b]a[/]te  "
             "[b]r[/]etrans  r[b]t[/]t  pac[b]k[/]ets   [b]q[/]uit")


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_rate(bytes_per_s: float) -> str:
    return human_bytes(bytes_per_s) + "/s"


def rtt_text(srtt_us: int) -> str:
    if not srtt_us:
        return "-"
    return f"{srtt_us / 1000:.2f} ms" if srtt_us < 100_000 else f"{srtt_us / 1000:.0f} ms"


def endpoint(addr: str, port: int, protocol: int) -> str:
    host = f"[{addr}]" if ":" in addr else addr
    if protocol in (1, 58):
        return host
    return f"{host}:{port}"


def _icmp_type(conn: Connection) -> str:
    # ICMP keys carry type << 8 | code in the destination port (the remote one for "out").
    port = conn.remote[1] or conn.local[1]
    return f" {port >> 8}/{port & 0xFF}"


def container_text(container: str, pod: str) -> str:
    if pod:
        return f"pod {pod[:8]}" + (f" {container[:12]}" if container else "")
    return container[:12]


def state_text(conn: Connection) -> str:
    if conn.end:
        return conn.end.upper()
    if conn.protocol == 6:
        return TCP_STATES.get(conn.tcp_state, "")
    return ""


def _sorted_marker(title: str, column_sort: str, sort: str) -> str:
    return f"{title} ▼" if column_sort == sort else title


def _flows_table(frame: Frame) -> Table:
    s = frame.sort
    table = Table(expand=True, box=None, header_style="bold reverse", pad_edge=False)
    table.add_column("PROTO", no_wrap=True)
    table.add_column("LOCAL", no_wrap=True, overflow="ellipsis")
    table.add_column("REMOTE", no_wrap=True, overflow="ellipsis")
    table.add_column("PROCESS", no_wrap=True, overflow="ellipsis")
    table.add_column("CONTAINER", no_wrap=True)
    table.add_column(_sorted_marker("BYTES", "bytes", s), justify="right", no_wrap=True)
    table.add_column("OUT", justify="right", no_wrap=True)
    table.add_column("IN", justify="right", no_wrap=True)
    table.add_column(_sorted_marker("RATE", "rate", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("PKTS", "packets", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("RETRANS", "retrans", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("RTT", "rtt", s), justify="right", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    for conn in frame.rows:
        proto = PROTOCOL_NAMES.get(conn.protocol, str(conn.protocol))
        if conn.protocol in (1, 58):
            proto += _icmp_type(conn)
        table.add_row(
            proto,
            endpoint(*conn.local, conn.protocol),
            endpoint(*conn.remote, conn.protocol),
            conn.process_label,
            container_text(conn.container, conn.pod),
            human_bytes(conn.total_bytes),
            human_bytes(conn.bytes_out),
            human_bytes(conn.bytes_in),
            human_rate(conn.rate),
            str(conn.total_packets),
            Text(str(conn.retrans), style="bold red" if conn.retrans else ""),
            rtt_text(conn.srtt_us),
            state_text(conn),
            style="dim" if conn.end else None,
        )
    return table


def _groups_table(frame: Frame) -> Table:
    s = frame.sort
    per_process = frame.view == "processes"
    table = Table(expand=True, box=None, header_style="bold reverse", pad_edge=False)
    table.add_column("PROCESS" if per_process else "REMOTE HOST", no_wrap=True)
    table.add_column("CONTAINER", no_wrap=True)
    table.add_column("CONNS", justify="right", no_wrap=True)
    table.add_column(_sorted_marker("BYTES", "bytes", s), justify="right", no_wrap=True)
    table.add_column("OUT", justify="right", no_wrap=True)
    table.add_column("IN", justify="right", no_wrap=True)
    table.add_column(_sorted_marker("RATE", "rate", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("PKTS", "packets", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("RETRANS", "retrans", s), justify="right", no_wrap=True)
    table.add_column(_sorted_marker("MAX RTT", "rtt", s), justify="right", no_wrap=True)
    table.add_column("REMOTE HOSTS" if per_process else "PROCESSES", overflow="ellipsis",
                     no_wrap=True)
    group: Group
    for group in frame.rows:
        members = sorted(group.members)
        shown = ", ".join(members[:4]) + (f" +{len(members) - 4}" if len(members) > 4 else "")
        table.add_row(
            group.label,
            container_text(group.container, group.pod) if per_process else "",
            str(group.connections),
            human_bytes(group.total_bytes),
            human_bytes(group.bytes_out),
            human_bytes(group.bytes_in),
            human_rate(group.rate),
            str(group.packets),
            Text(str(group.retrans), style="bold red" if group.retrans else ""),
            rtt_text(group.srtt_us),
            shown,
        )
    return table


def render(frame: Frame, show_keys: bool = True) -> RenderableType:
    clock = time.strftime("%H:%M:%S", time.localtime(frame.time_ms / 1000))
    header = Text.from_markup(
        f"[b]flowbridge top[/]  {clock}  {frame.origin}\n"
        f"{frame.connections} connections, {frame.processes} processes, "
        f"{frame.hosts} remote hosts   {human_bytes(frame.bytes_total)} total, "
        f"{human_rate(frame.rate_total)}, {frame.retrans_total} retransmissions   "
        f"view [b]{frame.view}[/] by [b]{frame.sort}[/]"
    )
    parts: list[RenderableType] = [header]
    parts += [Text(note, style="yellow") for note in frame.notes]
    parts.append(_flows_table(frame) if frame.view == "flows" else _groups_table(frame))
    if show_keys:
        parts.append(Text.from_markup(KEYS_HELP, style="dim"))
    return RichGroup(*parts)
