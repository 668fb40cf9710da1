"""One export session per collector: templates, sequence numbers, refresh, the v9/v5 time base."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import chain, islice, repeat
from operator import contains, itemgetter

from ipfix.assembler import data_bodies
from ipfix.errors import IpfixError
from ipfix.ipfix_encoder import IpfixEncoder
from ipfix.options import STATS_FIELDS, STATS_SCOPE, check_stats
from ipfix.packer import Packed, RecordPacker
from ipfix.profile import Profile
from ipfix.uptime import UptimeClock
from ipfix.v5_encoder import V5Encoder
from ipfix.v9_encoder import V9Encoder

IPV6_KEY = "sourceIPv6Address"


def _has_ipv6(records: Sequence[dict]) -> bool:
    return any(map(contains, records, repeat(IPV6_KEY)))


def _time_getters(
    packer: RecordPacker, missing: int
) -> tuple[Callable[[tuple], int], Callable[[tuple], int]]:
    """Getters of a row's flow start and end (epoch ms); `missing` when the template has none."""
    keys = packer.keys
    getters = []
    for name in ("flowStartMilliseconds", "flowEndMilliseconds"):
        if name in keys:
            getters.append(itemgetter(keys.index(name)))
        else:
            getters.append(lambda row, value=missing: value)
    return getters[0], getters[1]


