"""A throwaway PKI for the TLS tests, made with the openssl CLI (fixed argument lists, no shell):
a CA, a collector certificate for `collector.test` and 127.0.0.1 signed by it, a client
certificate, and a second CA whose certificates the first one does not vouch for."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_NAME = "collector.test"
DAYS = "2"
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *EC_KEY, "-keyout", key.name, "-out", cert.name, "-days", DAYS,
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return cert, key


def make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], *, subject_alt: str, usage: str
) -> tuple[Path, Path]:
    """A certificate signed by `ca`, e.g. subject_alt "DNS:collector.test,IP:127.0.0.1"."""
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
    _openssl(
        "req", "-new", *EC_KEY, "-keyout", key.name, "-out", request.name,
        "-subj", f"/CN={name}", "-addext", f"subjectAltName={subject_alt}",
        "-addext", f"extendedKeyUsage={usage}", "-addext", "basicConstraints=CA:FALSE",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", cert.name, "-days", DAYS, "-copy_extensions", "copy",
        cwd=directory,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the agent is told to trust
    server: tuple[Path, Path]  # collector.test / 127.0.0.1, signed by `ca`
    client: tuple[Path, Path]  # a client certificate signed by `ca`
    other_ca: Path  # a CA the agent does not trust
    other_server: tuple[Path, Path]  # collector.test / 127.0.0.1, signed by `other_ca`
    self_signed: tuple[Path, Path]  # collector.test / 127.0.0.1, its own issuer


def make_pki(directory: Path) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (Debian: openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    names = f"DNS:{SERVER_NAME},IP:127.0.0.1,IP:::1"
    ca = make_ca(directory, "flowbridge-test-ca")
    other = make_ca(directory, "flowbridge-other-ca")
    self_signed = make_ca(directory, "self-signed")
    return Pki(
        ca=ca[0],
        server=make_leaf(directory, "server", ca, subject_alt=names, usage="serverAuth"),
        client=make_leaf(directory, "client", ca, subject_alt="DNS:agent.test", usage="clientAuth"),
        other_ca=other[0],
        other_server=make_leaf(
            directory, "other-server", other, subject_alt=names, usage="serverAuth"
        ),
        self_signed=self_signed,
    )
