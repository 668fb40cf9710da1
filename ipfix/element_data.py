"""The information elements flowbridge knows, as data: (id, name, abstract type[, length]).

Sources: the IANA IPFIX registry, ntop's include/ntop_flow.h (PEN 35632, confirmed by Wireshark
4.0's value tables) and nfdump 1.7.1's netflow_v9.h for the legacy latency ids. The default length
of a type comes from elements.TYPE_LENGTHS unless a row gives one.
"""

from __future__ import annotations

IANA_PEN = 0
NTOP_PEN = 35632
REVERSE_PEN = 29305  # RFC 5103
NTOP_V9_BASE = 57472  # v9 has no enterprise bit: ntop element n travels as 57472 + n

IANA: tuple[tuple, ...] = (
    (1, "octetDeltaCount", "unsigned64"),
    (2, "packetDeltaCount", "unsigned64"),
    (4, "protocolIdentifier", "unsigned8"),
    (5, "ipClassOfService", "unsigned8"),
    (6, "tcpControlBits", "unsigned16"),
    (7, "sourceTransportPort", "unsigned16"),
    (8, "sourceIPv4Address", "ipv4Address"),
    (9, "sourceIPv4PrefixLength", "unsigned8"),
    (10, "ingressInterface", "unsigned32"),
    (11, "destinationTransportPort", "unsigned16"),
    (12, "destinationIPv4Address", "ipv4Address"),
    (13, "destinationIPv4PrefixLength", "unsigned8"),
    (14, "egressInterface", "unsigned32"),
    (15, "ipNextHopIPv4Address", "ipv4Address"),
    (16, "bgpSourceAsNumber", "unsigned32"),
    (17, "bgpDestinationAsNumber", "unsigned32"),
    (21, "flowEndSysUpTime", "unsigned32"),
    (22, "flowStartSysUpTime", "unsigned32"),
    (27, "sourceIPv6Address", "ipv6Address"),
    (28, "destinationIPv6Address", "ipv6Address"),
    (29, "sourceIPv6PrefixLength", "unsigned8"),
    (30, "destinationIPv6PrefixLength", "unsigned8"),
    (31, "flowLabelIPv6", "unsigned32"),
    (32, "icmpTypeCodeIPv4", "unsigned16"),
    (34, "samplingInterval", "unsigned32"),
    (35, "samplingAlgorithm", "unsigned8"),
    (40, "exportedOctetTotalCount", "unsigned64"),
    (41, "exportedMessageTotalCount", "unsigned64"),
    (42, "exportedFlowRecordTotalCount", "unsigned64"),
    (56, "sourceMacAddress", "macAddress"),
    (58, "vlanId", "unsigned16"),
    (60, "ipVersion", "unsigned8"),
    (61, "flowDirection", "unsigned8"),
    (62, "ipNextHopIPv6Address", "ipv6Address"),
    (80, "destinationMacAddress", "macAddress"),
    (82, "interfaceName", "string"),
    (83, "interfaceDescription", "string"),
    (85, "octetTotalCount", "unsigned64"),
    (86, "packetTotalCount", "unsigned64"),
    (95, "applicationId", "octetArray"),
    (96, "applicationName", "string"),
    (130, "exporterIPv4Address", "ipv4Address"),
    (131, "exporterIPv6Address", "ipv6Address"),
    (136, "flowEndReason", "unsigned8"),
    (139, "icmpTypeCodeIPv6", "unsigned16"),
    (144, "exportingProcessId", "unsigned32"),
    (145, "templateId", "unsigned16"),
    (148, "flowId", "unsigned64"),
    (149, "observationDomainId", "unsigned32"),
    (150, "flowStartSeconds", "dateTimeSeconds"),
    (151, "flowEndSeconds", "dateTimeSeconds"),
    (152, "flowStartMilliseconds", "dateTimeMilliseconds"),
    (153, "flowEndMilliseconds", "dateTimeMilliseconds"),
    (160, "systemInitTimeMilliseconds", "dateTimeMilliseconds"),
    (161, "flowDurationMilliseconds", "unsigned32"),
    (163, "observedFlowTotalCount", "unsigned64"),
    (164, "ignoredPacketTotalCount", "unsigned64"),
    (165, "ignoredOctetTotalCount", "unsigned64"),
    (166, "notSentFlowTotalCount", "unsigned64"),
    (167, "notSentPacketTotalCount", "unsigned64"),
    (168, "notSentOctetTotalCount", "unsigned64"),
    (176, "icmpTypeIPv4", "unsigned8"),
    (177, "icmpCodeIPv4", "unsigned8"),
    (178, "icmpTypeIPv6", "unsigned8"),
    (179, "icmpCodeIPv6", "unsigned8"),
    (210, "paddingOctets", "octetArray"),
    (218, "tcpSynTotalCount", "unsigned64"),
    (219, "tcpFinTotalCount", "unsigned64"),
    (220, "tcpRstTotalCount", "unsigned64"),
    (221, "tcpPshTotalCount", "unsigned64"),
    (222, "tcpAckTotalCount", "unsigned64"),
    (223, "tcpUrgTotalCount", "unsigned64"),
    (239, "biflowDirection", "unsigned8"),
    (302, "selectorId", "unsigned64"),
    (305, "samplingPacketInterval", "unsigned32"),
    (306, "samplingPacketSpace", "unsigned32"),
    (322, "observationTimeSeconds", "dateTimeSeconds"),
    (323, "observationTimeMilliseconds", "dateTimeMilliseconds"),
    (371, "userName", "string"),
)

