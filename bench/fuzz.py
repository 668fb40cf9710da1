"""`python -m bench fuzz` (or `python -m bench.fuzz --count N --seed S`): feed the decoder behind
`flowbridge collect` millions of mutated and random datagrams (bench/fuzz_corpus.py) through the
command's own Collection object, rendering every record the way collect (table and JSON) and the
agent's built-in collector print it, and check:

- nothing raises but DecodeError, and no rejection has the reason "unexpected" (the decoder's
  catch-all: a check is missing);
- every JSON line is strict JSON (no NaN, no huge integers);
- no datagram takes more CPU time (less garbage-collector pauses, reported apart) than
  --max-cpu-ms plus --cpu-us-per-byte of its size: the work must be linear in the datagram
  (crafted worst cases, e.g. 65515 one-byte records, are timed first); a watchdog thread ends
  the run if one call makes no progress for --hang-seconds;
- memory stays bounded: the template cache within its bounds, and RSS growth after warm-up under
  --max-rss-growth-mb;
- accepted + rejected (by reason) = datagrams fed.

Prints one JSON line per result (the bench form) and a final {"fuzz": {...}} summary; exits 1 on
any finding, writing each reproducer (hex) to stderr. `--atheris` runs the coverage-guided
atheris fuzzer on the same target instead (when atheris is installed)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import threading
import time
import traceback
from collections import Counter

from bench.fuzz_corpus import corpus, mutate, worst_cases
from bridge.cli.collect import Collection, json_line, table_row
from bridge.loopback import format_flow
from ipfix.errors import DecodeError

# A pool of exporters, plus now and then a new random one: a flood of exporter addresses.
EXPORTERS = [(f"192.0.2.{i}", 4739) for i in range(1, 9)]
VALID_EVERY = 64  # a valid message now and then keeps templates known, so data sets get parsed
MAX_FINDINGS_SHOWN = 10
ATHERIS_CORPUS = "/tmp/flowbridge-fuzz-atheris"


def _strict_json(line: str) -> None:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    json.loads(line, parse_constant=refuse)


def render_everywhere(record: dict) -> str:
    """Every form a record is printed in: collect's table, the built-in collector's line, and
    collect --json's line (returned, and checked to be strict JSON)."""
    table_row(record)
    format_flow(record)
    line = json_line(record)
    _strict_json(line)
    return line


class _GcClock:
    """CPU time spent in Python's cyclic garbage collector: a full collection walks the whole
    heap (70 ms with a full template cache), which is not the datagram's own work."""

    def __init__(self) -> None:
        self.total = self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.process_time()
        else:
            pause = time.process_time() - self._started
            self.total += pause
            self.longest = max(self.longest, pause)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Watchdog(threading.Thread):
    """Ends the process if the fuzz loop stops advancing: a hang inside one decode call."""

    def __init__(self, seconds: float) -> None:
        super().__init__(daemon=True)
        self.seconds = seconds
        self.progress = 0
        self.current = b""
        self.done = False

    def run(self) -> None:
        seen = -1
        while not self.done:
            time.sleep(self.seconds)
            if self.progress == seen and not self.done:
                print(f"fuzz: HANG over {self.seconds}s on {self.current.hex()}", file=sys.stderr)
                os._exit(3)
            seen = self.progress


def _cpu_budget_ms(datagram: bytes, max_cpu_ms: float, cpu_us_per_byte: float) -> float:
    return max_cpu_ms + len(datagram) * cpu_us_per_byte / 1000


def time_worst_cases(max_cpu_ms: float, cpu_us_per_byte: float) -> tuple[dict, list[str]]:
    """CPU ms of each crafted worst case (its last message), and the findings."""
    timings, findings = {}, []
    for name, messages in worst_cases():
        collection = Collection(as_json=True, render=render_everywhere)
        for message in messages[:-1]:
            collection.receive(message, EXPORTERS[0])
        before = time.process_time()
        try:
            collection.receive(messages[-1], EXPORTERS[0])
        except DecodeError as exc:
            findings.append(f"worst case {name!r} refused: {exc}")
        spent_ms = (time.process_time() - before) * 1000
        timings[name] = round(spent_ms, 1)
        if spent_ms > _cpu_budget_ms(messages[-1], max_cpu_ms, cpu_us_per_byte):
            findings.append(f"worst case {name!r} took {spent_ms:.0f} ms CPU")
    return timings, findings


