"""Every live cell of the matrix judged from one LiveRun: the problems of each cell (the tests
assert there are none) and the Results the matrix is rendered from."""

from __future__ import annotations

from tests.compat.collector_set import Decoded
from tests.compat.judge import Rules, judge_single, judge_split, of_protocol
from tests.compat.live_run import ACTIVE_TIMEOUT_S, LiveRun
from tests.compat.matrix import (
    FORMATS,
    NOT_INSTALLABLE,
    TESTED,
    Results,
    case_cell,
    format_cell,
)
from tests.live.expect import Expected

SHORT_TAGS = ("tcp", "reset", "udp", "icmp", "bulk")
# The "mixed" collector gets every record twice (IPFIX and v9). During the 2000-connection burst
# that is ~16k records/s into one nfacctd, whose core -> print plugin pipe then drops records
# without a log line or a sequence error on this 2-core VM (measured: 40% lost in 1 run of 3,
# with 64 MiB plugin pipes). Volume is judged per protocol by "many-connections"; this cell judges
# what it is about: two protocols from one host, keyed apart.
MIXED_TAGS = ("tcp", "reset", "udp", "icmp")
# A restarted exporter starts its sequence again at 0 (RFC 7011 allows it for a new transport
# session). nfdump counts one failure per stream, nfacctd logs one "expecting" line per stream
# (collectors.md 1.1 row 36); a tshark capture sees the new source port as a new stream.
AGENT_RESTART_SEQUENCE_ERRORS = {"nfdump": 1, "nfacctd": 1, "tshark": 0}


def _report_problems(name: str, decoded: Decoded, sequence_errors: int = 0,
                     template_warnings: bool = True) -> list[str]:
    """The collector's own report. `template_warnings=False` (a capture started mid-stream):
    data before the first template it saw is undecodable, and tshark also flags it malformed."""
    problems = []
    if decoded.sequence_errors != sequence_errors:
        problems.append(f"{name}: {decoded.sequence_errors} sequence errors, want "
                        f"{sequence_errors}")
    if decoded.dropped:
        problems.append(f"{name}: {decoded.dropped} datagrams dropped by its socket")
    if template_warnings and (decoded.template_warnings or decoded.malformed):
        problems.append(f"{name}: {decoded.template_warnings} template warnings, "
                        f"{decoded.malformed} malformed")
    return problems


