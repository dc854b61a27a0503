"""Batch invariance of the scores on this CPU (or a GPU, ``--device cuda``): how many
images get other float32 bits when scored in small batches than in one large batch,
unpadded and as scoring pads them.

A Glow with ``--hidden``-wide couplings (weights perturbed, so the couplings are not the
identity) scores ``--images`` Fashion-MNIST sample images in one batch, then in batches
of each size of ``--sizes``, with torch on each thread count of ``--threads`` (on the
CPU). Both ways compute in exact float32 (no TF32 on a GPU). "unpadded"
runs the model on the short batches as they are; "scoring" goes through
:func:`anomaly_flow.scoring.score_images`, which pads a batch shorter than
``scoring._min_batch`` with blank images. Prints, per thread count and batch size, the
images whose bits/dim differ from the large batch's, and writes JSON under
``benchmarks/results/``.

Examples:
    /work/venv/bin/python benchmarks/batch_invariance.py
    python3 benchmarks/batch_invariance.py --device cuda
"""

from __future__ import annotations

import argparse

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anomaly_flow import scoring
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import ArrayDataset
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.glow import Glow, breakdown_from_output, preprocess
from benchmarks.common import pick_device, print_table, setup_logging, write_results


def unpadded_bpd(model: Glow, images: torch.Tensor) -> torch.Tensor:
    """bits/dim of ``images`` by the scoring computation, without any padding (on the
    CPU, float32)."""
    with scoring.numerics(model, "float32"), torch.inference_mode():
        out = model(preprocess(images, model.config.n_bits))
        return breakdown_from_output(out, model.config, False).bpd.float().cpu()


def differing(score: object, images: torch.Tensor, size: int,
              reference: torch.Tensor) -> int:
    parts = [score(images[i:i + size]) for i in range(0, len(images), size)]  # type: ignore[operator]
    return int((torch.cat(parts) != reference).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=96)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 7, 15, 16, 64])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args()
    setup_logging()
    device = pick_device(args.device)
    config = GlowConfig(image_size=28, levels=2, steps_per_level=2,
                        hidden_channels=args.hidden)
    torch.manual_seed(1)
    model = Glow(config)
    images = ArrayDataset(load_sample().train[:args.images], config.mode,
                          config.image_size, config.resize).images
    model.initialize(preprocess(images[:64], config.n_bits))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model.eval().to(device)
    images = images.to(device)
    thread_counts = args.threads if device.type == "cpu" else [torch.get_num_threads()]

    saved = torch.get_num_threads()
    rows, results = [], []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            reference = unpadded_bpd(model, images)
            padded_to = scoring._min_batch(images.device)
            for size in args.sizes:
                raw = differing(lambda x: unpadded_bpd(model, x), images, size, reference)
                scored = differing(lambda x: scoring.score_images(model, x).bpd.float(),
                                   images, size, reference)
                rows.append([threads, size, padded_to, raw, scored])
                results.append({"threads": threads, "batch": size, "padded_to": padded_to,
                                "differ_unpadded": raw, "differ_scoring": scored})
    finally:
        torch.set_num_threads(saved)
    print_table(["threads", "batch", "scoring pads to", "differ unpadded", "differ scoring"],
                rows, title=f"{args.images} images, hidden {args.hidden}, {device}: images "
                            f"whose bits/dim differ from one batch of {args.images}")
    path = write_results("batch_invariance", device,
                         {"args": vars(args), "results": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
