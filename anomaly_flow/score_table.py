"""The scores table on disk: its format (CSV or Parquet, by the file's extension), its
atomic writes, and reading an earlier table back for ``resume``.

:func:`anomaly_flow.folder_scoring.score_folder` writes its table through
:func:`write_or_keep` at its end and, in a long run, every so often while it runs, so that
a killed run leaves rows to ``resume`` from. Each write goes to a hidden temporary file in
the same folder, flushed to disk, which then replaces the table in one rename: whatever
stops the run mid-write (a kill, a full disk) leaves the previous complete table, and a
reader (``--resume``, a dashboard) never sees one cut short. A table cut short anyway (by a
copy or an edit) is read up to its last complete row (:func:`read_table`).

:class:`ScoringError` lives here, the lowest of the scoring modules, since the table's
checks raise it as :mod:`anomaly_flow.scoring` and :mod:`anomaly_flow.folder_scoring` do;
this module knows nothing of models or batches and imports neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pa_compute
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet

from anomaly_flow import file_lock
from anomaly_flow.data import display_path
from anomaly_flow.errors import first_line, one_line

logger = logging.getLogger(__name__)

DECISION_COLUMNS = ("score", "p_value", "is_anomaly", "error")
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
"""Output file extensions (lower case) and the format each one means."""

EXACT_FLOATS: dict[str, Any] = (
    {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"})
"""``pandas.read_csv`` options that read every float back to the last bit: the default
from pandas 3 (which deprecates ``float_precision``), ``round_trip`` before."""

LATER_SCORES = ("coarse_complexity", "typicality", "knn", "pixel_knn", "ensemble")
"""Scores added after the first release: a table written before them lacks the column,
and resuming it scores its scored files again to fill the column in."""


class ScoringError(ValueError):
    """A scoring run cannot start or finish; the message says why and what to do."""


class OutputWriteError(ScoringError):
    """The table could not be written where it was asked for (disk full, name too long)."""


def output_format(out: Path) -> str:
    """``"csv"`` or ``"parquet"``, from the output file's extension.

    Raises:
        ScoringError: Any other extension.
    """
    fmt = OUTPUT_FORMATS.get(Path(out).suffix.lower())
    if fmt is None and Path(out).name.lower() in OUTPUT_FORMATS:  # ".csv": a name, no suffix
        raise ScoringError(
            f"{display_path(out)} is a hidden file name without an extension, so its output "
            f"format is unknown: give the table a name, such as scores{Path(out).name}")
    if fmt is None:
        raise ScoringError(
            f"cannot tell the output format of {display_path(out)}: use a file name "
            f"ending in {', '.join(OUTPUT_FORMATS)}"
        )
    return fmt


def check_writable(out: Path, *, resume: bool = False) -> None:
    """Fail now, before any scoring, if ``out`` cannot be written (atomically), or would
    replace a file that is not a scores table (``resume`` reads it instead, and says what
    is wrong with it there).

    Raises:
        ScoringError: The folder is missing, is not a folder, or refuses a new file;
            or ``out`` itself is a folder, or a file other than a scores table.
    """
    out = Path(out)
    parent = out.parent
    name = display_path(out)
    if not parent.exists():
        raise ScoringError(f"cannot write the output {name}: folder {display_path(parent)} "
                           "does not exist; create it or choose another output path")
    if not parent.is_dir():
        raise ScoringError(f"cannot write the output {name}: {display_path(parent)} is not a "
                           "folder; choose another output path")
    length, limit = len(os.fsencode(out.name)), _longest_name(parent)
    if length > limit:
        raise ScoringError(f"cannot write the output {name}: its name is {length} bytes "
                           f"long, and the file system there takes {limit} at most; choose "
                           "a shorter name")
    if out.is_dir():
        raise ScoringError(f"cannot write the output {name}: it is a folder; "
                           "give a file name ending in .csv or .parquet")
    if out.is_file() and (other := _misnamed_format(out)) is not None:
        fmt = output_format(out)
        raise ScoringError(f"{name} is a {other} file, not {_FORMAT_NAMES[fmt]} as its name "
                           f"says; name the output .{'csv' if other == 'CSV' else 'parquet'} "
                           "(or move that file away)")
    if not resume and out.is_file() and out.stat().st_size \
            and (problem := _not_a_table(out)) is not None:
        raise ScoringError(f"{name} exists and is not a scores table ({problem}); only an "
                           "earlier output is replaced: choose another output path, or move "
                           "that file away")
    probe = _temporary_name(out)  # the name write_table will use, so as long a name
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise ScoringError(f"cannot write the output {name}: {exc.strerror or exc}; "
                           "choose another output path") from None
    os.unlink(probe)


def _longest_name(folder: Path) -> int:
    """The longest file name, in bytes, the file system of ``folder`` takes (255 where it
    does not say, or says it has no limit)."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX, or no such setting there
        return 255
    return limit if limit > 0 else 255


