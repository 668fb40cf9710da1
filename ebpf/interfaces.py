"""Attaching the counting programs (TCX) to every interface of every network namespace.

Which program goes where:
- loopback: `tc_loopback` on egress only. Every loopback packet crosses lo's egress exactly
  once, and the program counts it both as sent and as received.
- link-layer devices (Ethernet, veth, bridges, ...): `tc_ingress` / `tc_egress`.
- devices without a link-layer header (tun, wireguard, ip tunnels): the `_l3` variants.
- interfaces enslaved to a bridge, bond or VRF are skipped: a local socket's packets also cross
  the master, where they are counted once.

TCX links are owned by file descriptors of this process, so they vanish with it. New
namespaces and interfaces are picked up by `sync()`, which the collector runs on a timer and
which tests call directly after creating a namespace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ebpf import bpfsys, netns
from ebpf.errors import EbpfUnavailable

log = logging.getLogger(__name__)

ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772
# Devices whose skb starts at the IP header.
L3_LINK_TYPES = {
    65534,  # ARPHRD_NONE: tun, wireguard
    768,  # ARPHRD_TUNNEL: ipip
    769,  # ARPHRD_TUNNEL6
    776,  # ARPHRD_SIT
    778,  # ARPHRD_IPGRE
    823,  # ARPHRD_IP6GRE
}


@dataclass
class Programs:
    """Counting program fds by role, loaded for one network namespace."""

    ingress: int
    egress: int
    loopback: int
    ingress_l3: int
    egress_l3: int

    def close(self) -> None:
        _close_all([self.ingress, self.egress, self.loopback, self.ingress_l3, self.egress_l3])


@dataclass
class NamespaceState:
    ns: netns.Namespace
    cookie: int
    programs: Programs
    links: dict[int, list[int]] = field(default_factory=dict)  # ifindex -> link fds
    names: dict[int, str] = field(default_factory=dict)


class InterfaceAttacher:
    def __init__(self, programs_for: Callable[[int], Programs]) -> None:
        self.programs_for = programs_for  # netns cookie -> programs bound to that namespace
        self.namespaces: dict[int, NamespaceState] = {}  # by inode
        self.cookie_to_inode: dict[int, int] = {}
        self.attach_errors = 0
        self.last_error = ""
        self.frozen = False
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Attach to namespaces and interfaces that appeared; forget those that went away.

        Raises EbpfUnavailable when no namespace at all could be entered: counting nothing
        while looking healthy is worse than failing."""
        with self._lock:
            if self.frozen:
                return
            seen = netns.discover()
            for inode in list(self.namespaces):
                if inode not in seen:
                    self._forget(self.namespaces.pop(inode))
            failures = []
            for ns in seen.values():
                try:
                    netns.run_in(ns, lambda ns=ns: self._sync_here(ns))
                except OSError as exc:
                    # The namespace disappeared while we looked, or is not ours to enter.
                    log.debug("netns %s: %s", ns.path, exc)
                    failures.append(exc)
            if failures and not self.namespaces:
                raise EbpfUnavailable(
                    f"could not enter any of {len(seen)} network namespaces to attach the "
                    f"counting programs (first error: {failures[0]}); the agent needs "
                    "CAP_SYS_ADMIN and CAP_SYS_PTRACE or root"
                )

    def freeze(self) -> None:
        """No more discovery: what is attached stays attached, nothing is added or removed
        (after a privilege drop a scan would see too little and detach the rest)."""
        with self._lock:
            self.frozen = True

    def _sync_here(self, ns: netns.Namespace) -> None:
        state = self.namespaces.get(ns.inode)
        if state is None:
            cookie = netns.cookie_here()
            state = NamespaceState(ns, cookie, self.programs_for(cookie))
            self.namespaces[ns.inode] = state
            self.cookie_to_inode[state.cookie] = ns.inode
        present = {}
        for ifindex, name, link_type, master in netns.iter_links():
            present[ifindex] = name
            if ifindex in state.links and state.names.get(ifindex) == name:
                continue
            if ifindex in state.links:  # ifindex reused by a new interface
                _close_all(state.links.pop(ifindex))
            if master:
                state.links[ifindex] = []
                state.names[ifindex] = name
                continue
            state.links[ifindex] = self._attach(state.programs, ifindex, name, link_type)
            state.names[ifindex] = name
        for ifindex in list(state.links):
            if ifindex not in present:
                _close_all(state.links.pop(ifindex))
                state.names.pop(ifindex, None)

    def _attach(self, p: Programs, ifindex: int, name: str, link_type: int) -> list[int]:
        if link_type == ARPHRD_LOOPBACK:
            plan = [(p.loopback, bpfsys.TCX_EGRESS)]
        elif link_type in L3_LINK_TYPES:
            plan = [(p.ingress_l3, bpfsys.TCX_INGRESS), (p.egress_l3, bpfsys.TCX_EGRESS)]
        elif link_type == ARPHRD_ETHER:
            plan = [(p.ingress, bpfsys.TCX_INGRESS), (p.egress, bpfsys.TCX_EGRESS)]
        else:
            return []
        fds = []
        for prog_fd, attach_type in plan:
            try:
                fds.append(bpfsys.link_create(prog_fd, ifindex, attach_type))
            except OSError as exc:
                self.attach_errors += 1
                self.last_error = f"TCX attach to {name} (ifindex {ifindex}) failed: {exc}"
                log.warning("%s", self.last_error)
        return fds

    def _forget(self, state: NamespaceState) -> None:
        for fds in state.links.values():
            _close_all(fds)
        state.programs.close()
        self.cookie_to_inode.pop(state.cookie, None)

    def interface_count(self) -> int:
        return sum(
            1 for state in self.namespaces.values() for fds in state.links.values() if fds
        )

    def close(self) -> None:
        with self._lock:
            for state in self.namespaces.values():
                self._forget(state)
            self.namespaces.clear()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
