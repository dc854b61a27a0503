"""Every image file under a folder scored, each with its scores or the reason it has none:
into a table file by the ``anomaly-flow score`` job (written atomically, resumable after a
kill, with optional heatmaps), or into memory for calibration and evaluation.

:func:`score_folder` answers every file: one row per image file found, in sorted path
order, with scores or, for a file that cannot be read, the reason in ``error`` (such a
file never stops the run); a folder that cannot be listed is named in the
:class:`ScoreSummary`, since its images can have no row. The scoring itself (batches,
numerics, decisions) is :mod:`anomaly_flow.scoring`'s, the table's format and atomic
writes :mod:`anomaly_flow.score_table`'s; this module is the run around them.

A run of hours is worth keeping when it is stopped: the partial table (the rows done so
far, in order) is rewritten every :data:`FLUSH_EVERY_S` seconds or more, and once more
when the run is interrupted or fails. Each write replaces the table in one rename, so
whatever stops the run, even mid-write, leaves a complete table.

``resume`` scores only the files missing from that table and ends with the table an
uninterrupted run would have written: the same rows in the same order, with the same
numbers, since scoring gives a file the same bits in a batch of any size (on the same
device, precision and thread count). A kept row must still be what scoring its file
now would give, so files modified or replaced since the table was written are scored
again, rows of files gone are dropped, and a few kept files are scored again to check
that the same model and precision made the table (:data:`RESUME_PROBES`); a table of
another folder, model or precision is refused rather than mixed in.

Heatmaps go to a folder apart from the scored one (inside it, the next run would score
them as images), one PNG per scored image, named so that a file scored in a resumed
run gets the name an uninterrupted run gives it and never a kept file's.

:func:`score_folder_table` is the same answer held in memory, as :class:`FolderScores`,
for :mod:`anomaly_flow.evaluation` and :mod:`anomaly_flow.prechecks`: a file that fails
to decode stays a row with its reason, so calibration and evaluation can say what they
left out (named once in the log, listed in full with their runs), or a threshold would
seem to rest on more of the folder than it does. Each file's content digest is kept
beside its row because the checks of :mod:`anomaly_flow.prechecks` recognise images by
content (a model's training images, images labelled both ways, copies), not by path.

Example:
    >>> model = Glow.load("my-model")  # doctest: +SKIP
    >>> summary = score_folder(model, None, Path("parts/"), Path("scores.csv"))  # doctest: +SKIP
    >>> summary.n_scored, summary.n_failed  # doctest: +SKIP
    (980, 2)
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from anomaly_flow.calibration import check_fitted_to
from anomaly_flow.data import display_path, undisplayed_path
from anomaly_flow.errors import one_line
from anomaly_flow.fingerprint import fingerprint_and_digests
from anomaly_flow.folders import find_images, is_store, search_images, unlisted_advice
from anomaly_flow.glow import Glow
from anomaly_flow.score_kinds import REFERENCE_SCORES
from anomaly_flow.score_table import (
    OutputWriteError,
    ScoringError,
    check_writable,
    output_format,
    output_lock,
    read_table,
    temporary_names,
    write_or_keep,
)
from anomaly_flow.scoring import (
    BatchOutOfMemory,
    HeatmapKind,
    Precision,
    ScoringDataset,
    apply_calibration,
    check_batch_size,
    check_initialized,
    check_precision,
    output_columns,
    paths_frame,
    score_dataset,
    score_names,
)
from anomaly_flow.stopping import remove_leftovers
from anomaly_flow.survey import conversion_notes

if TYPE_CHECKING:
    from anomaly_flow.config import GlowConfig
    from anomaly_flow.heatmap import HeatmapWriter

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 60.0
"""A long run rewrites its partial table at least this many seconds apart (see
:func:`score_folder`), so a killed run leaves something to ``resume`` from."""

FAILURES_KEPT = 10
"""How many failed files a :class:`ScoreSummary` names."""


@dataclass(frozen=True)
class ScoreSummary:
    """What :func:`score_folder` did.

    Attributes:
        n_files: Image files found (= rows written).
        n_scored: Rows with scores (this run's and resumed ones).
        n_failed: Rows with an ``error`` instead of scores.
        n_anomalous: Rows with ``is_anomaly`` true; None when the model is uncalibrated.
        out: The table written.
        n_resumed: Rows taken over from the earlier output (``resume``).
        heatmaps: Where heatmaps were written, or None.
        n_heatmaps: Heatmap files written in this run.
        heatmap_failures: Heatmaps this run could not write (a full disk, a name taken
            by another file), and the first one's path and reason.
        failures: ``(path, reason)`` of the first :data:`FAILURES_KEPT` failed rows.
        unlisted: ``(folder, reason)`` of the folders under the scored one that could not
            be listed: the images inside them have no row.
    """

    n_files: int
    n_scored: int
    n_failed: int
    n_anomalous: int | None
    out: Path
    n_resumed: int = 0
    heatmaps: Path | None = None
    n_heatmaps: int = 0
    heatmap_failures: tuple[int, str | None] = (0, None)
    failures: tuple[tuple[str, str], ...] = ()
    unlisted: tuple[tuple[str, str], ...] = ()


def score_folder(
    model: Glow,
    calibration: Any | None,
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    heatmaps: str | os.PathLike[str] | None = None,
    resume: bool = False,
    fdr: float | None = None,
    progress: bool | None = None,
    flush_every_s: float = FLUSH_EVERY_S,
    precision: Precision = "float32",
    compile: bool = False,
    heatmap_kind: HeatmapKind | Literal["auto"] = "auto",
) -> ScoreSummary:
    """Score every image file under ``folder`` into one table at ``out``.

    One row per file found (:func:`anomaly_flow.folders.search_images`), in sorted path order,
    with columns ``path`` (absolute; non-UTF-8 bytes as ``\\xff`` escapes), ``bpd``,
    ``complexity``, ``coarse_complexity``, ``typicality``, ``knn``, ``pixel_knn``,
    ``ensemble`` (models with a normal reference), ``level_1..level_L`` (bits/dim), ``score``
    (the calibration's score, or ``bpd`` when uncalibrated), ``p_value`` and
    ``is_anomaly`` (filled when calibrated) and ``error`` (empty for scored files, else
    a one-line reason; the score columns are then empty). A file that cannot be read
    never stops the run; a folder that cannot be listed is named in the summary's
    ``unlisted``, since its images can have no row.

    The table is written atomically. During a long run the partial table (the rows done
    so far, in order) is rewritten every ``flush_every_s`` seconds or more (at least ten
    times as long as the last write took), and when the run is interrupted
    (``KeyboardInterrupt``, which the CLI also raises on SIGTERM); ``resume=True`` then
    scores only the files missing from it.

    The same file gets the same numbers in every run on the same device, precision and
    thread count, in a batch of any size or composition (a resumed run, a one-image
    batch; see :func:`anomaly_flow.scoring._min_batch`): bit for bit on the CPUs this was
    measured and tested on. Another CPU model or another number of threads may change the
    last bit.

    Args:
        model: The flow, already on its scoring device.
        calibration: An :class:`anomaly_flow.calibration.Calibration`, or None.
        folder: Folder searched recursively for image files.
        out: Output file, ``.csv`` or ``.parquet``.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes that decode images.
        heatmaps: Folder for one heatmap PNG per scored image (same relative path,
            ``.png`` suffix; see :mod:`anomaly_flow.heatmap`), or None; ``heatmap_kind``
            says which map.
        resume: Keep the rows of an existing ``out`` and score only the missing files.
            Rows that failed before are kept as they are (run without ``resume`` to
            retry them). Decisions (``p_value``, ``is_anomaly``) are recomputed for all.
            A table from before a newer score
            (:data:`~anomaly_flow.score_table.LATER_SCORES`) has its scored files scored
            again, to fill that column in (see :func:`~anomaly_flow.score_table.read_table`).
        fdr: Decide by Benjamini-Hochberg at this false discovery rate over the whole
            table instead of the calibration's threshold.
        progress: Progress bar on stderr; None shows it only on a terminal.
        flush_every_s: Least time between two writes of the partial table; ``inf``
            writes only at the end (and on interruption), ``0`` after every batch.
        precision: ``float32`` (exact, the default), ``tf32`` or ``bf16`` (faster on a
            GPU, approximate); see :func:`~anomaly_flow.scoring.numerics`. Resume with the
            same precision.
        compile: Run the flow compiled (see :func:`~anomaly_flow.scoring.score_dataset`):
            for big folders; the scores move by a few millionths of their size.
        heatmap_kind: ``bpd``: the per-pixel bits/dim (the exact decomposition of
            ``-log p(x)``); ``typicality``: its per-pixel typicality terms, how far each
            pixel's bits/dim is from the normal images' (needs the model's normal
            reference); ``auto`` (default): the map of the deciding score,
            ``typicality`` when the calibration decides by ``typicality``, ``knn``,
            ``pixel_knn`` or ``ensemble``, else ``bpd``.

    Returns:
        Counts of the rows written.

    Raises:
        DataError: The folder is missing, not a folder, or holds no image files.
        CalibrationError: ``calibration`` was fitted to a model with other weights
            (:attr:`~anomaly_flow.calibration.Calibration.model_digest`).
        ScoringError: ``batch_size`` is not a whole number >= 1; the model was never
            initialised (:attr:`Glow.initialized`: it has learned nothing); the output
            cannot be written; the earlier output cannot be resumed from (unreadable, other
            columns, another model or precision scored it, none of its rows is under
            ``folder``, or resuming would drop rows of files that still exist outside it,
            or may still exist in a subfolder that cannot be listed now or is now left out
            as an MLflow store); two files' names print alike;
            ``fdr`` is given for an uncalibrated model; or typicality heatmaps for a
            model without a normal reference; or a batch ran out of memory (the rows
            done before it are kept, and the message names the batch size to lower).
    """
    # The table's modification time is set back to this moment, before any file or an
    # earlier table is looked at: a file changed while the run goes on is then newer than
    # the table, and a later --resume reads it again.
    started_ns = time.time_ns()
    out = Path(out)
    if out.is_symlink():  # replace the file the link names, not the link
        out = Path(os.path.realpath(out))
    output_format(out)
    check_writable(out, resume=resume)
    check_precision(precision)
    check_batch_size(batch_size)
    check_initialized(model)
    digest = model.digest()  # once: each is a copy of every weight to the host
    if calibration is not None:
        check_fitted_to(calibration, digest, advice=(
            "score with the calibration loaded with this model (load_model(URI).calibration),"
            " or calibrate this model (anomaly-flow calibrate)"))
    if heatmaps is not None and os.path.realpath(heatmaps) == os.path.realpath(out):
        raise ScoringError(f"the heatmap folder and the output are one path, "
                           f"{display_path(out)}; give the heatmaps a folder of their own "
                           "(--heatmaps DIR)")
    heatmaps_lock = contextlib.nullcontext() if heatmaps is None else output_lock(
        Path(heatmaps), instead="choose another heatmap folder (--heatmaps)")
    with output_lock(out), heatmaps_lock:
        return _score_folder(model, calibration, folder, out, batch_size=batch_size,
                             num_workers=num_workers, heatmaps=heatmaps, resume=resume,
                             fdr=fdr, progress=progress, flush_every_s=flush_every_s,
                             precision=precision, compile=compile,
                             heatmap_kind=heatmap_kind, started_ns=started_ns,
                             digest=digest)


def _score_folder(model: Glow, calibration: Any | None, folder: str | os.PathLike[str],
                  out: Path, *, batch_size: int, num_workers: int,
                  heatmaps: str | os.PathLike[str] | None, resume: bool, fdr: float | None,
                  progress: bool | None, flush_every_s: float, precision: Precision,
                  compile: bool, heatmap_kind: HeatmapKind | Literal["auto"],
                  started_ns: int, digest: str) -> ScoreSummary:
    """:func:`score_folder` once its arguments are checked, the output's lock held
    (``digest``: the model's :meth:`~anomaly_flow.glow.Glow.digest`)."""
    removed = remove_leftovers(out.parent, temporary_names(out))
    if removed:
        logger.info("removed %d unfinished copy(ies) of %s that a killed run left",
                    removed, display_path(out))
    if fdr is not None and calibration is None:
        apply_calibration(pd.DataFrame({"bpd": []}), None, fdr)  # raises the explanation
    if calibration is not None:  # a score the model does not give: fail before scoring
        apply_calibration(pd.DataFrame({name: [] for name in score_names(model)}),
                          calibration, fdr)
    maps: HeatmapKind = "bpd"
    if heatmaps is not None:
        maps = _resolve_heatmap_kind(heatmap_kind, model, calibration)
    root = Path(os.path.abspath(folder))
    paths, unlisted, linked = search_images(root)
    if heatmaps is not None:
        _check_heatmaps_apart(Path(heatmaps), root, linked)
    keys = [display_path(p) for p in paths]
    _check_names_apart(keys, root)
    config = model.config

    files = dict(zip(keys, paths, strict=True))
    previous = (_previous_rows(out, score_names(model), files, root, unlisted) if resume
                else None)
    if previous is not None:
        _check_same_scores(model, previous, files, out, precision)
    done = previous.index if previous is not None else pd.Index([], dtype="string")
    new = [i for i, key in enumerate(keys) if key not in done]
    earlier: _EarlierHeatmaps | None = None
    redraw: list[int] = []  # kept rows scored again to draw their heatmaps (kept till then)
    if heatmaps is not None:
        earlier = _earlier_heatmaps(Path(heatmaps), root, paths, keys, previous, digest)
        redraw = _without_heatmaps(previous, earlier, keys, out, Path(heatmaps))
    todo = sorted(new + redraw)
    if previous is not None:
        logger.info("resuming: %d of %d files already in %s, scoring %d%s", len(previous),
                    len(keys), display_path(out), len(new),
                    f" (and {len(redraw)} again, to draw their heatmaps)" if redraw else "")
    elif out.exists():
        logger.warning("replacing the earlier output %s (resuming, --resume, would keep its rows)",
                       display_path(out))
    _warn_conversion(model, root, [paths[i] for i in new], only_new=len(new) < len(keys))

    writer = None
    if heatmaps is not None:
        assert earlier is not None  # found with the heatmaps above
        writer = _heatmap_writer(heatmaps, todo, earlier, maps, config)

    def write(table: pd.DataFrame) -> None:
        write_or_keep(table, out, modified_ns=started_ns)

    rows = _Rows(keys, todo, previous, output_columns(model), calibration, fdr)
    flush = _Flusher(flush_every_s)

    def on_batch(frame: pd.DataFrame) -> None:
        rows.add(frame)
        if flush.due():
            with flush.timing():
                write(rows.table())

    dataset = ScoringDataset([paths[i] for i in todo], config)
    layered: list[int] = []
    try:
        if todo:
            score_dataset(model, dataset, batch_size=batch_size, num_workers=num_workers,
                          heatmaps=writer, heatmap_kind=maps, progress=progress,
                          on_batch=on_batch, precision=precision, compile=compile,
                          layered=layered)
    except BaseException as stop:  # what is scored is kept, whatever stopped the run
        if isinstance(stop, OutputWriteError):  # a flush failed: it said where rows went
            raise
        ran_out = stop if isinstance(stop, BatchOutOfMemory) else None
        kept = ""
        if rows.frames:
            interrupted = isinstance(stop, KeyboardInterrupt)
            so_far = rows.table()
            try:
                write(so_far)
            except Exception as failed:
                if interrupted:
                    raise
                logger.warning("could not keep the %d rows scored before the error in %s "
                               "either: %s", rows.n_new, display_path(out), failed)
                raise stop from failed  # the stop first; what the write met, as its cause
            kept = f"{len(so_far)} of {len(keys)} files are in {display_path(out)}"
            if ran_out is None:  # the error below says it all
                logger.warning(
                    "%s: %s%s", "interrupted" if interrupted else "stopped by an error", kept,
                    "" if interrupted  # the command's own line says what next
                    else "; once the error is dealt with, run again with resume (--resume) "
                    "to score the rest")
        elif len(done):  # nothing new, but the output still holds the rows kept from before
            kept = f"{len(done)} of {len(keys)} files are in {display_path(out)}"
        if ran_out is not None:  # said again with the rows the output holds
            raise ScoringError(ran_out.advice(kept)) from None
        raise
    finally:
        if writer is not None:
            writer.close()

    if writer is not None:  # a file that fails now keeps no heatmap from an earlier run
        failed_now = [int(i) for frame in rows.frames
                      for i in frame.index[frame["error"].fillna("") != ""]]
        removed = writer.discard(failed_now)
        if removed:
            logger.warning("removed %d heatmap(s) an earlier run drew of files that cannot "
                           "be scored now", removed)
    table = rows.table()
    write(table)
    _warn_first_frames([paths[todo[i]] for i in layered])
    failed = table["error"] != ""
    return ScoreSummary(
        n_files=len(table),
        n_scored=int((~failed).sum()),
        n_failed=int(failed.sum()),
        n_anomalous=None if calibration is None else int(table["is_anomaly"].fillna(False).sum()),
        out=out,
        n_resumed=len(done) - len(redraw),
        heatmaps=None if heatmaps is None else Path(heatmaps),
        n_heatmaps=0 if writer is None else writer.n_written,
        heatmap_failures=(0, None) if writer is None else (writer.n_failed,
                                                            writer.first_failure),
        failures=tuple(
            (str(path), str(error))
            for path, error in table.loc[failed, ["path", "error"]].head(FAILURES_KEPT)
            .itertuples(index=False)
        ),
        unlisted=tuple((display_path(folder), reason) for folder, reason in unlisted),
    )


def _check_names_apart(keys: Sequence[str], root: Path) -> None:
    """Refuse two files under ``root`` whose rows' paths (``keys``) print alike: a name
    that is not UTF-8 printed like one that is, whose rows would merge."""
    clash = pd.Index(keys).duplicated()
    if clash.any():
        raise ScoringError(
            f"two files under {display_path(root)} print as the same name, "
            f"{keys[int(np.flatnonzero(clash)[0])]} (one name is not valid UTF-8 and its "
            "bytes are shown as \\x escapes, the other has those characters); rename one "
            "of them, or their rows could not be told apart")


class _Rows:
    """The table's rows, in the order of the files found (``keys``): the earlier output's
    kept rows (``previous``, or None) and this run's batches for the files ``todo``
    (indices into ``keys``) as they come, with ``columns`` and the calibration's
    decisions for every row."""

    def __init__(self, keys: Sequence[str], todo: Sequence[int],
                 previous: pd.DataFrame | None, columns: list[str], calibration: Any | None,
                 fdr: float | None) -> None:
        self.columns, self.calibration, self.fdr = columns, calibration, fdr
        self.todo_keys = np.array([keys[i] for i in todo], dtype=object)
        self.todo_positions = np.asarray(todo, dtype=np.int64)  # each todo item's place in `keys`
        self.frames: list[pd.DataFrame] = []
        # Rows go out in `keys` order; the earlier rows' places are looked up once.
        self.kept: tuple[pd.DataFrame, np.ndarray] | None = None
        if previous is not None and len(previous):
            place = {key: i for i, key in enumerate(keys)}
            self.kept = (previous.reset_index(), np.fromiter(
                (place[k] for k in previous.index), np.int64, len(previous)))

    def add(self, frame: pd.DataFrame) -> None:
        """A batch's rows (:func:`~anomaly_flow.scoring.score_dataset`'s ``on_batch``)."""
        self.frames.append(frame)

    @property
    def n_new(self) -> int:
        """Rows this run scored so far."""
        return sum(map(len, self.frames))

    def table(self) -> pd.DataFrame:
        """The table so far: a kept row scored again (to draw its heatmap) is there once,
        as kept until its new row comes."""
        pieces = []
        for frame in self.frames:
            rows = frame.index.to_numpy()
            frame = frame.copy()
            frame.insert(0, "path", self.todo_keys[rows])
            pieces.append((frame, self.todo_positions[rows]))
        if self.kept is not None:
            kept, at = self.kept
            new_at = np.concatenate([at for _, at in pieces]) if pieces else at[:0]
            still = ~np.isin(at, new_at)
            pieces.insert(0, (kept[still], at[still]))
        pieces = [(frame, at) for frame, at in pieces if len(frame)]
        columns = self.columns
        if pieces:
            table = pd.concat([frame for frame, _ in pieces], ignore_index=True)
            table = table.iloc[np.argsort(np.concatenate([at for _, at in pieces]),
                                          kind="stable")]
        else:
            table = pd.DataFrame({c: [] for c in ["path", *columns[1:-4], "error"]})
        table = apply_calibration(table.reset_index(drop=True), self.calibration, self.fdr)
        table["path"] = table["path"].astype("string")
        table["error"] = table["error"].fillna("").astype("string")
        return table[columns]


def _warn_first_frames(files: Sequence[Path]) -> None:
    """Say that ``files`` hold frames or pages after the first, and were each scored by
    their first: the others have no row."""
    if files:
        logger.warning("%d scored file(s) hold several frames or pages (an animated GIF, PNG "
                       "or WebP, a multi-page TIFF), and only the first of each was scored "
                       "(e.g. %s); to score the others, save each frame as an image file of "
                       "its own", len(files), one_line(display_path(min(files))))


def _warn_conversion(model: Glow, root: Path, paths: Sequence[Path], *,
                     only_new: bool = False) -> None:
    """Warn of what converting the images of ``paths`` (under ``root``; with ``only_new``,
    the files a resumed run has left to score, which the notes then speak of) to
    ``model``'s input loses, as training says it of its own folder; resizing is
    training's concern (its folder set the size), sizes the model never trained on are
    not."""
    config = model.config
    files = "file" if len(paths) == 1 else "files"
    where = display_path(root) + (f" (the {len(paths)} {files} not scored before)"
                                  if only_new else "")
    for note in conversion_notes(paths, config.mode, config.image_size, resizing=False,
                                 training=False, resize=config.resize,
                                 trained_shapes=model.training_shapes):
        logger.warning("%s: %s", where, note)


def _heatmap_writer(heatmaps: str | os.PathLike[str], todo: Sequence[int],
                    earlier: _EarlierHeatmaps, maps: HeatmapKind,
                    config: GlowConfig) -> HeatmapWriter:
    """The writer of this run's heatmaps (``maps``) under ``heatmaps``: one for each file
    whose index is in ``todo``, for a model of ``config`` (its ``n_bits`` tops the scale,
    its ``resize`` says how to put each heatmap back in its file's shape). On resuming
    (``earlier``: the heatmaps the kept files have), it says which kept files keep a
    heatmap under another name, and whether the kept ones draw another map. Removes the
    unfinished heatmaps a killed run left."""
    from anomaly_flow.heatmap import TYPICALITY_VMAX, HeatmapWriter, resumed_names

    every_name, held, sources = earlier.every_name, earlier.held, earlier.sources
    names = resumed_names(every_name, held, todo)
    _check_heatmaps_own(Path(heatmaps), names, earlier.scored_folder)
    renamed = [i for i in earlier.kept if i in held and held[i] != every_name[i]]
    if renamed:
        logger.warning(
            "%d kept file(s) keep the heatmap an earlier run wrote, under another name "
            "than a run over the folder as it is now would give (e.g. %s's heatmap is "
            "%s); run without --resume for a fresh set of names", len(renamed),
            one_line(sources[renamed[0]]),
            one_line(display_path(Path(heatmaps) / held[renamed[0]])))
    other_kinds = sorted(earlier.kinds - {maps})
    if todo and other_kinds:
        logger.warning("the kept heatmaps under %s draw %s, and this run draws %s: the "
                       "folder would mix colour scales; resume with --heatmap-kind %s, "
                       "or run without --resume for one kind", display_path(heatmaps),
                       " and ".join(other_kinds), maps, other_kinds[0])
    elif other_kinds:
        logger.warning("the kept heatmaps under %s draw %s, not %s, and no file is left "
                       "to score, so none is drawn again; run without --resume to draw "
                       "them all as %s", display_path(heatmaps),
                       " and ".join(other_kinds), maps, maps)
    vmax = TYPICALITY_VMAX if maps == "typicality" else float(config.n_bits)
    writer = HeatmapWriter(Path(heatmaps), names, vmin=0.0, vmax=vmax, quantity=maps,
                           sources=[sources[i] for i in todo],
                           scored_folder=earlier.scored_folder, model=earlier.model,
                           resize=config.resize)
    removed = writer.remove_leftovers()
    if removed:
        logger.info("removed %d unfinished heatmap(s) that a killed run left under %s",
                    removed, display_path(heatmaps))
    return writer


def _check_heatmaps_own(folder: Path, names: Sequence[Path], scored_folder: str) -> None:
    """Refuse, before scoring, to draw over heatmaps that another scored folder's run drew
    under ``folder`` (two folders whose files share relative names, such as ``0001.png``,
    given one heatmap folder): the first folder's heatmaps were replaced without a word.
    Only the ``names`` this run writes that exist are read."""
    from anomaly_flow.heatmap import heatmap_mark

    theirs = [(name, other) for name in names
              if os.path.lexists(folder / name)
              and (other := heatmap_mark(folder / name).folder) not in (None, scored_folder)]
    if theirs:
        name, other = theirs[0]
        raise ScoringError(
            f"the heatmap folder {display_path(folder)} holds heatmaps of another scored "
            f"folder's files under {len(theirs)} of the names this run would draw (e.g. "
            f"{one_line(display_path(name))}, of a file in {one_line(other)}); give each "
            "scored folder its own heatmap folder (e.g. a subfolder named after it), or "
            "delete those heatmaps (if this folder was moved there since, they are its own "
            "from before)")


class _EarlierHeatmaps(NamedTuple):
    """The heatmaps of a run's files: what they are called, and what earlier runs drew.

    Attributes:
        scored_folder: The scored folder itself, by whatever path it was reached (a
            symlink, another mount), as heatmaps record it.
        sources: Each file's path under the scored folder, as heatmaps record it.
        every_name: Each file's heatmap name in a run over the folder as it is now (named
            over every file, so a file scored now gets the name an uninterrupted run
            gives it, and never the name of a kept file's heatmap: x.bmp added beside an
            earlier x.png).
        held: By file index, the heatmap an earlier run drew of the file, relative to the
            heatmap folder.
        kinds: What the kept files' recorded heatmaps draw (``bpd``, ``typicality``).
        kept: The files whose rows the run keeps.
        model: The digest of the run's model, as heatmaps record it; another model's
            heatmap of a kept file is not held (it is drawn again).
    """

    scored_folder: str
    sources: list[str]
    every_name: list[Path]
    held: dict[int, Path]
    kinds: set[str]
    kept: list[int]
    model: str


def _earlier_heatmaps(folder: Path, root: Path, paths: Sequence[Path], keys: Sequence[str],
                      previous: pd.DataFrame | None, model: str) -> _EarlierHeatmaps:
    """The heatmaps under ``folder`` of the files ``paths`` (found under ``root``, their
    rows' paths ``keys``; ``previous``: the rows a resumed run keeps, or None), for a run
    of the model whose digest is ``model``. An earlier run's heatmap of a file is found
    by the source (and the scored folder, and the model) it records;
    for a kept file whose heatmap, from a version that recorded neither, sits under the
    file's name now or its plain name (``x.png`` for ``x.bmp``) where no recorded heatmap
    claims it, that."""
    from anomaly_flow.heatmap import heatmap_mark, heatmap_names, recorded_heatmaps

    scored_folder = display_path(os.path.normcase(os.path.realpath(root)))
    relative = [path.relative_to(root) for path in paths]
    sources = [display_path(path) for path in relative]
    every_name = heatmap_names(relative)
    if previous is None:
        return _EarlierHeatmaps(scored_folder, sources, every_name, {}, set(), [], model)
    kept = [i for i, key in enumerate(keys) if key in previous.index]
    recorded = recorded_heatmaps(folder, scored_folder, model)
    held = {i: recorded[source][0] for i, source in enumerate(sources) if source in recorded}
    kinds = {kind for i in kept if sources[i] in recorded
             and (kind := recorded[sources[i]][1]) is not None}
    claimed = {name for name, _ in recorded.values()}
    for i in kept:
        if i in held:
            continue
        for name in (every_name[i], relative[i].with_suffix(".png")):
            if name in claimed:
                continue
            mark = heatmap_mark(folder / name)
            if mark.is_heatmap and mark.drawn_for(scored_folder, model):
                held[i] = name
                claimed.add(name)
                break
    return _EarlierHeatmaps(scored_folder, sources, every_name, held, kinds, kept, model)


def _without_heatmaps(previous: pd.DataFrame | None, earlier: _EarlierHeatmaps,
                      keys: Sequence[str], out: Path, heatmaps: Path) -> list[int]:
    """The kept files (indices into ``keys``) whose scored rows in ``previous`` have no
    heatmap of this model (an earlier run without ``heatmaps``, one whose heatmaps met a
    full disk, heatmaps deleted since, or drawn over by a run of another model): scored
    again to draw them, their rows kept until then."""
    if previous is None:
        return []
    scored = (previous["error"] == "").reindex([keys[i] for i in earlier.kept]).to_numpy()
    missing = [i for i, ok in zip(earlier.kept, scored, strict=True)
               if ok and i not in earlier.held]
    if missing:
        logger.info("%d file(s) kept from %s have no heatmap under %s, or one another model "
                    "drew (e.g. %s); scoring them again to draw them", len(missing),
                    display_path(out), display_path(heatmaps),
                    one_line(earlier.sources[missing[0]]))
    return missing


def _resolve_heatmap_kind(kind: str, model: Glow, calibration: Any | None) -> HeatmapKind:
    """The map ``kind`` names (``auto``: the deciding score's); refused before scoring
    when the model cannot give it."""
    if kind not in ("auto", "bpd", "typicality"):
        raise ScoringError(f"unknown heatmap kind {kind!r}; choose auto, bpd or typicality")
    if kind == "auto":
        # the deciding score was checked above to be one this model gives
        deciding = getattr(calibration, "score_name", "bpd")
        return "typicality" if deciding in REFERENCE_SCORES else "bpd"
    if kind == "typicality" and not model.has_reference:
        raise ScoringError(
            "typicality heatmaps need the model's normal reference (measured on the "
            "validation images at training), and this model has none; use bpd heatmaps "
            "(--heatmap-kind bpd), or train with a validation fraction above 0")
    return kind  # type: ignore[return-value]


def _check_heatmaps_apart(folder: Path, root: Path, linked: Sequence[Path] = ()) -> None:
    """Refuse a heatmap folder that overlaps the scored folder, or one of the symlinked
    folders its search followed (``linked``, real paths), then create it (or fail with a
    message) before any scoring.

    Inside the scored folder, heatmaps would take the names of the images they draw
    (``x.png``'s heatmap is ``x.png``) and be scored by the next run; around it, they
    land beside the user's own files.
    """
    real, real_root = Path(os.path.realpath(folder)), Path(os.path.realpath(root))
    if real.is_relative_to(real_root) or real_root.is_relative_to(real):
        where = ("is the scored folder" if real == real_root else
                 "is inside the scored folder" if real.is_relative_to(real_root) else
                 "contains the scored folder")
        raise ScoringError(
            f"the heatmap folder {display_path(folder)} {where} {display_path(root)}: its "
            "heatmaps would overwrite or mix with the images (and the next run would score "
            "them); choose a heatmap folder outside it, e.g. a new folder beside it")
    if reached := [f for f in linked if f.is_relative_to(real) or real.is_relative_to(f)]:
        raise ScoringError(
            f"the heatmap folder {display_path(folder)} is reached from the scored folder "
            f"{display_path(root)} through a symlinked folder inside it (to "
            f"{display_path(reached[0])}), so the next run would score the heatmaps as "
            "images; choose a heatmap folder the scored folder does not link to, or remove "
            "the link")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.", suffix=".png")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ScoringError(f"cannot write heatmaps to {display_path(folder)}: "
                           f"{exc.strerror or exc}; choose another heatmap folder") from None


def _previous_rows(out: Path, names: list[str], files: dict[str, Path], root: Path,
                   unlisted: Sequence[tuple[Path, str]] = ()) -> pd.DataFrame | None:
    """The earlier output's rows to keep, or None if there is no output.

    ``files`` maps each file found under ``root`` to its row's ``path``. Kept: the rows of
    files still there and unchanged since the table was last written (neither their
    modification nor their status-change time is later; a file copied or rewritten over
    an old one is scored again). Rows of files gone from ``root`` are dropped with a
    warning, and so are those of files under hidden names, which the search leaves out.
    Resuming is refused when it would drop rows of files that still exist outside
    ``root`` (a subfolder of the table's folder, or another folder: not lost files but a
    slip of the folder argument), or that may still exist where the search did not find
    them: in a folder it could not list (``unlisted``: ``(folder, reason)``), or one it
    now leaves out (an MLflow store).
    """
    if not out.exists():
        # a mistyped --out would otherwise rescore a large folder without a word
        logger.warning("resuming, but the output %s was not found, so every file is scored; "
                       "if the earlier table is elsewhere, stop and resume with its path",
                       display_path(out))
        return None
    previous = read_table(out, names)
    present = previous.index.isin(list(files))
    _check_none_unfound(previous.index[~present], out, root, unlisted)
    if len(previous) and not present.any():
        raise ScoringError(
            f"none of the {len(previous)} rows of {display_path(out)} is a file under "
            f"{display_path(root)} (its first row is {previous.index[0]}), so resuming "
            "would drop them all; resume with the folder the table was made from, spelled "
            "as then, or write to another --out")
    under = display_path(root)  # as the rows' paths are written
    elsewhere = [key for key in previous.index[~present]
                 if os.path.lexists(undisplayed_path(key)) and not Path(key).is_relative_to(under)]
    if elsewhere:
        raise ScoringError(
            f"{len(elsewhere)} row(s) of {display_path(out)} are files outside "
            f"{display_path(root)} that still exist (e.g. {elsewhere[0]}), so resuming "
            "would drop them; resume with the folder the table was made from, or write to "
            "another --out")
    if not present.all():
        # a file under a hidden name is left out of the search now, though it is there
        hidden = sum(os.path.lexists(undisplayed_path(key)) and any(
            part.startswith(".") for part in Path(key).relative_to(under).parts)
            for key in previous.index[~present] if Path(key).is_relative_to(under))
        gone = int((~present).sum()) - hidden
        if gone:
            logger.warning("dropping %d row(s) of %s whose files are no longer under %s",
                           gone, display_path(out), display_path(root))
        if hidden:
            logger.warning("dropping %d row(s) of %s whose files have hidden names (starting "
                           "with '.'), which the folder search now leaves out", hidden,
                           display_path(out))
    previous = previous[present]
    written = out.stat().st_mtime_ns
    changed = np.fromiter((_changed_since(files[key], written) for key in previous.index),
                          bool, len(previous))
    if changed.any():
        logger.warning("%d file(s) changed since %s was written (e.g. %s); scoring them "
                       "again", int(changed.sum()), display_path(out),
                       one_line(previous.index[int(np.flatnonzero(changed)[0])]))
    return previous[~changed]


def _check_none_unfound(missing: pd.Index, out: Path, root: Path,
                        unlisted: Sequence[tuple[Path, str]]) -> None:
    """Refuse to drop the rows of files under ``root`` that the search did not find but
    that may still be there: in a folder it could not list (whether or not the file can
    be seen from here), or in one it now leaves out as an MLflow store. ``missing`` holds
    the rows' ``path`` texts (:func:`display_path`), as the folders are compared."""
    under = display_path(root)
    shown = [(display_path(folder), reason) for folder, reason in unlisted]

    def in_unlisted(key: str) -> tuple[str, str] | None:
        return next(((folder, reason) for folder, reason in shown
                     if Path(key).is_relative_to(folder)), None)

    if blocked := [(key, where) for key in missing if (where := in_unlisted(key))]:
        key, (folder, reason) = blocked[0]
        raise ScoringError(
            f"{len(blocked)} row(s) of {display_path(out)} are files in folders under "
            f"{under} that could not be listed this time (e.g. {one_line(key)} in "
            f"{one_line(folder)}: {reason}), so resuming would drop rows of files that may "
            f"still be there; {unlisted_advice(reason)}, then resume, or write to another "
            "--out")

    def in_store(key: str) -> Path | None:
        if not Path(key).is_relative_to(under):
            return None
        folder = Path(undisplayed_path(key)).parent
        return next((above for above in [folder, *folder.parents]
                     if above.is_relative_to(root) and above != root and is_store(above)),
                    None)

    if stored := [(key, store) for key in missing if (store := in_store(key))]:
        key, store = stored[0]
        raise ScoringError(
            f"{len(stored)} row(s) of {display_path(out)} are files in {display_path(store)}, "
            f"which the folder search now leaves out as an MLflow store (e.g. {one_line(key)}), "
            "so resuming would drop them; move them out of it, or write to another --out")


def _changed_since(path: Path, time_ns: int) -> bool:
    """Whether ``path`` (the link, or the file it leads to) was modified or replaced
    after ``time_ns``; a file gone since counts as changed, so it is read again."""
    try:
        stats = [os.lstat(path)]
    except OSError:
        return True
    with contextlib.suppress(OSError):  # a dangling link or a loop is the link alone
        stats.append(os.stat(path))
    return any(max(st.st_mtime_ns, st.st_ctime_ns) > time_ns for st in stats)


RESUME_PROBES = 4
"""Kept rows scored again on resuming, to check they are the same model's numbers."""


def _check_same_scores(model: Glow, previous: pd.DataFrame, files: dict[str, Path],
                       out: Path, precision: Precision) -> None:
    """Refuse to resume a table whose kept rows another model (or precision) scored.

    Scoring is deterministic, so up to :data:`RESUME_PROBES` of the kept files, scored
    again, must give their ``bpd`` back. In float32 the tolerance (1e-5 relative) admits
    the last digits ``--compile`` moves and nothing a retrained, fine-tuned or bf16 model
    would give; in ``tf32`` or ``bf16``, whose GPU kernels may round otherwise in another
    batch size, it is 1e-3, still far below what other weights change; a float32 table
    falls within it, so there the probes are also scored in float32, and a table whose
    numbers are float32's (and not this precision's too) is refused. A probe that
    cannot be read now is not compared. A table of the same weights with another
    calibration passes: decisions are recomputed for every row anyway.
    """
    scored = previous.index[previous["error"] == ""]
    if not len(scored):
        return
    probes = scored[np.linspace(0, len(scored) - 1, min(RESUME_PROBES, len(scored)))
                    .round().astype(int)].unique()
    config = model.config
    before = previous.loc[probes, "bpd"].to_numpy(dtype=float)

    def rescored(at: Precision) -> tuple[np.ndarray, np.ndarray]:
        dataset = ScoringDataset([files[key] for key in probes], config)
        try:
            again = score_dataset(model, dataset, batch_size=len(probes), progress=False,
                                  precision=at)
        except BatchOutOfMemory as error:  # even these few kept files do not fit
            raise ScoringError(
                f"checking that {display_path(out)} was scored by this model ran "
                f"{error.ran_out} on {len(probes)} of its files; free memory, or score on a "
                "device with more") from None
        return again["bpd"].to_numpy(dtype=float), (again["error"].fillna("") == "").to_numpy()

    now, readable = rescored(precision)
    rtol = 1e-5 if precision == "float32" else 1e-3
    off = readable & ~np.isclose(now, before, rtol=rtol, atol=0.0)
    if not off.any() and precision != "float32" and (readable & ~np.isclose(
            now, before, rtol=1e-5, atol=0.0)).any():
        # within the loose tolerance but not the same numbers: a float32 table, whose
        # numbers a bf16 or tf32 run comes as close to, is not to be mixed with them
        exact, _ = rescored("float32")
        if np.isclose(exact, before, rtol=1e-5, atol=0.0)[readable].all():
            raise ScoringError(
                f"{display_path(out)} was scored in float32 (its bpd is float32's to 1e-5), "
                f"and this run is {precision}: the table would mix the two; resume with "
                "--precision float32, or score everything again in "
                f"{precision} (without --resume, or to another --out)")
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise ScoringError(
            f"{display_path(out)} was scored by another model or precision, or its files "
            f"changed since: {probes[i]} has bpd {before[i]:.6f} there and {now[i]:.6f} "
            "now; resume only with the model and --precision that started the table, or "
            "score everything again (without --resume, or to another --out)")


class _Flusher:
    """When to rewrite the partial table: every ``every_s`` seconds, and never more than
    a tenth of the time (at least ten times the last write's duration apart); ``0``
    means after every batch."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = time.monotonic()
        self.gap = every_s

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.gap

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.last = time.monotonic()
        if self.every_s > 0:
            self.gap = max(self.every_s, 10 * (self.last - start))


# A folder's scores in memory, for calibration and evaluation

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
            (str(path), str(error) or _non_finite(score))
            for path, error in rows.itertuples(index=False)
        ]

    def finite_in(self, scores: Sequence[str]) -> FolderScores:
        """These scores with each decoded image that has a non-finite value in any of
        ``scores`` left out like a file that failed (the reason in ``error``), and a
        warning naming them, so that every count and figure over ``scores`` rests on the
        same images. Scoring itself leaves such an image out (its ``bpd`` is NaN, every
        score with it); a table made otherwise may not have."""
        decoded = (self.table["error"] == "").to_numpy()
        values = self.table[list(scores)].to_numpy(dtype=np.float64)
        bad = decoded & ~np.isfinite(values).all(axis=1)
        if not bad.any():
            return self
        table = self.table.copy()
        first_bad = np.asarray(scores)[(~np.isfinite(values)).argmax(axis=1)]
        table.loc[bad, "error"] = [_non_finite(name) for name in first_bad[bad]]
        left = list(table.loc[bad, ["path", "error"]].itertuples(index=False))
        logger.warning("%d of %d image files in %s have a non-finite score and are left "
                       "out:\n%s", len(left), self.n_files, display_path(self.folder),
                       _listed(left))
        return FolderScores(self.folder, table, self.fingerprint, self.digests)


def score_folder_table(
    model: Glow,
    folder: str | Path,
    *,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool | None = None,
) -> FolderScores:
    """Score every image file under ``folder`` with ``model``.

    What the conversion to the model's input drops is warned of first, as
    :func:`score_folder` does. Files that fail to decode get a row with the reason in
    ``error`` and NaN scores; one warning states how many failed and why (the first ten
    files with their reasons, then how many more). This is the only place a failing file
    is named in the log:
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
    _warn_conversion(model, root, paths)
    dataset = ScoringDataset(paths, config)
    layered: list[int] = []
    table = score_dataset(model, dataset, batch_size=batch_size, num_workers=workers,
                          progress=progress, layered=layered)
    _warn_first_frames([paths[i] for i in layered])
    table = table.reset_index(drop=True)
    table.insert(0, "path", paths_frame(paths).to_numpy(dtype=object))
    table["error"] = table["error"].fillna("").astype(str)
    folder_digest, digests = fingerprint_and_digests(paths, root)
    scores = FolderScores(root, table, folder_digest, tuple(digests))
    failed = scores.failures("bpd")
    if failed:
        logger.warning("%d of %d image files in %s could not be scored and are left out:\n%s",
                       len(failed), len(paths), display_path(root), _listed(failed))
    return scores


def _non_finite(score: str) -> str:
    """The reason given for an image whose ``score`` is not finite."""
    return f"the model gave a non-finite {score} for this image"


def _listed(failed: Sequence[tuple[str, str]]) -> str:
    """The lines of a warning that names left-out files: the first
    :data:`MAX_REASONS_LOGGED` with their reasons, then how many more."""
    lines = [f"  {one_line(path)}: {reason}" for path, reason in failed[:MAX_REASONS_LOGGED]]
    if len(failed) > MAX_REASONS_LOGGED:
        lines.append(f"  ... and {len(failed) - MAX_REASONS_LOGGED} more")
    return "\n".join(lines)
