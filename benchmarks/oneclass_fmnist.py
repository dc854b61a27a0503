"""B4: one-class anomaly detection on Fashion-MNIST, every score type against raw-pixel
baselines run in the same script.

Protocol (../shared/BENCHMARKS.md, B4; Golan & El-Yaniv 2018, Ruff et al. 2018): for each
class k, train a Glow with the library's :func:`anomaly_flow.train.train` on the training
images of class k only (28x28, L=2), holding out ``--val-fraction`` of them (0.1, as
``anomaly-flow train`` does) for validation and the normal reference; score the whole
test set with
:func:`anomaly_flow.scoring.score_images`; class k is normal, the nine others anomalous;
AUROC (:func:`anomaly_flow.detection.detection_metrics`, anomalies positive, higher
score = more anomalous) for every score:

* ``bpd``: bits/dim (deterministic, bin centres);
* ``complexity``: bpd minus the PNG-compressed length of the image in bits/dim;
* ``coarse_complexity``: ``level_L`` minus the PNG-compressed length of the image
  box-downsampled to level L's resolution, in bits per dimension of the full image
  (:func:`anomaly_flow.complexity.coarse_complexity`);
* ``typicality``: how far the per-pixel bits/dim map is from the held-out normal
  images' average map, per pixel, in their standard deviations (:meth:`Glow.typicality`);
* ``knn``: the mean distance from the map to the 5 nearest held-out normal maps, on a
  7x7 grid, in the normal standard deviations (:meth:`Glow.knn`);
* ``pixel_knn``: the mean distance from the image itself to the 5 nearest held-out
  normal images, both averaged to the same 7x7 grid (:meth:`Glow.pixel_knn`);
* ``ensemble``: ``knn``, ``coarse_complexity`` and ``pixel_knn``, each standardised by
  its mean and std over the held-out normal images, summed (:meth:`Glow.ensemble`); the
  score ``anomaly-flow calibrate`` uses by default;
* ``level_1`` .. ``level_L``: each scale's share of ``-log p(x)`` in bits/dim.

Baselines, fitted on all the class-k training images (the held-out tenth included, so
they see more data than the Glow), raw pixels scaled to [0, 1]:

* ``knn5_mean``: mean Euclidean distance to the 5 nearest training images
  (``sklearn.neighbors.NearestNeighbors(n_neighbors=5)``), ``knn5_kth`` the distance
  to the 5th;
* ``iforest``: ``-score_samples`` of ``sklearn.ensemble.IsolationForest(random_state=0)``
  with default parameters.

Defaults: on CUDA, K=32, width 512, batch 128, 30 epochs per class; on the CPU a small
model (K=8, width 64, batch 64, 2 epochs). ``--minutes-per-class`` caps each training's
wall time as well.

Examples:
    python benchmarks/oneclass_fmnist.py                          # GPU: the B4 table
    nice -n 10 python benchmarks/oneclass_fmnist.py --device cpu --classes 0,1
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors

from anomaly_flow.complexity import (
    batch_coarse_png_bits_per_dim,
    batch_png_bits_per_dim,
    coarse_complexity,
)
from anomaly_flow.config import GlowConfig, RunConfig, TrainConfig
from anomaly_flow.data import ArrayDataset, split_train_val
from anomaly_flow.detection import detection_metrics
from anomaly_flow.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from anomaly_flow.glow import REFERENCE_STD_FLOOR, Glow
from anomaly_flow.scoring import score_images
from anomaly_flow.train import fit_reference

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (
    RESULTS,
    device_slug,
    pick_device,
    print_table,
    set_threads,
    setup_logging,
    train_for,
    write_results,
)

logger = logging.getLogger("benchmarks.oneclass")

BASELINES = ("knn5_mean", "knn5_kth", "iforest")
DEFAULTS = {  # device type -> (steps_per_level, hidden, batch, lr, warmup_steps, epochs)
    "cuda": (32, 512, 128, 1e-3, 200, 30),
    "cpu": (8, 64, 64, 2e-3, 50, 2),
}
PUBLISHED = {"IsolationForest on raw pixels": 91.7, "5-NN distance on raw pixels": 92.3,
             "GEOM (published)": 93.5}
"""Mean AUROC (%) from BENCHMARKS.md, for the table's last lines."""


