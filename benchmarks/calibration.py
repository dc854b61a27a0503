"""B5: does the conformal threshold keep its false-positive rate on new normal images?

Protocol (../shared/BENCHMARKS.md, B5): take scores of held-out normal images (never
training images); 20 times, split them at random into a calibration half and a check
half; set the threshold for a target false-positive rate α on the calibration half and
measure the FPR on the check half. Target: the mean achieved FPR is at most
``α + 2·sqrt(α(1−α)/n_check)``, for α ∈ {0.1, 0.01}. Also shows that a calibration set
smaller than ``1/α − 1`` is refused, with a message naming the count needed.

Where the held-out normal scores come from (one of):

* default: train a small Glow (preset ``tiny``) on images of one Fashion-MNIST class
  (the Debian ``dataset-fashion-mnist`` files; the sample shipped with the package when
  they are missing), holding out the preset's validation share for its normal reference
  as ``anomaly-flow train`` does, and score that class's images the model never saw;
* ``--model URI --normal DIR``: a registered model scoring a folder of held-out normals;
* ``--scores FILE --score bpd``: a table written by ``anomaly-flow score`` (CSV/Parquet).

The score defaults to ``ensemble``, the one ``anomaly-flow calibrate`` uses.

Prints a table and writes JSON, with the machine described (git commit, torch, device;
``benchmarks.common.environment``), to
``benchmarks/results/calibration-<device>-<date>.json`` (or ``--out``).

Example:
    /work/venv/bin/python benchmarks/calibration.py
    /work/venv/bin/python benchmarks/calibration.py --model models:/parts@candidate \\
        --normal data/val/normal --score complexity
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_flow.calibration import conformal_threshold, min_calibration_size
from anomaly_flow.calibration_checks import CalibrationError
from anomaly_flow.data import ArrayDataset, DataError, split_train_val
from anomaly_flow.fashion_mnist import load_fashion_mnist, load_sample
from anomaly_flow.scoring import ScoringDataset, score_dataset
from anomaly_flow.train import train

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import pick_device, write_results

ALPHAS = (0.1, 0.01)

logger = logging.getLogger("benchmarks.calibration")


def _png_bytes(images: np.ndarray) -> list[bytes]:
    """Encode uint8 ``(N, C, H, W)`` images as PNG bytes, as if read from files."""
    out = []
    for array in images:
        buffer = io.BytesIO()
        pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
        pil.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _normal_images(normal_class: int, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                        str]:
    """(training images, held-out images, description) of one class."""
    try:
        train_images, train_labels = load_fashion_mnist("train")
        test_images, test_labels = load_fashion_mnist("test")
    except DataError as error:
        logger.warning("Fashion-MNIST not available (%s); using the shipped sample", error)
        sample = load_sample()
        held_out = np.concatenate([sample.calibration,
                                   sample.test_images[~sample.test_is_anomaly]])
        return sample.train[:n_train], held_out, "shipped sample (normal class " \
            f"{sample.normal_class})"
    pool = train_images[train_labels == normal_class]
    order = np.random.default_rng(seed).permutation(len(pool))
    train_part = pool[order[:n_train]]
    held_out = np.concatenate([pool[order[n_train:]], test_images[test_labels == normal_class]])
    return train_part, held_out, f"Fashion-MNIST class {normal_class}"


def scores_from_training(args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    """Train a small model and return the ``args.score`` of held-out normal images."""
    from anomaly_flow.config import load_preset

    config = load_preset(args.preset).replace(epochs=args.epochs)
    train_images, held_out, source = _normal_images(args.normal_class, args.train_images,
                                                    args.seed)
    m = config.model
    fit, val = split_train_val(len(train_images), config.train.val_fraction, args.seed)
    start = time.perf_counter()
    result = train(config, ArrayDataset(train_images[fit], m.mode, m.image_size, m.resize),
                   ArrayDataset(train_images[val], m.mode, m.image_size, m.resize),
                   device=args.device, progress=False)
    train_s = time.perf_counter() - start
    dataset = ScoringDataset(_png_bytes(held_out), m)
    table = score_dataset(result.model, dataset, batch_size=512, progress=False)
    info = {"source": source, "preset": args.preset, "epochs": args.epochs,
            "n_train": len(fit), "n_reference": len(val), "train_seconds": round(train_s, 1),
            "val_bpd": result.val_bpd, "train_bpd": result.train_bpd}
    return table[args.score].to_numpy(dtype=np.float64), info


def scores_from_model(args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    """Score a folder of held-out normal images with a registered model."""
    from anomaly_flow import tracking
    from anomaly_flow.folder_scoring import score_folder_table

    tracking.configure(args.mlruns)
    loaded = tracking.load_model(args.model, device=args.device)
    scores = score_folder_table(loaded.model, args.normal, progress=False)
    return scores.values(args.score), {"source": f"{args.model} on {args.normal}"}


def scores_from_file(args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one score column from a CSV or Parquet scores table."""
    path = Path(args.scores)
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    if args.score not in table.columns:
        raise SystemExit(f"{path} has no column {args.score!r}; columns: {list(table.columns)}")
    return table[args.score].to_numpy(dtype=np.float64), {"source": str(path)}


