"""Configuration: file + flags, and errors that name the file, the line and the key."""

from __future__ import annotations

import pytest

from bridge.config import Overrides, build_config, default_observation_domain_id
from bridge.errors import UserError

FILE = """\
active_timeout = 120
idle_timeout = 10
biflow = true

[[collector]]
address = "127.0.0.1:4739"
protocol = "ipfix"
profile = "ntop"

[[collector]]
address = "[::1]:2055"
protocol = "v9"
transport = "tcp"
template_refresh = 5
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "flowbridge.toml"
    path.write_text(text)
    return str(path)


def test_file_with_several_collectors(tmp_path):
    config = build_config(write(tmp_path, FILE), Overrides())
    assert (config.active_timeout, config.idle_timeout, config.biflow) == (120, 10, True)
    first, second = config.collectors
    assert (first.host, first.port, first.protocol, first.profile_name) == (
        "127.0.0.1",
        4739,
        "ipfix",
        "ntop",
    )
    assert (second.host, second.port, second.protocol, second.transport) == (
        "::1",
        2055,
        "v9",
        "tcp",
    )
    assert second.profile_name == "standard" and second.template_refresh == 5
    assert second.address == "[::1]:2055"


def test_flags_override_the_file(tmp_path):
    overrides = Overrides(
        agent={"active_timeout": 30, "idle_timeout": None},
        collector={"max_message_size": 512, "profile": None},
    )
    config = build_config(write(tmp_path, FILE), overrides)
    assert (config.active_timeout, config.idle_timeout) == (30, 10)
    assert [c.max_message_size for c in config.collectors] == [512, 512]
    assert [c.profile_name for c in config.collectors] == ["ntop", "standard"]
    replaced = build_config(
        write(tmp_path, FILE),
        Overrides(collectors=("10.1.1.1:9995",), collector={"protocol": "v5"}),
    )
    (only,) = replaced.collectors
    assert (only.host, only.port, only.protocol, only.profile_name) == (
        "10.1.1.1",
        9995,
        "v5",
        "v5",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("active_timout = 5\n", ":1: unknown key 'active_timout'"),
        ("idle_timeout = -1\n", ":1: 'idle_timeout' must be a positive number of seconds"),
        ("biflow = 1\n", ":1: 'biflow' must be true or false"),
        ("a = 1\nx = = 2\n", ":2: invalid TOML"),
        (
            FILE.replace('protocol = "v9"', 'protocol = "v10"'),
            ":12: collector #2: 'protocol' must be one of ipfix, v9, v5, not 'v10'",
        ),
        (
            FILE.replace('address = "[::1]:2055"', 'address = "::1:2055"'),
            ":11: collector #2: address '::1:2055': write an IPv6 address in brackets",
        ),
        ('[[collector]]\nprotocol = "v9"\n', ":1: collector #1: 'address' (HOST:PORT) is missing"),
        ('[[collector]]\naddress = "h:1"\nport = 3\n', ":3: collector #1: unknown key 'port'"),
        ("idle_timeout = 90\n", "idle timeout 90s is longer than the active timeout 60s"),
        ("active_timeout = nan\n", ":1: 'active_timeout' must be a positive number of seconds"),
        ("active_timeout = inf\n", ":1: 'active_timeout' must be at most 604800 seconds"),
        ("options_interval = 1e9\n", ":1: 'options_interval' must be at most 604800 seconds"),
        ("max_flows = 100_000_000\n", ":1: 'max_flows' must be at most 16777216"),
        (
            "observation_domain_id = 4294967296\n",
            ":1: 'observation_domain_id' must be 1..4294967295",
        ),
        ('cgroup = "/nonexistent/cg"\n', ":1: 'cgroup' /nonexistent/cg: no such directory"),
        ("export_command_lines = 1\n", ":1: 'export_command_lines' must be true or false"),
        ("metrics = 0\n", ":1: metrics '127.0.0.1:0': port 0 is outside 1-65535"),
        (
            '[[collector]]\naddress = "h:1"\nsource = "eth0"\n',
            ":3: collector #1: 'source' 'eth0' is not an IP address",
        ),
        (
            '[[collector]]\naddress = "h:1"\ntransport = "tls"\ntls_key = "/nonexistent.key"\n',
            ":4: collector #1: 'tls_key' /nonexistent.key: cannot read: No such file or directory",
        ),
        (
            '[[collector]]\naddress = "h:1"\nmax_message_size = 65535\n',
            ": collector #1: 'max_message_size' 65535 does not fit a UDP datagram (at most 65507)",
        ),
        (
            '[[collector]]\naddress = "h:1"\ntransport = "tcp"\ntls_server_name = "h"\n',
            ": collector #1: 'tls_server_name' is a TLS setting, but transport is 'tcp'",
        ),
    ],
)
def test_file_errors_name_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as error:
        build_config(path, Overrides())
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    if message.startswith(":"):
        assert str(error.value).startswith(path + ":")


def test_flag_errors():
    with pytest.raises(UserError, match="--max-message-size: 'max_message_size' must be 256"):
        build_config(
            None, Overrides(collectors=("127.0.0.1:1",), collector={"max_message_size": 9})
        )
    with pytest.raises(UserError, match="--collector 'nowhere': expected HOST:PORT"):
        build_config(None, Overrides(collectors=("nowhere",)))
    with pytest.raises(UserError, match="config /nonexistent.toml: cannot read"):
        build_config("/nonexistent.toml", Overrides())


def test_observation_domain_id_is_stable_and_not_zero():
    first = default_observation_domain_id()
    assert first == default_observation_domain_id()
    assert 0 < first < 1 << 31


def test_limits_that_depend_on_the_transport_and_flags():
    # 65535 is the IPFIX length field's limit: fine over TCP, never deliverable over UDP
    config = build_config(
        None,
        Overrides(
            collectors=("127.0.0.1:1",),
            collector={"transport": "tcp", "max_message_size": 65535},
            agent={"metrics": "9465"},
        ),
    )
    assert config.collectors[0].max_message_size == 65535
    assert config.metrics == "127.0.0.1:9465"  # a bare port: loopback only
    with pytest.raises(UserError, match="--max-message-size: 'max_message_size' 65535 does not"):
        build_config(
            None, Overrides(collectors=("127.0.0.1:1",), collector={"max_message_size": 65535})
        )