def build_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    k, width, batch, lr, warmup, epochs = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    model = GlowConfig(in_channels=1, image_size=28, levels=2,
                       steps_per_level=args.steps_per_level or k,
                       hidden_channels=args.hidden or width)
    train_cfg = TrainConfig(epochs=args.epochs or epochs, batch_size=args.batch_size or batch,
                            lr=args.lr or lr,
                            warmup_steps=warmup if args.warmup_steps is None
                            else args.warmup_steps, bf16=args.bf16, seed=args.seed)
    return RunConfig(model, train_cfg)


def score_test_set(model: Glow, test: np.ndarray, device: torch.device,
                   batch: int = 1000) -> dict[str, np.ndarray]:
    """``bpd`` ``(N,)``, ``level_bits`` ``(N, L)``, ``typicality``, ``knn`` and
    ``pixel_knn`` ``(N,)`` of uint8 images ``(N, 1, 28, 28)``; the model must have a
    normal reference."""
    parts: dict[str, list[np.ndarray]] = {"bpd": [], "level_bits": [], "typicality": [],
                                          "knn": [], "pixel_knn": []}
    for start in range(0, len(test), batch):
        scores = score_images(model, torch.from_numpy(test[start : start + batch]).to(device))
        assert scores.typicality is not None and scores.pixel_knn is not None
        for name in parts:
            parts[name].append(getattr(scores, name).numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def baseline_scores(train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Raw-pixel baseline scores of the test images (higher = more anomalous)."""
    x_train = train.reshape(len(train), -1).astype(np.float32) / 255.0
    x_test = test.reshape(len(test), -1).astype(np.float32) / 255.0
    distances, _ = NearestNeighbors(n_neighbors=5).fit(x_train).kneighbors(x_test)
    forest = IsolationForest(random_state=0).fit(x_train)
    return {"knn5_mean": distances.mean(axis=1), "knn5_kth": distances[:, -1],
            "iforest": -forest.score_samples(x_test)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                        help="comma-separated class indices (default: all ten)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per class (default 30 on CUDA, 2 on the CPU)")
    parser.add_argument("--minutes-per-class", type=float, default=None,
                        help="also stop each training after this much wall time")
    parser.add_argument("--steps-per-level", type=int, default=None, help="K")
    parser.add_argument("--hidden", type=int, default=None, help="coupling network width")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="TrainConfig.bf16 (CUDA only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only the first N training images of the class")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class's training images held out for validation "
                             "and the normal reference (default 0.1)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    setup_logging()
    set_threads(args.threads)

    device = pick_device(args.device)
    config = build_config(args, device)
    classes = [int(c) for c in args.classes.split(",")]
    if not all(0 <= c < 10 for c in classes):
        raise SystemExit(f"--classes {args.classes!r}: give indices 0..9, comma-separated.")
    train_all, train_labels = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    tick = time.perf_counter()
    n_bits, levels = config.model.n_bits, config.model.levels
    png_bpd = batch_png_bits_per_dim(test, n_bits)
    coarse_png_bpd = batch_coarse_png_bits_per_dim(test, n_bits, levels)
    logger.info("PNG bits/dim (full and coarse) of %d test images in %.1f s", len(test),
                time.perf_counter() - tick)
    level_names = [f"level_{i + 1}" for i in range(levels)]
    flow_methods = ["bpd", "complexity", "coarse_complexity", "typicality", "knn",
                    "pixel_knn", "ensemble", *level_names]
    methods = flow_methods + ([] if args.no_baselines else list(BASELINES))
    logger.info("B4 on %s, classes %s: %s; %s", device, classes, config.model, config.train)

    # written after every class, so that a run stopped part way (a device lease's end)
    # keeps the classes it finished; "complete" says whether all were
    out = args.out or RESULTS / (f"oneclass_fmnist-{device_slug(device)}-"
                                 f"{time.strftime('%Y%m%d-%H%M%S')}.json")

    def payload(done: list[int]) -> dict[str, Any]:
        mean = {m: float(np.mean([per_class[k]["auroc"][m] for k in done])) for m in methods}
        worst = {m: float(np.min([per_class[k]["auroc"][m] for k in done])) for m in methods}
        return {"config": config.to_dict(), "classes": classes, "classes_done": done,
                "complete": done == classes, "minutes_per_class": args.minutes_per_class,
                "val_fraction": args.val_fraction,
                "reference_std_floor": REFERENCE_STD_FLOOR,
                "knn": "Euclidean distance on raw pixels in [0, 1]: knn5_mean = mean of the "
                       "5 nearest, knn5_kth = the 5th nearest",
                "iforest": "IsolationForest(random_state=0), defaults, score = "
                           "-score_samples",
                "mean_auroc": mean, "min_auroc": worst, "per_class": per_class}

    per_class: dict[int, dict[str, Any]] = {}
    for k in classes:
        train_k = train_all[train_labels == k][: args.train_images]
        fit_idx, val_idx = split_train_val(len(train_k), args.val_fraction, args.seed)
        fit, val = ArrayDataset(train_k[fit_idx]), ArrayDataset(train_k[val_idx])
        tick = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"b4-{k}-") as tmp:
            run = train_for(config, fit, val, device, args.minutes_per_class, Path(tmp),
                            check_every=max(1, math.ceil(len(fit) / config.train.batch_size)),
                            progress=False)
        if not run.model.has_reference:  # stopped by the time budget, before the last epoch
            fit_reference(run.model, val, config.train.batch_size, device)
        train_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        flow = score_test_set(run.model, test, device)
        bpd, level_bits = flow["bpd"], flow["level_bits"]
        coarse = coarse_complexity(level_bits, coarse_png_bpd)
        ensemble = run.model.ensemble(torch.from_numpy(flow["knn"]), torch.from_numpy(coarse),
                                      torch.from_numpy(flow["pixel_knn"])).numpy()
        scores = {"bpd": bpd, "complexity": bpd - png_bpd, "coarse_complexity": coarse,
                  "typicality": flow["typicality"], "knn": flow["knn"],
                  "pixel_knn": flow["pixel_knn"], "ensemble": ensemble,
                  **{name: level_bits[:, i] for i, name in enumerate(level_names)}}
        score_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        if not args.no_baselines:
            scores.update(baseline_scores(train_k, test))
        baseline_seconds = time.perf_counter() - tick
        normal = test_labels == k
        aurocs = {}
        for name in methods:
            finite = np.isfinite(scores[name])
            if not finite.all():
                logger.warning("class %d, %s: %d non-finite scores left out", k, name,
                               int((~finite).sum()))
            aurocs[name] = 100 * detection_metrics(scores[name][normal & finite],
                                                   scores[name][~normal & finite]).auroc
        last_bpd = next((r["train_bpd"] for r in reversed(run.step_log)
                         if math.isfinite(r.get("train_bpd", math.nan))), math.nan)
        per_class[k] = {
            "class_name": FASHION_MNIST_CLASSES[k], "n_train": len(fit),
            "n_val": len(val), "n_baseline_train": len(train_k),
            "steps": run.steps, "train_seconds": train_seconds,
            "stopped_by_budget": run.stopped_by_budget, "last_train_bpd": last_bpd,
            "test_bpd_normal_mean": float(bpd[normal].mean()),
            "test_bpd_anomalous_mean": float(bpd[~normal].mean()),
            "score_seconds": score_seconds, "baseline_seconds": baseline_seconds,
            "auroc": aurocs,
        }
        logger.info("class %d (%s): %d steps in %.0f s, bpd AUROC %.1f, complexity %.1f, "
                    "coarse_complexity %.1f, typicality %.1f, knn %.1f, pixel_knn %.1f, "
                    "ensemble %.1f%s", k,
                    FASHION_MNIST_CLASSES[k], run.steps, train_seconds, aurocs["bpd"],
                    aurocs["complexity"], aurocs["coarse_complexity"], aurocs["typicality"],
                    aurocs["knn"], aurocs["pixel_knn"], aurocs["ensemble"],
                    "" if args.no_baselines else
                    f", 5-NN {aurocs['knn5_mean']:.1f}, IF {aurocs['iforest']:.1f}")
        path = write_results("oneclass_fmnist", device, payload(list(per_class)), out)

    final = payload(classes)
    mean, worst = final["mean_auroc"], final["min_auroc"]
    rows = [(f"{k} {FASHION_MNIST_CLASSES[k]}", *(f"{per_class[k]['auroc'][m]:.1f}"
                                                   for m in methods)) for k in classes]
    rows.append(("**mean**", *(f"**{mean[m]:.1f}**" for m in methods)))
    rows.append(("min", *(f"{worst[m]:.1f}" for m in methods)))
    m = config.model
    print_table(["class", *methods], rows,
                title=f"B4 one-class AUROC (%) on Fashion-MNIST: Glow L={m.levels} "
                f"K={m.steps_per_level} width {m.hidden_channels}, {config.train.epochs} "
                f"epoch(s)/class, {device}")
    print("\npublished / measured elsewhere (BENCHMARKS.md, mean AUROC %): "
          + ", ".join(f"{k} {v}" for k, v in PUBLISHED.items()))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
