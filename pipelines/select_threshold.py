"""Choose a threshold from labelled data: compare F1, Youden's J and cost side by side.

Scores a folder of held-out normal images and one of labelled anomalies once, prints the
threshold each method picks with its false-positive rate, precision, recall, F1 and
cost on these data, and with ``--register METHOD`` logs a calibration run and registers
a model version carrying that method's threshold (``--promote`` moves ``champion``).

Example:
    python pipelines/select_threshold.py --model models:/parts@candidate \\
        --normal data/val/normal --anomalous data/val/defects \\
        --cost-fp 1 --cost-fn 20 --target-fpr 0.01 --register cost
"""

from __future__ import annotations

import argparse
import sys

from anomaly_flow.errors import describe, user_error_types
from anomaly_flow.pipeline_options import (
    add_cost_options,
    add_device_option,
    add_loader_options,
    add_mlruns_option,
    add_model_option,
    add_score_option,
    add_target_fpr_option,
    check_cost_options,
    given_path,
    setup_logging,
    stoppable,
)
from anomaly_flow.pipeline_options import (
    parser as pipeline_parser,
)

LABELLED = ("f1", "youden", "cost")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = pipeline_parser(__doc__)
    add_model_option(parser)
    parser.add_argument("--normal", required=True, type=given_path,
                        help="folder of held-out normal images")
    parser.add_argument("--anomalous", required=True, type=given_path,
                        help="folder of labelled anomalies")
    add_score_option(parser)
    add_cost_options(parser)
    add_target_fpr_option(
        parser, help="also show the conformal threshold at this false-positive rate")
    parser.add_argument("--register", choices=(*LABELLED, "conformal"), default=None,
                        help="register a model version with this method's threshold")
    parser.add_argument("--promote", action="store_true", help="with --register: move champion")
    add_device_option(parser)
    add_loader_options(parser)
    add_mlruns_option(parser)
    args = parser.parse_args(argv)
    check_cost_options(parser, args, "cost")  # the comparison always shows the cost method
    if args.register == "conformal" and args.target_fpr is None:
        parser.error("--register conformal needs --target-fpr, e.g. --target-fpr 0.01")
    if args.promote and args.register is None:
        parser.error("--promote moves champion to the version --register makes; add "
                     "--register METHOD, or drop --promote")
    return args


@stoppable
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # imported after parsing: --help and a mistyped option answer at once, not after
    # the seconds torch and mlflow take to load
    from anomaly_flow.evaluation import (
        AUTO_SCORE,
        calibrate_scores,
        check_registered,
        compare_thresholds,
        leave_out_training_images,
        open_model,
        precheck_calibration,
        resolve_score,
        score_folder_table,
        select_folder_score,
        warn_held_out,
        warn_replaced_calibration,
    )

    setup_logging()
    try:
        # the labelled methods' checks, and with --target-fpr the conformal row's size
        precheck_calibration(args.normal, args.anomalous, score=args.score,
                             method="f1" if args.target_fpr is None else "conformal",
                             target_fpr=args.target_fpr)
        # without --register nothing is logged: a read-only store serves
        loaded = open_model(args.model, args.device, args.mlruns,
                            logs=args.register is not None)
        if args.register is not None:  # what registering needs, before the scoring
            check_registered(loaded)
            warn_replaced_calibration(loaded, args.score, resolve_score(args.score,
                                                                        loaded.model))
        options = {"batch_size": args.batch_size, "workers": args.workers}
        normal = leave_out_training_images(
            loaded, score_folder_table(loaded.model, args.normal, **options),
            "threshold selection")
        anomalous = score_folder_table(loaded.model, args.anomalous, **options)
        if args.register is None:  # calibrate_scores below warns when registering
            warn_held_out(normal, anomalous)
        score = resolve_score(args.score, loaded.model)
        if score == AUTO_SCORE:
            selection = select_folder_score(normal, anomalous, loaded.model)
            score = selection.chosen
            print("AUROC by score: " + ", ".join(
                f"{name} {value:.4f}" for name, value in selection.auroc.items())
                + f"; chosen: {score} (optimistic: chosen on these images)")
        table = compare_thresholds(normal, anomalous, score, methods=LABELLED,
                                   target_fpr=args.target_fpr, cost_fp=args.cost_fp,
                                   cost_fn=args.cost_fn)
        print(f"score {score}: {len(normal.values(score))} normal, "
              f"{len(anomalous.values(score))} anomalous images; "
              f"cost = {args.cost_fp:g}·FP + {args.cost_fn:g}·FN")
        print(table.to_string(float_format=lambda v: f"{v:.4f}"))
        if args.register is not None:
            conformal = args.register == "conformal"
            outcome = calibrate_scores(
                loaded, normal, anomalous, score=args.score, method=args.register,
                target_fpr=args.target_fpr if conformal else None,
                cost_fp=args.cost_fp, cost_fn=args.cost_fn, promote=args.promote,
                run_name=f"select-threshold-{args.register}",
            )
            print(f"registered {outcome.model_uri} with the {args.register} threshold "
                  f"{outcome.threshold!r} (run {outcome.run_id})"
                  + (f"; {outcome.promotion}" if outcome.promoted else ""))
    except user_error_types() as error:
        print(f"error: {describe(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