def run_splits(scores: np.ndarray, alpha: float, splits: int, seed: int) -> dict[str, Any]:
    """Achieved FPR on the check half over ``splits`` random half/half splits."""
    rng = np.random.default_rng(seed)
    n_cal = scores.size // 2
    n_check = scores.size - n_cal
    achieved = []
    for _ in range(splits):
        order = rng.permutation(scores.size)
        cal, check = scores[order[:n_cal]], scores[order[n_cal:]]
        threshold = conformal_threshold(cal, alpha).value
        achieved.append(float(np.mean(check > threshold)))
    fpr = np.asarray(achieved)
    bound = alpha + 2 * math.sqrt(alpha * (1 - alpha) / n_check)
    # Under exchangeability, E[FPR] = (n + 1 - k) / (n + 1) exactly (continuous scores).
    k = math.ceil((1 - Fraction(repr(alpha))) * (n_cal + 1))
    return {
        "alpha": alpha, "n_calibration": n_cal, "n_check": n_check, "splits": splits,
        "mean_fpr": float(fpr.mean()), "std_fpr": float(fpr.std(ddof=1)),
        "min_fpr": float(fpr.min()), "max_fpr": float(fpr.max()),
        "expected_fpr": (n_cal + 1 - k) / (n_cal + 1),
        "bound": bound, "passes": bool(fpr.mean() <= bound), "achieved": achieved,
    }


def refusal(scores: np.ndarray, alpha: float) -> dict[str, Any]:
    """Calibrate on one image fewer than needed (refused) and on exactly enough (works)."""
    needed = min_calibration_size(alpha)
    out: dict[str, Any] = {"alpha": alpha, "needed": needed}
    try:
        conformal_threshold(scores[: needed - 1], alpha)
        out["refused"], out["message"] = False, ""
    except CalibrationError as error:
        out["refused"], out["message"] = True, str(error)
    out["accepted_at_needed"] = bool(
        np.isfinite(conformal_threshold(scores[:needed], alpha).value))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model URI (with --normal)")
    parser.add_argument("--normal", type=Path, help="folder of held-out normal images")
    parser.add_argument("--scores", type=Path, help="scores table (CSV or Parquet)")
    parser.add_argument("--score", default="ensemble",
                        help="score column (default ensemble, calibrate's default)")
    parser.add_argument("--mlruns", type=Path, default=None)
    parser.add_argument("--preset", default="tiny", help="preset trained by default")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--normal-class", type=int, default=7, help="Fashion-MNIST class")
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: results/calibration-<device>-<date>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    if args.scores is not None:
        scores, info = scores_from_file(args)
    elif args.model is not None:
        if args.normal is None:
            parser.error("--model needs --normal DIR (held-out normal images)")
        scores, info = scores_from_model(args)
    else:
        scores, info = scores_from_training(args)
    finite = np.isfinite(scores)
    if not finite.all():
        logger.warning("%d non-finite scores left out", int((~finite).sum()))
        scores = scores[finite]

    rows = [run_splits(scores, alpha, args.splits, args.seed) for alpha in ALPHAS]
    refusals = [refusal(scores, alpha) for alpha in ALPHAS]

    print(f"B5 calibration: {info['source']}, score {args.score}, "
          f"{scores.size} held-out normal images, {args.splits} random half/half splits")
    print(f"{'alpha':>6} {'n_cal':>6} {'n_check':>7} {'mean FPR':>9} {'std':>7} "
          f"{'min':>7} {'max':>7} {'E[FPR]':>7} {'bound':>7}  pass")
    for r in rows:
        print(f"{r['alpha']:>6g} {r['n_calibration']:>6d} {r['n_check']:>7d} "
              f"{r['mean_fpr']:>9.4f} {r['std_fpr']:>7.4f} {r['min_fpr']:>7.4f} "
              f"{r['max_fpr']:>7.4f} {r['expected_fpr']:>7.4f} {r['bound']:>7.4f}  "
              f"{'yes' if r['passes'] else 'NO'}")
    for r in refusals:
        print(f"alpha={r['alpha']:g}, {r['needed'] - 1} images: "
              + (f"refused: {r['message']}" if r["refused"] else "NOT refused")
              + f" | {r['needed']} images: {'accepted' if r['accepted_at_needed'] else 'failed'}")

    result = {"benchmark": "B5 calibration", "score": args.score, "n_scores": int(scores.size),
              **info, "results": rows, "refusals": refusals}
    path = write_results("calibration", pick_device(args.device), result, args.out)
    print(f"wrote {path}")
    return 0 if all(r["passes"] for r in rows) and all(r["refused"] for r in refusals) else 1


if __name__ == "__main__":
    sys.exit(main())
