"""Finding kernel headers for bcc.

bcc compiles BPF C at load time and wants kernel headers. It looks in
/lib/modules/$(uname -r)/{build,source}; the env var BCC_KERNEL_SOURCE replaces that with one
directory that must hold both `include/linux/kconfig.h` and the generated headers. Debian splits
headers in two packages (linux-headers-<ver>-common: the sources; linux-headers-<ver>-<arch>:
generated files), so for a Debian tree we point BCC_KERNEL_SOURCE at the common part and add
the generated include directories as extra -I flags (bcc appends cflags after its own).

Our programs use only UAPI types and tracepoint arguments (bcc builds those from tracefs), so
headers of another kernel version serve: we prefer the running kernel's, then the newest
installed.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ebpf.errors import EbpfUnavailable

MODULES_DIR = Path("/lib/modules")
SRC_DIR = Path("/usr/src")
INSTALL_HINT = "install kernel headers: apt-get install linux-headers-$(uname -r) " \
    "(or linux-headers-amd64 / your distribution's kernel-devel package)"


@dataclass(frozen=True)
class KernelHeaders:
    """Where bcc should read headers from: env vars to set and cflags to add."""

    release: str  # the kernel release the headers belong to
    source_dir: Path  # holds include/linux/kconfig.h
    env: dict[str, str] = field(default_factory=dict)
    cflags: tuple[str, ...] = ()
    matches_running_kernel: bool = False

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The environment bcc reads at compile time (BCC_KERNEL_SOURCE), set only meanwhile:
        left behind, it would read as the operator's choice to the next find_headers()."""
        saved = os.environ.get("BCC_KERNEL_SOURCE")
        os.environ.pop("BCC_KERNEL_SOURCE", None)
        os.environ.update(self.env)
        try:
            yield
        finally:
            os.environ.pop("BCC_KERNEL_SOURCE", None)
            if saved is not None:
                os.environ["BCC_KERNEL_SOURCE"] = saved

    def describe(self) -> str:
        which = "running kernel" if self.matches_running_kernel else "fallback"
        return f"{self.source_dir} ({self.release}, {which})"


def _arch() -> str:
    machine = platform.machine()
    if machine in ("x86_64", "i386", "i686"):
        return "x86"
    if machine == "aarch64":
        return "arm64"
    return machine


def _has_sources(path: Path) -> bool:
    return (path / "include/linux/kconfig.h").is_file()


def _has_generated(path: Path) -> bool:
    return (path / "include/generated/autoconf.h").is_file()


def _generated_flags(build: Path) -> tuple[str, ...]:
    arch = _arch()
    return (
        f"-I{build}/arch/{arch}/include/generated/uapi",
        f"-I{build}/arch/{arch}/include/generated",
        f"-I{build}/include",
        f"-I{build}/include/generated/uapi",
    )


def _from_modules_dir(kdir: Path, release: str, running: bool) -> KernelHeaders | None:
    """A /lib/modules/<release> directory with build/ (and maybe a split source/)."""
    build, source = kdir / "build", kdir / "source"
    if not build.is_dir():
        return None
    build = build.resolve()
    if _has_sources(build) and _has_generated(build):
        env = {} if running else {"BCC_KERNEL_SOURCE": str(build)}
        return KernelHeaders(release, build, env, (), running)
    if source.is_dir() and _has_sources(source.resolve()) and _has_generated(build):
        source = source.resolve()
        if running:
            return KernelHeaders(release, source, {}, (), True)  # bcc handles build+source
        return KernelHeaders(
            release, source, {"BCC_KERNEL_SOURCE": str(source)}, _generated_flags(build), False
        )
    return None


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release)[:4])


def _from_env() -> KernelHeaders | None:
    given = os.environ.get("BCC_KERNEL_SOURCE")
    if not given:
        return None
    path = Path(given)
    if not _has_sources(path):
        raise EbpfUnavailable(
            f"BCC_KERNEL_SOURCE={given} has no include/linux/kconfig.h; unset it or {INSTALL_HINT}"
        )
    return KernelHeaders(path.name, path, {"BCC_KERNEL_SOURCE": given}, (), False)


def find_headers(
    modules_dir: Path = MODULES_DIR, release: str | None = None
) -> KernelHeaders:
    """The best kernel headers on this host, or EbpfUnavailable saying what to install."""
    from_env = _from_env() if modules_dir == MODULES_DIR else None
    if from_env:
        return from_env
    release = release or platform.release()
    running = _from_modules_dir(modules_dir / release, release, True)
    if running:
        return running
    candidates = sorted(
        (p for p in modules_dir.glob("*") if p.is_dir() and p.name != release),
        key=lambda p: _version_key(p.name),
        reverse=True,
    )
    for kdir in candidates:
        found = _from_modules_dir(kdir, kdir.name, False)
        if found:
            return found
    raise EbpfUnavailable(f"no kernel headers found for {release} nor any other kernel; "
                          f"{INSTALL_HINT}")
