"""Self-metrics in Prometheus format, on the agent's own registry. Values are read from the
agent's counters at scrape time, so the export path pays nothing per record for them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.addresses import parse_hostport
from bridge.agent import Agent
from bridge.cache import EndReason
from bridge.config import metrics_address
from bridge.errors import UserError


class AgentCollector:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        exporters = list(agent.exporters)

        def per_collector(name: str, doc: str, value_of, gauge: bool = False) -> Metric:  # type: ignore[no-untyped-def]
            family = (GaugeMetricFamily if gauge else CounterMetricFamily)(
                f"flowbridge_{name}", doc, labels=["collector"]
            )
            for exporter in exporters:
                family.add_metric([exporter.name], value_of(exporter))
            return family

        yield per_collector(
            "exported_records", "Flow records sent or queued", lambda e: e.records_exported
        )
        yield per_collector(
            "exported_messages", "Messages sent", lambda e: e.transport.stats.messages_sent
        )
        yield per_collector("exported_bytes", "Bytes sent", lambda e: e.transport.stats.bytes_sent)
        yield per_collector(
            "send_errors",
            "Failed sends and lost connections",
            lambda e: e.transport.stats.send_errors,
        )
        yield per_collector(
            "send_refused",
            "ICMP port unreachable / connection refused",
            lambda e: e.transport.stats.refused,
        )
        yield per_collector(
            "dropped_messages",
            "Messages given up on (never sent)",
            lambda e: e.transport.stats.messages_dropped,
        )
        yield per_collector(
            "dropped_records",
            "Flow records in messages never sent",
            lambda e: e.transport.stats.records_dropped,
        )
        yield per_collector(
            "refused_records",
            "Records the protocol cannot carry (IPv6 in v5)",
            lambda e: e.records_refused,
        )
        yield per_collector(
            "template_messages",
            "Messages carrying templates (sends, refreshes)",
            lambda e: e.template_messages,
        )
        yield per_collector(
            "tcp_connects", "TCP connections established", lambda e: e.transport.stats.connects
        )
        yield per_collector(
            "resent_messages",
            "Messages a lost TCP connection never acknowledged, sent again on the next",
            lambda e: e.transport.stats.messages_resent,
        )
        yield per_collector(
            "tls_handshake_failures",
            "TLS handshakes failed or refused (certificate verification, alerts)",
            lambda e: e.transport.stats.tls_failures,
        )
        yield per_collector(
            "backlog_messages",
            "Messages waiting for a TCP collector",
            lambda e: e.transport.backlog_messages,
            gauge=True,
        )

        flows = CounterMetricFamily(
            "flowbridge_flows", "Flow records by flowEndReason", labels=["reason"]
        )
        for reason in EndReason:
            flows.add_metric([reason.name.lower()], agent.cache.records_by_reason[reason])
        yield flows
        yield GaugeMetricFamily(
            "flowbridge_cache_flows", "Flows in the cache", value=len(agent.cache)
        )
        yield GaugeMetricFamily(
            "flowbridge_cache_capacity", "The cache's bound", value=agent.cache.max_flows
        )
        yield CounterMetricFamily(
            "flowbridge_cache_evictions",
            "Flows expired early because the cache was full",
            value=agent.cache.evictions,
        )
        yield CounterMetricFamily(
            "flowbridge_counter_resets",
            "Kernel counters that restarted for a live flow",
            value=agent.cache.counter_resets,
        )
        yield CounterMetricFamily(
            "flowbridge_observations", "Observations read from the source", value=agent.observations
        )
        yield CounterMetricFamily(
            "flowbridge_reloads", "Configuration reloads (SIGHUP)", value=agent.reloads
        )
        stats = agent.source_stats
        if stats is not None:
            yield GaugeMetricFamily(
                "flowbridge_kernel_map_flows", "Flows in the kernel map", value=stats.flows_in_map
            )
            yield GaugeMetricFamily(
                "flowbridge_kernel_map_capacity", "The kernel map's bound", value=stats.map_capacity
            )
            yield CounterMetricFamily(
                "flowbridge_kernel_map_full_drops",
                "Packets or flows not tracked because a map was full",
                value=stats.map_full_drops,
            )
            yield CounterMetricFamily(
                "flowbridge_kernel_events_lost", "Ring buffer events lost", value=stats.events_lost
            )
            extra = GaugeMetricFamily(
                "flowbridge_kernel", "Other source statistics", labels=["name"]
            )
            for name, value in sorted(stats.extra.items()):
                extra.add_metric([name], value)
            yield extra


def serve_metrics(agent: Agent, address: str | int) -> CollectorRegistry:
    """Starts the HTTP endpoint (a daemon thread) on HOST:PORT; a bare PORT means loopback."""
    try:
        host, port = parse_hostport(metrics_address(address), "--metrics")
    except UserError as exc:
        raise UserError(f"--{exc}") from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent))
    try:
        start_http_server(port, addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise UserError(f"--metrics {address}: cannot listen: {exc.strerror or exc}") from None
    return registry
