"""The whole product on the sample data the package ships, offline, in minutes.

Steps: write the Fashion-MNIST sample as image folders; train a Glow on the normal class
(sneakers) and register it; calibrate a threshold at 1% false-positive rate on held-out
sneakers and promote the model to ``champion``; score a test folder that mixes sneakers
with the nine other classes; evaluate every score type on it (an MLflow run with ROC, PR
and histogram plots); write ``scores.csv``, heatmaps and a self-contained ``report.html``.
"""

from __future__ import annotations

import html
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from anomaly_flow import heatmap, plots, report, tracking
from anomaly_flow.calibration import operating_point, rate_interval, shown_precision
from anomaly_flow.checkpoint import TrainingError
from anomaly_flow.config import load_preset
from anomaly_flow.data import DataError, display_path
from anomaly_flow.detection import DetectionMetrics
from anomaly_flow.distributed import world_size
from anomaly_flow.errors import alike_on_every_process
from anomaly_flow.evaluation import calibrate_model, evaluate_scores
from anomaly_flow.fashion_mnist import SAMPLE_MARKER, write_sample_folders
from anomaly_flow.fingerprint import fingerprint_and_digests
from anomaly_flow.folder_scoring import FolderScores, score_folder
from anomaly_flow.prechecks import leave_out_training_images
from anomaly_flow.score_table import output_lock
from anomaly_flow.scoring import REFERENCE_SCORES
from anomaly_flow.train import resolve_device

logger = logging.getLogger(__name__)

MODEL_NAME = "fashion-sneaker"
TARGET_FPR = 0.01
CPU_PRESET = "small"
GPU_PRESET = "fashion-mnist"
DEMO_MARKER = ".anomaly-flow-demo"
"""The file that marks a folder the demo wrote: only such a folder (or a new or empty
one) is written to, since a second demo replaces what the first left there."""


@dataclass(frozen=True)
class DemoResult:
    """Where the demo put everything, and its headline figures."""

    out: Path
    tracking_uri: str
    model_uri: str
    scores_csv: Path
    report_html: Path
    heatmaps: Path
    auroc: float
    test_fpr: float
    test_tpr: float
    threshold: float
    score_name: str = "bpd"
    """The score the calibration decides on, which ``auroc`` and the threshold are of."""


def run_demo(out: Path, *, preset: str | None = None, device: str = "auto",
             epochs: int | None = None, progress: bool | None = None) -> DemoResult:
    """Run the demo end to end into ``out``; see the module docstring.

    Args:
        out: Output folder (images, ``mlruns/``, ``scores.csv``, ``heatmaps/``,
            ``report.html``).
        preset: Model preset; ``small`` on a CPU, ``fashion-mnist`` when CUDA is there.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        epochs: Override the preset's epochs (e.g. 1 for a smoke run).
        progress: Progress bars; ``None`` shows them on a terminal only.

    Raises:
        ScoringError: Another demo is running in ``out`` (it would delete this one's
            images and tables mid-run).
        TrainingError: Started under torchrun (the demo runs in one process), or the
            model's validation bits/dim was not finite, so it was not registered.
    """
    if world_size() > 1:
        raise alike_on_every_process(TrainingError(
            "the demo runs in one process, not under torchrun; run anomaly-flow demo "
            "alone, and train on several processes with torchrun ... -m anomaly_flow train"))
    resolve_device(device)  # a device this machine lacks: refused before any folder is made
    out = Path(out).resolve()
    tracking.check_store_folder(out / "mlruns")  # before _claim makes the folder
    with output_lock(out, holder="demo", instead="give this one another folder (--out DIR)"):
        return _run_demo(out, preset=preset, device=device, epochs=epochs, progress=progress)


