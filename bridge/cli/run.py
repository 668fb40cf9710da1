"""`flowbridge run`: the agent. Flags override the config file; SIGHUP re-reads both."""

from __future__ import annotations

import logging
import signal
import sys

import click

from bridge.config import Overrides, build_config
from bridge.errors import UserError

log = logging.getLogger("flowbridge")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def open_source(  # type: ignore[no-untyped-def]
    spec: str, cgroup: str | None, max_flows: int = 65536
):
    """The observation source: the eBPF collector (its kernel flow map holds `max_flows`), or
    `replay:FILE` (JSON lines, for tests)."""
    if spec.startswith("replay:"):
        from bridge.synthetic import ReplaySource

        return ReplaySource(spec.removeprefix("replay:"))
    if spec != "ebpf":
        raise UserError(f"--source {spec!r}: expected 'ebpf' or 'replay:FILE'")
    try:
        from ebpf.collector import FlowCollector
        from ebpf.errors import EbpfUnavailable
    except ImportError as exc:
        raise UserError(f"the eBPF collector is not available in this build ({exc})") from None
    try:
        return FlowCollector(cgroup=cgroup, max_flows=max_flows)
    except EbpfUnavailable as exc:
        raise UserError(f"eBPF unavailable: {exc} (see `flowbridge doctor`)") from None


def _number(text: str | None, flag: str, kind: type = float) -> float | int | None:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{flag} {text!r}: expected {what}") from None


