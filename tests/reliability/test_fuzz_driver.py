"""The decoder behind `flowbridge collect` against 150 000 mutated and random datagrams (the CI
variant of `python -m bench fuzz`, which feeds millions), and proof that the fuzz driver does
catch the failures it hunts."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import bench.fuzz
from bench.fuzz_corpus import MUTATORS
from ipfix.errors import DECODE_REASONS
from ipfix.record_parser import RecordParser
from tests.ipfix.test_cli import ROOT

CI_DATAGRAMS = 150_000  # about 20 s of CPU time (60 s wall at load 6 on 2 cores)
SEED = 20261126


def test_150k_hostile_datagrams() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--count", str(CI_DATAGRAMS), "--seed", str(SEED)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    summary = json.loads(result.stdout.splitlines()[-1])["fuzz"]
    assert result.returncode == 0 and summary["findings"] == [], result.stderr[-4000:]
    rejected = summary["rejected"]
    assert summary["accepted"] + sum(rejected.values()) == CI_DATAGRAMS
    # Every stage of the decoder was reached and refused something; the catch-all nothing.
    assert set(rejected) == set(DECODE_REASONS) - {"unexpected"}
    assert summary["records"] > CI_DATAGRAMS // 4 and summary["options_records"] > 0
    assert set(summary["mutators"]) == {m.__name__ for m in MUTATORS} | {"valid"}
    assert summary["templates_cached"] <= 4096 and summary["template_sources"] > 1000


def test_the_driver_reports_crashes_catch_alls_and_slow_datagrams(monkeypatch) -> None:
    """A renderer that raises, a parser that trips the decoder's catch-all, and a parser that
    burns CPU: each must show up as a finding, or the CI run above proves nothing."""
    original_parse = RecordParser.parse
    calls = {"n": 0}

    def faulty_parse(self: RecordParser, data: bytes) -> list[dict]:
        calls["n"] += 1
        if calls["n"] % 50 == 0:
            raise IndexError("planted")
        if calls["n"] == 77:
            deadline = time.process_time() + 0.3
            while time.process_time() < deadline:
                pass
        return original_parse(self, data)

    def faulty_table_row(record: dict) -> str:
        if record.get("packetDeltaCount") == 9 and record.get("sourceTransportPort") == 40000:
            raise TypeError("planted")
        return ""

    monkeypatch.setattr(RecordParser, "parse", faulty_parse)
    monkeypatch.setattr(bench.fuzz, "table_row", faulty_table_row)
    monkeypatch.setattr(bench.fuzz, "worst_cases", lambda: [])
    summary = bench.fuzz.run(3000, SEED)
    findings = "\n".join(summary["findings"])
    assert "crash" in findings and "TypeError: planted" in findings
    assert "rejections by the catch-all" in findings and summary["rejected"]["unexpected"] > 0
    assert "ms CPU for" in findings and summary["over_cpu_budget"] > 0
    assert summary["accepted"] + sum(summary["rejected"].values()) == 3000