def _run_demo(out: Path, *, preset: str | None, device: str, epochs: int | None,
              progress: bool | None) -> DemoResult:
    """:func:`run_demo` in ``out`` (absolute), once it holds the folder's lock."""
    _claim(out)
    use_cuda = resolve_device(device).type == "cuda"
    preset = preset or (GPU_PRESET if use_cuda else CPU_PRESET)
    config = load_preset(preset).replace(epochs=epochs)
    mlruns = out / "mlruns"
    uri = tracking.configure(mlruns)
    # in a store of the user's (MLFLOW_TRACKING_URI), a model of the same name that the
    # demo did not make keeps its aliases: the demo stops instead
    tracking.claim_model_name(MODEL_NAME, "demo", check=not tracking.uses_default_store())

    logger.info("writing the sample images to %s", out / "data")
    folders = write_sample_folders(out / "data")  # a fresh copy of the sample

    logger.info("training preset %r on %s", preset, folders["train"])
    trained = tracking.train_and_register(folders["train"], MODEL_NAME, config,
                                          device=device, mlruns=mlruns, progress=progress,
                                          restart=True)  # a demo stopped before: anew
    assert trained is not None  # None is a torchrun's other process: refused above
    if trained.version is None:
        raise TrainingError(f"the demo stops before calibrating: {trained.message}")

    logger.info("calibrating at %.0f%% false-positive rate", 100 * TARGET_FPR)
    calibrated = calibrate_model(
        f"models:/{MODEL_NAME}/{trained.version}", folders["calibration"],
        target_fpr=TARGET_FPR, promote=True, device=device, mlruns=mlruns,
        progress=progress,
    )

    # the version just calibrated, which champion names unless another process of a
    # shared store (MLFLOW_TRACKING_URI) has moved it since
    champion = f"models:/{MODEL_NAME}@champion"
    logger.info("scoring %s with %s (alias champion)", folders["test"], calibrated.model_uri)
    loaded = tracking.load_model(calibrated.model_uri, device=device)
    scores_csv, heatmaps = out / "scores.csv", out / "heatmaps"
    shutil.rmtree(heatmaps, ignore_errors=True)
    scores_csv.unlink(missing_ok=True)  # the last demo's: replaced, as the folder says
    score_folder(loaded.model, loaded.calibration, folders["test"], scores_csv,
                 heatmaps=heatmaps, progress=progress)

    table = pd.read_csv(scores_csv, keep_default_na=False, na_values=[""], dtype={"error": str})
    table["error"] = table["error"].fillna("")
    # test/normal/... or test/anomalous/<class>/..., whatever the folders above test/ are
    table["label"] = [Path(path).relative_to(folders["test"]).parts[0]
                      for path in table["path"]]
    # the images the evaluation uses (held out of training, scored) give every figure
    normal = leave_out_training_images(loaded, _folder_scores(table, folders, "normal"),
                                       "evaluation")
    anomalous = _folder_scores(table, folders, "anomalous")
    calibration = loaded.calibration
    score_name = calibration.score_name
    threshold = calibration.threshold.value
    point = operating_point(normal.values(score_name), anomalous.values(score_name),
                            threshold)
    logger.info("evaluating every score type on the test images; writing the report")
    evaluated = evaluate_scores(loaded, normal, anomalous)
    detection = {name: DetectionMetrics(row.auroc, row.aupr, row.fpr_at_95_tpr,
                                        int(row.n_normal), int(row.n_anomalous))
                 for name, row in evaluated.table.iterrows()}
    page = _render(table, folders["test"], heatmaps, detection, point, calibration,
                   preset=preset, model_uri=champion, tracking_uri=uri,
                   val_bpd=trained.val_bpd, calibrate_run=calibrated.run_id,
                   evaluate_run=evaluated.run_id, n_bits=loaded.model.config.n_bits,
                   image_size=loaded.model.config.image_size)
    report_html = report.write_report(out / "report.html", page)
    return DemoResult(out=out, tracking_uri=uri, model_uri=champion, scores_csv=scores_csv,
                      report_html=report_html, heatmaps=heatmaps,
                      auroc=detection[score_name].auroc, test_fpr=point["fpr"],
                      test_tpr=point["tpr"], threshold=threshold, score_name=score_name)