class ExportSession:
    """Encodes records for one collector. Not thread-safe: one session per sending thread."""

    def __init__(
        self,
        protocol: str,
        profile: Profile,
        observation_domain_id: int,
        *,
        max_message_size: int = 1400,
        template_refresh_seconds: float = 30,
        template_refresh_packets: int = 20,
        clock: Callable[[], float] = time.time,
        exporting_process_id: int | None = None,
    ) -> None:
        if protocol not in ("ipfix", "v9", "v5"):
            raise IpfixError(f"protocol '{protocol}': expected ipfix, v9 or v5")
        if protocol not in profile.protocols:
            raise IpfixError(
                f"profile '{profile.name}' is for {', '.join(profile.protocols)}, not {protocol}"
            )
        if not 0 < observation_domain_id < 1 << 32:
            raise IpfixError(
                f"observation domain id {observation_domain_id}: must be 1..4294967295 "
                "(0 is reserved for exporter statistics)"
            )
        if protocol != "v5" and not 256 <= max_message_size <= 65535:
            raise IpfixError(f"max message size {max_message_size}: must be 256..65535")
        if template_refresh_seconds <= 0 or template_refresh_packets <= 0:
            raise IpfixError("template refresh interval and packet count must be positive")
        self.protocol = protocol
        self.profile = profile
        self.observation_domain_id = observation_domain_id
        self.max_message_size = max_message_size
        self.template_refresh_seconds = template_refresh_seconds
        self.template_refresh_packets = template_refresh_packets
        self.clock = clock
        self.exporting_process_id = (
            os.getpid() if exporting_process_id is None else exporting_process_id
        )
        self.refused_records = 0
        self.messages_sent = 0
        self.records_sent = 0
        self.octets_sent = 0
        self.start_ms = int(clock() * 1000)
        self._last_templates: float | None = None
        self._messages_since_templates = 0
        self._encoder: IpfixEncoder | V9Encoder | V5Encoder
        if protocol == "ipfix":
            self._encoder = IpfixEncoder(profile, observation_domain_id, max_message_size)
        elif protocol == "v9":
            self._encoder = V9Encoder(profile, observation_domain_id, max_message_size)
        else:
            # v5's only stream identity: engine_type/engine_id, taken from the domain id.
            self._encoder = V5Encoder(
                (observation_domain_id >> 8) & 0xFF, observation_domain_id & 0xFF
            )

    @property
    def templates(self) -> dict:
        """The data templates by address family (4, 6); empty for v5."""
        return {} if isinstance(self._encoder, V5Encoder) else dict(self._encoder.templates)

    def row_layout(self, family: int) -> tuple[tuple[str, object], ...]:
        """The rows `encode_rows` takes for an address family (4, 6): (record key, value when the
        record has none) in row order. Empty when the protocol cannot carry the family (IPv6 in
        v5): such rows are refused and counted."""
        packer = self._packer(family)
        if packer is None:
            return ()
        return tuple(zip(packer.keys, packer.row_defaults, strict=True))

    def direct_pack(self, family: int) -> Callable[..., bytes] | None:
        """For rows of `family` whose records do not depend on the batch (all but v9/v5 with
        their relative times): the function of one row's values to its record. A caller that
        packs its rows with it passes them to `encode_runs` as an `ipfix.packer.Packed` list
        instead of tuples, and no row tuple is ever made."""
        packer = self._packer(family)
        return packer.direct_pack if packer is not None else None

    def encode(self, records: Sequence[dict]) -> list[bytes]:
        """Complete messages, each within max_message_size (v5: 30 records), templates first
        whenever they are due."""
        now = self.clock()
        now_ms = int(now * 1000)
        encoder = self._encoder
        if isinstance(encoder, V5Encoder):
            if _has_ipv6(records):
                kept = [r for r in records if IPV6_KEY not in r]
                self.refused_records += len(records) - len(kept)
                records = kept
            header_ms, records, refused, _ = encoder.uptime.stamp(now_ms, records)
            self.refused_records += refused
            rows = encoder.packer.rows(records)
            return self._count(encoder.packets(rows, header_ms), len(rows))
        header_ms = now_ms
        if isinstance(encoder, V9Encoder):
            header_ms, records, refused, moved = encoder.uptime.stamp(now_ms, records)
            self.refused_records += refused
            if moved:
                self._last_templates = None  # a new time base: resend templates at once
        runs = [(packer, packer.rows(run)) for packer, run in self._runs(records, encoder.packers)]
        return self._data_messages(runs, header_ms, now)

    def encode_rows(self, family: int, rows: Sequence[tuple]) -> list[bytes]:
        """As `encode`, for rows of one address family laid out as `row_layout(family)` says:
        what the agent builds straight from its flow cache, with no dict per record."""
        return self.encode_runs([(family, rows)])

    def encode_runs(self, runs: Sequence[tuple[int, Sequence[tuple]]]) -> list[bytes]:
        """Several (family, rows) runs in this order; sets of different families share
        messages where they fit. Rows may come packed (`direct_pack`, `Packed`)."""
        now = self.clock()
        now_ms = int(now * 1000)
        encoder = self._encoder
        packed_runs = []
        for family, rows in runs:
            packer = self._packer(family)
            if packer is None:
                self.refused_records += len(rows)
            elif type(rows) is Packed and packer.direct_pack is None:
                raise IpfixError(f"address family {family}: packed records given, but the "
                                 f"{self.protocol} records depend on the batch's time base")
            elif rows:
                packed_runs.append((packer, rows))
        if isinstance(encoder, V5Encoder):
            rows = [row for _, run in packed_runs for row in run]
            header_ms, kept, _ = self._stamp_rows(encoder.uptime, now_ms, [(encoder.packer, rows)])
            rows = kept[0][1] if kept else []
            return self._count(encoder.packets(rows, header_ms), len(rows))
        header_ms = now_ms
        if isinstance(encoder, V9Encoder):
            header_ms, packed_runs, moved = self._stamp_rows(encoder.uptime, now_ms, packed_runs)
            if moved:
                self._last_templates = None  # a new time base: resend templates at once
        return self._data_messages(packed_runs, header_ms, now)

    def _packer(self, family: int) -> RecordPacker | None:
        encoder = self._encoder
        if isinstance(encoder, V5Encoder):
            return encoder.packer if family == 4 else None
        if family not in encoder.packers:
            raise IpfixError(f"address family {family}: expected 4 or 6")
        return encoder.packers[family]

    def _stamp_rows(
        self, uptime: UptimeClock, now_ms: int, runs: list[tuple[RecordPacker, Sequence[tuple]]]
    ) -> tuple[int, list[tuple[RecordPacker, Sequence[tuple]]], bool]:
        """The v9/v5 time base for rows: (header time, runs without the rows it cannot carry,
        whether the epoch moved)."""
        earliest: int | None = None
        latest: int | None = None
        for packer, rows in runs:
            if not rows:
                continue
            start, end = _time_getters(packer, now_ms)
            try:
                ends = list(map(end, rows))
                low = min(min(map(start, rows)), min(ends))
                high = max(ends)
            except TypeError:
                raise IpfixError("rows: flow times must be integers (epoch ms)") from None
            except IndexError:
                for row in rows:
                    packer.check_length(row)
                raise
            earliest = low if earliest is None else min(earliest, low)
            latest = high if latest is None else max(latest, high)
        header_ms, moved = uptime.advance(now_ms, earliest, latest)
        boot = uptime.boot_ms
        assert boot is not None
        if earliest is None or earliest >= boot:
            return header_ms, runs, moved
        kept_runs = []
        for packer, rows in runs:
            start, end = _time_getters(packer, header_ms)
            kept = [row for row in rows if start(row) >= boot and end(row) >= boot]
            self.refused_records += len(rows) - len(kept)
            if kept:
                kept_runs.append((packer, kept))
        return header_ms, kept_runs, moved

    def _data_messages(
        self, runs: list[tuple[RecordPacker, Sequence[tuple]]], header_ms: int, now: float
    ) -> list[bytes]:
        encoder = self._encoder
        assert not isinstance(encoder, V5Encoder)
        boot_ms = (encoder.uptime.boot_ms or 0) if isinstance(encoder, V9Encoder) else 0
        packed = [(p.template.template_id, p.pack(rows, boot_ms)) for p, rows in runs if rows]
        sent = sum(len(p) for _, p in packed)
        max_body = self.max_message_size - encoder.header_length
        bodies = data_bodies(packed, max_body, encoder.align)
        messages: list[bytes] = []
        # Records are packed as their bodies are made, so a value that cannot be encoded stops
        # the batch midway: then no message of it was ever made (sequence numbers included).
        before = (encoder.sequence, self._last_templates, self._messages_since_templates)
        try:
            # Templates go before the first message when due, and then as often as the refresh
            # asks; the messages in between are wrapped in one call.
            for first in bodies:
                if self._templates_due(now):
                    messages += self._templates(header_ms, now)
                room = self.template_refresh_packets - self._messages_since_templates
                data = encoder.wrap_bodies(chain((first,), islice(bodies, room - 1)), header_ms)
                messages += data
                self._messages_since_templates += len(data)
        except IpfixError:
            encoder.sequence, self._last_templates, self._messages_since_templates = before
            raise
        return self._count(messages, sent)

    def template_messages(self) -> list[bytes]:
        """Every template now (a TCP reconnect, a forced refresh)."""
        if isinstance(self._encoder, V5Encoder):
            return []
        now = self.clock()
        return self._count(self._templates(self._header_ms(now), now), 0)

    def options_messages(
        self,
        stats: dict[str, int],
        *,
        interfaces: dict[int, str] | None = None,
        sampling: bool = False,
    ) -> list[bytes]:
        """Options data: the exporting process's reliability statistics (notSent* counts from
        `stats`, its own exported* totals, its start time) - in observation domain 0 for IPFIX;
        optionally interface names (ifindex -> name) and the unsampled sampling parameters, which
        describe the flow domain and go in its domain. Nothing for v5, which has no options."""
        check_stats({k: v for k, v in stats.items() if k != STATS_SCOPE})
        encoder = self._encoder
        if isinstance(encoder, V5Encoder):
            return []
        record = {
            "exportedMessageTotalCount": self.messages_sent,
            "exportedFlowRecordTotalCount": self.records_sent,
            "exportedOctetTotalCount": self.octets_sent,
            "systemInitTimeMilliseconds": self.start_ms,
            **stats,
        }
        now = self.clock()
        if isinstance(encoder, IpfixEncoder):
            record.setdefault(STATS_SCOPE, self.exporting_process_id)
        else:
            record.pop(STATS_SCOPE, None)
            record = {k: v for k, v in record.items() if k in STATS_FIELDS}
        messages = encoder.options_messages(record, self._header_ms(now), interfaces, sampling)
        return self._count(messages, 0)

    def _header_ms(self, now: float) -> int:
        now_ms = int(now * 1000)
        if isinstance(self._encoder, V9Encoder):
            # Header times never go back: the last data packet may have rounded up.
            header_ms = -(-now_ms // 1000) * 1000
            return header_ms
        return now_ms

    def _templates_due(self, now: float) -> bool:
        return (
            self._last_templates is None
            or now - self._last_templates >= self.template_refresh_seconds
            or self._messages_since_templates >= self.template_refresh_packets
        )

    def _templates(self, header_ms: int, now: float) -> list[bytes]:
        assert not isinstance(self._encoder, V5Encoder)
        self._last_templates = now
        self._messages_since_templates = 0
        return self._encoder.template_messages(header_ms)

    def _count(self, messages: list[bytes], records: int) -> list[bytes]:
        self.messages_sent += len(messages)
        self.records_sent += records
        self.octets_sent += sum(map(len, messages))
        return messages

    @staticmethod
    def _runs(
        records: Sequence[dict], packers: dict[int, RecordPacker]
    ) -> Iterator[tuple[RecordPacker, Sequence[dict]]]:
        """Consecutive records of one address family, in input order."""
        v4, v6 = packers[4], packers[6]
        if not _has_ipv6(records):
            if records:
                yield v4, records
            return
        start = 0
        current = IPV6_KEY in records[0]
        for i, record in enumerate(records):
            is_v6 = IPV6_KEY in record
            if is_v6 != current:
                yield (v6 if current else v4), records[start:i]
                start, current = i, is_v6
        yield (v6 if current else v4), records[start:]
