"""`flowbridge top`: the host's flows, live, as the agent sees them."""

from __future__ import annotations

import os
import signal
import sys

import click

from bridge.errors import UserError
from bridge.state import DEFAULT_PATH


def _terminate(*_: object) -> None:
    raise SystemExit(0)  # run the finally blocks: terminal restored, collector detached


@click.command("top")
@click.option("--view", type=click.Choice(["flows", "processes", "hosts"]), default="flows",
              show_default=True, help="What a row is: a connection, a process, a remote host.")
@click.option("--sort", type=click.Choice(["bytes", "rate", "retrans", "rtt", "packets"]),
              default="bytes", show_default=True, help="Largest first.")
@click.option("--interval", default=1.0, show_default=True, metavar="SECONDS",
              type=click.FloatRange(min=0.1), help="Refresh period.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Rows shown (default: as many as fit).")
@click.option("--state-socket", default=DEFAULT_PATH, show_default=True, metavar="PATH",
              help="The running agent's state socket.")
@click.option("--local", "local_mode", is_flag=True,
              help="Do not ask an agent: start top's own eBPF collector (root).")
@click.option("--cgroup", metavar="PATH", help="With --local: watch only this cgroup-v2 subtree.")
@click.option("--once", is_flag=True,
              help="Print one frame (rates over one interval) and exit; no keyboard.")
@click.option("--svg", "svg_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="With --once: also save the frame as an SVG picture.")
def top(view: str, sort: str, interval: float, limit: int | None, state_socket: str,
        local_mode: bool, cgroup: str | None, once: bool, svg_path: str | None) -> None:
    """Show the host's flows live: top connections by bytes, rate, retransmissions, RTT or
    packets; per process; per remote host; with the container and Kubernetes pod of each
    process. Refreshes every second.

    \b
    Keys: f flows, p processes, h hosts; b bytes, a rate, r retransmissions, t RTT,
    k packets; q (or Escape, Ctrl-C) quits.

    Beside a running `flowbridge run` it reads the agent's state socket (root only); without
    one (or with --local) it loads its own eBPF collector.

    \b
    Examples:
      sudo flowbridge top
      sudo flowbridge top --view processes --sort retrans
      sudo flowbridge top --local --cgroup system.slice/nginx.service
      sudo flowbridge top --once --limit 20 --svg top.svg
    """
    from rich.console import Console

    from bridge.top.live import AgentFeed, LocalFeed, Settings, Viewer, frames, opened
    from bridge.top.render import render

    if svg_path and not once:
        raise UserError("--svg FILE: only with --once")
    if cgroup and not local_mode:
        raise UserError("--cgroup: only with --local (the agent has its own --cgroup)")
    settings = Settings(view=view, sort=sort, interval=interval, limit=limit)
    if local_mode:
        feed = LocalFeed(cgroup)
    elif not os.path.exists(state_socket) and state_socket == DEFAULT_PATH:
        # No agent runs here: be useful anyway.
        click.echo(f"flowbridge top: no agent at {state_socket}; starting an own collector",
                   err=True)
        feed = LocalFeed(None)
    else:
        feed = AgentFeed(state_socket)
    signal.signal(signal.SIGTERM, _terminate)
    with opened(feed):
        viewer = Viewer(feed, settings)
        if once:
            console = Console(record=bool(svg_path), width=None if sys.stdout.isatty() else 160)
            *_, frame = frames(viewer, 2)
            console.print(render(frame, show_keys=False))
            if svg_path:
                console.save_svg(svg_path, title="flowbridge top")
            return
        try:
            from bridge.top.live import run_interactive

            run_interactive(viewer, Console())
        except KeyboardInterrupt:
            pass
