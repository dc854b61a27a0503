"""A folder of images scored for calibration or evaluation: every image file found in it,
each with its scores or the reason it cannot be used.

A file that fails to decode is kept as a row with its reason, not dropped: calibration
and evaluation say what they left out (named once in the log, listed in full with their
runs), or a threshold would seem to rest on more of the folder than it does. Each file's
content digest is kept beside its row because the checks of
:mod:`anomaly_flow.prechecks` recognise images by content (a model's training images,
images labelled both ways, copies), not by path. :mod:`anomaly_flow.prechecks` and
:mod:`anomaly_flow.evaluation` both build on :class:`FolderScores`, so it lives below
them both and the dependencies point one way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from anomaly_flow.data import display_path, find_images, one_line
from anomaly_flow.fingerprint import fingerprint_and_digests
from anomaly_flow.glow import Glow
from anomaly_flow.scoring import ScoringDataset, paths_frame, score_dataset

logger = logging.getLogger(__name__)

__all__ = ["MAX_REASONS_LOGGED", "FolderScores", "score_folder_table"]

MAX_REASONS_LOGGED = 10
"""Failed files a folder's warning names with their reasons; the rest it counts."""


@dataclass(frozen=True, eq=False)
class FolderScores:
    """Every image file found in one folder, with its scores or the reason it failed.

    Attributes:
        folder: The folder that was searched (recursively).
        table: One row per file: ``path``, the score columns
            (:func:`~anomaly_flow.scoring.score_names`), ``error`` (empty for images
            that are used; score columns NaN for files that failed to decode).
        fingerprint: SHA-256 of the folder's files (for MLflow tags).
        digests: SHA-256 of each file's content, in row order (empty when unknown).
    """

    folder: Path
    table: pd.DataFrame
    fingerprint: str
    digests: tuple[str, ...] = ()

    @property
    def n_files(self) -> int:
        """Number of image files found."""
        return len(self.table)

    def usable(self, score: str) -> np.ndarray:
        """Boolean mask, shape (n_files,): decoded and with a finite ``score``."""
        values = self.table[score].to_numpy(dtype=np.float64)
        return (self.table["error"].to_numpy() == "") & np.isfinite(values)

    def values(self, score: str) -> np.ndarray:
        """The usable values of ``score``, shape (n,), float64, in file order."""
        return self.table[score].to_numpy(dtype=np.float64)[self.usable(score)]

    def failures(self, score: str = "bpd") -> list[tuple[str, str]]:
        """``(path, reason)`` for every file left out when using ``score``."""
        left_out = ~self.usable(score)
        rows = self.table.loc[left_out, ["path", "error"]]
        return [
            (str(path), str(error) or f"the model gave a non-finite {score} for this image")
            for path, error in rows.itertuples(index=False)
        ]


def score_folder_table(
    model: Glow,
    folder: str | Path,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> FolderScores:
    """Score every image file under ``folder`` with ``model``.

    Files that fail to decode get a row with the reason in ``error`` and NaN scores; one
    warning states how many failed and why (the first ten files with their reasons,
    then how many more). This is the only place a failing file is named in the log:
    :func:`~anomaly_flow.evaluation.calibrate_scores` and
    :func:`~anomaly_flow.evaluation.evaluate_scores` add only where the full list was
    stored.

    Args:
        model: A loaded Glow on its scoring device.
        folder: Folder searched recursively for image files.
        batch_size: Images per forward pass.
        workers: DataLoader worker processes decoding images.
        progress: Progress bar on stderr; None shows it only on a terminal.

    Returns:
        The folder's scores.

    Raises:
        DataError: The folder is missing, not a folder, or holds no image files.
        BatchOutOfMemory: A batch did not fit in memory (the message names the
            batch size to lower).
    """
    root = Path(folder)
    paths = find_images(root)
    config = model.config
    dataset = ScoringDataset(paths, config.mode, config.image_size, config.n_bits,
                             config.levels)
    table = score_dataset(model, dataset, batch_size=batch_size, num_workers=workers,
                          progress=progress)
    table = table.reset_index(drop=True)
    table.insert(0, "path", paths_frame(paths).to_numpy(dtype=object))
    table["error"] = table["error"].fillna("").astype(str)
    folder_digest, digests = fingerprint_and_digests(paths, root)
    scores = FolderScores(root, table, folder_digest, tuple(digests))
    failed = scores.failures("bpd")
    if failed:
        lines = [f"  {one_line(path)}: {reason}"
                 for path, reason in failed[:MAX_REASONS_LOGGED]]
        if len(failed) > MAX_REASONS_LOGGED:
            lines.append(f"  ... and {len(failed) - MAX_REASONS_LOGGED} more")
        logger.warning("%d of %d image files in %s could not be scored and are left out:\n%s",
                       len(failed), len(paths), display_path(root), "\n".join(lines))
    return scores
