"""The agent's configuration: a TOML file for several collectors, flags on top.

active_timeout = 60          # seconds
idle_timeout = 15
max_flows = 100000           # the cache's bound; a full cache expires its oldest flow
kernel_max_flows = 65536     # the kernel flow map's bound; packets beyond it are counted
observation_domain_id = 42   # default: derived from /etc/machine-id
biflow = false               # RFC 5103 records to IPFIX collectors
cgroup = "/sys/fs/cgroup/system.slice"
metrics = "127.0.0.1:9465"   # Prometheus; a bare port (9465) means 127.0.0.1 only
export_command_lines = false # needed for profiles that list SRC/DST_PROC_CMDLINE
options_interval = 60        # seconds between options records (statistics, interfaces)

[[collector]]
address = "127.0.0.1:4739"   # IPv6 as "[::1]:4739"
protocol = "ipfix"           # ipfix | v9 | v5
profile = "standard"         # a shipped profile or a path; default per protocol
transport = "udp"            # udp | tcp | tls (IPFIX over TLS, RFC 7011 section 11)
tls_ca = "/etc/flowbridge/collector-ca.pem"  # tls: CA of the collector (default: system store)
tls_cert = "/etc/flowbridge/client.pem"      # tls: client certificate, if the collector asks
tls_key = "/etc/flowbridge/client.key"
tls_server_name = "collector.example"        # tls: name to verify; default the address's host
source = "127.0.0.1"         # optional source address
observation_domain_id = 7    # optional, this collector only
max_message_size = 1400
template_refresh = 30        # seconds
template_refresh_packets = 20
"""

from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from bridge.addresses import format_hostport, parse_hostport
from bridge.errors import UserError

PROTOCOLS = ("ipfix", "v9", "v5")
TRANSPORTS = ("udp", "tcp", "tls")
TLS_FILES = ("tls_ca", "tls_cert", "tls_key")
TLS_KEYS = (*TLS_FILES, "tls_server_name")
# Exported only when the operator says so: a command line can hold passwords and tokens.
COMMAND_LINE_ELEMENTS = ("SRC_PROC_CMDLINE", "DST_PROC_CMDLINE")
MAX_SECONDS = 7 * 86400  # timeouts and intervals; beyond this a value is a typo, not a plan
MAX_FLOWS = 1 << 24
MAX_UDP_PAYLOAD = 65507  # the largest datagram IPv4 carries; larger messages could never be sent
METRICS_HOST = "127.0.0.1"  # the metrics endpoint is reachable from elsewhere only when asked
DEFAULT_PROFILE = {"ipfix": "standard", "v9": "standard", "v5": "v5"}


@dataclass(frozen=True)
class CollectorConfig:
    host: str
    port: int
    protocol: str = "ipfix"
    profile: str = ""  # "" = the protocol's default
    transport: str = "udp"
    source: str | None = None
    max_message_size: int = 1400
    template_refresh: float = 30.0
    template_refresh_packets: int = 20
    observation_domain_id: int = 0  # 0 = the agent's (per protocol: see Agent.domain_for)
    tls_ca: str | None = None  # None = the system's trust store
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None  # None = host

    @property
    def address(self) -> str:
        return format_hostport(self.host, self.port)

    @property
    def profile_name(self) -> str:
        return self.profile or DEFAULT_PROFILE[self.protocol]


@dataclass(frozen=True)
class AgentConfig:
    collectors: tuple[CollectorConfig, ...] = ()
    active_timeout: float = 60.0
    idle_timeout: float = 15.0
    max_flows: int = 100_000
    kernel_max_flows: int = 65_536  # fixed when the programs load: a reload keeps the old one
    observation_domain_id: int = 0  # 0 = derive from the machine id
    biflow: bool = False
    cgroup: str | None = None
    metrics: str | None = None
    options_interval: float = 60.0
    export_command_lines: bool = False


_AGENT_KEYS = {f.name for f in fields(AgentConfig)} - {"collectors"}
_COLLECTOR_KEYS = ({f.name for f in fields(CollectorConfig)} - {"host", "port"}) | {"address"}


