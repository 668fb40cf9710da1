"""The agent's loop: poll the source, update the cache, expire, export to every collector.

One thread does all the work (the metrics server only reads counters). Signals only set flags;
the loop acts on them between polls: stop exports every live flow as a forced end, reload swaps
exporters and timeouts but keeps the cache, so no flow state is lost.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from bridge.cache import Export, FlowCache
from bridge.command_lines import command_lines_for
from bridge.config import AgentConfig, CollectorConfig, default_observation_domain_id
from bridge.containers import CgroupResolver
from bridge.errors import UserError
from bridge.exporter import Exporter
from bridge.loopback import LoopbackCollector
from ebpf.observation import ObservationSource, SourceStats

log = logging.getLogger("flowbridge.agent")

POLL_MS = 200  # bounds how late a signal is acted on
# Every record allocates tuples and objects, freed by reference counting, not by the cyclic
# collector. A young collection walks every young object still alive, and all of one poll's
# observations are alive together: at 10,000 a collection cost ~1 ms and the collector ~13% of
# the agent's CPU under churn (bench.churn, GC time from gc.callbacks), at 100,000 ~3-6%.
# At the default (700) bench.pipeline ran ~565k records/s, at 10,000 ~810k.
GC_THRESHOLD = (100_000, 20, 100)


def tune_gc() -> None:
    """Once start-up is done: move everything allocated so far (modules, BPF tables, config) out
    of the collector's sight, and collect the young generation far less often; give back what
    start-up (the BPF compile) no longer needs."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    release_startup_memory()


