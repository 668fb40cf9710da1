"""Host checks for `flowbridge doctor`: can the eBPF collector run here, and if not, why.

Each check says what works, what does not and the fix. Hooks are checked by loading and
attaching them for real (and detaching at once), not by reading kernel config.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass

from ebpf import bpfsys, loader, netns
from ebpf.errors import EbpfUnavailable
from ebpf.headers import find_headers

MIN_KERNEL = (6, 6)  # TCX links (6.6); bpf_get_netns_cookie in cgroup sock hooks (5.8)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _kernel() -> Check:
    release = platform.release()
    numbers = tuple(int(n) for n in re.findall(r"\d+", release)[:2])
    ok = numbers >= MIN_KERNEL
    fix = "" if ok else f"boot Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer (TCX attach links)"
    return Check("kernel", ok, f"Linux {release}", fix)


def _privileges() -> Check:
    ok = os.geteuid() == 0
    return Check("privileges", ok, "root" if ok else f"running as uid {os.geteuid()}",
                 "" if ok else "run as root (BPF, cgroup attach, network namespaces)")


def _cgroup2() -> Check:
    mount = loader.cgroup2_mount()
    if mount is None:
        return Check("cgroup v2", False, "no cgroup2 mount in /proc/mounts",
                     "mount -t cgroup2 none /sys/fs/cgroup/unified")
    return Check("cgroup v2", True, f"mounted at {mount}")


def _bcc() -> Check:
    try:
        bcc = loader.import_bcc()
    except EbpfUnavailable as exc:
        return Check("bcc", False, str(exc), "apt-get install python3-bpfcc")
    version = getattr(bcc, "__version__", "unknown version")
    return Check("bcc", True, f"bcc {version} ({os.path.dirname(bcc.__file__)})")


def _headers() -> Check:
    try:
        found = find_headers()
    except EbpfUnavailable as exc:
        return Check("kernel headers", False, str(exc), "apt-get install linux-headers-amd64")
    return Check("kernel headers", True, found.describe())


def _tracefs() -> Check:
    mount = loader.tracefs_mount()
    if mount is None:
        return Check("tracefs", False, "not mounted", "mount -t tracefs nodev /sys/kernel/tracing")
    return Check("tracefs", True, f"mounted at {mount}")


def _hooks() -> list[Check]:
    """Load and attach every program the collector uses, then detach them."""
    try:
        loaded = loader.load(None, max_flows=1024, max_socks=1024)
    except EbpfUnavailable as exc:
        return [Check("BPF programs", False, str(exc), "fix the failed checks above first")]
    checks = [Check("BPF programs", True, f"compiled with headers {loaded.headers.describe()}")]
    try:
        for func, _, _ in loader.CGROUP_PROGRAMS:
            checks.append(Check(f"hook {func}", True, f"attached to {loaded.cgroup}"))
        checks.append(Check("hook tracepoint tcp:tcp_destroy_sock", True, "attached"))
        checks.append(_tcx(loaded))
    finally:
        loaded.close()
    return checks


def _tcx(loaded: loader.LoadedPrograms) -> Check:
    """Attach the loopback counting program to lo of this namespace and detach it."""
    try:
        programs = loaded.tc_programs(netns.cookie_here())
    except OSError as exc:
        return Check("hook TCX (interface counting)", False, f"verifier rejected it: {exc}",
                     "a kernel with bpf_skb_load_bytes, bpf_sk_fullsock and bpf_tcp_sock in tc")
    try:
        link = bpfsys.link_create(programs.loopback, 1, bpfsys.TCX_EGRESS)
        os.close(link)
    except OSError as exc:
        return Check("hook TCX (interface counting)", False, f"attach to lo failed: {exc}",
                     f"Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]}+ with CONFIG_NET_XGRESS")
    finally:
        programs.close()
    return Check("hook TCX (interface counting)", True, "attached to lo and detached")


def run_checks() -> list[Check]:
    """All checks, in an order where an earlier failure explains a later one."""
    steps: list[Callable[[], Check]] = [
        _kernel, _privileges, _cgroup2, _bcc, _headers, _tracefs,
    ]
    checks = [step() for step in steps]
    if all(c.ok for c in checks if c.required):
        with contextlib.suppress(KeyboardInterrupt):
            checks.extend(_hooks())
    else:
        checks.append(Check("BPF programs", False, "not tried: an earlier check failed",
                            "fix the failed checks above"))
    return checks
