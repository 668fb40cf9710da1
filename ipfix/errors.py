"""The errors ipfix/ raises. Callers catch IpfixError; the CLI shows them as one line."""

from __future__ import annotations


class IpfixError(Exception):
    """Anything the wire-format layer refuses: bad profile, bad record value, bad datagram."""


class ProfileError(IpfixError):
    """A profile that cannot be used. The message names the file, the line and the element:
    "templates/x.toml:12: element 'octetDeltaCont': unknown information element"."""


class DecodeError(IpfixError):
    """Malformed or truncated input. The only exception the decoder ever raises."""
