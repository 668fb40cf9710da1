"""What options data flowbridge exports, independent of the protocol that carries it."""

from __future__ import annotations

from ipfix.elements import Element

# RFC 7011 §4.3 Exporting Process Reliability Statistics, plus the exporter's own totals and its
# start time. Exported in observation domain 0 (IPFIX) so nfdump's sequence check, which ignores
# options records, stays quiet for the flow domain (collectors.md item 6).
STATS_SCOPE = "exportingProcessId"
STATS_FIELDS = (
    "notSentFlowTotalCount",
    "notSentPacketTotalCount",
    "notSentOctetTotalCount",
    "exportedMessageTotalCount",
    "exportedFlowRecordTotalCount",
    "exportedOctetTotalCount",
    "systemInitTimeMilliseconds",
    # Packets the kernel did not meter because its bounded flow map was full (flowbridge's own
    # metering limit): counted here so that no packet goes missing without a trace at the
    # collector.
    "ignoredPacketTotalCount",
)
# Interface names: scope ingressInterface (the Linux ifindex), value interfaceName.
INTERFACE_FIELDS = ("ingressInterface", "interfaceName")
# Unsampled: samplingPacketInterval 1, samplingPacketSpace 0 (nfdump, goflow2 and Akvorado read
# these), scoped by selectorId.
SAMPLING_FIELDS = ("selectorId", "samplingPacketInterval", "samplingPacketSpace")
SAMPLING_VALUES = {"selectorId": 1, "samplingPacketInterval": 1, "samplingPacketSpace": 0}
# v9: RFC 3954 §6.1 scope types instead of scope elements.
V9_SCOPE_SYSTEM = Element("scopeSystem", 1, 0, "unsigned32", 4, 1)
V9_SCOPE_INTERFACE = Element("scopeInterface", 2, 0, "unsigned32", 4, 2)
V9_SAMPLING_FIELDS = ("samplingInterval", "samplingAlgorithm")
V9_SAMPLING_VALUES = {"samplingInterval": 1, "samplingAlgorithm": 0}


def check_stats(stats: dict[str, int]) -> None:
    from ipfix.errors import IpfixError

    unknown = sorted(set(stats) - set(STATS_FIELDS))
    if unknown:
        raise IpfixError(
            f"options statistics: unknown key '{unknown[0]}' (known: {', '.join(STATS_FIELDS)})"
        )
