"""The ``anomaly-flow`` command line: a thin click layer over the library.

Expected failures become ``click.ClickException`` (one line, exit code 1) or usage errors
(one line too, exit code 2); data goes to stdout, progress and logs to stderr.
"""

from __future__ import annotations

from typing import IO, Any

import click

from anomaly_flow.cli.common import configure_logging
from anomaly_flow.errors import told_nearby
from anomaly_flow.stopping import (
    exit_when_done,
    interrupt_exit_code,
    keep_going_without_stderr,
)


class _OneLineUsageError(click.UsageError):
    """A usage error told in one line, ``Error: ... (see 'anomaly-flow score --help')``,
    where click would print the usage synopsis and a hint on lines of their own."""

    def show(self, file: IO[str] | None = None) -> None:
        if told_nearby():  # under torchrun: the same arguments, the same error everywhere
            return
        message = self.format_message()
        if self.ctx is not None:
            message = f"{message.rstrip('.')} (see '{self.ctx.command_path} --help')"
        click.echo(f"Error: {message}", file=file, err=file is None)


# click 8.2 and later: a command given no arguments shows its help this way
_HELP_FOR_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _one_line(error: click.UsageError) -> click.UsageError:
    if isinstance(error, _HELP_FOR_NO_ARGS):  # the help text, as asked
        return error
    return _OneLineUsageError(error.format_message(), error.ctx)


class _Group(click.Group):
    """Two departures from click's defaults, for every command.

    A usage error (a missing argument, a bad option value) is one line on stderr, exit
    code 2. A Ctrl-C or SIGTERM that no command turned into its own message (one during
    start-up, say) exits as a shell reports the signal (130, 143) instead of click's
    "Aborted!" with status 1, which would read as a failure."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:  # the group's own options: ``anomaly-flow --bogus``
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            raise _one_line(error) from None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:  # a command's arguments, or its own checks
            raise _one_line(error) from None
        except KeyboardInterrupt as stop:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(interrupt_exit_code(stop)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="anomaly-flow")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
def main(verbose: int) -> None:
    """Image anomaly detection by exact likelihood (Glow), tracked in MLflow."""
    configure_logging(verbose)


def run() -> None:
    """The ``anomaly-flow`` program: :data:`main` as a process's entry point, whose
    success ends the process without a stop's exit status (:func:`exit_when_done`), and
    whose work goes on when stderr cannot be written (:func:`keep_going_without_stderr`)."""
    keep_going_without_stderr()
    try:
        main()
    except SystemExit as done:
        exit_when_done(done.code if isinstance(done.code, int | None) else 1)


# Each command lives in its own module and registers itself on `main`.
from anomaly_flow.cli import commands  # noqa: E402,F401
