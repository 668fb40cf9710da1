"""Encoding speed: flowbridge's IPFIX and v9 encoders against python-ipfix and scapy, on the same
records, in the same run, into full messages (1400 bytes, templates refreshed as in real use),
as rows (`encode_rows`, what the agent sends) and as record dicts (`encode`); then rows of the
shipped standard profile, which no peer takes (`*.rows.standard`, peer null). Rates are per
second of CPU time of the encoding process. One JSON line per result:
{"name", "value", "unit", "peer", "peer_value", "ratio"}.

python-ipfix (PyPI "ipfix") claims the top-level name of our own package, so it lives in
bench/.peers/ipfix (`pip install --target bench/.peers/ipfix ipfix`) and runs in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench import results
from bridge.cli.generate import synthetic_records
from ipfix.profile import load_profile
from ipfix.session import ExportSession

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / ".peers" / "ipfix"
RECORDS = 60_000
PEER_RECORDS = 6_000  # the peers are 5-500x slower: fewer records, same per-record measure
REPEATS = 5
NOW_MS = int(time.time() * 1000)
# The IPv4 template of the standard profile, without icmp/sampling (python-ipfix has no defaults).
FIELDS = (
    "sourceIPv4Address", "destinationIPv4Address", "sourceTransportPort",
    "destinationTransportPort", "protocolIdentifier", "tcpControlBits", "ipVersion",
    "ipClassOfService", "octetDeltaCount", "packetDeltaCount", "flowStartMilliseconds",
    "flowEndMilliseconds", "ingressInterface", "egressInterface", "flowDirection",
    "flowEndReason",
)  # fmt: skip


def records(count: int) -> list[dict]:
    made = synthetic_records(1, count, NOW_MS, allow_ipv6=False)
    return [{name: r.get(name, 0) for name in FIELDS} for r in made]


def bench_profile_toml() -> str:
    fields = ",\n".join(
        '{ element = "tcpControlBits", length = 1 }' if f == "tcpControlBits" else f'"{f}"'
        for f in FIELDS
    )
    return f'name = "bench"\nprotocols = ["ipfix", "v9"]\nfields = [\n{fields}\n]\n'


def best_rate(encode, batch: list) -> float:
    """Records per second of this process's CPU time, best of REPEATS (the machine is shared)."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.process_time()
        encode(batch)
        best = min(best, time.process_time() - started)
    return len(batch) / best


def ours(protocol: str, batch: list[dict]) -> tuple[float, float]:
    """(record dicts/s through encode, rows/s through encode_rows: the agent's path)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(bench_profile_toml())
    profile = load_profile(f.name)
    Path(f.name).unlink()
    session = ExportSession(protocol, profile, 1)
    dicts = best_rate(session.encode, batch)
    layout = session.row_layout(4)
    rows = [tuple(r.get(key, default) for key, default in layout) for r in batch]
    return dicts, best_rate(lambda rows: session.encode_rows(4, rows), rows)


def standard_rows(protocol: str) -> float:
    """encode_rows with the shipped standard profile as the agent runs it (its IPv4 template:
    the fields above plus icmpTypeCodeIPv4 and samplingInterval). No peer can take it as is."""
    session = ExportSession(protocol, load_profile("standard"), 1)
    layout = session.row_layout(4)
    made = synthetic_records(1, RECORDS, NOW_MS, allow_ipv6=False)
    rows = [tuple(r.get(key, default) for key, default in layout) for r in made]
    return best_rate(lambda rows: session.encode_rows(4, rows), rows)


PYTHON_IPFIX = r"""
import sys, json, time, ipaddress, datetime
sys.path.insert(0, sys.argv[1])
import ipfix.ie, ipfix.template, ipfix.message
ipfix.ie.use_iana_default()
fields, rows, repeats = json.loads(sys.stdin.read())
specs = [f + "[1]" if f == "tcpControlBits" else f for f in fields]
template = ipfix.template.from_ielist(256, ipfix.ie.spec_list(specs))
def native(row):
    out = {}
    for k, v in zip(fields, row):
        if k.endswith("Address"):
            v = ipaddress.ip_address(v)
        elif k.endswith("Milliseconds"):
            v = datetime.datetime.utcfromtimestamp(v / 1000)  # python-ipfix wants naive UTC
        out[k] = v
    return out
batch = [native(r) for r in rows]
def encode(batch):
    out = []
    msg = ipfix.message.MessageBuffer()
    msg.mtu = 1400
    msg.begin_export(1)
    msg.add_template(template)
    msg.export_ensure_set(256)
    for rec in batch:
        try:
            msg.export_namedict(rec)
        except ipfix.message.EndOfMessage:
            out.append(msg.to_bytes())
            msg.begin_export(1)
            msg.export_ensure_set(256)
            msg.export_namedict(rec)
    out.append(msg.to_bytes())
    return out