def default_observation_domain_id(protocol: str = "ipfix") -> int:
    """Non-zero, stable across restarts: from /etc/machine-id (else the hostname). v9 gets an id
    of its own: pmacct keys its sequence check on exporter address + id whatever the version, so
    IPFIX and v9 from one host into one nfacctd must not share it (collectors.md 2.10)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            seed = Path(path).read_text().strip()
        except OSError:
            continue
        if seed:
            break
    else:
        import socket

        seed = socket.gethostname()
    if protocol != "ipfix":
        seed = f"{seed}/{protocol}"
    value = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big") & 0x7FFFFFFF
    return value or 1


class _FileReader:
    """Validates one config file; errors name the file, the line and the key."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"config {path}: cannot read: {getattr(exc, 'strerror', exc)}"
            ) from None
        self.lines = self.text.splitlines()

    def line_of(self, needle: str, start: int = 0) -> int:
        for number, line in enumerate(self.lines[start:], start + 1):
            if line.split("#", 1)[0].strip().startswith(needle):
                return number
        return 1

    def fail(self, line: int, message: str) -> UserError:
        return UserError(f"{self.path}:{line}: {message}")

    def read(self) -> dict:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            line = 1
            if "at line " in message:
                digits = message.split("at line ", 1)[1].split(",", 1)[0].split(")", 1)[0]
                line = int(digits) if digits.strip().isdigit() else 1
            raise self.fail(line, f"invalid TOML: {message.split(' (at line', 1)[0]}") from None
        values: dict = {}
        for name, value in data.items():
            if name == "collector":
                continue
            if name not in _AGENT_KEYS:
                raise self.fail(self.line_of(name), f"unknown key '{name}'")
            values[name] = _check(name, value, lambda m, n=name: self.fail(self.line_of(n), m))
        raw = data.get("collector", [])
        if not isinstance(raw, list):
            raise self.fail(self.line_of("collector"), "use [[collector]] tables")
        collectors = []
        section_lines = [i for i, line in enumerate(self.lines) if line.strip() == "[[collector]]"]
        for index, table in enumerate(raw):
            start = section_lines[index] if index < len(section_lines) else 0
            collectors.append(self.collector(table, index + 1, start))
        values["collectors"] = tuple(collectors)
        return values

    def collector(self, table: dict, number: int, start: int) -> CollectorConfig:
        def fail(key: str, message: str) -> UserError:
            return self.fail(self.line_of(key, start), f"collector #{number}: {message}")

        for key in table:
            if key not in _COLLECTOR_KEYS:
                raise fail(key, f"unknown key '{key}'")
        if "address" not in table:
            raise self.fail(start + 1, f"collector #{number}: 'address' (HOST:PORT) is missing")
        try:
            host, port = parse_hostport(str(table["address"]), "address")
        except UserError as exc:
            raise fail("address", str(exc)) from None
        values = {k: _check(k, v, lambda m, k=k: fail(k, m)) for k, v in table.items()}
        values.pop("address")
        return CollectorConfig(host=host, port=port, **values)


