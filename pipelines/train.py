"""Train a Glow on a folder of images, log the run to MLflow and register the model.

A thin script over :func:`anomaly_flow.tracking.train_and_register`, the same call as
``anomaly-flow train``: params, per-step and per-epoch metrics, sample grid and training
curves go to MLflow; a model with a finite validation bits/dim becomes a new version of
NAME with alias ``candidate``. Checkpoints go to ``<mlruns>/checkpoints/NAME``.

Examples (the second trains the first's model for two more epochs, in the same run):
    python pipelines/train.py data/good --name parts --preset tiny --epochs 2
    python pipelines/train.py data/good --name parts --preset tiny --epochs 4 --resume
    python pipelines/train.py data/good --name parts-small --config pipelines/configs/small.toml
"""

from __future__ import annotations

import argparse
import sys

from anomaly_flow.config import PRESETS, load_config, load_preset
from anomaly_flow.errors import (
    describe_failure,
    is_store_error,
    store_mark,
    user_error_types,
)
from anomaly_flow.pipeline_options import (
    add_device_option,
    add_epochs_option,
    add_mlruns_option,
    add_name_option,
    at_least,
    given_path,
    image_folder,
    setup_logging,
    stoppable,
)
from anomaly_flow.pipeline_options import (
    parser as pipeline_parser,
)
from anomaly_flow.stopping import interrupt_exit_code, run_as_program, sigterm_as_interrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = pipeline_parser(__doc__)
    parser.add_argument("data", type=image_folder, help="folder of images of normal data")
    add_name_option(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=PRESETS, default=None,
                        help="shipped configuration (default: small)")
    source.add_argument("--config", type=given_path, default=None,
                        help="TOML or JSON configuration")
    add_epochs_option(parser)
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="images per step (default: the preset's)")
    add_device_option(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint of --name")
    parser.add_argument("--restart", action="store_true",
                        help="start afresh even where the training of --name stopped before "
                             "its end (its checkpoint is deleted; refused without it)")
    add_mlruns_option(parser)
    return parser.parse_args(argv)


@stoppable  # a stop before training starts (imports, the config) is a line too
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mark = store_mark()  # what training registers is said if the store then fails
    # imported after parsing: --help and a mistyped option answer at once, not after
    # the seconds torch and mlflow take to load
    from anomaly_flow.tracking import interrupted_message, train_and_register

    setup_logging()
    config = load_config(args.config) if args.config else load_preset(args.preset or "small")
    config = config.replace(epochs=args.epochs, batch_size=args.batch_size)
    # the configuration is read before the stop handling below, which names it in the
    # resume hint
    try:
        with sigterm_as_interrupt(hold_after_stop=True):  # SIGTERM as Ctrl-C
            outcome = train_and_register(args.data, args.name, config, device=args.device,
                                         resume=args.resume, restart=args.restart,
                                         mlruns=args.mlruns)
    except user_error_types() as error:
        print(f"error: {describe_failure(error, mark)}", file=sys.stderr)
        if is_store_error(error):  # mid-training: where to go on, not to start again
            print(interrupted_message(args.name, config, args.mlruns,
                                      what="training stopped"), file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print(interrupted_message(args.name, config, args.mlruns), file=sys.stderr)
        return interrupt_exit_code(stop)
    if outcome is None:  # a process of rank above 0 under torchrun: rank 0 reports
        return 0
    print(f"run_id: {outcome.run_id}")
    if outcome.version is None:  # no model_uri line: a script reading it gets none to use
        print(f"error: {outcome.message}; the model is logged for inspection as "
              f"{outcome.model_uri}", file=sys.stderr)
        return 1
    print(f"model_uri: {outcome.model_uri}")
    print(outcome.message, file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_as_program(main)
