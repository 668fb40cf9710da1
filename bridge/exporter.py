"""One exporter per collector: profile -> records -> ExportSession -> transport.

Templates and sequence state live in the exporter's own ExportSession, so each collector has its
own; the transport is one long-lived socket. Nothing a collector does is fatal to the agent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

from bridge.cache import Export
from bridge.config import CollectorConfig
from bridge.errors import UserError
from bridge.messages import carries_templates, data_record_counts, numbered_before
from bridge.records import RecordBuilder, biflow_profile
from bridge.rows import RowBuilder, in_row_order
from bridge.transport import Transport, open_collector_transport
from ipfix.errors import IpfixError
from ipfix.profile import Profile, load_profile
from ipfix.session import ExportSession

log = logging.getLogger("flowbridge.exporter")

PACKETS = "packetDeltaCount"
OCTETS = "octetDeltaCount"


def load_collector_profile(config: CollectorConfig) -> Profile:
    try:
        return load_profile(config.profile_name)
    except IpfixError as exc:
        raise UserError(f"collector {config.address}: {exc}") from None


class Exporter:
    def __init__(
        self,
        config: CollectorConfig,
        observation_domain_id: int,
        *,
        biflow: bool = False,
        clock: Callable[[], float] = time.time,
        transport: Transport | None = None,
        on_socket: Callable | None = None,
        container_ids: Callable[[int], str] | None = None,
        command_lines: Callable[[int, str], str] | None = None,
    ) -> None:
        self.config = config
        self.protocol = config.protocol
        profile = load_collector_profile(config)
        # RFC 5103 exists for IPFIX only; other protocols get the two directions as two records.
        self.biflow = biflow and config.protocol == "ipfix"
        if self.biflow:
            profile = biflow_profile(profile)
        self.profile = profile
        try:
            self.session = ExportSession(
                config.protocol,
                profile,
                observation_domain_id,
                max_message_size=config.max_message_size,
                template_refresh_seconds=config.template_refresh,
                template_refresh_packets=config.template_refresh_packets,
                clock=clock,
            )
        except IpfixError as exc:
            raise UserError(f"collector {config.address}: {exc}") from None
        self.builder = RecordBuilder(
            profile.fields,
            biflow=self.biflow,
            container_ids=container_ids,
            command_lines=command_lines,
        )
        layouts = {family: self.session.row_layout(family) for family in (4, 6)}
        self.rows = RowBuilder(
            layouts,
            profile.fields,
            biflow=self.biflow,
            container_ids=container_ids,
            command_lines=command_lines,
            packs={family: self.session.direct_pack(family) for family in (4, 6)},
        )
        if transport is None:
            transport = open_collector_transport(config)
        self.transport = transport
        if on_socket is not None:
            transport.on_socket = on_socket
            if transport.socket is not None:
                on_socket(transport.socket)
        if hasattr(transport, "on_connect"):
            transport.on_connect = self._on_connect
        self.records_exported = 0  # records handed to the transport and sent or queued
        self.records_refused = 0  # records the protocol cannot carry (IPv6 in v5)
        self.template_messages = 0
        self.not_sent_packets = 0
        self.not_sent_octets = 0

    @property
    def name(self) -> str:
        c = self.config
        return f"{c.transport}://{c.address}/{c.protocol}/{self.profile.name}"

    def _on_connect(self) -> list[bytes]:
        messages = self.session.template_messages()
        self.template_messages += len(messages)
        waiting = getattr(self.transport, "waiting", None)
        if waiting is not None:  # the templates go ahead of older queued messages
            messages = numbered_before(self.protocol, messages, waiting())
        return messages

    def export(self, exports: Sequence[Export], *, biflow_cache: bool = False) -> None:
        """Cache exports to the collector: rows straight from the cache (no dict per record)."""
        if biflow_cache and not self.biflow:
            exports = _split_pairs(exports)
        if not exports:
            return
        refused_before = self.session.refused_records
        try:
            messages = self.session.encode_runs(self.rows.build(exports))
        except IpfixError as exc:
            # A value the encoder refuses is a bug or a kernel oddity: lose these, keep running.
            log.error("collector %s: cannot encode %d records: %s", self.name, len(exports), exc)
            self.records_refused += len(exports)
            return
        self._deliver(messages, len(exports), refused_before, partial(_export_totals, exports))

    def send_records(self, records: list[dict]) -> None:
        """Record dicts to the collector (replayed or built elsewhere)."""
        if not records:
            return
        refused_before = self.session.refused_records
        try:
            messages = self.session.encode(records)
        except IpfixError as exc:
            log.error("collector %s: cannot encode %d records: %s", self.name, len(records), exc)
            self.records_refused += len(records)
            return
        self._deliver(messages, len(records), refused_before, partial(_record_totals, records))

    def _deliver(
        self,
        messages: list[bytes],
        total: int,
        refused_before: int,
        totals: Callable[[int, int], tuple[int, int]],
    ) -> None:
        """Sends the messages of `total` records; `totals(start, end)` gives the packets and
        octets of records start..end, for those in a message that could not be sent."""
        refused = self.session.refused_records - refused_before
        self.records_refused += refused
        counts = data_record_counts(self.protocol, messages, total - refused)
        send = self.transport.send
        protocol = self.protocol
        position = 0  # records go in order (per family, v4 first), so messages map to slices
        for message, count in zip(messages, counts, strict=True):
            if not count and carries_templates(protocol, message):
                self.template_messages += 1
            if not send(message, count) and count and not refused:
                packets, octets = totals(position, position + count)
                self.not_sent_packets += packets
                self.not_sent_octets += octets
            position += count
        self.records_exported += total - refused

    def send_options(
        self, interfaces: dict[int, str] | None = None, ignored_packets: int = 0
    ) -> None:
        """Exporter statistics (RFC 7011 §4.3), system init time and interface names, as far as
        the protocol carries them. Sampling goes in every record (samplingInterval = 1) instead
        of an options record, which would sit in the flow domain (collectors.md 2.12).
        `ignored_packets`: packets the kernel did not meter (its flow map was full)."""
        stats = {
            "notSentFlowTotalCount": self.transport.stats.records_dropped,
            "notSentPacketTotalCount": self.not_sent_packets,
            "notSentOctetTotalCount": self.not_sent_octets,
            "ignoredPacketTotalCount": ignored_packets,
        }
        try:
            messages = self.session.options_messages(stats, interfaces=interfaces)
        except IpfixError as exc:
            log.error("collector %s: cannot encode options: %s", self.name, exc)
            return
        for message in messages:
            self.transport.send(message, 0)

    def flush(self) -> None:
        self.transport.flush()

    def close(self, drain_seconds: float = 2.0) -> None:
        self.transport.close(drain_seconds)


def _record_totals(records: Sequence[dict], start: int, end: int) -> tuple[int, int]:
    lost = records[start:end]
    return sum(r.get(PACKETS, 0) for r in lost), sum(r.get(OCTETS, 0) for r in lost)


def _export_totals(exports: Sequence[Export], start: int, end: int) -> tuple[int, int]:
    """Both directions of a biflow record count: the whole record was lost."""
    packets = octets = 0
    for export in in_row_order(exports)[start:end]:
        packets += export[2]
        octets += export[1]
        peer = export[8]
        if peer is not None:
            packets += peer[2]
            octets += peer[1]
    return packets, octets


def _split_pairs(exports: Sequence[Export]) -> list[Export]:
    out = []
    for export in exports:
        peer = export[8]
        if peer is None:
            out.append(export)
        else:
            out.append(export[:8] + (None,))
            out.append(peer + (None,))
    return out