def _claim(out: Path) -> None:
    """Make ``out`` the demo's folder, or refuse: it must be new, empty, or one an
    earlier demo wrote (marked, or holding the sample it wrote before the mark existed),
    since the demo replaces its images, ``scores.csv`` and ``heatmaps/`` there.

    Raises:
        DataError: ``out`` is a file, a folder with someone else's contents, or cannot
            be written.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"{display_path(out)} is a file; give the demo a new or empty "
                        "folder (--out DIR)")
    ours = (out / DEMO_MARKER).is_file() or (out / "data" / SAMPLE_MARKER).is_file()
    if out.is_dir() and not ours and any(out.iterdir()):
        raise DataError(f"{display_path(out)} is not empty and no demo wrote it; the demo "
                        "replaces its images, scores.csv, heatmaps/ and report.html, so give "
                        "it a new or empty folder (--out DIR), or one an earlier demo wrote")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARKER).write_text("Written by `anomaly-flow demo`; a demo run here "
                                       "again replaces data/, scores.csv, heatmaps/ and "
                                       "report.html.\n")
    except OSError as exc:  # a file on the way, a read-only disk, no permission
        raise DataError(f"cannot write the demo's folder {display_path(out)}: "
                        f"{exc.strerror or exc}; give it a writable --out DIR") from None


def _folder_scores(table: pd.DataFrame, folders: dict[str, Path], label: str) -> FolderScores:
    """The rows of ``scores.csv`` under ``test/<label>`` as the folder's scores."""
    rows = table.loc[table["label"] == label].drop(columns="label").reset_index(drop=True)
    folder = folders[f"test_{label}"]
    digest, digests = fingerprint_and_digests([Path(p) for p in rows["path"]], folder)
    return FolderScores(folder, rows, digest, tuple(digests))


def _gallery(rows: pd.DataFrame, test_root: Path, heatmaps: Path,
             drawn: dict[str, tuple[Path, str | None]]) -> list[report.GalleryItem]:
    """The report's cards for ``rows`` of ``scores.csv``, each with the heatmap scoring
    drew of it under ``heatmaps``, found in ``drawn`` (:func:`heatmap.recorded_heatmaps`
    of that folder: by the source each heatmap records, since a name two files would
    share gets another), or none where it drew none."""
    items = []
    for row in rows.itertuples():
        rel = Path(row.path).relative_to(test_root)
        with Image.open(test_root / rel) as img:
            image = np.asarray(img)
        heat = None
        if (found := drawn.get(display_path(rel))) is not None:
            with Image.open(heatmaps / found[0]) as img:
                heat = np.asarray(img.convert("RGB"))
        items.append(report.GalleryItem(
            title=rel.parent.name, image=image, heatmap=heat, score=float(row.score),
            is_anomaly=None if pd.isna(row.is_anomaly) else bool(row.is_anomaly),
            note=rel.name))
    return items


def _per_class(anomalous: pd.DataFrame) -> list[dict[str, object]]:
    """Per class (the folder above each file) of ``scores.csv``'s anomalous rows: its
    images, those scored, and the share of the scored flagged (a failed file has no
    verdict, so it counts in ``images`` only)."""
    classes = anomalous["path"].map(lambda p: Path(p).parent.name)
    rows = []
    for name in sorted(classes.unique()):
        of_class = anomalous.loc[classes == name]
        verdicts = of_class.loc[of_class["error"].fillna("") == "", "is_anomaly"]
        rows.append({"class": name, "images": len(of_class), "scored": len(verdicts),
                     "detected": (f"{verdicts.astype(bool).mean():.1%}" if len(verdicts)
                                  else "none scored")})
    return rows


def _runs_note(tracking_uri: str, calibrate_run: str, evaluate_run: str) -> str:
    """The report's paragraph on where the runs are, as HTML: the store's location is
    text (a demo folder may be named ``a<b>&c``), so it is escaped like every other."""
    command = html.escape(tracking.ui_command(tracking_uri))
    return (f"<p>The runs and the registry: <code>{command}</code>; calibration run "
            f"<code>{html.escape(calibrate_run)}</code>, evaluation run "
            f"<code>{html.escape(evaluate_run)}</code>.</p>")


def _heatmap_caption(score_name: str, *, n_bits: int, image_size: int) -> str:
    """What the galleries' heatmaps draw and how to read their colours: the map scoring
    draws for ``score_name``, on the fixed scale and overlay of :mod:`anomaly_flow.heatmap`
    (``n_bits`` and ``image_size`` are the model's)."""
    if score_name in REFERENCE_SCORES:
        what = ("how far each pixel's bits/dim is from the normal images', in their standard "
                "deviations (bright = unlike a normal image)")
        top, unit = heatmap.TYPICALITY_VMAX, heatmap.UNITS["typicality"]
    else:
        what = "its per-pixel bits/dim (bright = unlikely)"
        top, unit = float(n_bits), heatmap.UNITS["bpd"]
    low, high = heatmap.ALPHA_RANGE
    return (f"Left: the image; right: {what}. The colours are {heatmap.COLORMAP}'s, on one "
            f"fixed scale for every image, so heatmaps compare: black at 0, through purple "
            f"and orange, to yellow at {top:g} {unit} or more. They are drawn over the image "
            f"as the model saw it ({image_size}×{image_size}), more opaque where the value is "
            f"higher ({low:.0%} at 0 to {high:.0%} at {top:g}).")


