"""HOST:PORT as an operator writes it (IPv6 as [addr]:port) and its resolution to a socket
address."""

from __future__ import annotations

import ipaddress
import socket

from bridge.errors import UserError


def parse_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """'127.0.0.1:4739', '[::1]:4739', 'collector.example:2055' -> (host, port). Brackets are
    stripped from IPv6 hosts. `what` names the flag or key in the error message."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UserError(f"{what} {text!r}: expected [IPv6-address]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise UserError(f"{what} {text!r}: expected HOST:PORT")
        if ":" in host:
            raise UserError(f"{what} {text!r}: write an IPv6 address in brackets, as [{host}]:PORT")
    if not host:
        raise UserError(f"{what} {text!r}: empty host")
    try:
        port = int(port_text)
    except ValueError:
        raise UserError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise UserError(f"{what} {text!r}: port {port} is outside 1-65535")
    return host, port


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(
    host: str, port: int, kind: str, source: str | None = None
) -> tuple[socket.AddressFamily, tuple]:
    """The socket family and address to reach host:port over `kind` ("udp" or "tcp"). With a
    source address the collector address must be of the same family."""
    host = host.strip("[]")
    socktype = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    family = socket.AF_UNSPEC
    if source is not None:
        try:
            family = (
                socket.AF_INET6
                if ipaddress.ip_address(source.strip("[]")).version == 6
                else socket.AF_INET
            )
        except ValueError:
            raise UserError(f"source address {source!r} is not an IP address") from None
    try:
        infos = socket.getaddrinfo(host, port, family, socktype, 0, socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        fam = {socket.AF_INET: "IPv4 ", socket.AF_INET6: "IPv6 "}.get(family, "")
        where = format_hostport(host, port)
        message = f"collector {where}: no {fam}address for {host!r} ({exc.strerror})"
        raise UserError(message) from None
    af, _type, _proto, _name, sockaddr = infos[0]
    return af, sockaddr
