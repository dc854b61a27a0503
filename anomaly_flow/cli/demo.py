"""``anomaly-flow demo``: the whole product on the shipped sample, offline."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from anomaly_flow.cli import main
from anomaly_flow.cli.common import (
    PathGiven,
    device_option,
    show_stages,
    stops_reported,
    user_errors,
)
from anomaly_flow.config import PRESETS


@main.command(short_help="Run the whole product on the shipped Fashion-MNIST sample.",
              epilog="""\b
Example:
  anomaly-flow demo --out ./anomaly-flow-demo
  mlflow ui --backend-store-uri sqlite:///$PWD/anomaly-flow-demo/mlruns/mlflow.db
""")
@click.option("--out", type=PathGiven(file_okay=False, path_type=Path),
              default=Path("anomaly-flow-demo"), show_default=True,
              help="Folder for the images, the MLflow store, scores and the report.")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help="Model preset [default: small on a CPU, fashion-mnist with CUDA].")
@device_option
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the preset's epochs (1 gives a quick smoke run).")
@user_errors
def demo(out: Path, preset: str | None, device: str, epochs: int | None) -> None:
    """Train, calibrate, promote and score on the Fashion-MNIST sample the package ships.

    Sneakers are the normal class; the nine other classes are anomalies. Writes
    scores.csv, heatmaps/ and a self-contained report.html under OUT, and an MLflow
    store under OUT/mlruns (with MLFLOW_TRACKING_URI set, the runs and the model
    fashion-sneaker go to that store instead; the demo refuses to touch a model of that
    name it did not make there).
    """
    from anomaly_flow.demo import run_demo

    show_stages("anomaly_flow.demo", "anomaly_flow.train")
    with stops_reported(lambda: f"demo interrupted; run it again to start over (it "
                                f"rewrites {out})"):
        result = run_demo(out, preset=preset, device=device, epochs=epochs)
    db = result.tracking_uri
    click.echo(f"model:    {result.model_uri}  (threshold {result.threshold:.4f})")
    click.echo(f"AUROC {result.auroc:.4f} ({result.score_name} score); on the test set "
               "the threshold flags "
               f"{result.test_tpr:.1%} of anomalies at {result.test_fpr:.1%} false positives")
    click.echo(f"scores:   {result.scores_csv}")
    click.echo(f"heatmaps: {result.heatmaps}")
    click.echo(f"report:   {result.report_html}")
    from anomaly_flow.tracking import ui_command

    click.echo(f"MLflow:   {ui_command(db)}")
    # where the variable named the store, it is already set (and may hold a password)
    store = ("" if os.environ.get("MLFLOW_TRACKING_URI")
             else f"MLFLOW_TRACKING_URI={shlex.quote(db)} ")
    click.echo(f"serve:    {store}mlflow models serve -m "
               f"{result.model_uri} --env-manager local -p 5001")
    # the commands read ./mlruns unless told: the demo's store is under OUT
    mlruns = ("" if os.environ.get("MLFLOW_TRACKING_URI")
              else f" --mlruns {shlex.quote(str(out / 'mlruns'))}")
    click.echo(f"score:    anomaly-flow score DIR --model {result.model_uri}{mlruns} "
               "--out more-scores.csv")
