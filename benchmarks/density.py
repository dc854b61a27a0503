"""B3: density quality: test-set bits/dim of a Glow trained on Fashion-MNIST in a time budget.

Protocol (../shared/BENCHMARKS.md, B3): train on the Fashion-MNIST training set (28x28,
L=2) with the library's :func:`anomaly_flow.train.train`, stop at ``--minutes`` of wall
time (everything ``train()`` does counts: initialisation, steps, validation, checkpoint
writes), then report the deterministic bits/dim (bin centres, the library's
``evaluate_bpd``) of the 10,000 test images. Target: below 2.9 within 15 minutes on one
GPU. ``--val-images`` training images are held out for a per-epoch validation curve; the
test set is only used once, at the end.

The training curve (train bits/dim, learning rate, images/s per step; validation bits/dim
per epoch) and the final figures are logged to MLflow through ``anomaly_flow.tracking``,
experiment ``benchmark-density``, after training so logging never costs training time.
Without a usable tracking module the figures are still printed and written as JSON.

Defaults: on CUDA, K=32, width 512, batch 256, 15 minutes; on the CPU a small model
(K=8, width 64, batch 64) and 5 minutes. Every size can be overridden.

Examples:
    python benchmarks/density.py                      # GPU: the B3 figure
    nice -n 10 python benchmarks/density.py --device cpu --minutes 5
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

from anomaly_flow.config import GlowConfig, RunConfig, TrainConfig
from anomaly_flow.data import ArrayDataset
from anomaly_flow.fashion_mnist import load_fashion_mnist
from anomaly_flow.train import evaluate_bpd

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import (
    log_curve,
    mlflow_run,
    pick_device,
    print_table,
    set_threads,
    setup_logging,
    train_for,
    write_results,
)

logger = logging.getLogger("benchmarks.density")

TARGET_BPD = 2.9
DEFAULTS = {  # device type -> (steps_per_level, hidden, batch, lr, warmup_steps, minutes)
    "cuda": (32, 512, 256, 1e-3, 500, 15.0),
    "cpu": (8, 64, 64, 2e-3, 50, 5.0),
}


def build_config(args: argparse.Namespace, device: torch.device) -> RunConfig:
    k, width, batch, lr, warmup, _ = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    model = GlowConfig(in_channels=1, image_size=28, levels=2,
                       steps_per_level=args.steps_per_level or k,
                       hidden_channels=args.hidden or width)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size or batch,
                            lr=args.lr or lr, warmup_steps=warmup if args.warmup_steps is None
                            else args.warmup_steps, bf16=args.bf16,
                            num_workers=args.workers if args.workers is not None else 0,
                            seed=args.seed, compile=args.compile)
    return RunConfig(model, train_cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training wall-time budget (default 15 on CUDA, 5 on the CPU)")
    parser.add_argument("--epochs", type=int, default=1000,
                        help="upper bound on epochs; the budget normally ends training first")
    parser.add_argument("--steps-per-level", type=int, default=None, help="K")
    parser.add_argument("--hidden", type=int, default=None, help="coupling network width")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--bf16", action="store_true", help="TrainConfig.bf16 (CUDA only)")
    parser.add_argument("--compile", action="store_true",
                        help="TrainConfig.compile (the compilation counts against the budget)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-images", type=int, default=2000,
                        help="training images held out for the validation curve (0: none)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="use only this many training images (smoke tests)")
    parser.add_argument("--check-every", type=int, default=100,
                        help="steps between checkpoints, where the budget is checked")
    parser.add_argument("--mlruns", type=Path, default=None,
                        help="MLflow store root (default: tracking's default, ./mlruns)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    setup_logging()
    set_threads(args.threads)

    device = pick_device(args.device)
    config = build_config(args, device)
    minutes = args.minutes if args.minutes is not None else DEFAULTS[
        "cuda" if device.type == "cuda" else "cpu"][5]

    images, _ = load_fashion_mnist("train")
    order = np.random.default_rng(args.seed).permutation(len(images))
    val = images[order[: args.val_images]]
    train_images = images[order[args.val_images :]][: args.train_images]
    test, _ = load_fashion_mnist("test")
    logger.info("B3 on %s: %d training, %d validation, %d test images; %s; %s; budget %.1f "
                "min", device, len(train_images), len(val), len(test), config.model,
                config.train, minutes)

    with tempfile.TemporaryDirectory(prefix="b3-") as tmp:
        run = train_for(config, ArrayDataset(train_images),
                        ArrayDataset(val) if len(val) else None, device, minutes, Path(tmp),
                        check_every=args.check_every)
    tick = time.perf_counter()
    test_bpd = evaluate_bpd(run.model, ArrayDataset(test), 500, device)
    eval_seconds = time.perf_counter() - tick
    steps_per_epoch = math.ceil(len(train_images) / config.train.batch_size)
    val_bpd = run.epoch_log[-1]["val_bpd"] if run.epoch_log else math.nan
    images_per_sec = [r["images_per_sec"] for r in run.step_log if "images_per_sec" in r]
    payload: dict[str, Any] = {
        "config": config.to_dict(), "budget_minutes": minutes,
        "n_train": len(train_images), "n_val": len(val), "n_test": len(test),
        "train_seconds": run.train_seconds, "steps": run.steps,
        "epochs": run.steps / steps_per_epoch, "stopped_by_budget": run.stopped_by_budget,
        "last_val_bpd": val_bpd, "test_bpd": test_bpd, "test_eval_seconds": eval_seconds,
        "target_bpd": TARGET_BPD, "meets_target": bool(test_bpd < TARGET_BPD),
        "last_images_per_sec": images_per_sec[-1] if images_per_sec else math.nan,
        "epoch_log": run.epoch_log,
        "step_curve": [{k: r[k] for k in ("step", "t", "train_bpd") if k in r}
                       for r in run.step_log],
    }
    path = write_results("density", device, payload, args.out)
    m = config.model
    print_table(
        ["model", "device", "batch", "budget min", "trained s", "steps", "epochs",
         "images/s", "val bpd", "test bpd", "target"],
        [(f"L={m.levels} K={m.steps_per_level} w={m.hidden_channels}", str(device),
          config.train.batch_size, f"{minutes:g}", f"{run.train_seconds:.0f}", run.steps,
          f"{payload['epochs']:.2f}", f"{payload['last_images_per_sec']:.0f}",
          f"{val_bpd:.4f}", f"{test_bpd:.4f}", f"< {TARGET_BPD}")],
        title="B3 density: Fashion-MNIST test bits/dim (deterministic, bin centres)")
    print(f"\nwrote {path}")

    if args.no_mlflow:
        return
    try:
        with mlflow_run("benchmark-density", f"{m.levels}x{m.steps_per_level}x"
                        f"{m.hidden_channels}-{device.type}-{minutes:g}min", args.mlruns,
                        tags={"benchmark": "B3", "results_json": str(path)}) as mlrun:
            if mlrun is None:
                return
            params = {f"model.{k}": v for k, v in m.to_dict().items()}
            params.update({f"train.{k}": v for k, v in config.train.to_dict().items()})
            params.update(budget_minutes=minutes, device=str(device), n_train=len(train_images))
            mlrun.log_params(params)
            log_curve(mlrun, run.step_log, run.epoch_log,
                      ("train_bpd", "lr", "images_per_sec", "grad_norm"),
                      every=max(1, len(run.step_log) // 2000))
            mlrun.log_metrics({"test_bpd": test_bpd, "train_seconds": run.train_seconds,
                               "steps": float(run.steps)}, step=run.steps)
            logger.info("training curve logged to MLflow run %s",
                        getattr(mlrun, "run_id", "?"))
    except Exception as error:  # the figures are already written; say why logging failed
        logger.warning("MLflow logging failed (%s: %s); the figures are in %s",
                       type(error).__name__, error, path)


if __name__ == "__main__":
    main()
