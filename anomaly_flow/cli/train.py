"""``anomaly-flow train``: a thin wrapper over :func:`anomaly_flow.tracking.train_and_register`."""

from __future__ import annotations

from pathlib import Path

import click

from anomaly_flow.cli import main
from anomaly_flow.cli.common import (
    ImageFolder,
    PathGiven,
    device_option,
    mlruns_option,
    show_stages,
    stops_reported,
    user_errors,
)
from anomaly_flow.config import MAX_BATCH, PRESETS, load_config, load_preset
from anomaly_flow.errors import describe, is_store_error

DEFAULT_PRESET = "small"


@main.command(short_help="Train a Glow on DATA and register it as NAME@candidate.",
              epilog="""\b
Examples:
  anomaly-flow train images/good --name bottle-caps --preset tiny --epochs 2
  anomaly-flow train images/good --name bottle-caps --config my-glow.toml --device cuda
  anomaly-flow train images/good --name bottle-caps --config my-glow.toml --resume

\b
Then: anomaly-flow calibrate --model models:/bottle-caps@candidate --normal held-out/ ...
""")
@click.argument("data", type=ImageFolder())
@click.option("--name", required=True,
              help="Registered model name; also the MLflow experiment's name.")
@click.option("--preset", type=click.Choice(PRESETS), default=None,
              help=f"A shipped configuration [default: {DEFAULT_PRESET}].")
@click.option("--config", "config_file", type=PathGiven(dir_okay=False, path_type=Path),
              default=None, help="A TOML or JSON configuration with [model] and [train] "
                                 "tables (see anomaly_flow/presets/*.toml); for colour, "
                                 "in_channels = 3; for non-square images, resize = 'crop' "
                                 "or 'pad' keeps their aspect ratio.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the configuration's epochs.")
@click.option("--batch-size", type=click.IntRange(1, MAX_BATCH), default=None,
              help="Override the configuration's batch size.")
@device_option
@click.option("--resume", is_flag=True,
              help="Continue the last training of --name from its latest checkpoint "
                   "(<mlruns>/checkpoints/NAME), in the same MLflow run.")
@click.option("--restart", is_flag=True,
              help="Start afresh even where the last training of --name stopped before "
                   "its end (its checkpoint is deleted); without it that is refused, so a "
                   "forgotten --resume loses no work.")
@mlruns_option
@user_errors
def train(data: Path, name: str, preset: str | None, config_file: Path | None,
          epochs: int | None, batch_size: int | None, device: str, resume: bool,
          restart: bool, mlruns: Path | None) -> None:
    """Train a Glow on the images under DATA and register it as NAME@candidate.

    DATA is a folder of images of normal data, searched recursively; a share of them
    (train.val_fraction) is held out for validation bits/dim and for the normal
    reference behind the typicality, knn, pixel_knn and ensemble scores. The run (params,
    metrics, sample grid, training curves) goes to MLflow; a model whose validation
    bits/dim is finite becomes a new version of NAME with alias 'candidate'. Prints the
    run id and the model URI on stdout.
    """
    if preset is not None and config_file is not None:
        raise click.UsageError("give --preset or --config, not both.")
    config = (load_config(config_file) if config_file is not None
              else load_preset(preset or DEFAULT_PRESET))
    config = config.replace(epochs=epochs, batch_size=batch_size)

    from anomaly_flow.tracking import interrupted_message, train_and_register

    show_stages("anomaly_flow.train")  # a line an epoch where no progress bar shows
    try:
        with stops_reported(lambda: interrupted_message(name, config, mlruns)):
            outcome = train_and_register(data, name, config, device=device, resume=resume,
                                         restart=restart, mlruns=mlruns)
    except Exception as error:
        if not is_store_error(error):
            raise
        # the store went away mid-training: "run the command again" must not mean without
        # --resume, which would delete the checkpoints
        raise click.ClickException(describe(error) + "\n" + interrupted_message(
            name, config, mlruns, what="training stopped")) from None
    if outcome is None:  # a process of rank above 0 under torchrun: rank 0 reports
        return
    click.echo(f"run_id: {outcome.run_id}")
    if outcome.version is None:  # no model_uri line: a script reading it gets none to use
        raise click.ClickException(f"{outcome.message}; the model is logged for inspection "
                                   f"as {outcome.model_uri}")
    click.echo(f"model_uri: {outcome.model_uri}")
    click.echo(f"candidate: models:/{name}@candidate")
    click.echo(f"val_bpd: {outcome.val_bpd:.6f}")
    click.echo(outcome.message, err=True)
