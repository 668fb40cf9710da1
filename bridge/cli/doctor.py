"""`flowbridge doctor`: check that this host can run the agent, and say how to fix what cannot."""

from __future__ import annotations

import os
import sys

import click


@click.command("doctor", short_help="Check that this host can run the agent.")
def doctor() -> None:
    """Check kernel, cgroup v2, bcc, kernel headers, privileges and every BPF hook the agent
    needs (by loading it). Exit status 1 when the agent cannot run here.

    \b
    Example:
      sudo flowbridge doctor
    """
    from bridge.privileges import privilege_drop_check
    from ebpf.preflight import run_checks

    checks = run_checks()
    if os.geteuid() == 0:  # the probe makes a map and hands it to `nobody`: root only
        checks.append(privilege_drop_check())
    width = max(len(c.name) for c in checks)
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.required else "warn")
        line = f"{mark}  {check.name:<{width}}  {check.detail}"
        if not check.ok and check.fix:
            line += f"  -> fix: {check.fix}"
        click.echo(line)
    failed = [c.name for c in checks if not c.ok and c.required]
    if failed:
        click.echo(f"flowbridge cannot run here: {', '.join(failed)} failed", err=True)
        sys.exit(1)
    click.echo("flowbridge can run here")
