"""Finding kernel headers for bcc: the running kernel's, else any installed, else one clear error.

These build fake /lib/modules trees, so they need neither root nor bcc."""

from __future__ import annotations

from pathlib import Path

import pytest

from ebpf.errors import EbpfUnavailable
from ebpf.headers import find_headers


def tree(root: Path, release: str, split: bool) -> Path:
    """A /lib/modules/<release> dir; split=True lays it out like Debian (-common + -amd64)."""
    src = root / "src"
    build = src / f"linux-headers-{release}"
    (build / "include/generated").mkdir(parents=True)
    (build / "include/generated/autoconf.h").write_text("")
    kdir = root / "modules" / release
    kdir.mkdir(parents=True)
    (kdir / "build").symlink_to(build)
    if split:
        common = src / f"linux-headers-{release}-common"
        (common / "include/linux").mkdir(parents=True)
        (common / "include/linux/kconfig.h").write_text("")
        (kdir / "source").symlink_to(common)
    else:
        (build / "include/linux").mkdir(parents=True)
        (build / "include/linux/kconfig.h").write_text("")
    return kdir


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)


def test_running_kernel_headers_need_no_override(tmp_path):
    tree(tmp_path, "6.18.0-test", split=True)
    found = find_headers(tmp_path / "modules", release="6.18.0-test")
    assert found.matches_running_kernel
    assert found.env == {} and found.cflags == ()


def test_other_kernel_split_headers_use_bcc_kernel_source_and_generated_includes(tmp_path):
    tree(tmp_path, "6.1.0-56-amd64", split=True)
    tree(tmp_path, "5.10.0-9-amd64", split=True)
    found = find_headers(tmp_path / "modules", release="6.18.44-other")
    assert not found.matches_running_kernel
    assert found.release == "6.1.0-56-amd64"  # the newest installed
    common = (tmp_path / "src/linux-headers-6.1.0-56-amd64-common").resolve()
    assert found.env == {"BCC_KERNEL_SOURCE": str(common)}
    build = (tmp_path / "src/linux-headers-6.1.0-56-amd64").resolve()
    assert f"-I{build}/include" in found.cflags
    assert any(flag.endswith("/include/generated") for flag in found.cflags)


def test_other_kernel_single_tree_needs_only_bcc_kernel_source(tmp_path):
    tree(tmp_path, "6.5.0-1", split=False)
    found = find_headers(tmp_path / "modules", release="6.18.0")
    assert found.env == {"BCC_KERNEL_SOURCE": str(tmp_path / "src/linux-headers-6.5.0-1")}
    assert found.cflags == ()


def test_applied_sets_the_env_only_meanwhile(tmp_path):
    import os

    tree(tmp_path, "6.1.0-56-amd64", split=True)
    found = find_headers(tmp_path / "modules", release="6.18.0")
    with found.applied():
        assert os.environ["BCC_KERNEL_SOURCE"] == found.env["BCC_KERNEL_SOURCE"]
    assert "BCC_KERNEL_SOURCE" not in os.environ


def test_no_headers_is_one_line_saying_what_to_install(tmp_path):
    (tmp_path / "modules" / "6.18.0").mkdir(parents=True)  # modules, no build dir
    with pytest.raises(EbpfUnavailable) as caught:
        find_headers(tmp_path / "modules", release="6.18.0")
    message = str(caught.value)
    assert "\n" not in message
    assert "6.18.0" in message and "apt-get install linux-headers" in message


def test_operator_bcc_kernel_source_is_honoured_or_rejected_clearly(tmp_path, monkeypatch):
    kdir = tree(tmp_path, "6.5.0-1", split=False)
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(kdir / "build"))
    assert find_headers().source_dir == kdir / "build"
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "nowhere"))
    with pytest.raises(EbpfUnavailable, match="BCC_KERNEL_SOURCE=.*nowhere.*kconfig.h"):
        find_headers()
