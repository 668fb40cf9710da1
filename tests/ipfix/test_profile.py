"""Profiles: shipped ones load, bad ones give one line naming file, line and element."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipfix.errors import ProfileError
from ipfix.profile import load_profile, shipped_profiles, template_dirs

GOOD = """\
name = "mine"
protocols = ["ipfix", "v9"]
fields = [
    "sourceIPv4Address",
    "destinationIPv4Address",
    { element = "tcpControlBits", length = 1 },
    "octetDeltaCount",
]
"""


@pytest.mark.parametrize(
    ("name", "protocols"),
    [
        ("standard", ("ipfix", "v9")),
        ("ntop", ("ipfix", "v9")),
        ("nfdump-latency", ("v9",)),
        ("v5", ("v5",)),
    ],
)
def test_shipped_profiles_load(name: str, protocols: tuple[str, ...]) -> None:
    profile = load_profile(name)
    assert profile.name == name and profile.protocols == protocols
    assert "octetDeltaCount" in profile.fields


def test_templates_are_found_next_to_the_packages() -> None:
    assert template_dirs()[0] == Path(__file__).resolve().parents[2] / "templates"


def test_user_profile_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    profile = load_profile(str(path))
    assert profile.fields == (
        "sourceIPv4Address",
        "destinationIPv4Address",
        "tcpControlBits",
        "octetDeltaCount",
    )
    assert profile.lengths == {"tcpControlBits": 1}


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            '"octetDeltaCount"',
            '"octetDeltaCont"',
            ":7: element 'octetDeltaCont': unknown information element",
        ),
        ("length = 1 }", "length = 3 }", ":6: element 'tcpControlBits': length 3 not allowed"),
        (
            '"destinationIPv4Address"',
            '"sourceIPv4Address"',
            ":5: element 'sourceIPv4Address': listed twice",
        ),
        ('"ipfix", "v9"', '"ipfix", "v7"', ":2: unknown protocol 'v7'"),
        (
            '"octetDeltaCount"',
            '"CLIENT_NW_DELAY_SEC"',
            ":7: element 'CLIENT_NW_DELAY_SEC': exists in NetFlow v9 only",
        ),
        (
            '"octetDeltaCount"',
            '"reverseOctetDeltaCount"',
            ":7: element 'reverseOctetDeltaCount': NetFlow v9 cannot carry it",
        ),
        (
            "length = 1 }",
            "lenght = 1 }",
            ":6: element 'tcpControlBits': unknown field key 'lenght'",
        ),
        ('    "octetDeltaCount",\n]', '    "octetDeltaCount",\n', ":8: invalid TOML"),
    ],
)
def test_bad_profile_names_file_line_and_element(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    assert old in GOOD
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(ProfileError) as info:
        load_profile(str(path))
    text = str(info.value)
    assert text.startswith(str(path) + ":") and message in text
    assert "\n" not in text


def test_reduced_size_only_where_allowed(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text(
        GOOD.replace('"octetDeltaCount"', '{ element = "flowStartMilliseconds", length = 4 }')
    )
    with pytest.raises(ProfileError, match="length 4 not allowed for dateTimeMilliseconds"):
        load_profile(str(path))
    path.write_text(
        GOOD.replace('"octetDeltaCount"', '{ element = "octetDeltaCount", length = 4 }')
    )
    assert load_profile(str(path)).lengths["octetDeltaCount"] == 4


def test_more_than_60_fields_is_refused(tmp_path: Path) -> None:
    from ipfix.elements import ALL

    names = [e.name for e in ALL if e.pen == 0 and e.family is None][:61]
    path = tmp_path / "big.toml"
    path.write_text(
        'name = "big"\nprotocols = ["ipfix"]\nfields = [\n'
        + "".join(f'  "{n}",\n' for n in names)
        + "]\n"
    )
    with pytest.raises(ProfileError, match="61 fields; at most 60"):
        load_profile(str(path))


def test_unknown_shipped_name() -> None:
    with pytest.raises(ProfileError, match="no such shipped profile.*standard"):
        load_profile("nope")


def test_the_tests_format_list_is_what_the_shipped_profiles_declare() -> None:
    from tests.harness.formats import FORMATS

    declared = {(p, name) for name in shipped_profiles() for p in load_profile(name).protocols}
    assert sorted(FORMATS) == sorted(declared)
    assert len(set(FORMATS)) == len(FORMATS)
