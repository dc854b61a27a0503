"""Calibrate a registered model on held-out images: a thin script over the library.

Same as ``anomaly-flow calibrate``: scores the folders, fits the threshold
(split-conformal at a target false-positive rate, or F1 / Youden / cost with labelled
anomalies), logs a run and registers a new model version carrying the calibration.

Example:
    python pipelines/calibrate.py --model models:/parts@candidate \\
        --normal data/val/normal --target-fpr 0.01 --promote
"""

from __future__ import annotations

import argparse

from anomaly_flow.calibration import METHODS
from anomaly_flow.pipeline_options import (
    add_cost_options,
    add_device_option,
    add_loader_options,
    add_mlruns_option,
    add_model_option,
    add_score_option,
    add_target_fpr_option,
    check_cost_options,
    image_folder,
    setup_logging,
    stoppable,
)
from anomaly_flow.pipeline_options import (
    parser as pipeline_parser,
)
from anomaly_flow.stopping import run_as_program


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = pipeline_parser(__doc__)
    add_model_option(parser)
    parser.add_argument("--normal", required=True, type=image_folder,
                        help="folder of held-out normal images (never training images)")
    parser.add_argument("--anomalous", type=image_folder, default=None,
                        help="folder of labelled anomalies (optional)")
    add_score_option(parser)
    add_target_fpr_option(parser, help="target false-positive rate for the conformal method")
    parser.add_argument("--method", choices=METHODS, default="conformal",
                        help="conformal (normal images only, needs --target-fpr), or with "
                             "--anomalous: f1, youden or cost")
    add_cost_options(parser)
    parser.add_argument("--promote", action="store_true", help="move alias 'champion'")
    add_device_option(parser)
    add_loader_options(parser)
    add_mlruns_option(parser)
    args = parser.parse_args(argv)
    check_cost_options(parser, args, args.method)
    return args


@stoppable
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing: --help and a mistyped option answer at once, not after
    # the seconds torch and mlflow take to load
    from anomaly_flow.evaluation import calibrate_model, calibration_summary

    setup_logging()
    outcome = calibrate_model(
        args.model, args.normal, args.anomalous, score=args.score,
        target_fpr=args.target_fpr, method=args.method, cost_fp=args.cost_fp,
        cost_fn=args.cost_fn, promote=args.promote, device=args.device,
        batch_size=args.batch_size, workers=args.workers, mlruns=args.mlruns,
    )
    for line in calibration_summary(outcome):
        print(line)
    print(f"run: {outcome.run_id}" + (f"; {outcome.promotion}" if outcome.promoted else ""))
    return 0


if __name__ == "__main__":
    run_as_program(main)