def run(
    count: int,
    seed: int,
    max_cpu_ms: float = 50.0,
    cpu_us_per_byte: float = 50.0,
    hang_seconds: float = 30.0,
    max_rss_growth_mb: float = 64.0,
) -> dict:
    """Fuzz `count` datagrams; returns the counts and findings (the summary JSON)."""
    rng = random.Random(seed)
    pool = corpus()
    worst, findings = time_worst_cases(max_cpu_ms, cpu_us_per_byte)
    collection = Collection(as_json=True, render=render_everywhere)
    mutators: Counter[str] = Counter()
    slowest_ms, slowest, over_budget = 0.0, b"", 0
    watchdog = _Watchdog(hang_seconds)
    watchdog.start()
    warm_rss = None
    gc_clock = _GcClock()
    gc.callbacks.append(gc_clock)
    started_cpu, started = time.process_time(), time.perf_counter()
    for n in range(count):
        if n % VALID_EVERY == 0:
            datagram, how = rng.choice(pool), "valid"
        else:
            datagram, how = mutate(rng, pool)
        exporter = EXPORTERS[n % len(EXPORTERS)]
        if rng.random() < 0.01:
            exporter = (f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}", 1)
        watchdog.current = datagram
        before, gc_before = time.process_time(), gc_clock.total
        try:
            collection.receive(datagram, exporter)
        except DecodeError:
            pass
        except Exception:  # noqa: BLE001 - any other exception is exactly what we hunt
            findings.append(f"crash ({how}): {datagram.hex()}\n{traceback.format_exc()}")
        spent_ms = (time.process_time() - before - (gc_clock.total - gc_before)) * 1000
        if spent_ms > slowest_ms:
            slowest_ms, slowest = spent_ms, datagram
        if spent_ms > _cpu_budget_ms(datagram, max_cpu_ms, cpu_us_per_byte):
            over_budget += 1
            if over_budget <= MAX_FINDINGS_SHOWN:
                findings.append(
                    f"{spent_ms:.1f} ms CPU for {len(datagram)} bytes: {datagram.hex()}"
                )
        mutators.update(how.split("+"))
        watchdog.progress = n
        if n == count // 10:
            warm_rss = _rss_mb()
    cpu = time.process_time() - started_cpu
    wall = time.perf_counter() - started
    watchdog.done = True
    gc.callbacks.remove(gc_clock)
    end_rss = _rss_mb()
    decoder = collection.decoder
    rejected = dict(sorted(collection.rejected.items()))
    if collection.rejected["unexpected"]:
        findings.append(f"{collection.rejected['unexpected']} rejections by the catch-all")
    if collection.accepted + sum(rejected.values()) != count:
        findings.append(f"accepted {collection.accepted} + rejected {rejected} != fed {count}")
    growth = end_rss - (warm_rss if warm_rss is not None else end_rss)
    if growth > max_rss_growth_mb:
        findings.append(f"RSS grew {growth:.1f} MB after warm-up")
    if len(decoder.templates) > decoder.templates.max_templates:
        findings.append(f"{len(decoder.templates)} templates cached")
    if decoder.templates.fields > decoder.templates.max_fields:
        findings.append(f"{decoder.templates.fields} template fields cached")
    return {
        "seed": seed,
        "datagrams": count,
        "accepted": collection.accepted,
        "rejected": rejected,
        "records": collection.records,
        "options_records": collection.options,
        "data_sets_without_template": collection.no_template,
        "templates_cached": len(decoder.templates),
        "template_sources": decoder.templates.sources(),
        "templates_evicted": decoder.templates.evictions,
        "datagrams_per_cpu_second": round(count / cpu) if cpu else None,
        "cpu_seconds": round(cpu, 1),
        "wall_seconds": round(wall, 1),
        "slowest_ms_cpu": round(slowest_ms, 2),
        "slowest_bytes": len(slowest),
        "longest_gc_pause_ms_cpu": round(gc_clock.longest * 1000, 2),
        "over_cpu_budget": over_budget,
        "worst_cases_ms_cpu": worst,
        "rss_mb": round(end_rss, 1),
        "rss_growth_after_warmup_mb": round(growth, 1),
        "mutators": dict(sorted(mutators.items())),
        "findings": findings,
    }


def atheris_main(runs: int, seed: int) -> int:
    """Coverage-guided fuzzing of the same target, seeded with the corpus (atheris: libFuzzer)."""
    try:
        import atheris
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris)", file=sys.stderr)
        return 2

    collection = Collection(as_json=True, render=render_everywhere)

    def one_input(data: bytes) -> None:
        try:
            collection.receive(data, EXPORTERS[0])
        except DecodeError as exc:
            if exc.reason == "unexpected":
                raise AssertionError(f"the decoder's catch-all: {exc}") from None

    # One directory reused by every run: libFuzzer adds what it finds, the next run resumes.
    seeds = ATHERIS_CORPUS
    os.makedirs(seeds, exist_ok=True)
    for i, message in enumerate(corpus()):
        with open(os.path.join(seeds, f"seed{i}"), "wb") as f:
            f.write(message)
    atheris.instrument_all()
    atheris.Setup(
        [sys.argv[0], f"-runs={runs}", f"-seed={seed}", "-max_len=65535", "-rss_limit_mb=1024"]
        + [seeds],
        one_input,
    )
    atheris.Fuzz()
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--count", type=int, default=2_000_000, help="datagrams to feed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-cpu-ms", type=float, default=50.0, help="per datagram, plus:")
    parser.add_argument("--cpu-us-per-byte", type=float, default=50.0)
    parser.add_argument("--hang-seconds", type=float, default=30.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("--atheris", action="store_true", help="coverage-guided, --count runs")
    args = parser.parse_args(argv)
    if args.atheris:
        return atheris_main(args.count, args.seed)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))  # a leak fails
    result = run(
        args.count,
        args.seed,
        args.max_cpu_ms,
        args.cpu_us_per_byte,
        args.hang_seconds,
        args.max_rss_growth_mb,
    )
    rate = result["datagrams_per_cpu_second"]
    print(json.dumps({"name": "fuzz decode+render", "value": rate, "unit": "datagrams/s CPU",
                      "peer": None, "peer_value": None, "ratio": None}))  # fmt: skip
    print(json.dumps({"fuzz": result}))
    for finding in result["findings"][:MAX_FINDINGS_SHOWN]:
        print(f"fuzz: FINDING: {finding}", file=sys.stderr)
    return 1 if result["findings"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
