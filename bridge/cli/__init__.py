"""`flowbridge` command line: one module per command, loaded only when that command runs."""

from __future__ import annotations

import importlib
import sys

import click

from bridge.errors import UserError

COMMANDS = {
    "run": ("bridge.cli.run", "run", "Run the agent: collect flows with eBPF and export them."),
    "collect": ("bridge.cli.collect", "collect", "Receive IPFIX/v9/v5 and print the flows."),
    "replay": ("bridge.cli.replay", "replay", "Export flow records read from JSON lines."),
    "generate": (
        "bridge.cli.generate",
        "generate",
        "Export synthetic flows to load-test a collector.",
    ),
    "doctor": ("bridge.cli.doctor", "doctor", "Check that this host can run the agent."),
    "top": ("bridge.cli.top", "top", "Show the host's flows live (per process, per host)."),
}


class LazyGroup(click.Group):
    """Imports a command's module only when it is invoked, so `--help` and small commands stay fast
    and do not need bcc."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr, short_help = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return click.Command(name, short_help=f"{short_help} (not available in this build)")
        return getattr(module, attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flowbridge")
def cli() -> None:
    """flowbridge: host flows from eBPF, exported as IPFIX, NetFlow v9 and NetFlow v5."""


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        click.echo(f"flowbridge: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
