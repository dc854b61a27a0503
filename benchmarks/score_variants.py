"""B4 ablation: which score definition separates one-class Fashion-MNIST best.

For each class k, trains the same model as ``oneclass_fmnist.py`` (its defaults for the
device; class k's training images less a held-out 10 %), keeps the exact per-level maps
(log-det and prior log-density per latent position), the latents and the standardised
latents of the held-out ("reference") and test images, and scores the test set with
each variant below. Class k is normal, the nine others anomalous; AUROC per class, mean
and min. The product's scores are among them (``typicality``, ``knn``, ``pixel_knn``,
``ensemble``), so this is the evidence behind :func:`anomaly_flow.scoring.default_score`;
choosing on these test AUROCs makes the winner's figure somewhat optimistic.

Variants (reference = the held-out images; "standardised" = per position, by the
reference's mean and population std + 0.1):

* ``typicality``: the product's (:meth:`Glow.typicality`).
* ``typicality_levels``: mean |z| of each level's log-det and prior maps at their own
  resolution, averaged over the 2L maps.
* ``eps_typicality``: mean |z| of ε = (z − μ_prior) / σ_prior over every latent dimension.
* ``mahalanobis_top``: Mahalanobis distance of the top latent (Ledoit-Wolf covariance).
* ``knn_latent`` / ``knn_eps``: 5-NN distance on the raw latents / on ε.
* ``knn_map_G``: 5-NN distance on the standardised bits map averaged to G×G (28 = none;
  7 is :func:`anomaly_flow.glow.knn_grid`, the product's ``knn``; 4 straddles level
  positions); ``knn_map_7_kK`` with K neighbours; ``knn_map_7_refsN`` with the first N
  reference maps only.
* ``pixel_knn_G``: 5-NN distance on the images themselves (flow inputs, a pixel's range
  1) averaged to G×G, not standardised; ``pixel_knn_7`` is the product's ``pixel_knn``;
  ``pixel_knn_7s`` standardised per position like the maps.
* ``typicality+cc``, ``knn_map_7+cc`` (the product's ``ensemble`` before ``pixel_knn``),
  ``knn_map_7+cc+pixel_knn_7`` (the product's ``ensemble``), ``knn_map_7+pixel_knn_7``,
  ``knn_map_28+typicality_levels+cc``: sums of scores standardised by their mean and std
  over the reference images (leave-one-out for k-NN), cc = ``coarse_complexity``.
* ``pixel_knn_G_all``: ``pixel_knn_G`` against the training images and the reference
  images together (pixels are not fitted by the model, so the training images carry no
  memorisation bias there), standardised by the reference images' distances to the
  training images; its sum with ``knn_map_7`` and cc, once with the pixel term counted
  twice (``knn_map_7+cc+pixel_knn_7_all+pixel_knn_7_all``), and with ``knn_map_7_fit``.

Examples:
    python benchmarks/score_variants.py --device cpu                 # ten 2-epoch models
    python benchmarks/score_variants.py --device cpu --epochs 6 --classes 0,2,4,6,8
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from anomaly_flow.complexity import batch_coarse_png_bits_per_dim, coarse_complexity
from anomaly_flow.data import ArrayDataset, split_train_val
from anomaly_flow.detection import detection_metrics
from anomaly_flow.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from anomaly_flow.glow import (
    REFERENCE_STD_FLOOR,
    FlowOutput,
    Glow,
    breakdown_from_output,
    pool_images,
    preprocess,
)

if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import pick_device, print_table, setup_logging, train_for, write_results
from benchmarks.oneclass_fmnist import build_config

logger = logging.getLogger("benchmarks.score_variants")

PRODUCT = {"typicality": "typicality", "knn_map_7": "knn", "pixel_knn_7": "pixel_knn",
           "knn_map_7+cc+pixel_knn_7": "ensemble"}
"""Variants that are the product's scores (on 28x28 at L=2), and their names there."""


