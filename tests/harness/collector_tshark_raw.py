"""ntop elements tshark 4.0 has no name for (e.g. 556-559, command line and container id), read
back from its PDML output.

tshark dissects them, but as anonymous bytes: `cflow.enterprise_private_entry` (IPFIX) and
`cflow.unknown_field_type` (v9). Its JSON output carries neither the element's number nor, for
repeated keys, more than one value; its PDML output has both: the number in `showname`
("(ntop) Type 558", "Type 58030") and the bytes in `value`. `raw_records` gives, per record in
the order tshark shows them, the values of such elements by IE name.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from ipfix.element_data import NTOP_PEN, NTOP_V9_BASE
from ipfix.elements import BY_NAME, INTEGER_TYPES
from tests.harness.collector_common import run_tool

RAW_FIELDS = ("cflow.enterprise_private_entry", "cflow.unknown_field_type")
_IPFIX_NTOP = re.compile(r"\(ntop\) Type (\d+):")
_V9_TYPE = re.compile(r"^Unknown Field Type: Type (\d+):")
_BY_NTOP_ID = {e.id: e for e in BY_NAME.values() if e.pen == NTOP_PEN}


def tshark_timeout_s(pcap: Path) -> float:
    """How long tshark may take to decode `pcap`: it grows with the file, which holds every
    flow of the host the agent exported (other benchmarks' churn too, on a shared machine).
    Measured ~2 s per MiB at load average 7.7 on this 2-core VM; 30 s per MiB leaves room for
    a CPU share several times smaller, 120 s the floor for a small file."""
    return 120.0 + 30.0 * pcap.stat().st_size / 2**20


def has_raw_fields(tshark_json: str) -> bool:
    return any(f'"{name}"' in tshark_json for name in RAW_FIELDS)


def _element_name(showname: str) -> str | None:
    match = _IPFIX_NTOP.search(showname)
    if match:
        number = int(match.group(1))
    else:
        match = _V9_TYPE.match(showname)
        if not match or int(match.group(1)) < NTOP_V9_BASE:
            return None
        number = int(match.group(1)) - NTOP_V9_BASE
    element = _BY_NTOP_ID.get(number)
    return element.name if element is not None else None


def _value(name: str, hex_bytes: str) -> object:
    data = bytes.fromhex(hex_bytes)
    if BY_NAME[name].type in INTEGER_TYPES:
        return int.from_bytes(data, "big")
    return data.rstrip(b"\0").decode("utf-8", errors="replace")  # v9 pads strings with NULs


def parse_pdml(text: str) -> list[dict[str, object]]:
    """One dict per record ("Flow N" of a set, "pdu N/M" of v5), in document order."""
    records: list[dict[str, object]] = []
    root = ET.fromstring(text)
    for proto in root.iter("proto"):
        if proto.get("name") != "cflow":
            continue
        for node in proto.iter("field"):
            show = node.get("show", "")
            if node.get("name") != "" or not show.startswith(("Flow ", "pdu ")):
                continue
            raw: dict[str, object] = {}
            for child in node.iter("field"):
                if child.get("name") in RAW_FIELDS:
                    name = _element_name(child.get("showname", ""))
                    if name is not None:
                        raw[name] = _value(name, child.get("value", ""))
            records.append(raw)
    return records


def raw_records(pcap: Path, port: int) -> list[dict[str, object]]:
    text = run_tool(
        ["tshark", "-n", "-r", str(pcap), "-d", f"udp.port=={port},cflow", "-T", "pdml"],
        timeout=tshark_timeout_s(pcap),
    )
    return parse_pdml(text)