best = min(
    (lambda t0: (encode(batch), time.process_time() - t0)[1])(time.process_time())
    for _ in range(repeats)
)
print(len(batch) / best)
"""


def python_ipfix(batch: list[dict]) -> float | None:
    if not (PEERS / "ipfix").is_dir():
        print(
            f"bench.encode: python-ipfix missing: pip install --target {PEERS} ipfix",
            file=sys.stderr,
        )
        return None
    rows = [[_plain(r[f]) for f in FIELDS] for r in batch]
    result = subprocess.run(
        [sys.executable, "-c", PYTHON_IPFIX, str(PEERS)],
        input=json.dumps([FIELDS, rows, REPEATS]), capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    if result.returncode != 0:
        print(f"bench.encode: python-ipfix failed: {result.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return float(result.stdout)


def _plain(value: object) -> object:
    import ipaddress

    return str(ipaddress.ip_address(value)) if isinstance(value, bytes) else value


def scapy_rate(protocol: str, batch: list[dict]) -> float | None:
    from scapy.layers.netflow import (
        GetNetflowRecordV9,
        NetflowDataflowsetV9,
        NetflowFlowsetV9,
        NetflowHeader,
        NetflowHeaderV9,
        NetflowHeaderV10,
        NetflowTemplateFieldV9,
        NetflowTemplateV9,
    )

    from ipfix.elements import BY_NAME
    from ipfix.template import V9_RELATIVE_TIMES

    fields, names = [], []
    for name in FIELDS:
        element = BY_NAME[name]
        length = 1 if name == "tcpControlBits" else element.length
        if protocol == "v9" and name in V9_RELATIVE_TIMES:
            element, length = BY_NAME[V9_RELATIVE_TIMES[name]], 4
        fields.append(NetflowTemplateFieldV9(fieldType=element.id, fieldLength=length))
        names.append(name)
    template = NetflowTemplateV9(templateID=256, fieldCount=len(fields), template_fields=fields)
    flowset = NetflowFlowsetV9(flowSetID=0 if protocol == "v9" else 2, templates=[template])
    record_class = GetNetflowRecordV9(flowset)
    scapy_names = [f.name for f in record_class.fields_desc]
    boot = NOW_MS - 86_400_000
    per_message = (1400 - 20 - 4) // 50

    def convert(r: dict) -> dict:
        out = {}
        for scapy_name, name in zip(scapy_names, names, strict=True):
            v = r[name]
            if isinstance(v, bytes):
                v = _plain(v)
            elif name in V9_RELATIVE_TIMES:
                v = v - boot if protocol == "v9" else v / 1000
            out[scapy_name] = v
        return out

    native = [convert(r) for r in batch]

    def encode(rows: list[dict]) -> list[bytes]:
        out = []
        for i in range(0, len(rows), per_message):
            data = NetflowDataflowsetV9(
                templateID=256, records=[record_class(**r) for r in rows[i : i + per_message]]
            )
            head = NetflowHeaderV9() if protocol == "v9" else NetflowHeaderV10()
            version = 9 if protocol == "v9" else 10
            out.append(bytes(NetflowHeader(version=version) / head / data))
        return out

    try:
        return best_rate(encode, native)
    except Exception as exc:  # a peer's failure is reported, never fatal to the benchmark
        print(f"bench.encode: scapy {protocol} failed: {exc}", file=sys.stderr)
        return None


def struct_floor(batch: list[dict]) -> float:
    """itemgetter + one struct call per 24 records, no framing: what any dict-based encoder in
    this interpreter can at best reach for this template (rows skip the itemgetter)."""
    import struct
    from itertools import chain
    from operator import itemgetter

    from ipfix.packer import _format_char
    from ipfix.template import flow_templates

    template = flow_templates(load_profile("standard"), "ipfix", set())[4]
    fields = [f for f in template.fields if f.key in FIELDS]
    getter = itemgetter(*(f.key for f in fields))
    pack = struct.Struct(">" + "".join(_format_char(f) for f in fields) * 24).pack

    def encode(rows: list[dict]) -> None:
        for i in range(0, len(rows) - 23, 24):
            pack(*chain.from_iterable(map(getter, rows[i : i + 24])))

    return best_rate(encode, batch)


def emit(name: str, value: float, peer: str | None, peer_value: float | None) -> None:
    results.emit(name, value, "records/s", peer, peer_value, digits=0, ratio_digits=2)


def main() -> None:
    batch = records(RECORDS)
    peer_batch = batch[:PEER_RECORDS]
    ipfix_dicts, ipfix_rows = ours("ipfix", batch)
    v9_dicts, v9_rows = ours("v9", batch)
    standard = {protocol: standard_rows(protocol) for protocol in ("ipfix", "v9")}
    python_ipfix_rate = python_ipfix(peer_batch)
    scapy_ipfix = scapy_rate("ipfix", peer_batch[:1500])
    floor = struct_floor(batch)
    scapy_v9 = scapy_rate("v9", peer_batch[:1500])
    for name, rate in (("encode.ipfix.rows", ipfix_rows), ("encode.ipfix.dicts", ipfix_dicts)):
        emit(name, rate, "python-ipfix", python_ipfix_rate)
        emit(name, rate, "scapy", scapy_ipfix)
        emit(name, rate, "struct-floor", floor)
    emit("encode.v9.rows", v9_rows, "scapy", scapy_v9)
    emit("encode.v9.dicts", v9_dicts, "scapy", scapy_v9)
    for protocol, rate in standard.items():
        emit(f"encode.{protocol}.rows.standard", rate, None, None)


if __name__ == "__main__":
    main()