@torch.no_grad()
def flow_parts(model: Glow, images: np.ndarray, batch: int = 1000) -> dict[str, np.ndarray]:
    """For uint8 images ``(N, 1, 28, 28)``, deterministic (bin centres): per level l,
    ``logdet{l}`` and ``prior{l}`` ``(N, H_l, W_l)`` nats, the latent ``z{l}`` and its
    standardised form ``eps{l}`` ``(N, C_l, H_l, W_l)``; and the library's
    ``pixel_bpd`` ``(N, 28, 28)`` and ``level_bits`` ``(N, L)``
    (:func:`anomaly_flow.glow.breakdown_from_output` of the same maps)."""
    parts: dict[str, list[np.ndarray]] = {}
    device = model.device
    for start in range(0, len(images), batch):
        h = preprocess(torch.from_numpy(images[start:start + batch]).to(device),
                       model.config.n_bits)
        out = FlowOutput([], [], [])
        for i, level in enumerate(model.levels):
            h, logdet = level.run_steps(h)
            if level.last:  # the walk of Level.forward, keeping the prior's parameters
                z, mean, log_std = h, level.prior.mean, level.prior.log_std
                prior = level.prior.log_prob_map(z)
            else:
                h, z, prior = level.prior.log_prob_map(h)
                mean, log_std = level.prior._params(h)
            for maps, value in ((out.latents, z), (out.logdet_maps, logdet),
                                (out.prior_maps, prior)):
                maps.append(value)
            parts.setdefault(f"eps{i}", []).append(
                ((z - mean) / torch.exp(log_std)).float().cpu().numpy())
        breakdown = breakdown_from_output(out, model.config)
        for name, values in (("z", out.latents), ("logdet", out.logdet_maps),
                             ("prior", out.prior_maps)):
            for i, value in enumerate(values):
                parts.setdefault(f"{name}{i}", []).append(value.float().cpu().numpy())
        parts.setdefault("pixel_bpd", []).append(breakdown.pixel_bpd.float().cpu().numpy())
        parts.setdefault("level_bits", []).append(breakdown.level_bits.double().cpu().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}


def abs_z(reference: np.ndarray, x: np.ndarray, floor: float) -> np.ndarray:
    """|x − μ| / (σ + floor) with μ, σ per position over the reference (axis 0)."""
    return np.abs((x - reference.mean(0)) / (reference.std(0) + floor))


def knn_distances(reference: np.ndarray, x: np.ndarray | None, k: int = 5,
                  standardise: bool = True) -> np.ndarray:
    """Mean distance of each row of ``x`` to its ``k`` nearest reference rows (flattened);
    with ``x=None``, of each reference row to the others (leave-one-out)."""
    ref = torch.from_numpy(reference.reshape(len(reference), -1)).double()
    queries = ref if x is None else torch.from_numpy(x.reshape(len(x), -1)).double()
    if standardise:
        centre, spread = ref.mean(0), ref.std(0, correction=0) + REFERENCE_STD_FLOOR
        ref, queries = (ref - centre) / spread, (queries - centre) / spread
    distances = torch.cdist(queries, ref)
    if x is None:
        distances.fill_diagonal_(math.inf)
    return distances.topk(min(k, distances.shape[1] - (x is None)), largest=False
                          ).values.mean(1).numpy()


def pooled(maps: np.ndarray, grid: int) -> np.ndarray:
    return F.adaptive_avg_pool2d(torch.from_numpy(maps)[:, None], grid)[:, 0].numpy()


