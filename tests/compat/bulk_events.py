"""bulk_traffic.py seen from a test: where the script is and its JSON event lines read back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

BULK_SCRIPT = Path(__file__).resolve().with_name("bulk_traffic.py")


def read_event(process: subprocess.Popen[str], event: str) -> dict:
    """The next event line of a bulk_traffic.py process, which must be `event`."""
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(10)
        raise RuntimeError(f"bulk_traffic.py exited {process.returncode} before '{event}'")
    message = json.loads(line)
    if message.get("event") != event:
        raise RuntimeError(f"bulk_traffic.py said {message}, expected '{event}'")
    return message
