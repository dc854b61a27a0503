"""The PNG length behind the complexity scores: batched (``anomaly_flow.complexity``)
against saving each image with Pillow, on the same images.

Images: Fashion-MNIST test images (the Debian ``dataset-fashion-mnist`` files; the sample
shipped with the package when they are missing) as grey 14×14 (every other pixel) and
28×28, and as RGB 32×32 and 64×64 (three shifted copies as channels, zero-padded by 2,
the 64×64 ones upsampled by 2). For each set: microseconds per image of
``batch_png_bits_per_dim`` over batches of ``--batch`` images, of its filter step alone,
and of Pillow's ``save(format="PNG", compress_level=9)`` per image (best of
``--repeats``), and whether the lengths are equal (they are wherever Pillow and Python
use the same zlib). Prints a table and writes JSON under ``benchmarks/results/``.

Example:
    /work/venv/bin/python benchmarks/png_length.py
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from anomaly_flow.complexity import _png_filtered_rows, batch_png_bits_per_dim
from anomaly_flow.data import DataError
from anomaly_flow.fashion_mnist import load_fashion_mnist, load_sample

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, setup_logging, write_results


def pillow_png_bits(image: np.ndarray) -> float:
    """Bits/dim of uint8 ``(C, H, W)`` saved by Pillow as PNG at level 9."""
    mode = "L" if image.shape[0] == 1 else "RGB"
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode).save(buffer, format="PNG",
                                                              compress_level=9)
    return 8.0 * buffer.tell() / image.size


def image_sets(n: int) -> dict[str, np.ndarray]:
    """Grey and RGB uint8 ``(n, C, H, W)`` sets built from Fashion-MNIST test images."""
    try:
        grey = load_fashion_mnist("test")[0][:n]
    except DataError:
        grey = load_sample().test_images[:n]
    shifted = np.concatenate([np.roll(grey, s, axis=3) for s in (0, 1, 2)], axis=1)
    rgb32 = np.pad(shifted, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return {"grey 14x14": np.ascontiguousarray(grey[:, :, ::2, ::2]), "grey 28x28": grey,
            "RGB 32x32": rgb32, "RGB 64x64": rgb32.repeat(2, axis=2).repeat(2, axis=3)}


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(images: np.ndarray, batch: int, repeats: int) -> tuple[dict[str, float], bool]:
    """Microseconds per image of each way, and whether the lengths are Pillow's."""
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]
    ours = np.concatenate([batch_png_bits_per_dim(b, 8) for b in batches])
    pillow = np.array([pillow_png_bits(image) for image in images])
    seconds = {
        "batched": best_seconds(lambda: [batch_png_bits_per_dim(b, 8) for b in batches],
                                repeats),
        "filters only": best_seconds(lambda: [_png_filtered_rows(b) for b in batches],
                                     repeats),
        "Pillow": best_seconds(lambda: [pillow_png_bits(i) for i in images], repeats),
    }
    return ({key: 1e6 * value / len(images) for key, value in seconds.items()},
            bool(np.array_equal(ours, pillow)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="images per set (1024)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (256)")
    parser.add_argument("--repeats", type=int, default=5, help="keep the best of (5)")
    args = parser.parse_args()
    setup_logging()
    rows, results = [], {}
    for name, images in image_sets(args.n).items():
        per_image, equal = measure(images, args.batch, args.repeats)
        results[name] = {**per_image, "equal_lengths": equal}
        rows.append([name, f"{per_image['batched']:.1f}", f"{per_image['filters only']:.1f}",
                     f"{per_image['Pillow']:.1f}",
                     f"{per_image['Pillow'] / per_image['batched']:.2f}x", equal])
    print_table(["images", "batched µs/img", "its filters µs/img", "Pillow µs/img",
                 "speed-up", "same lengths"], rows,
                title=f"PNG length, batches of {args.batch}, best of {args.repeats}")
    path = write_results("png_length", torch.device("cpu"),
                         {"n": args.n, "batch": args.batch, "repeats": args.repeats,
                          "microseconds_per_image": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
