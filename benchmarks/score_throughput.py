"""B2: scoring throughput against decode-only throughput on the same PNG files.

Protocol (../shared/BENCHMARKS.md, B2): write N Fashion-MNIST images as PNG files (the
Debian ``dataset-fashion-mnist`` files, training split then test split, repeated if N is
larger; the sample shipped with the package when they are missing), then, with the same
DataLoader workers and batch size:

1. **decode-only**: iterate a DataLoader over the files that only decodes them and
   converts them to the model's mode and size (``ImageFolderDataset``), no model;
2. **decode + complexity**: the same over ``ScoringDataset``, which also measures each
   image's PNG-compressed lengths for the ``complexity`` and ``coarse_complexity``
   scores (part of scoring's cost);
3. **model only**: the forward pass on in-memory batches (no files), for context (eager,
   also under ``--compile``);
4. **scoring**: :func:`anomaly_flow.folder_scoring.score_folder` end to end, into a CSV.

After a warm-up pass over the files (so all passes read from the page cache), the four
passes run in ``--repeats`` interleaved rounds and each keeps its fastest time (a shared
machine's load from other processes then hits one round of each pass alike).
Target: scoring time within 1.3x of decode-only time (ratio <= 1.3). The model is
untrained but initialised (ActNorm on a batch): its cost is the trained model's cost.
Prints a table and writes JSON, with the machine described (git commit, torch, device,
load; ``benchmarks.common.environment``), to
``benchmarks/results/score_throughput-<preset>[_<precision>][_compiled]-<device>-<date>.json``
(no precision suffix for float32), a new file each run.

Example:
    /work/venv/bin/python benchmarks/score_throughput.py --n 2000 --preset tiny --workers 2
    /work/venv/bin/python benchmarks/score_throughput.py --device cuda --workers 16  # GPU, 50k
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomaly_flow.config import PRESETS, load_preset
from anomaly_flow.data import ArrayDataset, DataError, ImageFolderDataset, write_image_folder
from anomaly_flow.fashion_mnist import load_fashion_mnist, load_sample
from anomaly_flow.folder_scoring import score_folder
from anomaly_flow.folders import find_images
from anomaly_flow.glow import Glow, preprocess
from anomaly_flow.scoring import ScoringDataset, score_images
from anomaly_flow.train import fit_reference, resolve_device

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import write_results

TARGET_RATIO = 1.3

logger = logging.getLogger("benchmarks.score_throughput")


def fashion_mnist(n: int) -> tuple[np.ndarray, str]:
    """``n`` uint8 ``(n, 1, 28, 28)`` images and where they came from."""
    try:
        images = np.concatenate([load_fashion_mnist("train")[0], load_fashion_mnist("test")[0]])
        source = "Fashion-MNIST train+test (/usr/share/datasets/fashion-mnist)"
    except DataError as exc:
        logger.warning("%s; using the sample shipped with the package", exc)
        sample = load_sample()
        images = np.concatenate([sample.train, sample.calibration, sample.test_images])
        source = "Fashion-MNIST sample shipped with anomaly-flow"
    repeats = -(-n // len(images))
    return np.concatenate([images] * repeats)[:n], source


def png_folder(n: int, folder: Path | None) -> tuple[Path, str]:
    """A folder of exactly ``n`` PNG files, reused when it already holds them."""
    folder = folder or Path(tempfile.gettempdir()) / f"anomaly-flow-b2-fmnist-{n}"
    images, source = fashion_mnist(n)
    if folder.is_dir() and len(list(folder.glob("*.png"))) == n:
        logger.info("reusing %d PNG files in %s", n, folder)
        return folder, source
    if folder.exists() and any(not p.name.startswith("fmnist")
                               for p in folder.iterdir()):
        raise SystemExit(f"{folder} holds files this script did not write; give --data an "
                         "empty or new folder (it is rewritten when its PNG count is not --n)")
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    write_image_folder(images, folder, "fmnist", "png")
    logger.info("wrote %d PNG files to %s in %.1f s", n, folder, time.perf_counter() - start)
    return folder, source


def build_model(preset: str, model_uri: str | None, device: torch.device,
                reference_images: np.ndarray) -> tuple[Glow, str]:
    """The model to score with, on ``device``, and a description of it."""
    if model_uri is not None:
        from anomaly_flow.tracking import load_model  # only this path needs MLflow

        return load_model(model_uri, device=str(device)).model, model_uri
    config = load_preset(preset).model
    torch.manual_seed(0)
    model = Glow(config)
    images = ArrayDataset(reference_images, config.mode, config.image_size, config.resize)
    model.initialize(preprocess(images.images[:256], config.n_bits))
    model = model.to(device).eval()
    # As every trained model has one, so scoring also computes the reference scores (speed
    # only: the statistics' content does not matter here, their size does: knn compares
    # every image with all the reference maps).
    n_maps = fit_reference(model, images, 256, device)
    return model, (f"preset {preset} (untrained, initialised, with a normal reference of "
                   f"{n_maps} images)")


def time_loader(dataset: Any, batch_size: int, workers: int) -> float:
    """Seconds to iterate a DataLoader over ``dataset`` once (with the collate scoring
    uses for a :class:`ScoringDataset`, PyTorch's default otherwise)."""
    collate = ScoringDataset.collate if isinstance(dataset, ScoringDataset) else None
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate)
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def time_model(model: Glow, n: int, batch_size: int, precision: str) -> float:
    """Seconds for the forward pass over ``n`` random images in memory."""
    config = model.config
    shape = (batch_size, config.in_channels, config.image_size, config.image_size)
    batch = torch.randint(0, 256, shape, dtype=torch.uint8).to(model.device)
    score_images(model, batch, precision=precision)  # warm-up
    start = time.perf_counter()
    done = 0
    while done < n:  # score_images returns host tensors: each batch is finished
        score_images(model, batch[: min(batch_size, n - done)], precision=precision)
        done += batch_size
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="PNG files to score (50000)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="DataLoader worker processes (default: CPU cores, at most 16)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reference-images", type=int, default=6000,
                        help="held-out images behind the untrained model's normal reference "
                             "(default 6000: a tenth of Fashion-MNIST's training set, as "
                             "anomaly-flow train holds out)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--preset", choices=PRESETS, default="fashion-mnist",
                        help="architecture of the untrained model (default: fashion-mnist, B1)")
    parser.add_argument("--model", default=None,
                        help="score with this model instead (URI or folder; see --model of "
                             "anomaly-flow score)")
    parser.add_argument("--precision", choices=["float32", "tf32", "bf16"], default="float32",
                        help="scoring arithmetic (see anomaly_flow.scoring.numerics)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time each pass this many times and keep the fastest")
    parser.add_argument("--compile", action="store_true",
                        help="score with the model compiled (score_folder(compile=True)); "
                             "one untimed scoring pass compiles it first, and its time is "
                             "reported apart")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder for the PNG files (default: a reusable folder in /tmp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    device = resolve_device(args.device)
    folder, source = png_folder(args.n, args.data)
    model, described = build_model(args.preset, args.model, device,
                                   fashion_mnist(args.reference_images)[0])
    config = model.config
    paths = find_images(folder)
    n, bs, workers = len(paths), args.batch_size, args.workers

    decoding = ImageFolderDataset(paths, config.mode, config.image_size, config.resize)
    scoring = ScoringDataset(paths, config)
    time_loader(decoding, bs, workers)  # warm-up: files into the page cache

    def score_once() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = score_folder(model, None, folder, Path(tmp) / "scores.csv",
                                   batch_size=bs, num_workers=workers, progress=False,
                                   precision=args.precision, compile=args.compile)
            seconds = time.perf_counter() - start
        if summary.n_scored != n:
            raise SystemExit(f"only {summary.n_scored} of {n} files were scored")
        return seconds

    first_compiled_s = score_once() if args.compile else None  # compiles, untimed
    # Rounds interleave the passes, so a burst of load from other processes hits one
    # round of each rather than every repeat of one pass; each pass keeps its fastest.
    times: dict[str, list[float]] = {"decode": [], "loader": [], "model": [], "score": []}
    for _ in range(max(1, args.repeats)):
        times["decode"].append(time_loader(decoding, bs, workers))
        times["loader"].append(time_loader(scoring, bs, workers))
        times["model"].append(time_model(model, n, bs, args.precision))
        times["score"].append(score_once())
    decode_s, loader_s, model_s, score_s = (min(times[k]) for k in times)
    ratio = score_s / decode_s
    result = {
        "benchmark": "B2 scoring throughput",
        "n_images": n,
        "images": source,
        "model": described,
        "config": config.to_dict(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "workers": workers,
        "batch_size": bs,
        "precision": args.precision,
        "compile": args.compile,
        "first_compiled_pass_s": first_compiled_s,
        "repeats": args.repeats,
        "seconds_per_round": times,
        "load_average_1min_after": os.getloadavg()[0],
        "decode_only_img_s": n / decode_s,
        "decode_and_complexity_img_s": n / loader_s,
        "model_only_img_s": n / model_s,
        "scoring_img_s": n / score_s,
        "ratio_scoring_to_decode_time": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                      else sys.argv[1:])]),
    }
    rows = [
        ("decode-only", result["decode_only_img_s"]),
        ("decode + complexity (no model)", result["decode_and_complexity_img_s"]),
        ("model only (in memory" + (", not compiled)" if args.compile else ")"),
         result["model_only_img_s"]),
        ("scoring, end to end to CSV" + (" (compiled)" if args.compile else ""),
         result["scoring_img_s"]),
    ]
    print(f"B2 on {result['device']} ({result['device_name']}), {n} PNGs, {described}, "
          f"{workers} workers, batch {bs}, {args.precision}, best of {args.repeats}")
    if first_compiled_s is not None:
        print(f"first compiled scoring pass, compiling included: {first_compiled_s:.1f} s")
    print(f"{'pass':<38} {'images/s':>10}")
    for name, value in rows:
        print(f"{name:<38} {value:>10.0f}")
    print(f"ratio scoring time / decode-only time: {ratio:.2f} (target <= {TARGET_RATIO}: "
          f"{'met' if result['meets_target'] else 'not met'})")
    label = ((args.preset if args.model is None else "model")
             + ("" if args.precision == "float32" else f"_{args.precision}")
             + ("_compiled" if args.compile else ""))
    out = write_results(f"score_throughput-{label}", device, result)
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
