"""``anomaly-flow score``: a thin wrapper over :func:`anomaly_flow.folder_scoring.score_folder`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from anomaly_flow.cli import main
from anomaly_flow.cli.common import (
    ImageFolder,
    PathGiven,
    device_option,
    finite,
    mlruns_option,
    model_option,
    stops_reported,
    user_errors,
)
from anomaly_flow.errors import one_line
from anomaly_flow.score_kinds import REFERENCE_SCORES
from anomaly_flow.stopping import usable_cores

if TYPE_CHECKING:  # the tracking package imports mlflow: not for --help
    from anomaly_flow.tracking import LoadedModel

_FAILURES_SHOWN = 5


def _which_model(loaded: LoadedModel, given: str, fdr: float | None = None) -> str:
    """The version scoring uses, as a line to keep with the table: an alias is read once,
    so the version it named then, and what decides (the calibrated threshold, or
    Benjamini-Hochberg over the p-values with ``fdr``)."""
    which = (f"models:/{loaded.name}/{loaded.version}" if loaded.version is not None
             else one_line(str(loaded.uri)))
    if which != given:
        which += f" ({one_line(given)})"
    calibration = loaded.calibration
    if calibration is None:
        return f"{which}, uncalibrated (no verdicts)"
    if fdr is not None:
        return (f"{which}, Benjamini-Hochberg over the {calibration.score_name} p-values at "
                f"false discovery rate {fdr:g} decides (not the calibrated threshold)")
    threshold = calibration.threshold
    return (f"{which}, {calibration.score_name} > {threshold.value:.6g} is anomalous "
            f"({threshold.method} threshold)")


def _default_workers() -> int:
    """Up to 8, and no more than the cores this process may use (``taskset``, a
    container's CPU set)."""
    return min(8, usable_cores())


@main.command(short_help="Score every image under DIR into a CSV or Parquet table.",
              epilog="""\b
Examples:
  anomaly-flow score incoming/ --model models:/bottle-caps@champion --out scores.csv
  anomaly-flow score incoming/ --model models:/bottle-caps@champion --out scores.parquet \\
      --heatmaps heatmaps/ --workers 8 --device cuda
  anomaly-flow score incoming/ --model models:/bottle-caps@champion --out scores.csv --resume
""")
@click.argument("folder", metavar="DIR", type=ImageFolder())
@model_option
@click.option("--out", required=True, type=PathGiven(dir_okay=False, path_type=Path),
              metavar="FILE", help="The table to write: FILE.csv or FILE.parquet (or .pq).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader worker processes decoding images [default: CPU cores, at "
                   "most 8]; 0 decodes in the main process.")
@device_option
@click.option("--heatmaps", type=PathGiven(file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Also write, for each scored image, a PNG heatmap of where "
                                  "it is unlikely (same relative path under DIR, suffix .png; "
                                  "files that differ only in their suffix keep it: x.jpg.png, "
                                  "x.bmp.png), in inferno colours on a fixed scale; see "
                                  "--heatmap-kind.")
@click.option("--heatmap-kind", type=click.Choice(["auto", "bpd", "typicality"]),
              default=None,
              help="bpd: per-pixel bits/dim, 0 (black) to the model's n_bits, e.g. 8 "
                   "(yellow). typicality: how far each pixel's bits/dim is from the normal "
                   "images', 0 to 5 of their standard deviations (models trained with a "
                   "validation set). auto (default): typicality for a model calibrated on "
                   f"{', '.join(REFERENCE_SCORES)}, else bpd.")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in --out and score only the files missing from "
                   "it or changed since it was written. Rows that failed stay as they were "
                   "(run without --resume to retry them); a few kept files are scored "
                   "again first, and a table another model or --precision scored is "
                   "refused.")
@click.option("--strict", is_flag=True,
              help="Exit with an error when any file could not be scored (the table is "
                   "still written).")
@click.option("--precision", type=click.Choice(["float32", "tf32", "bf16"]),
              default="float32", show_default=True,
              help="float32: exact and deterministic. tf32 (CUDA) and bf16 (the coupling "
                   "networks only) are faster on a GPU but approximate (bf16 moves bits/dim "
                   "by about 1e-4 to 1e-3). Resume with the precision the table was started "
                   "with.")
@click.option("--compile", "compile_model", is_flag=True,
              help="Compile the model (torch.compile) first: about twice the images/s on "
                   "a CPU for big folders, after tens of seconds of compiling. The same "
                   "float32 sums in another order: bpd moves by a few millionths of its "
                   "size, complexity and coarse_complexity by up to a few 1e-5, typicality, "
                   "knn and ensemble (distances in units of the normal images' spread) by "
                   "up to about 1e-3 (a table started without it can be resumed with it, "
                   "and the reverse). Scores without it, with a warning, where compiling "
                   "fails.")
@click.option("--fdr", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, metavar="Q",
              help="Flag anomalies by Benjamini-Hochberg at false discovery rate Q over "
                   "all files, instead of the calibrated threshold.", callback=finite)
@mlruns_option
@user_errors
def score(folder: Path, model: str, out: Path, batch_size: int, workers: int | None,
          device: str, heatmaps: Path | None, heatmap_kind: str | None, resume: bool,
          strict: bool, precision: str, compile_model: bool, fdr: float | None,
          mlruns: Path | None) -> None:
    """Score every image file under DIR into one table, one row per file.

    Columns: path, bpd, complexity, coarse_complexity, typicality, knn, pixel_knn and
    ensemble (models trained with a validation set), level_1..level_L (bits/dim), score (the
    calibration's score; bpd when uncalibrated), p_value and is_anomaly (filled when the
    model is calibrated), error (why a file could not be
    scored; empty otherwise). Files that cannot be read (not images, truncated, empty,
    too large, unreadable) get a row with the reason and do not stop the run. The table
    is written atomically and rewritten now and then during long runs; after an
    interruption, --resume scores only the files still missing (and rescores the files
    of a table written before coarse_complexity, typicality, knn, pixel_knn or ensemble
    existed, to fill the column). A summary goes to stderr: N scored, M failed, K
    anomalous.
    """
    from anomaly_flow.data import display_path
    from anomaly_flow.evaluation import open_model
    from anomaly_flow.folder_scoring import score_folder
    from anomaly_flow.folders import unlisted_advice
    from anomaly_flow.score_table import ScoringError, check_writable, output_format

    if heatmap_kind is not None and heatmaps is None:
        raise click.UsageError("--heatmap-kind says which heatmaps to write; add --heatmaps "
                               "DIR, or drop --heatmap-kind")
    try:
        output_format(out)
    except ScoringError as exc:  # a file name the option cannot take
        raise click.BadParameter(str(exc), param_hint="--out") from None
    # before loading a model or scoring anything
    check_writable(out, resume=resume)
    loaded = open_model(model, device, mlruns, logs=False, reads_runs=False)
    click.echo(f"model: {_which_model(loaded, model, fdr)}", err=True)
    shown = one_line(display_path(out))

    def interrupted() -> str:  # the rows scored so far are kept
        return ("interrupted; run the same command with --resume to score the files not "
                f"yet in {shown}" if out.exists() else "interrupted before any row was "
                f"written to {shown}; run the same command again")

    with stops_reported(interrupted):
        summary = score_folder(
            loaded.model, loaded.calibration, folder, out, batch_size=batch_size,
            num_workers=_default_workers() if workers is None else workers,
            heatmaps=heatmaps, resume=resume, fdr=fdr, precision=precision,  # type: ignore[arg-type]
            compile=compile_model, heatmap_kind=heatmap_kind or "auto",  # type: ignore[arg-type]
        )

    if summary.n_failed:
        click.echo(f"{summary.n_failed} file(s) could not be scored:", err=True)
        for path, reason in summary.failures[:_FAILURES_SHOWN]:
            click.echo(f"  {one_line(path)}: {reason}", err=True)
        if summary.n_failed > _FAILURES_SHOWN:
            click.echo(f"  ... and {summary.n_failed - _FAILURES_SHOWN} more (see the error "
                       "column)", err=True)
    how = f" (Benjamini-Hochberg at FDR {fdr:g})" if fdr is not None else ""
    decided = (f"{summary.n_anomalous} anomalous{how}" if summary.n_anomalous is not None
               else "anomalies not decided (uncalibrated model; see anomaly-flow calibrate)")
    # with --resume the counts are the whole table's, and the next words say so
    read_now = summary.n_files - summary.n_resumed
    kept = _count(summary.n_resumed, "row")
    resumed = ("" if not resume
               else f" in the whole table ({'the' if summary.n_resumed == 1 else 'all'} "
                    f"{kept} kept from before; no file was new)"
               if read_now == 0 and summary.n_resumed
               else f" in the whole table ({kept} kept from before, "
                    f"{_count(read_now, 'file')} read now)")
    click.echo(f"{summary.n_scored} scored, {summary.n_failed} failed, {decided}{resumed}",
               err=True)
    if summary.unlisted:
        unlisted, reason = summary.unlisted[0]
        click.echo(f"{len(summary.unlisted)} folder(s) could not be listed, so the images "
                   f"inside have no row (the first, {one_line(unlisted)}: {reason}); "
                   f"{unlisted_advice(reason)} and run again with --resume to score them",
                   err=True)
    click.echo(f"wrote {_count(summary.n_files, 'row')} to {shown}", err=True)
    unwritten, first = summary.heatmap_failures
    if summary.heatmaps is not None:
        lost = (f"; {unwritten} could not be written (the first, {first}); make room or fix "
                "the folder, then run the same command with --resume to draw them"
                if unwritten else "")
        where = one_line(display_path(summary.heatmaps))
        click.echo(f"wrote {_count(summary.n_heatmaps, 'heatmap')} under {where}{lost}",
                   err=True)
    if strict and summary.n_failed:
        raise click.ClickException(
            f"{summary.n_failed} file(s) could not be scored (--strict); the error column of "
            f"{shown} says why for each")
    if strict and summary.unlisted:
        raise click.ClickException(
            f"{len(summary.unlisted)} folder(s) under {one_line(display_path(folder))} could "
            "not be listed (--strict); their images were not scored")
    if strict and unwritten:
        raise click.ClickException(f"{_count(unwritten, 'heatmap')} could not be written "
                                   "(--strict)")


def _count(n: int, noun: str) -> str:
    """``"1 row"``, ``"2 rows"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