class LiveCells:
    def __init__(self, run: LiveRun):
        self.run = run
        self.problems: dict[str, list[str]] = {}
        self.results = Results()
        self._judge_formats()
        self._judge_cases()

    def _tag(self, tag: str, version: int | None = None) -> list[Expected]:
        wanted = self.run.traffic.expected.get(tag, [])
        return [w for w in wanted if version is None or w.version == version]

    def _set(self, cell: str, problems: list[str], checked: str) -> None:
        self.problems[cell] = problems
        self.results.record(cell, problems, checked)

    # --- one cell per (protocol, profile, collector) --------------------------------------
    def _format_problems(self, collector: str, protocol: str, profile: str,
                         tags: tuple[str, ...] = (*SHORT_TAGS, "long")) -> dict[str, list[str]]:
        decoded = self.run.decoded[f"{protocol}/{profile}"][collector]
        rules = Rules.of(collector, protocol, profile)
        out: dict[str, list[str]] = {}
        for tag in tags:
            if tag == "long":
                out[tag] = judge_split(decoded.flows, self._tag(tag), rules,
                                       min_records=3)
            else:
                out[tag] = judge_single(decoded.flows, self._tag(tag), rules)
        out["report"] = _report_problems(f"{collector}/{protocol}/{profile}", decoded)
        return out

    def _judge_formats(self) -> None:
        self.by_format: dict[tuple[str, str, str], dict[str, list[str]]] = {}
        for protocol, profile in FORMATS:
            for collector in TESTED:
                parts = self._format_problems(collector, protocol, profile)
                self.by_format[(protocol, profile, collector)] = parts
                checked = Rules.of(collector, protocol, profile).checked()
                self._set(format_cell("live", protocol, profile, collector),
                          [p for ps in parts.values() for p in ps],
                          f"{checked}; 0 sequence errors, 0 template warnings")
            self.results.not_applicable(format_cell("live", protocol, profile, "goflow2"),
                                        NOT_INSTALLABLE["goflow2"])

    # --- one cell per (case, collector) -----------------------------------------------------
    def _from_formats(self, collector: str, tag: str, ipv6_only: bool = False) -> list[str]:
        problems = []
        for (protocol, profile, name), parts in self.by_format.items():
            if name != collector or (ipv6_only and protocol == "v5"):
                continue
            if ipv6_only:
                rules = Rules.of(collector, protocol, profile)
                decoded = self.run.decoded[f"{protocol}/{profile}"][collector]
                problems += judge_single(decoded.flows, [w for t in ("tcp", "reset", "udp", "icmp")
                                                         for w in self._tag(t, 6)], rules)
            else:
                problems += parts[tag]
        return problems

    def _station(self, station: str, collector: str, tags: tuple[str, ...], sequence_errors: int,
                 template_warnings: bool = True) -> list[str]:
        """A station fed IPFIX and v9 (standard): each record once per protocol, exact. A split
        station: IPFIX in nfcapd and its capture, v9 in nfacctd."""
        decoded = self.run.decoded[station][collector]
        expected = [w for tag in tags for w in self._tag(tag)]
        problems = _report_problems(f"{collector}@{station}", decoded, sequence_errors,
                                    template_warnings)
        if station != "mixed":
            protocol = "v9" if collector == "nfacctd" else "ipfix"
            return problems + judge_single(decoded.flows, expected,
                                           Rules.of(collector, protocol, "standard"))
        if collector == "tshark":
            # both copies must be exact; tshark shows the same fields for IPFIX and v9 here
            rules = Rules.of(collector, "v9", "standard")
            return problems + judge_single(decoded.flows, expected, rules, copies=2)
        for protocol in ("ipfix", "v9"):
            rules = Rules.of(collector, protocol, "standard")
            flows = of_protocol(decoded.flows, collector, protocol)
            problems += judge_single(flows, expected, rules)
        return problems

    def _judge_cases(self) -> None:
        many = "each of 4 x 2000 records exact; 0 sequence errors in every format"
        for collector in TESTED:
            cell = lambda case, c=collector: case_cell(case, c)  # noqa: E731
            self._set(cell("ipv6"), self._from_formats(collector, "", ipv6_only=True),
                      "TCP, UDP, ICMPv6 records exact in every IPFIX/v9 format")
            self._set(cell("long-flow"), self._from_formats(collector, "long"),
                      f"split every {ACTIVE_TIMEOUT_S} s, deltas add up to the capture")
            self._set(cell("reset"), self._from_formats(collector, "reset"),
                      "client and server resets, records exact")
            self._set(cell("udp"), self._from_formats(collector, "udp"), "records exact")
            self._set(cell("icmp"), self._from_formats(collector, "icmp"), "records exact")
            bulk = self._from_formats(collector, "bulk") + [
                p for (_, _, name), parts in self.by_format.items() if name == collector
                for p in parts["report"]]
            self._set(cell("many-connections"), bulk, many)
            self._set(cell("late-collector"),
                      self._station("late", collector, ("bulk",), 0,
                                    template_warnings=collector != "tshark"),
                      "records exact from one refresh interval after start")
            self._set(cell("ipfix-and-v9"), self._station("mixed", collector, MIXED_TAGS, 0),
                      "every record once per protocol, exact; 0 sequence errors")
            self._set(cell("agent-restart"),
                      self._station("agent-restart", collector, ("restart",),
                                    AGENT_RESTART_SEQUENCE_ERRORS[collector]),
                      "records after the restart exact; sequence reset counted "
                      f"{AGENT_RESTART_SEQUENCE_ERRORS[collector]}x"
                      if AGENT_RESTART_SEQUENCE_ERRORS[collector] else
                      "records after the restart exact; new stream, 0 sequence errors")
            if collector == "tshark":
                self.results.not_applicable(
                    cell("restarted-collector"),
                    "a capture keeps no state: a restart is a late start (row above)")
            else:
                self._set(cell("restarted-collector"),
                          self._station("restarted", collector, ("bulk",), 0),
                          "records exact from one refresh interval after restart")
        for case in ("ipv6", "long-flow", "reset", "udp", "icmp", "late-collector",
                     "restarted-collector", "ipfix-and-v9", "many-connections", "agent-restart"):
            self.results.not_applicable(case_cell(case, "goflow2"), NOT_INSTALLABLE["goflow2"])