def standardised(reference: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (x - reference.mean()) / reference.std()


def pooled_images(images: np.ndarray, grid: int, n_bits: int) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` as flow inputs averaged to ``(N, C, grid, grid)``."""
    return pool_images(preprocess(torch.from_numpy(images), n_bits), grid).numpy()


def variants(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], levels: int,
             ref_cc: np.ndarray, test_cc: np.ndarray,
             fit_maps: np.ndarray | None = None,
             images: tuple[np.ndarray, np.ndarray, int] | None = None,
             fit_images: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every variant's test scores (higher = more anomalous); ``images`` = (reference
    and test uint8 images, n_bits) adds the ``pixel_knn`` variants."""
    m_ref, m_test = ref["pixel_bpd"], test["pixel_bpd"]
    flat = {name: tuple(np.concatenate([d[f"{name}{i}"].reshape(len(d[f"{name}{i}"]), -1)
                                        for i in range(levels)], 1) for d in (ref, test))
            for name in ("z", "eps")}
    out: dict[str, np.ndarray] = {}
    scores_ref: dict[str, np.ndarray] = {}
    out["typicality"] = abs_z(m_ref, m_test, REFERENCE_STD_FLOOR).mean((1, 2))
    scores_ref["typicality"] = abs_z(m_ref, m_ref, REFERENCE_STD_FLOOR).mean((1, 2))

    def per_level(d: dict[str, np.ndarray]) -> np.ndarray:
        terms = []
        for i in range(levels):
            for part in ("logdet", "prior"):
                r = ref[f"{part}{i}"]
                floor = 1e-3 + 0.1 * float(np.median(r.std(0)))
                terms.append(abs_z(r, d[f"{part}{i}"], floor).mean((1, 2)))
        return np.mean(terms, 0)

    out["typicality_levels"] = per_level(test)
    scores_ref["typicality_levels"] = per_level(ref)
    out["eps_typicality"] = abs_z(flat["eps"][0], flat["eps"][1], 0.1).mean(1)
    top = levels - 1
    ledoit = LedoitWolf().fit(ref[f"z{top}"].reshape(len(m_ref), -1))
    out["mahalanobis_top"] = ledoit.mahalanobis(test[f"z{top}"].reshape(len(m_test), -1))
    out["knn_latent"] = knn_distances(*flat["z"], standardise=False)
    out["knn_eps"] = knn_distances(*flat["eps"], standardise=False)
    for grid in (28, 14, 7, 4):
        r, t = (m_ref, m_test) if grid == 28 else (pooled(m_ref, grid), pooled(m_test, grid))
        out[f"knn_map_{grid}"] = knn_distances(r, t)
        scores_ref[f"knn_map_{grid}"] = knn_distances(r, None)
    r7, t7 = pooled(m_ref, 7), pooled(m_test, 7)
    for k in (1, 3, 10, 20):
        out[f"knn_map_7_k{k}"] = knn_distances(r7, t7, k)
    for n in (30, 100, 300):
        out[f"knn_map_7_refs{n}"] = knn_distances(r7[:n], t7)
    if fit_maps is not None:  # the training images' maps as the k-NN reference
        f7 = pooled(fit_maps, 7)
        out["knn_map_7_fit"] = knn_distances(f7, t7)
        scores_ref["knn_map_7_fit"] = knn_distances(f7, r7)
    out["cc"], scores_ref["cc"] = test_cc, ref_cc
    combos = [("typicality", "cc"), ("knn_map_7", "cc"), ("knn_map_28", "typicality_levels", "cc")]
    if images is not None:
        ref_images, test_images, n_bits = images
        for grid in (28, 14, 7):
            r, t = (pooled_images(x, grid, n_bits) for x in (ref_images, test_images))
            out[f"pixel_knn_{grid}"] = knn_distances(r, t, standardise=False)
            scores_ref[f"pixel_knn_{grid}"] = knn_distances(r, None, standardise=False)
            if grid == 7:
                out["pixel_knn_7s"] = knn_distances(r, t)
        combos += [("knn_map_7", "cc", "pixel_knn_7"), ("knn_map_7", "pixel_knn_7"),
                   ("knn_map_7", "cc", "pixel_knn_14"), ("knn_map_7", "cc", "pixel_knn_28")]
        if fit_images is not None:  # every training image as the pixel k-NN reference
            for grid in (14, 7):
                r, t, f = (pooled_images(x, grid, n_bits)
                           for x in (ref_images, test_images, fit_images))
                both = np.concatenate([f, r])
                name = f"pixel_knn_{grid}_all"
                out[name] = knn_distances(both, t, standardise=False)
                scores_ref[name] = knn_distances(f, r, standardise=False)
                combos += [("knn_map_7", "cc", name)]
                if grid == 7:
                    combos += [("knn_map_7", "cc", name, name)]
                    if fit_maps is not None:
                        combos += [("knn_map_7_fit", "cc", name)]
    if fit_maps is not None:
        combos += [("knn_map_7_fit", "cc"), ("knn_map_7_fit", "typicality", "cc")]
    for combo in combos:
        name = "+".join(combo)
        out[name] = sum(standardised(scores_ref[c], out[c]) for c in combo)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per class (default: oneclass_fmnist.py's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-reference", action="store_true",
                        help="also k-NN against the training images' maps (knn_map_7_fit)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    setup_logging()
    device = pick_device(args.device)
    config = build_config(argparse.Namespace(
        steps_per_level=None, hidden=None, epochs=args.epochs, batch_size=None, lr=None,
        warmup_steps=None, bf16=False, seed=args.seed), device)
    levels, n_bits = config.model.levels, config.model.n_bits
    classes = [int(c) for c in args.classes.split(",")]
    train_all, train_labels = load_fashion_mnist("train")
    test, test_labels = load_fashion_mnist("test")
    test_cpng = batch_coarse_png_bits_per_dim(test, n_bits, levels)

    aurocs: dict[int, dict[str, float]] = {}
    for k in classes:
        tick = time.perf_counter()
        images = train_all[train_labels == k]
        fit_idx, val_idx = split_train_val(len(images), 0.1, args.seed)
        with tempfile.TemporaryDirectory(prefix=f"variants-{k}-") as tmp:
            run = train_for(config, ArrayDataset(images[fit_idx]),
                            ArrayDataset(images[val_idx]), device, None, Path(tmp),
                            check_every=10**9, progress=False)
        model = run.model.eval()
        ref, tst = flow_parts(model, images[val_idx]), flow_parts(model, test)

        ref_cpng = batch_coarse_png_bits_per_dim(images[val_idx], n_bits, levels)
        fit_maps = flow_parts(model, images[fit_idx])["pixel_bpd"] if args.fit_reference \
            else None
        scores = variants(ref, tst, levels, coarse_complexity(ref["level_bits"], ref_cpng),
                          coarse_complexity(tst["level_bits"], test_cpng), fit_maps,
                          (images[val_idx], test, n_bits), images[fit_idx])
        normal = test_labels == k
        aurocs[k] = {name: 100 * detection_metrics(s[normal], s[~normal]).auroc
                     for name, s in scores.items()}
        logger.info("class %d (%s) in %.0f s: %s", k, FASHION_MNIST_CLASSES[k],
                    time.perf_counter() - tick,
                    ", ".join(f"{n} {v:.1f}" for n, v in aurocs[k].items()))

    names = list(aurocs[classes[0]])
    rows = [(f"{name}" + (f" (`{PRODUCT[name]}`)" if name in PRODUCT else ""),
             f"{np.mean([aurocs[k][name] for k in classes]):.2f}",
             f"{np.min([aurocs[k][name] for k in classes]):.1f}",
             *(f"{aurocs[k][name]:.1f}" for k in classes)) for name in names]
    m = config.model
    print_table(["variant", "mean", "min", *(str(k) for k in classes)], rows,
                title=f"B4 score variants, AUROC (%): Glow L={m.levels} K={m.steps_per_level} "
                      f"width {m.hidden_channels}, {config.train.epochs} epoch(s)/class, "
                      f"{device}")
    path = write_results("score_variants", device, {
        "config": config.to_dict(), "classes": classes, "product_names": PRODUCT,
        "auroc": {str(k): v for k, v in aurocs.items()}}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