_FORMAT_NAMES = {"csv": "CSV", "parquet": "Parquet"}
_PARQUET_MAGIC = b"PAR1"
"""The four bytes a Parquet file starts and ends with."""


_TABLE_COLUMNS = frozenset({"path", "bpd", "error"})
"""The columns every table :func:`~anomaly_flow.folder_scoring.score_folder` writes has."""


def _misnamed_format(path: Path) -> str | None:
    """``"Parquet"`` where ``path`` is named like a CSV file and holds Parquet (its
    first and last four bytes), ``"CSV"`` where it is named like a Parquet file and holds
    a CSV scores table; else None (unreadable files included: others say why)."""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
            size = os.fstat(file.fileno()).st_size
            file.seek(max(size - 4, 0))
            tail = file.read(4)
    except OSError:
        return None
    parquet = size >= 8 and head == tail == _PARQUET_MAGIC
    if output_format(path) == "csv":
        return "Parquet" if parquet else None
    if parquet or not size:
        return None
    try:
        columns = _header(path, "csv")
    except Exception:  # not CSV either: pandas raises many types
        return None
    return "CSV" if set(columns) >= _TABLE_COLUMNS else None


def _header(path: Path, fmt: str) -> list[str]:
    """The column names of the table at ``path`` read as ``fmt`` (``csv`` or
    ``parquet``), from its header alone; raises what pandas or pyarrow raise."""
    if fmt == "csv":
        return [str(name) for name in pd.read_csv(path, nrows=0).columns]
    return pa_parquet.read_schema(path).names


def _not_a_table(path: Path) -> str | None:
    """None where ``path`` has the columns every table
    :func:`~anomaly_flow.folder_scoring.score_folder` writes has (its header alone is
    read); else why it is not such a table, in a few words."""
    fmt = output_format(path)
    try:
        columns = _header(path, fmt)
    except OSError as exc:  # unreadable: whose table it is cannot be told
        raise ScoringError(f"cannot read {display_path(path)} to check that it is an earlier "
                           f"scores table ({exc.strerror or exc}); choose another output path "
                           "or fix its permissions") from None
    except Exception as exc:  # pandas and pyarrow raise many types
        # a table cut short (a copy that stopped) is no less unreadable: its rows cannot be
        # told from another file's, so it is not replaced either
        return f"it cannot be read as {_FORMAT_NAMES[fmt]}: {one_line(first_line(exc))}"
    if not set(columns) >= _TABLE_COLUMNS:
        return "it lacks a path, bpd or error column"
    return None


def _temporary_stem(out: Path) -> str:
    """``out``'s name, cut before its suffix to leave room in a file name (255 bytes on
    most file systems) for what the temporary and spare names add to it."""
    base, suffix = out.name[: len(out.name) - len(out.suffix)], out.suffix
    while len(os.fsencode(base + suffix)) > 200 and base:
        base = base[:-1]
    return base + suffix


