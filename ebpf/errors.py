"""Errors of the eBPF layer. Each carries one line that says what is wrong and how to fix it."""

from __future__ import annotations


class EbpfUnavailable(Exception):
    """The collector cannot load or attach on this host (no root, no headers, no cgroup v2, ...).

    str(exc) is a single line meant for the operator, e.g. shown by `flowbridge run` and
    `flowbridge doctor`.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
