"""Command-line options the pipeline scripts (``pipelines/*.py``) share, each spelled once.

Every function adds one option, or one group that always travels together, to an
``argparse`` parser: its flag, type, default and help. A script that words an option's
help for its own context passes ``help=``. The ``anomaly-flow`` CLI has its click
counterparts in :mod:`anomaly_flow.cli.common`.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_model_option(parser)
    >>> add_device_option(parser)
    >>> parser.parse_args(["--model", "models:/parts@candidate"]).device
    'auto'
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from anomaly_flow.errors import command_scope, describe_failure, stop_advice, user_error_types
from anomaly_flow.score_kinds import SCORE_CHOICES
from anomaly_flow.stopping import interrupt_exit_code, sigterm_as_interrupt

SCORE_HELP = (f"{SCORE_CHOICES}, "
              "or auto (the highest AUROC on --anomalous); default: ensemble (typicality "
              "for a model whose normal reference predates knn, bpd for a model without "
              "one)")


def given_path(text: str) -> Path:
    """An argparse ``type`` for paths that refuses an empty value (``Path("")`` is the
    current folder: an unset shell variable must not mean "here")."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty; give a file or folder ('.' for "
                                         "the current folder)")
    return Path(text)


def image_folder(text: str) -> Path:
    """An argparse ``type`` for a folder of images to read: :func:`given_path`, refused
    at once when missing or not a folder, so the error names the option that gave it."""
    from anomaly_flow.data import DataError
    from anomaly_flow.folders import check_image_folder

    path = given_path(text)
    try:
        check_image_folder(path)
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return path


class ShowDefaults(argparse.HelpFormatter):
    """``--help`` with each option's default, where it has one (not None or a flag's
    False), as the ``anomaly-flow`` commands show theirs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = not any(action.default is hidden  # `is`: 0 == False, and 0 is shown
                        for hidden in (None, False, argparse.SUPPRESS))
        if shown and action.option_strings and "%(default)" not in text \
                and "default:" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Says a usage error in one line, ``error: ... (see 'calibrate.py --help')``, where
    argparse would first print the whole usage synopsis; exit code 2 as argparse's. Ends
    ``--help`` with ``example``, as written: argparse would refill an epilog's lines, and
    a command spread over lines ending in ``\\`` would no longer run when pasted."""

    def __init__(self, *args: Any, example: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.example = example

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")

    def format_help(self) -> str:
        text = super().format_help()
        return text if self.example is None else f"{text}\n{self.example}\n"


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser for a pipeline script, from its docstring: the first paragraph
    as the description, and the example section (the docstring's last) closing
    ``--help``; defaults shown in ``--help``, usage errors in one line."""
    paragraphs = [] if description is None else description.strip().split("\n\n")
    example = next((i for i, text in enumerate(paragraphs)
                    if text.startswith("Example")), None)
    return _Parser(
        description=paragraphs[0] if paragraphs else None,
        example=None if example is None else "\n\n".join(paragraphs[example:]),
        formatter_class=ShowDefaults)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model URI`` (required): the model to load."""
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@candidate")


def add_name_option(parser: argparse.ArgumentParser) -> None:
    """``--name NAME`` (required): the registered model (and experiment) to train."""
    parser.add_argument("--name", required=True, help="registered model name")


def add_epochs_option(parser: argparse.ArgumentParser) -> None:
    """``--epochs N``: replaces the configuration's number of epochs."""
    parser.add_argument("--epochs", type=at_least(1), default=None,
                        help="number of training epochs (default: the preset's)")


def add_score_option(parser: argparse.ArgumentParser, *,
                     help: str | None = SCORE_HELP) -> None:
    """``--score NAME``: the score the threshold applies to (default None: the model's
    :func:`~anomaly_flow.scoring.default_score`)."""
    parser.add_argument("--score", default=None, help=help)


def add_target_fpr_option(parser: argparse.ArgumentParser, *, default: float | None = None,
                          help: str | None = None) -> None:
    """``--target-fpr RATE``: the false-positive rate of the conformal threshold."""
    parser.add_argument("--target-fpr", type=_rate, default=default, help=help or (
        "target false-positive rate of the conformal threshold"))


def _rate(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} is not a rate strictly between 0 and 1 "
                                         "(e.g. 0.01 for 1 false alarm in 100)")
    return value


def add_cost_options(parser: argparse.ArgumentParser) -> None:
    """``--cost-fp`` and ``--cost-fn`` (None when not given, which the ``cost`` method
    reads as 1): the costs it weighs. :func:`check_cost_options` refuses them with
    another method."""
    parser.add_argument("--cost-fp", type=_cost, default=None,
                        help="cost of a false alarm (method cost; default 1)")
    parser.add_argument("--cost-fn", type=_cost, default=None,
                        help="cost of a missed anomaly (method cost; default 1)")


def _cost(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def check_cost_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       method: str | None) -> None:
    """Refuse ``--cost-fp``/``--cost-fn`` unless ``method`` is ``cost`` (they would be
    ignored); then fill in the default cost of 1."""
    if method != "cost" and (args.cost_fp is not None or args.cost_fn is not None):
        parser.error("--cost-fp and --cost-fn only apply to the cost method; drop them, or "
                     "use the cost method")
    if args.cost_fp == 0 and args.cost_fn == 0:
        parser.error("--cost-fp and --cost-fn are both 0, so every threshold costs the same; "
                     "give at least one of them a positive cost")
    args.cost_fp = 1.0 if args.cost_fp is None else args.cost_fp
    args.cost_fn = 1.0 if args.cost_fn is None else args.cost_fn


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default ``auto``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, as the
    command line takes it; the library rejects anything else with a message."""
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_loader_options(parser: argparse.ArgumentParser) -> None:
    """``--batch-size`` (default 256) and ``--workers`` (default 0) for scoring folders."""
    parser.add_argument("--batch-size", type=at_least(1), default=256,
                        help="images per forward pass")
    parser.add_argument("--workers", type=at_least(0), default=0,
                        help="DataLoader worker processes decoding images")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def add_mlruns_option(parser: argparse.ArgumentParser, *,
                      help: str | None = None) -> None:
    """``--mlruns DIR``: the local MLflow store (None: ``./mlruns``, or
    ``MLFLOW_TRACKING_URI`` when set)."""
    parser.add_argument("--mlruns", type=given_path, default=None, help=help or (
        "folder of the local MLflow store (default: ./mlruns); MLFLOW_TRACKING_URI, when "
        "set, replaces it"))


def setup_logging() -> None:
    """INFO lines from anomaly-flow and the script on stderr; MLflow's own only from
    WARNING up (its INFO lines: the database set-up, "Successfully registered model"),
    unless ``MLFLOW_LOGGING_LEVEL`` asks for them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def stoppable(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A pipeline's ``main``, with SIGTERM (a scheduler's stop) a stop as Ctrl-C is: any
    MLflow run started ends KILLED, a store write under way is finished first, and the
    script says so and returns 130 or 143, as a shell reports the signal. An error a user
    can cause is one line, ``error: ...`` (with what the run registered before it,
    :func:`~anomaly_flow.errors.describe_failure`), and status 1."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        with command_scope() as mark:
            try:
                with sigterm_as_interrupt(hold_after_stop=True):
                    return main(argv)
            except Exception as error:
                if not isinstance(error, user_error_types()):
                    raise
                print(f"error: {describe_failure(error, mark)}", file=sys.stderr)
                return 1
            except KeyboardInterrupt as stop:
                print(f"interrupted {stop_advice(mark)}", file=sys.stderr)
                return interrupt_exit_code(stop)

    return run
