"""The ``anomaly-flow`` command line: a thin click layer over the library.

Expected failures become ``click.ClickException`` (one line, exit code 1) or usage errors
(exit code 2); data goes to stdout, progress and logs to stderr.
"""

from __future__ import annotations

import click

from anomaly_flow.cli.common import configure_logging
from anomaly_flow.stopping import interrupt_exit_code


class _Group(click.Group):
    """A Ctrl-C or SIGTERM that no command turned into its own message (one during start-up,
    say) exits as a shell reports the signal (130, 143) instead of click's "Aborted!"
    with status 1, which would read as a failure."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as stop:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(interrupt_exit_code(stop)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anomaly-flow")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Image anomaly detection by exact likelihood (Glow), tracked in MLflow."""
    configure_logging(verbose)


# Each command lives in its own module and registers itself on `main`.
from anomaly_flow.cli import commands  # noqa: E402,F401