def _check(name: str, value: object, fail) -> object:  # type: ignore[no-untyped-def]
    """One value's type and range; `fail(message)` builds the error naming where it is."""
    if name in ("active_timeout", "idle_timeout", "template_refresh", "options_interval"):
        # `not value > 0` also refuses nan, which TOML allows and `value <= 0` lets through
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise fail(f"'{name}' must be a positive number of seconds, not {value!r}")
        if value > MAX_SECONDS:
            raise fail(f"'{name}' must be at most {MAX_SECONDS} seconds (7 days), not {value!r}")
        return float(value)
    if name == "kernel_max_flows":
        if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 1 << 24:
            raise fail(f"'kernel_max_flows' must be 16..16777216, not {value!r}")
        return value
    if name in ("max_flows", "template_refresh_packets"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise fail(f"'{name}' must be a positive integer, not {value!r}")
        if name == "max_flows" and value > MAX_FLOWS:
            raise fail(f"'max_flows' must be at most {MAX_FLOWS}, not {value!r}")
        return value
    if name == "max_message_size":
        if isinstance(value, bool) or not isinstance(value, int) or not 256 <= value <= 65535:
            raise fail(f"'max_message_size' must be 256..65535, not {value!r}")
        return value
    if name == "observation_domain_id":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 32:
            raise fail(f"'observation_domain_id' must be 1..4294967295, not {value!r}")
        return value
    if name in ("biflow", "export_command_lines"):
        if not isinstance(value, bool):
            raise fail(f"'{name}' must be true or false, not {value!r}")
        return value
    if name == "protocol" and value not in PROTOCOLS:
        raise fail(f"'protocol' must be one of {', '.join(PROTOCOLS)}, not {value!r}")
    if name == "transport" and value not in TRANSPORTS:
        raise fail(f"'transport' must be udp, tcp or tls, not {value!r}")
    if name == "metrics":
        try:
            return metrics_address(value)
        except UserError as exc:
            raise fail(str(exc)) from None
    if not isinstance(value, str) or not value:
        raise fail(f"'{name}' must be a non-empty string, not {value!r}")
    if name in TLS_FILES:
        try:
            with open(value, "rb"):
                pass
        except OSError as exc:
            raise fail(f"'{name}' {value}: cannot read: {exc.strerror or exc}") from None
    if name == "source":
        try:
            ipaddress.ip_address(value.strip("[]"))
        except ValueError:
            raise fail(f"'source' {value!r} is not an IP address") from None
    if name == "cgroup" and not Path(value).is_dir():
        raise fail(f"'cgroup' {value}: no such directory (a cgroup-v2 path)")
    return value


def metrics_address(value: object) -> str:
    """HOST:PORT for the metrics endpoint. A bare port (9465 or "9465") binds to loopback only:
    the endpoint shows which collectors the host exports to and how busy it is, so exposing it
    needs an explicit host ("0.0.0.0:9465")."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"metrics {value!r}: expected PORT or HOST:PORT")
    text = value.strip()
    if text.isdigit():
        text = f"{METRICS_HOST}:{text}"
    host, port = parse_hostport(text, "metrics")
    return format_hostport(host, port)


@dataclass
class Overrides:
    """Values given as flags: None = not given. Collector flags apply to every collector."""

    collectors: tuple[str, ...] = ()
    agent: dict = field(default_factory=dict)
    collector: dict = field(default_factory=dict)


def build_config(path: str | None, overrides: Overrides) -> AgentConfig:
    """The file's configuration (if any) with the flags on top."""
    values = _FileReader(path).read() if path else {"collectors": ()}
    for name, value in overrides.agent.items():
        if value is not None:
            values[name] = _check(name, value, lambda m, n=name: _flag_error(n, m))
    collectors = list(values.pop("collectors"))
    if overrides.collectors:
        collectors = []
        for text in overrides.collectors:
            host, port = parse_hostport(text, "--collector")
            collectors.append(CollectorConfig(host=host, port=port))
    given = {k: v for k, v in overrides.collector.items() if v is not None}
    for name, value in given.items():
        _check(name, value, lambda m, n=name: _flag_error(n, m))
    collectors = [replace(c, **given) for c in collectors]
    config = AgentConfig(collectors=tuple(collectors), **values)
    if config.idle_timeout > config.active_timeout:
        raise UserError(
            f"idle timeout {config.idle_timeout:g}s is longer than the active timeout "
            f"{config.active_timeout:g}s"
        )
    for number, collector in enumerate(config.collectors, 1):

        def where(key: str, number: int = number) -> str:
            if key in given:
                return "--" + key.replace("_", "-")
            return f"{path}: collector #{number}" if path else f"collector #{number}"

        _check_collector(collector, where)
        _check_command_lines(collector, config.export_command_lines)
    return config


def _check_collector(collector: CollectorConfig, where) -> None:  # type: ignore[no-untyped-def]
    """What no single value shows: settings that contradict each other, TLS files that are not
    what their key says."""
    for key in TLS_KEYS:
        if getattr(collector, key) is not None and collector.transport != "tls":
            raise UserError(
                f"{where(key)}: '{key}' is a TLS setting, but transport is {collector.transport!r}"
                ' (set transport = "tls")'
            )
    if collector.transport == "udp" and collector.max_message_size > MAX_UDP_PAYLOAD:
        raise UserError(
            f"{where('max_message_size')}: 'max_message_size' {collector.max_message_size} "
            f"does not fit a UDP datagram (at most {MAX_UDP_PAYLOAD})"
        )
    if collector.transport == "tls":
        from bridge.tls import TlsConfigError, client_context

        try:
            client_context(collector.tls_ca, collector.tls_cert, collector.tls_key)
        except TlsConfigError as exc:
            raise UserError(f"{where(exc.key)}: {exc}") from None


def _check_command_lines(collector: CollectorConfig, allowed: bool) -> None:
    if allowed:
        return
    from ipfix.errors import IpfixError
    from ipfix.profile import load_profile

    try:
        profile = load_profile(collector.profile_name)
    except IpfixError as exc:
        raise UserError(f"collector {collector.address}: {exc}") from None
    for name in COMMAND_LINE_ELEMENTS:
        if name in profile.fields:
            raise UserError(
                f"profile {profile.path or profile.name} lists {name}: command lines can hold "
                "secrets; export them only with export_command_lines = true "
                "(or --export-command-lines)"
            )


def _flag_error(name: str, message: str) -> UserError:
    flag = "--" + name.replace("_", "-")
    return UserError(f"{flag}: {message}")
