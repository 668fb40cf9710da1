"""`python -m bench [NAME ...]` (or `tox -e bench`): run the benchmarks, each in its own process
so one cannot warm or pollute another. Each prints one JSON line per result:
{"name", "value", "unit", "peer", "peer_value", "ratio"}."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ALL = ["encode", "pipeline", "scale", "overhead", "churn"]

# Run only when named: `python -m bench fuzz` feeds the collect decoder 2 million hostile
# datagrams (minutes; `python -m bench.fuzz --help` for counts, seeds and atheris);
# `hook_interleave` and `hooks` take the collector's cost to nginx + wrk apart (minutes; run
# them under `ip netns exec`, see their --help).
LONG = ["fuzz", "hook_interleave", "hooks"]


def main(argv: list[str]) -> int:
    names = argv or ALL
    unknown = [n for n in names if n not in ALL + LONG]
    if unknown:
        known = ", ".join(ALL + LONG)
        print(f"bench: unknown benchmark {unknown[0]!r}; known: {known}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent
    failed = 0
    for name in names:
        print(f"# bench.{name}", file=sys.stderr, flush=True)
        failed |= subprocess.call([sys.executable, "-m", f"bench.{name}"], cwd=root) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
