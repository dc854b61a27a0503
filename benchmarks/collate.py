"""Worker collates: stacking a batch of images with ``torch.stack`` against
``default_collate`` (which, in a DataLoader worker, stacks straight into shared memory).

A DataLoader over an in-memory uint8 image (the same tensor for every item, so decoding
costs nothing and only the collate and the transfer from the workers are measured), with
``--workers`` workers and batches of ``--batch``: items/s through the loader, best of
``--repeats`` passes over ``--items`` items, for 1×28×28 and 3×64×64 images. Prints a
table and writes JSON under ``benchmarks/results/``.

Example:
    /work/venv/bin/python benchmarks/collate.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

if __package__ in (None, ""):  # run as a script: make `benchmarks.common` importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import print_table, setup_logging, write_results

SHAPES = ((1, 28, 28), (3, 64, 64))


class _SameImage(Dataset):
    def __init__(self, shape: tuple[int, ...], n: int) -> None:
        self.image = torch.randint(0, 256, shape, dtype=torch.uint8)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.image


def _stack(items: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(items))


def items_per_second(shape: tuple[int, ...], collate: Callable[..., torch.Tensor],
                     args: argparse.Namespace) -> float:
    best = float("inf")
    for _ in range(args.repeats):
        loader = DataLoader(_SameImage(shape, args.items), batch_size=args.batch,
                            num_workers=args.workers, collate_fn=collate)
        start = time.perf_counter()
        n = sum(len(batch) for batch in loader)
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_logging()
    rows, results = [], []
    for shape in SHAPES:
        stacked = items_per_second(shape, _stack, args)
        collated = items_per_second(shape, default_collate, args)
        label = "×".join(map(str, shape))
        rows.append([label, f"{stacked:,.0f}", f"{collated:,.0f}", collated / stacked])
        results.append({"shape": list(shape), "stack_items_per_s": stacked,
                        "default_collate_items_per_s": collated})
    print_table(["image", "torch.stack items/s", "default_collate items/s", "ratio"], rows,
                title=f"{args.workers} workers, batch {args.batch}, {args.items:,} items, "
                      f"best of {args.repeats}")
    path = write_results("collate", torch.device("cpu"), {"args": vars(args),
                                                          "results": results})
    print(f"written {path}")


if __name__ == "__main__":
    main()