def _temporary_name(out: Path) -> Path:
    """Where :func:`write_table` writes ``out`` before renaming it: in the same folder,
    hidden, unique to this process and call."""
    return out.with_name(f".{_temporary_stem(out)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporary_names(out: Path) -> re.Pattern[str]:
    """Every name :func:`_temporary_name` gives ``out``, the writer's process id as
    ``pid``: what :func:`anomaly_flow.stopping.remove_leftovers` looks for."""
    return re.compile(re.escape(f".{_temporary_stem(out)}.") + r"(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


@contextlib.contextmanager
def output_lock(out: Path, *, holder: str = "scoring run",
                instead: str = "choose another output path") -> Iterator[None]:
    """Hold ``.<out>.lock`` beside ``out`` (a file or a folder; its real path, so that a
    symlink to it takes the same lock) while a run writes it: two scoring runs given the
    same output each replaced the other's table, and the rows of one were lost while both
    said they wrote them. The folder it goes in is made where missing; the file goes when
    the run ends; where locks cannot be taken (no ``flock``, a file system without locks,
    a folder that cannot be written or made) nothing is held, with a warning where the
    folder is there (the run says itself why it cannot make one).
    ``holder`` names the kind of run that may hold it, ``instead`` ends the refusal's
    advice.

    Raises:
        ScoringError: Another process holds the lock.
    """
    target = Path(os.path.realpath(out))
    if not file_lock.SUPPORTED or not target.name:  # the root folder: no place beside it
        yield
        return
    stem = _temporary_stem(target)
    if stem != target.name:  # cut short: names alike up to the cut get locks of their own
        stem += "-" + hashlib.sha256(os.fsencode(target.name)).hexdigest()[:8]
    path = target.with_name(f".{stem}.lock")
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 (held until the run ends)
        except OSError as exc:
            if path.parent.is_dir():  # else the run fails making its folder, and says why
                logger.warning("cannot create the lock file %s (%s), so nothing stops a "
                               "second run from writing %s meanwhile", display_path(path),
                               exc.strerror or exc, display_path(out))
            yield
            return
        try:
            held = file_lock.lock(handle)
        except OSError as exc:  # no locks on this file system (NFS without lockd, FUSE)
            handle.close()
            logger.warning("cannot lock %s (%s), so nothing stops a second run from writing "
                           "%s meanwhile", display_path(path), exc.strerror,
                           display_path(out))
            yield
            return
        if not held:
            who = file_lock.holder(handle)
            handle.close()
            raise ScoringError(f"another {holder} ({who}) is writing {display_path(out)}; "
                               f"wait for it to end, or {instead}")
        try:  # the file a run that just ended removed is no lock: take the new one
            current = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except OSError:
            current = False
        if current:
            break
        handle.close()
    with handle:
        with contextlib.suppress(OSError):
            file_lock.claim(handle)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # still held: no other run can have taken it meanwhile
            file_lock.unlock(handle)


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write ``table`` to ``out`` (CSV or Parquet by extension) atomically.

    The table goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``out`` in one step: a reader sees the old file or the new one, never half.

    Raises:
        OutputWriteError: The file system refused (disk full, name too long, the folder
            gone); ``out`` is as it was.
    """
    out = Path(out)
    fmt = output_format(out)
    # open(..., "xb") rather than mkstemp: the file gets the usual permissions (umask),
    # not mkstemp's owner-only 0600, which os.replace would carry over to `out`.
    tmp = _temporary_name(out)
    try:
        with open(tmp, "xb") as file:
            if fmt == "csv":
                _write_csv(table, file)
            else:
                table.to_parquet(file, index=False)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, out)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise OutputWriteError(f"cannot write the output {display_path(out)}: "
                                   f"{error.strerror or error}") from error
        raise


def write_or_keep(table: pd.DataFrame, out: Path, *, modified_ns: int | None = None) -> None:
    """:func:`write_table`, and where ``out`` refuses the table, the table written to the
    temporary-files folder instead, so that the scored rows are not lost. The file
    written gets ``modified_ns`` as its modification time, where given (the start of the
    run, which ``resume`` compares the files' times with).

    Raises:
        OutputWriteError: ``out`` refused; the message says where the rows are kept (or
            that no place took them) and what to do.
    """
    def stamped(path: Path) -> None:
        write_table(table, path)
        if modified_ns is not None:
            with contextlib.suppress(OSError):
                os.utime(path, ns=(time.time_ns(), modified_ns))

    try:
        stamped(out)
    except OutputWriteError as refused:
        spare = (Path(tempfile.gettempdir())
                 / f"anomaly-flow-{os.getpid()}-{_temporary_stem(Path(out))}")
        try:
            stamped(spare)
        except OutputWriteError:
            raise OutputWriteError(f"{refused}; {len(table)} rows are lost (the folder "
                                   f"{tempfile.gettempdir()} refused them too): free space or "
                                   "choose another output path and run again") from refused
        raise OutputWriteError(
            f"{refused}; its {len(table)} rows are kept in {display_path(spare)}: once there "
            f"is room, move that file to {display_path(out)} and run again with resume "
            "(--resume) to score what it lacks") from refused


def _write_csv(table: pd.DataFrame, file: Any) -> None:
    """``table`` as UTF-8 CSV by Arrow's writer: eight times faster than pandas' at
    50,000 rows (0.1 against 0.75 s), which a big scoring run pays at its end.

    Strings are quoted, empty and missing cells are empty, floats are written in their
    shortest round-trip form (with ``.0`` where a column holds only whole numbers) and
    booleans as ``True``/``False`` (pandas' spelling); ``pandas.read_csv`` reads the file
    back to the same table as pandas' own writer's.
    """
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    for i, field in enumerate(arrow.schema):
        column = arrow.column(i)
        if pa.types.is_boolean(field.type):
            arrow = arrow.set_column(i, field.name,
                                     pa_compute.if_else(column, "True", "False"))
        elif pa.types.is_floating(field.type) and _only_whole_numbers(table[field.name]):
            # Arrow writes 1.0 as "1", so such a column (p-values all 1, say) would read
            # back as integers: give its numbers a decimal point (they are then quoted)
            text = pa_compute.replace_substring_regex(
                pa_compute.cast(column, pa.string()), r"^(-?[0-9]+)$", r"\1.0")
            arrow = arrow.set_column(i, field.name, text)
    pa_csv.write_csv(arrow, file)


def _only_whole_numbers(column: pd.Series) -> bool:
    """Whether a float column's finite values, of which it has at least one, are all
    whole numbers."""
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = values[np.isfinite(values)]
    return bool(len(finite)) and bool((finite == np.round(finite)).all())


def _whole_csv_records(data: bytes) -> bytes:
    """``data`` up to the end of its last complete CSV record: the last line end outside
    quotes (a quoted path may hold line ends; the quotes before a record's end, doubled
    ones included, are even in number)."""
    end, quotes, start = 0, 0, 0
    at = data.find(b"\n")
    while at != -1:
        quotes += data.count(b'"', start, at)
        start = at
        if quotes % 2 == 0:
            end = at + 1
        at = data.find(b"\n", at + 1)
    return data[:end]


def read_table(out: Path, names: Sequence[str]) -> pd.DataFrame:
    """Read a table :func:`~anomaly_flow.folder_scoring.score_folder` wrote, for ``resume``.

    Args:
        out: The table.
        names: The scores the resuming model gives (:func:`~anomaly_flow.scoring.score_names`).

    Returns:
        The stored raw score columns (``names``, ``error``) indexed by ``path``, one row
        per path (the first row kept if a path repeats); rows with neither every score
        nor an error are left out (to be scored again), as is a last row cut short (a
        CSV that ends inside a line or a quoted path). A table written before a score
        of :data:`LATER_SCORES` existed lacks that column: its scored rows are left out
        too, so that resuming rescores those files and the finished table has every
        column filled; its failed rows are kept.

    Raises:
        ScoringError: The file cannot be read, or its score columns are not ``names``
            (another model wrote it).
    """
    out = Path(out)
    fmt = output_format(out)
    name = display_path(out)
    try:
        if fmt == "csv":
            data = out.read_bytes()
            # a copy or an edit cut it mid-row (it ends inside a line, or inside a quoted
            # path holding a line end): the rows before the cut stand
            if data and (not data.endswith(b"\n") or data.count(b'"') % 2):
                whole = _whole_csv_records(data)
                logger.warning("the earlier output %s ends in a row cut short (%d bytes "
                               "after its last complete line); scoring that file again",
                               name, len(data) - len(whole))
                data = whole
            table = pd.read_csv(io.BytesIO(data), dtype={"path": "string", "error": "string"},
                                **EXACT_FLOATS)
        else:
            # text that is not UTF-8 (a damaged file) is found only when a value is used,
            # far from here: check every value now
            arrow = pa_parquet.read_table(out)
            arrow.validate(full=True)
            table = arrow.to_pandas()
    except Exception as exc:  # pandas and pyarrow raise many types for damaged files
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ScoringError(
            f"cannot read the earlier output {name} to resume from ({reason}); delete it "
            "or choose another output path, then run again"
        ) from None
    raw = ["path", *names, "error"]
    if "path" not in table.columns and "bpd" not in table.columns:
        shown = [str(c) for c in table.columns[:8]]
        raise ScoringError(
            f"the earlier output {name} is not a scores table (no path or bpd column; its "
            f"columns are {shown}{' ...' if len(table.columns) > 8 else ''}); choose "
            "another output path, or move that file away")
    missing = [c for c in raw if c not in table.columns]
    filled = missing if missing and set(missing) <= set(LATER_SCORES) else []
    for column in filled:  # the table was written before these scores existed
        table[column] = np.nan
    if filled:
        missing = []
    extra = [c for c in table.columns
             if (c.startswith("level_") or c in LATER_SCORES) and c not in raw]
    if missing or extra:
        problem = (f"lacks column(s) {missing}" if missing
                   else f"has score column(s) {extra} this model does not give")
        raise ScoringError(
            f"the earlier output {name} {problem}, so it was not written by this model's "
            "scoring; resume with the same model, or choose another output path"
        )
    # pandas names a column without a header "Unnamed: N": the first one is its index
    # written back, an empty one a trailing separator; one holding values elsewhere is a
    # column someone added without a name
    foreign = [str(c) for i, c in enumerate(table.columns)
               if c not in {*raw, *DECISION_COLUMNS}
               and not (re.fullmatch(r"Unnamed: \d+", str(c))
                        and (i == 0 or table.iloc[:, i].isna().all()))]
    if foreign:  # a column someone added (labels, notes): the rewritten table drops it
        raise ScoringError(
            f"the earlier output {name} has column(s) {foreign[:8]} that scoring does not "
            "write, so resuming would drop them; save them elsewhere (they join back on "
            "path) and remove them from the table, or write to another --out")
    table = table[raw].copy()
    table["path"] = table["path"].astype("string")
    table = table[table["path"].notna()]
    table["error"] = table["error"].fillna("").astype(str)
    for column in raw[1:-1]:
        table[column] = pd.to_numeric(table[column], errors="coerce").astype("float64")
    finite = np.isfinite(table[raw[1:-1]].to_numpy())
    complete = finite.all(axis=1)
    unanswered = (table["error"] == "") & ~complete
    contradictory = (table["error"] != "") & finite.any(axis=1)
    if contradictory.any():  # scores and a reason: edited by hand, trust neither
        logger.warning("the earlier output %s has %d row(s) with both scores and an error "
                       "(e.g. %s); scoring those files again", name,
                       int(contradictory.sum()), table.loc[contradictory, "path"].iloc[0])
        table = table[~contradictory]
        complete, unanswered = complete[~contradictory], unanswered[~contradictory]
    if filled and unanswered.any():
        logger.warning("the earlier output %s has no %s column%s (it was written by an older "
                       "anomaly-flow, or by a model without that score); scoring its %d "
                       "scored file(s) again to fill %s in (rows with an error are kept)",
                       name, " or ".join(filled),
                       "s" if len(filled) > 1 else "", int(unanswered.sum()),
                       "them" if len(filled) > 1 else "it")
    elif unanswered.any():  # neither the scores nor a reason: score those files again
        logger.warning("the earlier output %s has %d row(s) with neither every score nor an "
                       "error; scoring those files again", name, int(unanswered.sum()))
    table = table[~unanswered]
    repeated = table["path"].duplicated()
    if repeated.any():
        logger.warning("the earlier output %s lists %d path(s) more than once; keeping the "
                       "first row of each", name, int(repeated.sum()))
        table = table[~repeated]
    return table.set_index("path")