# RFC 5103: the reverse of IANA element X is element X under PEN 29305, named reverseX.
# Only elements that describe one direction's traffic have a meaningful reverse.
REVERSIBLE = (
    "octetDeltaCount",
    "packetDeltaCount",
    "tcpControlBits",
    "ipClassOfService",
    "flowStartMilliseconds",
    "flowEndMilliseconds",
    "tcpSynTotalCount",
    "tcpFinTotalCount",
    "tcpRstTotalCount",
)

NTOP: tuple[tuple, ...] = (
    (78, "CLIENT_TCP_FLAGS", "unsigned8"),
    (79, "SERVER_TCP_FLAGS", "unsigned8"),
    (80, "SRC_FRAGMENTS", "unsigned16"),
    (81, "DST_FRAGMENTS", "unsigned16"),
    (109, "RETRANSMITTED_IN_PKTS", "unsigned32"),
    (110, "RETRANSMITTED_OUT_PKTS", "unsigned32"),
    (111, "OOORDER_IN_PKTS", "unsigned32"),
    (112, "OOORDER_OUT_PKTS", "unsigned32"),
    (118, "L7_PROTO", "unsigned16"),
    (119, "L7_PROTO_NAME", "string"),
    (123, "CLIENT_NW_LATENCY_MS", "unsigned32"),
    (124, "SERVER_NW_LATENCY_MS", "unsigned32"),
    (125, "APPL_LATENCY_MS", "unsigned32"),
    (127, "RETRANSMITTED_IN_BYTES", "unsigned32"),
    (128, "RETRANSMITTED_OUT_BYTES", "unsigned32"),
    (168, "SRC_PROC_PID", "unsigned32"),
    (169, "SRC_PROC_NAME", "string"),
    (372, "SRC_PROC_USER_NAME", "string"),
    (373, "SRC_FATHER_PROC_PID", "unsigned32"),
    (374, "SRC_FATHER_PROC_NAME", "string"),
    (375, "DST_PROC_PID", "unsigned32"),
    (376, "DST_PROC_NAME", "string"),
    (377, "DST_PROC_USER_NAME", "string"),
    (378, "DST_FATHER_PROC_PID", "unsigned32"),
    (379, "DST_FATHER_PROC_NAME", "string"),
    (415, "TCP_WIN_MIN_IN", "unsigned16"),
    (416, "TCP_WIN_MAX_IN", "unsigned16"),
    (417, "TCP_WIN_MSS_IN", "unsigned16"),
    (418, "TCP_WIN_SCALE_IN", "unsigned8"),
    (419, "TCP_WIN_MIN_OUT", "unsigned16"),
    (420, "TCP_WIN_MAX_OUT", "unsigned16"),
    (421, "TCP_WIN_MSS_OUT", "unsigned16"),
    (422, "TCP_WIN_SCALE_OUT", "unsigned8"),
    (425, "SRC_PROC_UID", "unsigned32"),
    (426, "DST_PROC_UID", "unsigned32"),
    (427, "APPLICATION_NAME", "string"),
    (471, "NPROBE_IPV4_ADDRESS", "ipv4Address"),
    (540, "SRC_PROC_PKG_NAME", "string"),
    (541, "DST_PROC_PKG_NAME", "string"),
    (556, "SRC_PROC_CMDLINE", "string"),
    (557, "DST_PROC_CMDLINE", "string"),
    (558, "SRC_PROC_CONTAINER_ID", "string"),
    (559, "DST_PROC_CONTAINER_ID", "string"),
)

# nProbe 6 numbered these 82-87; nfdump 1.7.1 still maps their v9 ids 57554-57559 to its latency
# columns, while current ntop reuses 82-87 for throughput. So they exist for v9 only.
NFDUMP_LEGACY_V9: tuple[tuple, ...] = (
    (57554, "CLIENT_NW_DELAY_SEC", "unsigned32"),
    (57555, "CLIENT_NW_DELAY_USEC", "unsigned32"),
    (57556, "SERVER_NW_DELAY_SEC", "unsigned32"),
    (57557, "SERVER_NW_DELAY_USEC", "unsigned32"),
    (57558, "APPL_LATENCY_SEC", "unsigned32"),
    (57559, "APPL_LATENCY_USEC", "unsigned32"),
)

# Elements that only make sense in one address family's template.
IPV4_ONLY = frozenset(
    {
        "sourceIPv4Address",
        "destinationIPv4Address",
        "sourceIPv4PrefixLength",
        "destinationIPv4PrefixLength",
        "ipNextHopIPv4Address",
        "icmpTypeCodeIPv4",
        "icmpTypeIPv4",
        "icmpCodeIPv4",
    }
)
IPV6_ONLY = frozenset(
    {
        "sourceIPv6Address",
        "destinationIPv6Address",
        "sourceIPv6PrefixLength",
        "destinationIPv6PrefixLength",
        "ipNextHopIPv6Address",
        "icmpTypeCodeIPv6",
        "icmpTypeIPv6",
        "icmpCodeIPv6",
        "flowLabelIPv6",
    }
)

# RFC 3954 has no variable-length fields: strings travel NUL-padded at a fixed length in v9.
V9_STRING_LENGTH = 16
# Container ids at nProbe's v9 length, 16: a prefix of the 64-digit id that docker, podman and
# crictl accept as a unique one (`docker ps` shows 12); the full id would make the ntop profile's
# v9 record ~85% larger, mostly NUL padding (IPFIX carries the whole id, variable-length).
V9_STRING_LENGTHS = {
    "SRC_PROC_CONTAINER_ID": 16,
    "DST_PROC_CONTAINER_ID": 16,
    "SRC_PROC_CMDLINE": 64,
    "DST_PROC_CMDLINE": 64,
    "interfaceName": 16,
    "interfaceDescription": 32,
}