@click.command("run")
@click.option("--config", "config_path", metavar="FILE", help="TOML file (several collectors).")
@click.option(
    "--collector",
    "collectors",
    multiple=True,
    metavar="HOST:PORT",
    help="Collector address, IPv6 as [addr]:port. Repeatable. Default: print flows here.",
)
@click.option("--protocol", help="ipfix (default), v9 or v5.")
@click.option("--profile", help="Export profile: standard, ntop, nfdump-latency, v5 or a path.")
@click.option("--transport", help="udp (default), tcp or tls (IPFIX over TLS).")
@click.option("--tls-ca", metavar="FILE", help="tls: the collector's CA (default: system store).")
@click.option("--tls-cert", metavar="FILE", help="tls: client certificate, if the collector asks.")
@click.option("--tls-key", metavar="FILE", help="tls: the client certificate's private key.")
@click.option(
    "--tls-server-name", metavar="NAME", help="tls: name to verify (default: the collector host)."
)
@click.option("--source-address", metavar="ADDR", help="Source address of the export socket.")
@click.option("--active-timeout", metavar="SECONDS", help="Export long flows this often (60).")
@click.option("--idle-timeout", metavar="SECONDS", help="End flows idle this long (15).")
@click.option("--max-flows", metavar="N", help="Cache bound (100000).")
@click.option(
    "--observation-domain-id", metavar="ID", help="Default: derived from /etc/machine-id."
)
@click.option("--max-message-size", metavar="BYTES", help="Largest message (1400).")
@click.option("--template-refresh", metavar="SECONDS", help="Resend templates this often (30).")
@click.option("--template-refresh-packets", metavar="N", help="...and every N messages (20).")
@click.option("--cgroup", metavar="PATH", help="Watch only this cgroup-v2 subtree.")
@click.option(
    "--metrics",
    metavar="[HOST:]PORT",
    help="Serve Prometheus metrics; a bare port listens on 127.0.0.1 only.",
)
@click.option("--biflow/--no-biflow", default=None, help="RFC 5103 biflow records (IPFIX).")
@click.option(
    "--export-command-lines",
    is_flag=True,
    default=None,
    help="Allow profiles that export process command lines (they can hold secrets).",
)
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"]),
    show_default=True,
)
@click.option(
    "--state-socket",
    metavar="PATH",
    help="Serve live flows to `flowbridge top` here; '' turns it off. "
    "Default with eBPF: /run/flowbridge/state.sock.",
)
@click.option("--user", "run_as", metavar="NAME", help="After attaching, drop to this user.")
@click.option("--source", "source_spec", default="ebpf", hidden=True)
def run(
    config_path: str | None,
    collectors: tuple[str, ...],
    protocol: str | None,
    profile: str | None,
    transport: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_server_name: str | None,
    source_address: str | None,
    active_timeout: str | None,
    idle_timeout: str | None,
    max_flows: str | None,
    observation_domain_id: str | None,
    max_message_size: str | None,
    template_refresh: str | None,
    template_refresh_packets: str | None,
    cgroup: str | None,
    metrics: str | None,
    biflow: bool | None,
    export_command_lines: bool | None,
    log_level: str,
    state_socket: str | None,
    run_as: str | None,
    source_spec: str,
) -> None:
    """Collect flows with eBPF and export them to every collector.

    SIGTERM/SIGINT export every live flow (forced end) and exit 0; SIGHUP reloads the
    configuration and keeps the flows.

    \b
    Examples:
      sudo flowbridge run                                  # print flows here
      sudo flowbridge run --collector 10.0.0.5:4739 --profile ntop
      sudo flowbridge run --collector 10.0.0.5:2055 --protocol v9 --user nobody
      sudo flowbridge run --config /etc/flowbridge/flowbridge.toml --metrics 9465
      sudo flowbridge run --collector 10.0.0.5:4740 --transport tls --tls-ca ca.pem
    """
    _configure_logging(log_level)
    overrides = Overrides(
        collectors=collectors,
        agent={
            "active_timeout": _number(active_timeout, "--active-timeout"),
            "idle_timeout": _number(idle_timeout, "--idle-timeout"),
            "max_flows": _number(max_flows, "--max-flows", int),
            "observation_domain_id": _number(observation_domain_id, "--observation-domain-id", int),
            "cgroup": cgroup,
            "metrics": metrics,
            "biflow": biflow,
            "export_command_lines": export_command_lines,
        },
        collector={
            "protocol": protocol,
            "profile": profile,
            "transport": transport,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "tls_server_name": tls_server_name,
            "source": source_address,
            "max_message_size": _number(max_message_size, "--max-message-size", int),
            "template_refresh": _number(template_refresh, "--template-refresh"),
            "template_refresh_packets": _number(
                template_refresh_packets, "--template-refresh-packets", int
            ),
        },
    )
    config = build_config(config_path, overrides)

    # -- operator hooks (bridge/state.py, bridge/privileges.py) --
    from bridge import privileges, state
    from bridge.agent import Agent, tune_gc

    account = privileges.lookup_user(run_as) if run_as else None
    if account is not None:
        probe = privileges.map_access_after_drop(account)
        if not probe.ok:
            raise UserError(f"--user {run_as}: {probe.detail}")
    state_path = state_socket
    if state_path is None and source_spec == "ebpf":
        state_path = state.DEFAULT_PATH
    # -- end of operator hooks --
    source = open_source(source_spec, config.cgroup, config.kernel_max_flows)
    try:
        agent = Agent(config, source, printer=lambda line: print(line, flush=True))
    except BaseException:
        source.close()
        raise
    state_server = None
    if state_path:
        try:
            state_server = state.serve_for_agent(
                state_path, agent, explicit=state_socket is not None
            )
        except UserError:
            agent.shutdown(drain_seconds=0)
            raise
    if config.metrics:
        from bridge.metrics import serve_metrics

        try:
            serve_metrics(agent, config.metrics)
        except UserError:
            agent.shutdown(drain_seconds=0)
            raise
        log.info("metrics on http://%s/metrics", config.metrics)

    if account is not None:  # everything privileged is done: programs attached, sockets bound
        try:
            privileges.stop_interface_discovery(getattr(source, "source", source))
            privileges.drop_privileges(account)
        except (UserError, OSError) as exc:
            if state_server is not None:
                state_server.close()
            agent.shutdown(drain_seconds=0)
            raise UserError(f"--user {run_as}: {exc}") from None

    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: agent.request_reload())
    tune_gc()
    try:
        agent.run(load_config=lambda: build_config(config_path, overrides))
    finally:
        if state_server is not None:
            state_server.close()
    log.info("stopped")
