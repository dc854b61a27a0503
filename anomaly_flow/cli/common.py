"""Pieces every command shares: user errors as one-line messages, and common options.

- :func:`user_errors`: a decorator turning the library's user-facing exceptions
  (``DataError``, ``ConfigError``, ``TrainingError``, ``ModelNotFoundError``,
  ``CalibrationError``, ...) into ``click.ClickException``: ``Error: <message>`` on
  stderr, exit code 1, no traceback.
- :data:`model_option` (``--model``, a :class:`ModelURI`), :data:`mlruns_option`
  (``--mlruns``) and :data:`device_option` (``--device``).
- :func:`configure_logging`: the library's log records on click's stderr.
- :func:`stops_reported`: around a command's work, Ctrl-C and SIGTERM end it with a
  line saying how to go on and the status a shell expects.

This module imports neither torch nor mlflow, so ``anomaly-flow --help`` stays fast;
commands import the library inside their function.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from anomaly_flow.errors import (
    command_scope,
    describe_failure,
    peer_lost,
    told_nearby,
    user_error_types,
)
from anomaly_flow.stopping import interrupt_exit_code, sigterm_as_interrupt

F = TypeVar("F", bound=Callable[..., Any])

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Option callback: a number option must be finite (``click.FloatRange`` lets ``nan``
    through every bound, and ``inf`` through open ones), refused before any work."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


class PathGiven(click.Path):
    """``click.Path`` that refuses an empty value: ``Path("")`` is the current folder, so
    an unset shell variable (``--out "$DIR"``) would otherwise score, calibrate on, or
    write heatmaps into whatever folder the command runs in."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("the path is empty; give a file or folder ('.' for the current "
                      "folder)", param, ctx)
        return super().convert(value, param, ctx)


class ImageFolder(PathGiven):
    """A folder of images to read, refused when missing or not a folder, with the name
    of the option (or argument) that gave it, before a store is opened or a model
    loaded: ``calibrate`` and the pipelines take several folders."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)  # a file is refused below, in the library's words

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        from anomaly_flow.data import DataError
        from anomaly_flow.folders import check_image_folder

        path = super().convert(value, param, ctx)
        try:
            check_image_folder(Path(path))
        except DataError as error:
            self.fail(str(error), param, ctx)
        return path


class ClickLogHandler(logging.Handler):
    """Writes log records with ``click.echo(err=True)``, looking the stream up per record.

    A ``StreamHandler`` keeps the ``sys.stderr`` it was made with; this one follows the
    stderr click uses now, so records land in the command's output also when the
    command runs inside another program (``CliRunner``, a notebook).
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


def configure_logging(verbose: int) -> None:
    """Show the library's warnings (``-v``: info, ``-vv``: debug) on stderr.

    Installs one :class:`ClickLogHandler` on the root logger, however many commands run
    in the process; handlers others installed (pytest's, an application's) stay.
    """
    root = logging.getLogger()
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))
    if _other_rank():  # under torchrun rank 0 speaks for all: the others show errors only
        root.setLevel(logging.ERROR)
    if not any(isinstance(handler, ClickLogHandler) for handler in root.handlers):
        handler = ClickLogHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)


def _other_rank() -> bool:
    """Whether this process is a torchrun rank other than 0."""
    return os.environ.get("RANK", "0") != "0"


def show_stages(*names: str) -> None:
    """Let these loggers' INFO lines through (which stage runs, a line an epoch where no
    progress bar shows): commands that run for minutes say so also in a pipe or CI log.
    Not on torchrun ranks other than 0, which show errors only."""
    if _other_rank():
        return
    for name in names:
        named = logging.getLogger(name)
        named.setLevel(min(named.getEffectiveLevel(), logging.INFO))


@contextlib.contextmanager
def stops_reported(said: Callable[[], str]) -> Iterator[None]:
    """Within the block, SIGTERM stops the work as Ctrl-C does (:func:`sigterm_as_interrupt`:
    an MLflow run ends KILLED, a store write under way is finished first); either one
    ends the command with ``said()`` on stderr (read after the stop, so it can say what is
    left) and status 130 or 143, as a shell reports the signal."""
    try:
        with sigterm_as_interrupt(hold_after_stop=True):
            yield
    except KeyboardInterrupt as stop:
        if not told_nearby():  # a stop reaches every process of a torchrun alike
            click.echo(said(), err=True)
        raise click.exceptions.Exit(interrupt_exit_code(stop)) from None


