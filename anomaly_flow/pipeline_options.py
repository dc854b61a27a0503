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
from pathlib import Path

SCORE_HELP = ("bpd, complexity, coarse_complexity, typicality, knn, ensemble, level_1, ..., "
              "or auto (the highest AUROC on --anomalous); default: ensemble, or bpd for a "
              "model without a normal reference")


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


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser for a pipeline script: its docstring's first paragraph as the
    description, defaults shown in ``--help``."""
    return argparse.ArgumentParser(
        description=None if description is None else description.split("\n\n")[0],
        formatter_class=ShowDefaults)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model URI`` (required): the model to load."""
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/NAME@candidate")


def add_name_option(parser: argparse.ArgumentParser) -> None:
    """``--name NAME`` (required): the registered model (and experiment) to train."""
    parser.add_argument("--name", required=True, help="registered model name")


def add_epochs_option(parser: argparse.ArgumentParser) -> None:
    """``--epochs N``: replaces the configuration's number of epochs."""
    parser.add_argument("--epochs", type=int, default=None,
                        help="number of training epochs (default: the preset's)")


def add_score_option(parser: argparse.ArgumentParser, *,
                     help: str | None = SCORE_HELP) -> None:
    """``--score NAME``: the score the threshold applies to (default None: the model's
    :func:`~anomaly_flow.scoring.default_score`)."""
    parser.add_argument("--score", default=None, help=help)


def add_target_fpr_option(parser: argparse.ArgumentParser, *, default: float | None = None,
                          help: str | None = None) -> None:
    """``--target-fpr RATE``: the false-positive rate of the conformal threshold."""
    parser.add_argument("--target-fpr", type=float, default=default, help=help or (
        "target false-positive rate of the conformal threshold"))


def add_cost_options(parser: argparse.ArgumentParser) -> None:
    """``--cost-fp`` and ``--cost-fn`` (default 1 each): the costs the ``cost`` method
    weighs."""
    parser.add_argument("--cost-fp", type=float, default=1.0,
                        help="cost of a false alarm (method cost)")
    parser.add_argument("--cost-fn", type=float, default=1.0,
                        help="cost of a missed anomaly (method cost)")


def add_device_option(parser: argparse.ArgumentParser, *,
                      choices: tuple[str, ...] | None = None) -> None:
    """``--device`` (default ``auto``): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; the
    library rejects anything else with a message, or ``choices`` does it while parsing."""
    parser.add_argument("--device", choices=choices, default="auto",
                        help="auto (CUDA when available), cpu, cuda"
                             + ("" if choices else " or cuda:N"))


def add_loader_options(parser: argparse.ArgumentParser) -> None:
    """``--batch-size`` (default 256) and ``--workers`` (default 0) for scoring folders."""
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes decoding images")


def add_mlruns_option(parser: argparse.ArgumentParser, *,
                      help: str | None = None) -> None:
    """``--mlruns DIR``: the local MLflow store (None: ``./mlruns``, or
    ``MLFLOW_TRACKING_URI`` when set)."""
    parser.add_argument("--mlruns", type=Path, default=None, help=help or (
        "folder of the local MLflow store (default: ./mlruns); MLFLOW_TRACKING_URI, when "
        "set, replaces it"))
