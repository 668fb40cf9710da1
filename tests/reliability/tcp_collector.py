"""A TCP IPFIX collector as its own process, so a test can stop it (SIGSTOP), kill it (SIGKILL)
and start it again like a real one. None of the real collectors here (nfcapd, nfacctd) takes
IPFIX over TCP; this one decodes with the project's decoder, a fresh one per connection (a new
transport session knows no templates: the exporter must send them first).

    python tcp_collector.py --port P --out FILE      (prints "ready" once listening)

Appends one JSON line per message to FILE: {"connection", "domain", "sequence", "unknown_sets",
"templates", "records", "options"}; records in the project's JSON form.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ipfix.decoder import Decoder  # noqa: E402
from ipfix.jsonform import record_to_json  # noqa: E402

HEADER = struct.Struct(">HH")


def messages(conn: socket.socket):  # type: ignore[no-untyped-def]
    """IPFIX messages from a stream: each starts with version 10 and its own length."""
    buffer = b""
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return
        buffer += chunk
        while len(buffer) >= HEADER.size:
            version, length = HEADER.unpack_from(buffer)
            if version != 10 or length < 16:
                raise ValueError(f"not an IPFIX stream: version {version}, length {length}")
            if len(buffer) < length:
                break
            yield buffer[:length]
            buffer = buffer[length:]


def serve(port: int, out: Path) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4)
    print("ready", flush=True)
    number = 0
    with open(out, "a") as lines:
        while True:
            conn, peer = listener.accept()
            number += 1
            decoder = Decoder()
            with conn:
                for data in messages(conn):
                    for message in decoder.feed(data, peer):
                        lines.write(json.dumps({
                            "connection": number,
                            "domain": message.domain_id,
                            "sequence": message.sequence,
                            "unknown_sets": message.unknown_template_sets,
                            "templates": message.templates + message.options_templates,
                            "records": [record_to_json(r) for r in message.records],
                            "options": [record_to_json(r) for r in message.options_records],
                        }) + "\n")
                    lines.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.out)


if __name__ == "__main__":
    main()