def user_errors(func: F) -> F:
    """Run a command so that errors a user can cause end it with a one-line message.

    Example:
        >>> @main.command()  # doctest: +SKIP
        ... @user_errors
        ... def score(...): ...
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with command_scope() as mark:
            try:
                return func(*args, **kwargs)
            except click.ClickException:
                raise
            except Exception as exc:
                if told_nearby(exc):  # under torchrun, local rank 0 says the same
                    raise click.exceptions.Exit(1) from None
                if isinstance(exc, user_error_types()):
                    raise click.ClickException(describe_failure(exc, mark)) from None
                if (lost := peer_lost(exc)) is not None:
                    raise click.ClickException(lost) from None
                raise

    return wrapper  # type: ignore[return-value]


class ModelURI(click.ParamType):
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (or ``/latest``),
    ``runs:/RUN_ID/PATH``, another MLflow model URI (``models:/m-...``), or a local model
    folder. Only the form is checked here; whether the model exists is found out when it
    is loaded.

    Args:
        folders: Whether the command takes a model folder at all; ``calibrate`` and
            ``promote`` work on a registered model, so their advice names none.
    """

    name = "model"
    _FORMS = re.compile(r"^(models:/[^/@\s]+(@[^/@\s]+|/\d+|/(?i:latest)|)/?"
                        r"|runs:/[0-9A-Za-z]+/\S+)$")

    def __init__(self, *, folders: bool = True) -> None:
        self.folders = folders
        self._forms = "models:/NAME@ALIAS, models:/NAME/VERSION" + (
            ", runs:/RUN_ID/model or a model folder" if folders else " or runs:/RUN_ID/model")

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value).strip()
        if text.startswith(("models:", "runs:")):
            if not self._FORMS.match(text):
                self.fail(f"{text!r} is not a model URI; use models:/NAME@ALIAS, "
                          "models:/NAME/VERSION or runs:/RUN_ID/model", param, ctx)
            return text
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) and not text.startswith("file://"):
            return text  # another store URI (mlflow-artifacts:, s3:, ...): let MLflow try it
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.exists():
            self.fail(f"{text!r} is neither a model URI nor an existing folder; use "
                      f"{self._forms}", param, ctx)
        if not path.is_dir():
            self.fail(f"{text!r} is a file, not a model folder; give the folder that holds "
                      "the model (its MLmodel file), or a models:/ or runs:/ URI"
                      if self.folders else f"{text!r} is a file, not a model; use "
                      f"{self._forms}", param, ctx)
        return text


MODEL_URI = ModelURI()
REGISTERED_MODEL_URI = ModelURI(folders=False)

model_option = click.option(
    "--model", "model", type=MODEL_URI, required=True, metavar="URI",
    help="The model: models:/NAME@ALIAS (e.g. @candidate, @champion), models:/NAME/VERSION, "
         "runs:/RUN_ID/model, or a local model folder.")

mlruns_option = click.option(
    "--mlruns", type=PathGiven(file_okay=False, path_type=Path), default=None,
    metavar="DIR",
    help="Folder of the local MLflow store (mlflow.db, artifacts/) and of training "
         "checkpoints [default: ./mlruns]. MLFLOW_TRACKING_URI, when set, replaces the store.")

class DeviceName(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (one GPU of several), as the pipelines and
    the library take them; anything else is an option error, not a traceback later."""

    name = "device"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[auto|cpu|cuda|cuda:N]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> str:
        text = str(value).strip().lower()
        if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
            return text
        self.fail(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N (N a GPU's "
                  "index, e.g. cuda:0)", param, ctx)


device_option = click.option(
    "--device", type=DeviceName(), default="auto", show_default=True,
    help="Where the model runs: auto (CUDA when available), cpu, cuda, or cuda:N for one GPU "
         "of several.")
