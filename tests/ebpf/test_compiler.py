"""The BPF compile in a child process (ebpf.compiler): the agent never maps bcc or LLVM, the
kernel objects arrive as working descriptors, and the child's errors reach the caller."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ebpf.compiler import LD_IMM64, relocate_maps
from ebpf.errors import EbpfUnavailable
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


def insn(code: int, src_reg: int, imm: int) -> bytes:
    return struct.pack("<BBhi", code, src_reg << 4, 0, imm)


def ld_imm64(src_reg: int, imm: int) -> bytes:
    return insn(LD_IMM64, src_reg, imm) + insn(0, 0, 0)


def test_relocate_maps_rewrites_map_fds_only():
    exit_insn = insn(0x95, 0, 0)
    code = ld_imm64(1, 7) + ld_imm64(0, 7) + ld_imm64(2, 9) + exit_insn
    moved = relocate_maps(code, {7: 70, 9: 90})
    assert moved == ld_imm64(1, 70) + ld_imm64(0, 7) + ld_imm64(2, 90) + exit_insn


def test_relocate_maps_refuses_an_unknown_map_fd():
    with pytest.raises(EbpfUnavailable, match="map fd 5"):
        relocate_maps(ld_imm64(1, 5), {7: 70})


AGENT_PROBE = """
import json, sys
from ebpf.collector import FlowCollector
collector = FlowCollector(max_flows=1024)
with open("/proc/self/maps") as f:
    libraries = sorted({line.split()[-1] for line in f if ".so" in line})
stats = collector.stats()
collector.close()
print(json.dumps({"libraries": libraries, "bcc_imported": "bcc" in sys.modules,
                  "namespaces": stats.extra["namespaces"]}))
"""


def test_agent_process_never_maps_the_compiler(needs_root):
    done = subprocess.run([sys.executable, "-c", AGENT_PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0 and "EbpfUnavailable" in done.stderr:
        skip_or_fail(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    compiler = [lib for lib in probe["libraries"] if "LLVM" in lib or "libbcc" in lib
                or "clang" in lib]
    assert compiler == []
    assert probe["bcc_imported"] is False
    assert probe["namespaces"] >= 1  # the collector worked with what the child handed over


def test_compiler_error_reaches_the_caller(needs_root):
    from ebpf.compiler import compile_in_child

    before = set(os.listdir("/proc/self/fd"))
    # A ring buffer must be a power-of-two number of pages: the kernel refuses 3.
    with pytest.raises(EbpfUnavailable, match="events"):
        compile_in_child(1024, 4096, 3)
    assert set(os.listdir("/proc/self/fd")) <= before  # no descriptor left behind
