"""Build the Fashion-MNIST sample the package ships for ``anomaly-flow demo``.

Reads the IDX files (Debian: ``apt-get install dataset-fashion-mnist``) and writes
``anomaly_flow/sample_data/fashion_mnist_sample.npz`` with

- ``train``: normal-class images from the training split,
- ``calibration``: further normal-class images from the training split, disjoint from
  ``train`` (calibration scores must never come from training images),
- ``test_images`` / ``test_labels``: normal images plus anomalies drawn evenly from the
  other nine classes, from the test split,
- ``classes``, ``normal_class``, ``seed``,

and the dataset's MIT licence next to it. The same arguments give a byte-identical file.

Usage (from the repository root, with the package installed)::

    python scripts/build_sample.py [--normal-class Sneaker] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from anomaly_flow.data import DataError
from anomaly_flow.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist

logger = logging.getLogger("build_sample")

OUT_DIR = Path(__file__).resolve().parent.parent / "anomaly_flow" / "sample_data"

LICENSE_TEXT = """\
The file fashion_mnist_sample.npz in this folder holds a subset of Fashion-MNIST
(https://github.com/zalandoresearch/fashion-mnist), built by scripts/build_sample.py.
Fashion-MNIST is distributed under the following licence.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def class_index(value: str) -> int:
    """A class given as its index (``7``) or its name (``Sneaker``, any case)."""
    if value.isdigit() and int(value) < len(FASHION_MNIST_CLASSES):
        return int(value)
    names = [name.lower() for name in FASHION_MNIST_CLASSES]
    if value.lower() in names:
        return names.index(value.lower())
    raise argparse.ArgumentTypeError(
        f"unknown class {value!r}; use 0-9 or one of {', '.join(FASHION_MNIST_CLASSES)}"
    )


def build(
    normal_class: int,
    n_train: int,
    n_calibration: int,
    n_test_normal: int,
    n_test_anomalous: int,
    seed: int,
    source: Path,
) -> dict[str, np.ndarray]:
    """Draw the sample's arrays (see the module docstring) reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    train_images, train_labels = load_fashion_mnist("train", source)
    test_images, test_labels = load_fashion_mnist("test", source)

    normal = rng.permutation(np.flatnonzero(train_labels == normal_class))
    if len(normal) < n_train + n_calibration:
        raise DataError(
            f"only {len(normal)} training images of the normal class, "
            f"{n_train + n_calibration} requested; lower --n-train or --n-calibration"
        )
    train = train_images[np.sort(normal[:n_train])]
    calibration = train_images[np.sort(normal[n_train : n_train + n_calibration])]

    others = [c for c in range(len(FASHION_MNIST_CLASSES)) if c != normal_class]
    per_class = [n_test_anomalous // len(others)] * len(others)
    for i in range(n_test_anomalous % len(others)):
        per_class[i] += 1
    picks = [rng.choice(np.flatnonzero(test_labels == normal_class), n_test_normal, replace=False)]
    for cls, count in zip(others, per_class, strict=True):
        picks.append(rng.choice(np.flatnonzero(test_labels == cls), count, replace=False))
    test_index = rng.permutation(np.concatenate(picks))

    return {
        "train": train,
        "calibration": calibration,
        "test_images": test_images[test_index],
        "test_labels": test_labels[test_index],
        "classes": np.array(FASHION_MNIST_CLASSES),
        "normal_class": np.array(normal_class, dtype=np.int64),
        "seed": np.array(seed, dtype=np.int64),
    }


def save_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so rebuilding changes no byte."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buffer.getvalue(), compresslevel=9)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, build the sample and write it with its licence."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--normal-class", type=class_index, default=7, help="default: 7 Sneaker")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-calibration", type=int, default=600)
    parser.add_argument("--n-test-normal", type=int, default=300)
    parser.add_argument("--n-test-anomalous", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    arrays = build(
        args.normal_class,
        args.n_train,
        args.n_calibration,
        args.n_test_normal,
        args.n_test_anomalous,
        args.seed,
        args.source,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / "fashion_mnist_sample.npz"
    save_npz(arrays, out)
    (args.out_dir / "LICENSE-fashion-mnist.txt").write_text(LICENSE_TEXT, encoding="utf-8")
    for name, array in arrays.items():
        logger.info("%-12s %-8s %s", name, array.dtype, array.shape)
    normal_name = FASHION_MNIST_CLASSES[args.normal_class]
    size_kb = out.stat().st_size / 1024
    logger.info("wrote %s (%.0f KiB), normal class %s", out, size_kb, normal_name)


if __name__ == "__main__":
    main()
