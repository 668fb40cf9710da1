"""The errors ipfix/ raises. Callers catch IpfixError; the CLI shows them as one line."""

from __future__ import annotations

# Why the decoder refused a datagram: short names a collector counts by and prints in a summary.
DECODE_REASONS = {
    "short": "shorter than its header",
    "version": "not IPFIX, NetFlow v9 or v5",
    "length": "header length or count disagrees with the datagram size",
    "set": "a set (FlowSet) that does not fit, or a reserved set id",
    "template": "a malformed template",
    "count": "fewer records than the v9 header count (a truncated packet)",
    "unexpected": "a decoder bug: malformed input that no check above caught",
}


class IpfixError(Exception):
    """Anything the wire-format layer refuses: bad profile, bad record value, bad datagram."""


class ProfileError(IpfixError):
    """A profile that cannot be used. The message names the file, the line and the element:
    "templates/x.toml:12: element 'octetDeltaCont': unknown information element"."""


class DecodeError(IpfixError):
    """Malformed or truncated input. The only exception the decoder ever raises. `reason` is one
    of DECODE_REASONS, so rejections can be counted by kind."""

    def __init__(self, message: str, reason: str) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}")
        super().__init__(message)
        self.reason = reason
