"""The live tests' judge of a connection's records: a late tail merges back, nothing else does."""

from __future__ import annotations

from tests.live.expect import ACTIVE_TIMEOUT, END_OF_FLOW, merged_late_tail


def record(start: int, end: int, octets: int, packets: int, flags: int, reason: int) -> dict:
    return {"flowStartMilliseconds": start, "flowEndMilliseconds": end, "octetDeltaCount": octets,
            "packetDeltaCount": packets, "tcpControlBits": flags, "flowEndReason": reason,
            "protocolIdentifier": 6}


def test_duplicate_ack_after_the_close_merges_into_the_connection():
    connection = record(1000, 1040, 3580, 11, 0x1B, END_OF_FLOW)
    late = record(1052, 1052, 64, 1, 0x10, ACTIVE_TIMEOUT)
    assert merged_late_tail([connection, late]) == [
        record(1000, 1052, 3644, 12, 0x1B, END_OF_FLOW)]


def test_a_new_connection_or_a_split_in_the_middle_is_not_a_tail():
    connection = record(1000, 1040, 3580, 11, 0x1B, END_OF_FLOW)
    reused_port = record(1100, 1140, 3580, 11, 0x1B, END_OF_FLOW)  # SYN: a new connection
    overlapping = record(1030, 1050, 64, 1, 0x10, ACTIVE_TIMEOUT)
    bulky = record(1050, 1060, 9000, 6, 0x18, ACTIVE_TIMEOUT)
    timed_out = record(1000, 1040, 3580, 11, 0x1B, ACTIVE_TIMEOUT)
    for records in ([connection, reused_port], [connection, overlapping],
                    [connection, bulky], [timed_out, record(1052, 1052, 64, 1, 0x10, 2)]):
        assert merged_late_tail(records) == records
    assert merged_late_tail([connection]) == [connection]
