"""``anomaly-flow calibrate`` and ``anomaly-flow evaluate``: thin wrappers over
:func:`anomaly_flow.evaluation.calibrate_model` and :func:`~anomaly_flow.evaluation.evaluate_model`.

The library is imported inside the commands, so ``anomaly-flow --help`` stays fast.
Files that could not be scored are reported by the library's log warnings (one per
folder, naming the first ten files, and where the full list was stored), which the
group's log handler writes to stderr; the commands do not repeat them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from anomaly_flow.cli import main
from anomaly_flow.cli.common import (
    REGISTERED_MODEL_URI,
    ImageFolder,
    device_option,
    finite,
    mlruns_option,
    model_option,
    stops_reported,
    user_errors,
)
from anomaly_flow.score_kinds import REFERENCE_SCORES, SCORE_CHOICES, is_score_name
from anomaly_flow.threshold_methods import METHODS

if TYPE_CHECKING:
    import pandas as pd

existing_dir = ImageFolder()


def _scoring_options(func):  # type: ignore[no-untyped-def]
    func = click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
                        help="DataLoader worker processes decoding images.")(func)
    func = click.option("--batch-size", type=click.IntRange(min=1), default=256,
                        show_default=True, help="Images per forward pass.")(func)
    return func


@main.command(short_help="Fit a threshold on held-out images as a new model version.")
@click.option("--model", "model", type=REGISTERED_MODEL_URI, required=True, metavar="URI",
              help="The registered model to calibrate: models:/NAME@ALIAS (e.g. @candidate), "
                   "models:/NAME/VERSION, or runs:/RUN_ID/model of a registered training "
                   "run; the calibration becomes a new version of NAME (so not a local "
                   "folder).")
@click.option("--normal", required=True, type=existing_dir,
              help="Folder of held-out normal images (never the training images).")
@click.option("--anomalous", type=existing_dir, default=None,
              help="Folder of labelled anomalies: adds precision/recall, ROC and PR curves, "
                   "and enables --method f1, youden and cost, and --score auto.")
@click.option("--score", default=None,
              help=f"Score the threshold applies to: {SCORE_CHOICES} "
                   f"({', '.join(REFERENCE_SCORES)}: models trained with a validation set) "
                   "[default: ensemble; typicality for a model whose normal reference "
                   "predates knn; bpd for a model without one]; or "
                   "auto (needs --anomalous): the one with the highest AUROC on the labelled "
                   "images, recorded in the calibration. That AUROC is measured on the same "
                   "images that chose it, so it is optimistic; a conformal threshold still "
                   "comes from the normal images alone.")
@click.option("--target-fpr", type=float, default=None,
              help="Target false-positive rate α for --method conformal, e.g. 0.01; needs "
                   "at least 1/α − 1 normal images.")
@click.option("--method", type=click.Choice(METHODS), default="conformal", show_default=True,
              help="conformal: threshold for --target-fpr from normal images alone; f1, "
                   "youden, cost: from labelled anomalies (--anomalous).")
@click.option("--cost-fp", type=click.FloatRange(min=0), default=None, callback=finite,
              help="Cost of one false alarm (--method cost) [default: 1].")
@click.option("--cost-fn", type=click.FloatRange(min=0), default=None, callback=finite,
              help="Cost of one missed anomaly (--method cost) [default: 1].")
@click.option("--promote", is_flag=True,
              help="Move alias 'champion' to the new version; refused (nothing registered) "
                   "when its threshold flags every normal image or none of the anomalous "
                   "ones.")
@device_option
@_scoring_options
@mlruns_option
@user_errors
def calibrate(model: str, normal: Path, anomalous: Path | None, score: str | None,
              target_fpr: float | None, method: str, cost_fp: float | None,
              cost_fn: float | None,
              promote: bool, device: str, batch_size: int, workers: int,
              mlruns: Path | None) -> None:
    """Fit a decision threshold on held-out images and register a calibrated version.

    Scores the folders, fits the threshold, logs a run (metrics, score histogram with
    the threshold, ROC/PR curves with --anomalous, calibration.json) and registers a
    new model version carrying the calibration. Prints the new model URI and the
    threshold. With --score auto, the score is chosen by AUROC on --anomalous and the
    AUROC of every candidate is printed and stored with the calibration.

    \b
    Example:
      anomaly-flow calibrate --model models:/parts@candidate \\
          --normal data/val/normal --target-fpr 0.01 --promote
    """
    if score is not None:  # first: a misspelt name is the likelier slip
        if score == "auto" and anomalous is None:
            raise click.UsageError("--score auto chooses the score with the highest AUROC on "
                                   "labelled anomalies: pass --anomalous DIR, or name a score "
                                   f"({SCORE_CHOICES}).")
        if score != "auto" and not is_score_name(score):  # this model's: known once loaded
            raise click.BadParameter(f"unknown score {score!r}; choose one of {SCORE_CHOICES}, "
                                     "or auto (with --anomalous).", param_hint="--score")
    if method != "conformal" and target_fpr is not None:
        raise click.UsageError(
            f"--target-fpr only applies to --method conformal, not {method}: {method} picks "
            "its threshold from the labelled anomalies, whatever false-positive rate that "
            "gives; drop --target-fpr, or drop --method for a conformal threshold at that "
            "rate (the repository's pipelines/select_threshold.py compares the two and "
            "registers either)")
    if method == "conformal" and target_fpr is None:
        raise click.UsageError("--method conformal needs --target-fpr, e.g. --target-fpr 0.01.")
    if method != "conformal" and anomalous is None:
        raise click.UsageError(f"--method {method} needs labelled anomalies: pass --anomalous DIR.")
    if method != "cost" and (cost_fp, cost_fn) != (None, None):
        raise click.UsageError("--cost-fp and --cost-fn only apply to --method cost.")
    if cost_fp == 0 and cost_fn == 0:
        raise click.UsageError("--cost-fp and --cost-fn are both 0, so every threshold costs "
                               "the same; give at least one of them a positive cost.")
    if target_fpr is not None and not 0 < target_fpr < 1:
        raise click.BadParameter(f"must be between 0 and 1, both excluded (e.g. 0.01), got "
                                 f"{target_fpr}.", param_hint="--target-fpr")

    from anomaly_flow.evaluation import calibrate_model, calibration_summary
    from anomaly_flow.tracking import stop_advice, stop_mark

    mark = stop_mark()
    with stops_reported(lambda: f"calibrate interrupted {stop_advice(mark)}"):
        outcome = calibrate_model(
            model, normal, anomalous, score=score, target_fpr=target_fpr, method=method,  # type: ignore[arg-type]
            cost_fp=1.0 if cost_fp is None else cost_fp,
            cost_fn=1.0 if cost_fn is None else cost_fn, promote=promote, device=device,
            batch_size=batch_size, workers=workers, mlruns=mlruns,
        )
    for line in calibration_summary(outcome):
        click.echo(line)
    click.echo(f"run: {outcome.run_id}" + (f"; {outcome.promotion}" if outcome.promoted else ""))


def format_table(table: pd.DataFrame) -> str:
    """Fixed-width text table of per-score detection metrics (AUROC etc.)."""
    width = max([12, *(len(str(name)) for name in table.index)])
    header = f"{'score':<{width}} {'AUROC':>7} {'AUPR':>7} {'FPR@95TPR':>10}"
    lines = [header, "-" * len(header)]
    for name, row in table.iterrows():
        lines.append(f"{name!s:<{width}} {row['auroc']:>7.4f} {row['aupr']:>7.4f} "
                     f"{row['fpr_at_95_tpr']:>10.4f}")
    return "\n".join(lines)


@main.command(short_help="AUROC, AUPR, FPR at 95% TPR of every score, logged.")
@model_option
@click.option("--normal", required=True, type=existing_dir, help="Folder of normal test images.")
@click.option("--anomalous", required=True, type=existing_dir,
              help="Folder of anomalous test images.")
@device_option
@_scoring_options
@mlruns_option
@user_errors
def evaluate(model: str, normal: Path, anomalous: Path, device: str, batch_size: int,
             workers: int, mlruns: Path | None) -> None:
    """AUROC, AUPR and FPR at 95% TPR of every score type on labelled folders.

    Prints a table (one row per score: bpd, complexity, coarse_complexity, typicality, knn,
    pixel_knn, ensemble, level_1 ... level_L) and logs it as a run with ROC and PR curves and score
    histograms.

    \b
    Example:
      anomaly-flow evaluate --model models:/parts@champion \\
          --normal data/test/normal --anomalous data/test/anomalous
    """
    from anomaly_flow.calibration import shown_precision
    from anomaly_flow.evaluation import evaluate_model
    from anomaly_flow.tracking import stop_advice, stop_mark

    mark = stop_mark()
    with stops_reported(lambda: f"evaluate interrupted {stop_advice(mark)}"):
        outcome = evaluate_model(model, normal, anomalous, device=device,
                                 batch_size=batch_size, workers=workers, mlruns=mlruns)
    click.echo(format_table(outcome.table))
    metrics = outcome.metrics
    if "calibrated_fpr" in metrics:
        click.echo(f"at the stored threshold {metrics['calibrated_threshold']!r} "
                   f"({outcome.stored_threshold}): "
                   f"FPR {metrics['calibrated_fpr']:.4g}, "
                   f"recall {metrics['calibrated_recall']:.4g}, "
                   "precision " + shown_precision(metrics["calibrated_precision"],
                                                  metrics["calibrated_recall"],
                                                  metrics["calibrated_fpr"]))
    click.echo(f"run: {outcome.run_id}")


@main.command(short_help="Point alias champion at a calibrated version (or back).")
@click.argument("model", type=REGISTERED_MODEL_URI, metavar="MODEL")
@mlruns_option
@user_errors
def promote(model: str, mlruns: Path | None) -> None:
    """Point alias champion at the calibrated version MODEL (models:/NAME/VERSION).

    To roll back (every promotion prints the command that undoes it), or to promote a
    version calibrated without --promote. The version must be calibrated, with a
    threshold that decides something on the images that set it, as calibrate --promote
    checks; it is tagged previous_champion with the version the alias leaves.

    \b
    Example:
      anomaly-flow promote models:/parts/4
    """
    from anomaly_flow.evaluation import promote_model

    with stops_reported(lambda: "promote interrupted; run the same command again"):
        outcome = promote_model(model, mlruns)
    click.echo(outcome.line)
