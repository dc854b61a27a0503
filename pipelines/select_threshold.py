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
from anomaly_flow.threshold_methods import METHODS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = pipeline_parser(__doc__)
    add_model_option(parser)
    parser.add_argument("--normal", required=True, type=image_folder,
                        help="folder of held-out normal images")
    parser.add_argument("--anomalous", required=True, type=image_folder,
                        help="folder of labelled anomalies")
    add_score_option(parser)
    add_cost_options(parser)
    add_target_fpr_option(
        parser, help="also show the conformal threshold at this false-positive rate")
    parser.add_argument("--register", choices=METHODS, default=None,
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
    from anomaly_flow.calibration import shown_precision
    from anomaly_flow.evaluation import SelectThresholdOutcome, select_threshold

    def show(compared: SelectThresholdOutcome) -> None:
        """The comparison, printed before a registration that could fail or be stopped."""
        if (selection := compared.score_selection) is not None:
            print("AUROC by score: " + ", ".join(
                f"{name} {value:.4f}" for name, value in selection.auroc.items())
                + f"; chosen: {compared.score} (optimistic: chosen on these images)")
        print(f"score {compared.score}: {compared.n_normal} normal, "
              f"{compared.n_anomalous} anomalous images; "
              f"cost = {args.cost_fp:g}·FP + {args.cost_fn:g}·FN")
        shown = compared.table.astype(object)
        shown["precision"] = [shown_precision(row.precision, row.recall, row.fpr, ".4f")
                              for row in compared.table.itertuples()]
        print(shown.to_string(float_format=lambda v: f"{v:.4f}"))

    setup_logging()
    outcome = select_threshold(
        args.model, args.normal, args.anomalous, score=args.score,
        target_fpr=args.target_fpr, cost_fp=args.cost_fp, cost_fn=args.cost_fn,
        register=args.register, promote=args.promote, device=args.device,
        batch_size=args.batch_size, workers=args.workers, mlruns=args.mlruns,
        on_compared=show,
    )
    if (registered := outcome.registered) is not None:
        print(f"registered {registered.model_uri} with the {args.register} threshold "
              f"{registered.threshold!r} (run {registered.run_id})"
              + (f"; {registered.promotion}" if registered.promoted else ""))
    return 0


if __name__ == "__main__":
    run_as_program(main)
