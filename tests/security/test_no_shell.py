"""No shell is ever started by the agent: flows and configuration carry text from untrusted places
(process names, command lines, paths), and a shell would read it as commands. Checked on the
syntax tree of every module, so a comment or a string mentioning os.system does not count and an
aliased import does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bridge", "ebpf", "ipfix")
# Functions that run their argument through /bin/sh whatever the caller passes.
SHELL_FUNCTIONS = {
    ("os", "system"),
    ("os", "popen"),
    ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput"),
    ("pty", "spawn"),
}


def shell_uses(source: str, filename: str = "<text>") -> list[str]:
    """Each shell use as 'line: what'."""
    tree = ast.parse(source, filename)
    aliases: dict[str, tuple[str, str]] = {}  # local name -> (module, function)
    modules: dict[str, str] = {}  # local name -> module
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if (node.module, alias.name) in SHELL_FUNCTIONS:
                    aliases[alias.asname or alias.name] = (node.module, alias.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        for keyword in node.keywords:
            shell_off = isinstance(keyword.value, ast.Constant) and not keyword.value.value
            if keyword.arg == "shell" and not shell_off:
                found.append(f"{node.lineno}: shell={ast.unparse(keyword.value)}")
        function = node.func
        target = None
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            target = (modules.get(function.value.id, ""), function.attr)
        elif isinstance(function, ast.Name):
            target = aliases.get(function.id)
        if target in SHELL_FUNCTIONS:
            found.append(f"{node.lineno}: {target[0]}.{target[1]}")
    return found


def test_no_module_starts_a_shell():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 20  # the scan really sees the packages
    uses = [
        f"{path.relative_to(ROOT)}:{use}"
        for path in files
        for use in shell_uses(path.read_text(encoding="utf-8"), str(path))
    ]
    assert uses == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import subprocess\nsubprocess.run(cmd, shell=True)\n", ["2: shell=True"]),
        ("import subprocess as sp\nsp.Popen(cmd, shell=flag)\n", ["2: shell=flag"]),
        ("import os\nos.system('ls')\n", ["2: os.system"]),
        ("import os as o\no.popen(x)\n", ["2: os.popen"]),
        ("from os import system as run\nrun(x)\n", ["2: os.system"]),
        ("from subprocess import getoutput\ngetoutput(x)\n", ["2: subprocess.getoutput"]),
        ("import subprocess\nsubprocess.run(['ls'], shell=False)\n", []),
        ("# os.system('ls')\ntext = 'shell=True'\n", []),
    ],
)
def test_the_scan_finds_what_it_looks_for(source, expected):
    assert shell_uses(source) == expected
