"""deploy/: the systemd unit, the Containerfile and the DaemonSet, checked by the tools that
know them (systemd-analyze, hadolint, the Kubernetes schema), and against each other."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tools, skip_or_fail

DEPLOY = Path(__file__).parents[2] / "deploy"
UNIT = DEPLOY / "flowbridge.service"
CONTAINERFILE = DEPLOY / "Containerfile"
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"


def venv_tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is not installed (pip install '.[test]')")
    return str(path)


def unit_capabilities() -> set[str]:
    line = re.search(r"^CapabilityBoundingSet=(.*)$", UNIT.read_text(), re.M)
    assert line is not None
    return {cap.removeprefix("CAP_") for cap in line.group(1).split()}


def daemonset_capabilities() -> set[str]:
    import yaml

    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    assert ds["spec"]["template"]["spec"]["hostPID"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/sys/fs/cgroup" in mounts
    return set(caps["add"])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    # The unit names the agent where deploy/ installs it; point it at this checkout's.
    agent = Path(sys.executable).parent / "flowbridge"
    if not agent.exists():
        skip_or_fail(f"{agent} is missing: install the project (deploy/setup.sh)")
    unit = tmp_path / "flowbridge.service"
    unit.write_text(UNIT.read_text().replace("/opt/flowbridge/bin/flowbridge", str(agent)))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in out.stderr.splitlines() if "flowbridge.service" in line]
    assert out.returncode == 0 and not problems, out.stderr


def test_systemd_unit_security_exposure() -> None:
    """systemd's own rating of the sandbox (lower is better; 10 is an unconfined root)."""
    require_tools("systemd-analyze")
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    if "--offline" in out.stderr or "unrecognized option" in out.stderr:
        skip_or_fail("systemd-analyze security --offline needs systemd 252+")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert match is not None, out.stdout + out.stderr
    assert float(match.group(1)) < 6.0, out.stdout[-2000:]


def test_containerfile_lints_clean() -> None:
    hadolint = venv_tool("hadolint")
    out = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_daemonset_matches_the_kubernetes_schema() -> None:
    validate = venv_tool("kubernetes-validate")
    out = subprocess.run([validate, "--strict", str(DAEMONSET)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed for resource daemonset/flowbridge" in out.stdout + out.stderr


def test_unit_and_daemonset_grant_the_same_capabilities() -> None:
    pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate")
    assert unit_capabilities() == daemonset_capabilities()
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN"} <= unit_capabilities()


def test_containerfile_installs_every_package_the_agent_imports() -> None:
    text = CONTAINERFILE.read_text()
    for package in ("bridge", "ebpf", "ipfix", "templates"):
        assert f"COPY {package} ./{package}" in text
    assert "python3-bpfcc" in text and "--system-site-packages" in text
