"""Train, calibrate and evaluate in one go: a parent MLflow run with three nested runs.

A thin script over the library: :func:`anomaly_flow.tracking.train_and_register`
(child run ``train-NAME``, registers ``NAME@candidate``), then
:func:`anomaly_flow.evaluation.calibrate_model` on held-out normal images (child run
``calibrate``, registers a calibrated version, moves ``champion`` unless
``--no-promote``), then :func:`anomaly_flow.evaluation.evaluate_model` of the calibrated
version on labelled test folders (child run ``evaluate``). The parent run
(``end-to-end``, in experiment NAME) records the options, the headline metrics and the
child run ids.

Data: either four folders (``--train``, ``--calibration``, ``--test-normal``,
``--test-anomalous``), or ``--sample DIR``, which writes the Fashion-MNIST sample shipped
with the package into ``DIR`` (``--limit`` caps each folder, for quick runs). ``DIR`` must
be new, empty, or a folder the sample was written to before, which is then replaced. A
calibration folder that shares images with the training folder is refused before
training when too few held-out images would be left.

Example:
    python pipelines/end_to_end.py --name sneakers --sample /tmp/sneakers --preset small \\
        --epochs 1 --target-fpr 0.01
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anomaly_flow.config import PRESETS, ConfigError, RunConfig, load_config, load_preset
from anomaly_flow.pipeline_options import (
    add_device_option,
    add_epochs_option,
    add_mlruns_option,
    add_name_option,
    add_score_option,
    add_target_fpr_option,
    at_least,
    given_path,
    image_folder,
    setup_logging,
    stoppable,
)
from anomaly_flow.pipeline_options import (
    parser as pipeline_parser,
)
from anomaly_flow.score_kinds import SCORE_CHOICES
from anomaly_flow.stopping import interrupt_exit_code, run_as_program, stop_reported

if TYPE_CHECKING:
    from anomaly_flow.evaluation import CalibrateOutcome, EvaluateOutcome
    from anomaly_flow.tracking import TrainOutcome

logger = logging.getLogger("pipelines.end_to_end")


@dataclass(frozen=True)
class PipelineResult:
    """The parent run and what each stage produced."""

    run_id: str
    train: TrainOutcome
    calibrate: CalibrateOutcome
    evaluate: EvaluateOutcome


def run_pipeline(name: str, folders: dict[str, Path], *, config_name: str = "tiny",
                 epochs: int | None = None, target_fpr: float = 0.01, score: str | None = None,
                 promote: bool = True, device: str = "auto", mlruns: Path | None = None,
                 progress: bool | None = None, resume: bool = False,
                 restart: bool = False) -> PipelineResult:
    """Train, calibrate and evaluate model ``name`` under one parent run.

    Args:
        name: Registered model name (and experiment).
        folders: ``train``, ``calibration``, ``test_normal``, ``test_anomalous`` folders.
        config_name: A preset name or a path to a TOML/JSON configuration.
        epochs: Override the configuration's epochs.
        target_fpr: Target false-positive rate of the conformal threshold.
        score: Score type the threshold applies to; None for the model's default
            (:func:`anomaly_flow.scoring.default_score`).
        promote: Move alias ``champion`` to the calibrated version.
        device: ``auto``, ``cpu`` or ``cuda``.
        mlruns: Root of the local MLflow store (default ``./mlruns``).
        progress: Progress bars on stderr; None: only on a terminal.
        resume: Continue the stopped training of ``name`` from its latest checkpoint;
            where it had finished (the pipeline stopped later), go on from its model.
        restart: Start afresh even over a stopped training of ``name`` that ``resume``
            could continue (refused without it).

    Returns:
        The parent run id and the three stages' outcomes.
    """
    # imported here: the script's --help and option errors answer without loading them
    from anomaly_flow import tracking
    from anomaly_flow.checkpoint import TrainingError
    from anomaly_flow.evaluation import calibrate_model, evaluate_model
    from anomaly_flow.folders import check_decodable
    from anomaly_flow.prechecks import (
        check_held_out_of_calibration,
        check_separate_folders,
        precheck_calibration,
        precheck_held_out,
        precheck_score_of_training,
    )
    from anomaly_flow.train import resolve_device

    config = named_config(config_name).replace(epochs=epochs)
    # what calibrating would refuse, refused before hours of training
    precheck_calibration(folders["calibration"], None, score=score, target_fpr=target_fpr)
    precheck_score_of_training(score, config)
    # shared files said as such, before precheck_held_out counts them as copies
    check_held_out_of_calibration(folders["calibration"], folders["test_normal"])
    precheck_held_out(folders["train"], folders["calibration"], target_fpr,
                      test_normal=folders["test_normal"],
                      test_anomalous=folders["test_anomalous"],
                      mode=config.model.mode, size=config.model.image_size)
    check_separate_folders(folders["test_normal"], folders["test_anomalous"])  # evaluate's
    # the test folders are new to the threshold: the calibration images are normal, and
    # measured on them the false-positive rate at the threshold is the one it was fitted to
    check_separate_folders(folders["calibration"], folders["test_anomalous"])
    for key in ("calibration", "test_normal", "test_anomalous"):  # not found after training
        check_decodable(folders[key], config.model.mode, config.model.image_size,
                        config.model.resize)
    tracking.precheck_training(name, config)  # before the parent run names an experiment
    tracking.precheck_checkpoints(name, config, mlruns, resume=resume, restart=restart)
    resolve_device(device)
    tracking.configure(mlruns)
    params = {"name": name, "config": config_name, "epochs": config.train.epochs,
              "target_fpr": target_fpr, "score": score or "default", "promote": promote,
              "device": device,
              **{f"folder.{key}": str(Path(path).resolve()) for key, path in folders.items()}}
    with tracking.start_run(name, "end-to-end", tags={"pipeline": "end_to_end"}) as parent:
        parent.log_params(params)
        # a run stopped past its training (in calibration, say) goes on from its model
        trained = tracking.finished_training(folders["train"], name, config, mlruns) \
            if resume else None
        if trained is not None:
            logger.info("the training of %r had finished (%s): resuming with its model",
                        name, trained.message)
            parent.set_tags({"train_resumed_finished": trained.model_uri})
        else:
            trained = tracking.train_and_register(
                folders["train"], name, config, device=device, mlruns=mlruns,
                progress=progress, nested=True, resume=resume, restart=restart)
        if trained is None:
            raise TrainingError("the end-to-end pipeline runs in one process; train on "
                                "several with torchrun ... -m anomaly_flow train")
        parent.set_tags({"train_run_id": trained.run_id})
        if trained.version is None:
            raise TrainingError(trained.message)
        calibrated = calibrate_model(
            trained.model_uri, folders["calibration"], score=score, target_fpr=target_fpr,
            promote=promote, device=device, mlruns=mlruns, nested=True, progress=progress)
        score = calibrated.calibration.score_name
        parent.set_tags({"calibrate_run_id": calibrated.run_id, "score_name": score,
                         "calibrated_model_uri": calibrated.model_uri})
        evaluated = evaluate_model(
            calibrated.model_uri, folders["test_normal"], folders["test_anomalous"],
            device=device, mlruns=mlruns, nested=True, progress=progress)
        parent.set_tags({"evaluate_run_id": evaluated.run_id})
        headline = {"val_bpd": trained.val_bpd, "threshold": calibrated.threshold,
                    **{key: value for key, value in evaluated.metrics.items()
                       if key.startswith((f"{score}_", "calibrated_"))}}
        parent.log_metrics(headline)
        run_id = parent.run_id
    return PipelineResult(run_id, trained, calibrated, evaluated)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = pipeline_parser(__doc__)
    add_name_option(parser)
    parser.add_argument("--sample", type=given_path, default=None,
                        help="write the shipped sample here (a new or empty folder, or an "
                             "earlier sample's, which is replaced) and use it as the data")
    parser.add_argument("--limit", type=at_least(1), default=None,
                        help="with --sample: at most this many images per folder")
    parser.add_argument("--train", type=image_folder, help="folder of normal training images")
    parser.add_argument("--calibration", type=image_folder, help="folder of held-out normal images")
    parser.add_argument("--test-normal", type=image_folder, help="folder of normal test images")
    parser.add_argument("--test-anomalous", type=image_folder,
                        help="folder of anomalous test images")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None,
                        help=f"shipped configuration: {', '.join(PRESETS)} (default: tiny)")
    source.add_argument("--config", type=given_path, default=None,
                        help="TOML or JSON configuration, as train's --config")
    add_epochs_option(parser)
    add_target_fpr_option(parser, default=0.01)
    add_score_option(parser, help=f"the score the threshold applies to: {SCORE_CHOICES}; "
                                  "default: ensemble, or bpd for a model without a normal "
                                  "reference")
    parser.add_argument("--resume", action="store_true",
                        help="continue the training of --name that a stop interrupted from "
                             "its latest checkpoint (or, where it had finished, its model), "
                             "then calibrate and evaluate")
    parser.add_argument("--restart", action="store_true",
                        help="start afresh even where the training of --name stopped before "
                             "its end (its checkpoint is deleted; refused without it)")
    parser.add_argument("--no-promote", action="store_true",
                        help="do not move alias 'champion' to the calibrated version")
    add_device_option(parser)
    add_mlruns_option(parser)
    args = parser.parse_args(argv)
    if args.config is not None and not args.config.is_file():
        parser.error(f"--config {args.config} is not a file; give a TOML or JSON "
                     "configuration (see pipelines/configs/)")
    # what run_pipeline takes: a preset's name or a config file's path
    args.preset = str(args.config) if args.config is not None else args.preset or "tiny"
    given = [args.train, args.calibration, args.test_normal, args.test_anomalous]
    if args.sample is None and None in given:
        parser.error("give --sample DIR, or all of --train, --calibration, --test-normal "
                     "and --test-anomalous")
    if args.sample is not None and any(g is not None for g in given):
        parser.error("give --sample DIR or the four folders, not both")
    if args.limit is not None and args.sample is None:
        parser.error("--limit caps the folders --sample writes; with your own folders, "
                     "drop it (or give fewer images)")
    if args.limit is not None:  # the calibration folder --sample writes holds --limit images
        from anomaly_flow.calibration import min_calibration_size, rounded_up

        needed = min_calibration_size(args.target_fpr)
        if args.limit < needed:
            from anomaly_flow.fashion_mnist import load_sample

            shipped = len(load_sample().calibration)  # only now: it takes a second
            fpr = f"a --target-fpr of at least {rounded_up(1 / (min(args.limit, shipped) + 1)):g}"
            parser.error(f"--limit {args.limit} leaves at most {args.limit} calibration "
                         f"images, and --target-fpr {args.target_fpr:g} needs at least "
                         f"{needed}; " + (f"give --limit {needed} or more, or {fpr}"
                                          if needed <= shipped else
                                          f"the sample holds {shipped}, so give {fpr}"))
    if args.score == "auto":  # checked before training, not after
        parser.error("--score auto needs labelled anomalies, and this pipeline calibrates "
                     f"on normal images only: name a score ({SCORE_CHOICES}), or run "
                     "pipelines/select_threshold.py --score auto on the trained model")
    return args


def named_config(name: str) -> RunConfig:
    """A shipped preset by name, else the TOML or JSON configuration file at ``name``."""
    if name in PRESETS:
        return load_preset(name)
    if not name or not Path(name).is_file():
        raise ConfigError(f"--preset {name!r} is neither a preset ({', '.join(PRESETS)}) nor "
                          "an existing TOML/JSON config file")
    return load_config(Path(name))


@stoppable
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from anomaly_flow.fashion_mnist import write_sample_folders
    from anomaly_flow.tracking import (
        ensure_configured,
        interrupted_message,
        training_concluded,
        ui_command,
    )

    setup_logging()
    try:
        named_config(args.preset)  # a wrong --preset is refused before the sample is written
        if args.sample is not None:
            folders = write_sample_folders(args.sample, args.limit)
        else:
            folders = {"train": args.train, "calibration": args.calibration,
                       "test_normal": args.test_normal, "test_anomalous": args.test_anomalous}
        result = run_pipeline(
            args.name, folders, config_name=args.preset, epochs=args.epochs,
            target_fpr=args.target_fpr, score=args.score, promote=not args.no_promote,
            device=args.device, mlruns=args.mlruns, resume=args.resume,
            restart=args.restart)
    except KeyboardInterrupt as stop:
        if (outcome := training_concluded(args.name, args.mlruns)) is not None:
            # after the training: its model is registered (or why not), the usual line
            # says so
            if outcome.version is not None:
                print("the training had finished: the same command with --resume "
                      "calibrates and evaluates its model without training again",
                      file=sys.stderr)
            raise
        # during the training (or before it): where --resume goes on from, not "run the
        # same command again", which would delete its checkpoint
        config = named_config(args.preset).replace(epochs=args.epochs)
        print(interrupted_message(args.name, config, args.mlruns), file=sys.stderr)
        stop_reported()  # else stoppable raises it again and adds "run the same command again"
        return interrupt_exit_code(stop)
    print(f"parent run: {result.run_id}")
    print(f"trained: {result.train.model_uri} (val bpd {result.train.val_bpd:.4f})")
    print(f"calibrated: {result.calibrate.model_uri} (threshold {result.calibrate.threshold!r})")
    print(result.evaluate.table.to_string(float_format=lambda v: f"{v:.4f}"))
    point = result.evaluate.metrics
    if "calibrated_fpr" in point:
        print(f"at the threshold, on the test folders: false-positive rate "
              f"{point['calibrated_fpr']:.2%}, anomalies flagged {point['calibrated_tpr']:.2%}")
    print(f"MLflow: {ui_command(ensure_configured())}")
    return 0


if __name__ == "__main__":
    run_as_program(main)