def _rate_text(rate: float, total: int) -> str:
    """A rate measured on ``total`` images, with the count it is and its 95 % interval: a
    test false-positive rate a little above the target is then seen to be chance."""
    count = round(rate * total)
    low, high = rate_interval(count, total)
    return f"{rate:.4f} ({count} of {total}; 95% interval {low:.4f} to {high:.4f})"


def _render(table: pd.DataFrame, test_root: Path, heatmaps: Path, detection: dict,
            point: dict, calibration, *, preset: str, model_uri: str, tracking_uri: str,
            val_bpd: float, calibrate_run: str, evaluate_run: str, n_bits: int,
            image_size: int) -> str:
    anomalous = table["label"] == "anomalous"
    name = calibration.score_name
    caption = _heatmap_caption(name, n_bits=n_bits, image_size=image_size)
    scored = table[table["error"].fillna("") == ""]
    summary = [
        {"item": "model", "value": model_uri},
        {"item": "preset", "value": preset},
        {"item": "validation bits/dim (training run)", "value": f"{val_bpd:.4f}"},
        {"item": "decision score", "value": name},
        {"item": "threshold (score > threshold is anomalous)",
         "value": f"{calibration.threshold.value:.4f}"},
        {"item": "target false-positive rate", "value": f"{calibration.threshold.alpha}"},
        {"item": "calibration images", "value": calibration.threshold.n_calibration},
        {"item": "achieved false-positive rate on test normals",
         "value": _rate_text(point["fpr"], detection[name].n_normal)},
        {"item": "detection rate (TPR) on test anomalies",
         "value": _rate_text(point["tpr"], detection[name].n_anomalous)},
        {"item": "precision",
         "value": shown_precision(point["precision"], point["tpr"], point["fpr"], ".4f")},
        {"item": f"AUROC ({name})", "value": f"{detection[name].auroc:.4f}"},
        {"item": "test images scored / failed",
         "value": f"{len(scored)} / {len(table) - len(scored)}"},
    ]
    per_score = [{"score": k, "AUROC": f"{m.auroc:.4f}", "AUPR": f"{m.aupr:.4f}",
                  "FPR at 95% TPR": f"{m.fpr_at_95_tpr:.4f}"} for k, m in detection.items()]
    per_class = _per_class(table.loc[anomalous])
    normal_scores = table.loc[~anomalous, name].to_numpy(float)
    anomalous_scores = table.loc[anomalous, name].to_numpy(float)
    figures = {
        "score histogram": plots.score_histogram(
            normal_scores, anomalous_scores, threshold=calibration.threshold.value,
            score_name=name, title="test images: normal vs anomalous"),
        "ROC": plots.roc_curves(
            {k: (table.loc[~anomalous, k].to_numpy(float),
                 table.loc[anomalous, k].to_numpy(float)) for k in detection},
            operating_points={name: (point["fpr"], point["tpr"])}),
    }
    ranked = scored.sort_values("score", ascending=False)
    n_shown = min(12, len(ranked) // 2)  # a small table shows no image in both galleries
    drawn = heatmap.recorded_heatmaps(heatmaps)
    how = _runs_note(tracking_uri, calibrate_run, evaluate_run)
    return report.render_report(
        "anomaly-flow demo: Fashion-MNIST sneakers",
        "A Glow trained on sneakers only; every other class is an anomaly.",
        [
            ("Summary", report.table_section(summary) + how),
            ("Every score", report.table_section(per_score)),
            ("Detection rate per anomalous class", report.table_section(per_class)),
            ("Figures", report.figures_section(figures)),
            ("Most anomalous test images", report.gallery_section(
                _gallery(ranked.head(n_shown), test_root, heatmaps, drawn), caption)),
            ("Least anomalous test images", report.gallery_section(
                _gallery(ranked.iloc[::-1].head(n_shown), test_root, heatmaps, drawn), caption)),
        ],
    )