def release_startup_memory() -> None:
    """Returns the heap freed after start-up (loading, the first scans) to the kernel. bcc and
    LLVM never load here: ebpf/compiler.py compiles in a child process. Best effort: a libc
    without malloc_trim does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


# Resolved container ids kept per agent; past this many (containers come and go) start afresh.
CONTAINER_MEMO = 4096


def container_ids(resolver: CgroupResolver) -> Callable[[int], str]:
    """cgroup id -> container id ("" for host processes and ids not resolved yet), for the
    records' SRC/DST_PROC_CONTAINER_ID. A plain dict in front of the resolver: a known id costs
    one lookup, no lock. Unknown ids go to the resolver, which walks the cgroup tree at most once
    per its refresh interval; host processes are cached by the resolver itself."""
    known: dict[int, str] = {}

    def container_id(cgroup_id: int) -> str:
        found = known.get(cgroup_id)
        if found is not None:
            return found
        info = resolver.container(cgroup_id)
        if info is None:
            return ""
        if len(known) >= CONTAINER_MEMO:
            known.clear()
        known[cgroup_id] = info.container_id
        return info.container_id

    return container_id


def interface_names() -> dict[int, str]:
    try:
        return dict(socket.if_nameindex())
    except OSError:
        return {}


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        source: ObservationSource,
        *,
        clock: Callable[[], float] = time.time,
        printer: Callable[[str], None] = print,
        containers: CgroupResolver | None = None,
    ) -> None:
        """`containers`: the agent's one cgroup resolver (default: the host's cgroup2 mount)."""
        self.config = config
        self.containers = containers if containers is not None else CgroupResolver()
        self.container_ids = container_ids(self.containers)
        self.source = source
        self.clock = clock
        self._printer = printer
        self.observation_domain_id = self.domain_for("ipfix", config)
        self.cache = FlowCache(
            active_timeout=config.active_timeout,
            idle_timeout=config.idle_timeout,
            max_flows=config.max_flows,
            biflow=config.biflow,
        )
        # Held while the loop changes the cache: a reader on another thread (the state socket,
        # bridge/top/view.py) takes it to read the flows whole.
        self.cache_lock = threading.Lock()
        # Given every batch of records that left the cache, under cache_lock (top's view).
        self.on_records: Callable[[list[Export], int], None] | None = None
        self.loopback: LoopbackCollector | None = None
        self.exporters: list[Exporter] = self._exporters(config, {})
        self.observations = 0
        self.reloads = 0
        self.source_stats: SourceStats | None = None
        self._next_options = 0.0
        self._next_stats = 0.0
        self._stop = False
        self._reload = False

    # -- exporters ------------------------------------------------------------------------------

    def _exporters(
        self, config: AgentConfig, keep: dict[tuple[CollectorConfig, bool], Exporter]
    ) -> list[Exporter]:
        """Exporters for `config`; those in `keep` with the same settings are reused, so their
        sockets, templates and sequence numbers carry on."""
        collectors = list(config.collectors)
        if not collectors:
            if self.loopback is None:
                self.loopback = LoopbackCollector(self._printer)
                exclude_own = getattr(self.source, "exclude_socket", None)
                if exclude_own is not None:  # or each export would be a new flow to export
                    exclude_own(self.loopback.socket)
                log.info(
                    "no collector configured: printing flows from the built-in collector on "
                    "127.0.0.1:%d",
                    self.loopback.port,
                )
            collectors = [CollectorConfig(host="127.0.0.1", port=self.loopback.port)]
        exclude = getattr(self.source, "exclude_socket", None)
        command_lines = command_lines_for(
            config.export_command_lines, (c.profile_name for c in collectors)
        )
        exporters: list[Exporter] = []
        created: list[Exporter] = []
        try:
            for collector in collectors:
                reused = keep.get((collector, config.biflow))
                if reused is not None:
                    exporters.append(reused)
                    continue
                created.append(
                    Exporter(
                        collector,
                        collector.observation_domain_id or self.domain_for(collector.protocol),
                        biflow=config.biflow,
                        clock=self.clock,
                        on_socket=exclude,
                        container_ids=self.container_ids,
                        command_lines=command_lines,
                    )
                )
                exporters.append(created[-1])
        except UserError:
            for exporter in created:
                exporter.close(0)
            raise
        return exporters

    def domain_for(self, protocol: str, config: AgentConfig | None = None) -> int:
        """The configured observation domain id, else one derived per protocol from the machine
        id (IPFIX and v9 streams of one host must not share an id at one collector)."""
        config = config or self.config
        return config.observation_domain_id or default_observation_domain_id(protocol)

    def reload(self, config: AgentConfig) -> None:
        """New configuration, same flows. Unchanged collectors keep their exporter."""
        if config.observation_domain_id and (
            config.observation_domain_id != self.observation_domain_id
        ):
            log.warning(
                "reload: a new observation domain id needs a restart; keeping %d",
                self.observation_domain_id,
            )
        if config.kernel_max_flows != self.config.kernel_max_flows:
            log.warning(
                "reload: the kernel flow map's size needs a restart; keeping %d",
                self.config.kernel_max_flows,
            )
            config = replace(config, kernel_max_flows=self.config.kernel_max_flows)
        if config.biflow != self.cache.biflow:
            log.warning(
                "reload: switching biflow needs a restart; keeping biflow=%s", self.cache.biflow
            )
            config = replace(config, biflow=self.cache.biflow)
        old = {(e.config, self.cache.biflow): e for e in self.exporters}
        new = self._exporters(config, old)
        for exporter in self.exporters:
            if exporter not in new:
                log.info("collector %s removed", exporter.name)
                exporter.close(drain_seconds=1.0)
        for exporter in new:
            if exporter not in self.exporters:
                log.info("collector %s added", exporter.name)
        self.exporters = new
        self.cache.set_timeouts(config.active_timeout, config.idle_timeout)
        self.cache.max_flows = config.max_flows
        self.config = config
        self.reloads += 1
        self._next_options = 0.0  # announce the new exporters' options soon
        log.info(
            "configuration reloaded: %d collector(s), %d flows kept",
            len(self.exporters),
            len(self.cache),
        )

    # -- the loop -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop = True

    def request_reload(self) -> None:
        self._reload = True

    def run(self, load_config: Callable[[], AgentConfig] | None = None) -> None:
        """Until a stop is requested; then every live flow is exported (forced end)."""
        log.info(
            "exporting to %s",
            ", ".join(
                f"{e.name} (observation domain {e.session.observation_domain_id})"
                for e in self.exporters
            ),
        )
        try:
            while not self._stop:
                if self._reload:
                    self._reload = False
                    if load_config is not None:
                        try:
                            self.reload(load_config())
                        except UserError as exc:
                            log.error("reload refused, keeping the running configuration: %s", exc)
                self.step()
        finally:
            self.shutdown()

    def step(self, poll_ms: int = POLL_MS) -> None:
        observations = self.source.poll(poll_ms)
        exports: list[Export] = []
        with self.cache_lock:
            if observations:
                self.observations += len(observations)
                exports = self.cache.update(observations)
            now = self.clock()
            now_ms = int(now * 1000)
            exports += self.cache.sweep(now_ms)
            released = self.cache.take_released()
            if self.on_records is not None:
                self.on_records(exports, now_ms)
        if released:
            self.source.release(released)
        self.export(exports)
        if now >= self._next_options:
            self._next_options = now + self.config.options_interval
            names = interface_names()
            stats = self.source_stats
            ignored = stats.map_full_drops if stats is not None else 0
            for exporter in self.exporters:
                exporter.send_options(names, ignored_packets=ignored)
        for exporter in self.exporters:
            exporter.flush()
        if now >= self._next_stats:
            self._next_stats = now + 1.0
            self.source_stats = self.source.stats()
        if self.loopback is not None:
            self.loopback.drain()

    def export(self, exports: list[Export]) -> None:
        if not exports:
            return
        biflow = self.cache.biflow
        for exporter in self.exporters:
            exporter.export(exports, biflow_cache=biflow)

    def shutdown(self, drain_seconds: float = 2.0) -> None:
        """Forced end for every live flow, sent before the sockets close. One last poll first:
        packets counted since the previous poll belong in the final records."""
        exports: list[Export] = []
        try:
            last = self.source.poll(0, final=True)
        except Exception as exc:  # a broken source must not cost the flows already cached
            log.error("last poll before shutdown failed: %s", exc)
            last = []
        with self.cache_lock:
            if last:
                self.observations += len(last)
                exports = self.cache.update(last)
            flows = len(self.cache)
            exports += self.cache.flush_all()
        self.export(exports)
        log.info("shutting down: %d live flows exported as forced end", flows)
        for exporter in self.exporters:
            exporter.close(drain_seconds)
        if self.loopback is not None:
            self.loopback.close()
        self.source.close()
