"""Finding the image files in a folder tree: every candidate listed, nothing skipped unsaid.

:func:`search_images` lists every file named like an image below a folder, readable or
not (scoring gives each a row; decoding, in :mod:`anomaly_flow.data`, says why one
fails), and says what it leaves out: folders it cannot list, files of other extensions,
hidden names, MLflow stores. Symlinked folders are followed once each; the walk has no
recursion, so a tree of any depth is searched.

Example:
    >>> search = search_images(Path("parts/"))  # doctest: +SKIP
    >>> search.paths[:2], search.unlisted  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from anomaly_flow.config import Resize
from anomaly_flow.data import (
    IMAGE_EXTENSIONS,
    DataError,
    ImageMode,
    display_path,
    try_load_image,
)
from anomaly_flow.errors import one_line

logger = logging.getLogger(__name__)


def check_image_folder(root: Path) -> None:
    """Refuse ``root`` as a folder of images when it is missing or not a folder, without
    searching it (a command checks this before loading a model).

    Raises:
        DataError: Which of the two, and what to do.
    """
    if not root.exists():
        raise DataError(f"image folder not found: {display_path(root)}; check the path")
    if not root.is_dir():
        raise DataError(f"{display_path(root)} is not a folder; pass the folder of images")


def find_images(root: Path) -> list[Path]:
    """Every file under ``root`` whose extension is an image extension, in sorted order:
    :func:`search_images`, without the folders it could not list (logged as warnings).
    """
    return search_images(root).paths


class ImageSearch(NamedTuple):
    """What :func:`search_images` found.

    Attributes:
        paths: The image files, as :func:`find_images` returns them.
        unlisted: ``(folder, reason)`` of each folder below the root that could not be
            listed (no permission, gone while searched): images inside it are missing
            from ``paths``, which a command that promises every file must say.
        linked: The real paths of the symlinked folders the search followed (the only
            ways out of the root's own tree).
    """

    paths: list[Path]
    unlisted: list[tuple[Path, str]]
    linked: tuple[Path, ...] = ()


def search_images(root: Path) -> ImageSearch:
    """Every file under ``root`` whose extension is an image extension, in sorted order,
    and the folders below ``root`` that could not be listed.

    Nothing is skipped for being unreadable: dangling symlinks, symlink loops, files
    without read permission and names that are not valid UTF-8 are all listed, so that
    scoring gives them a row with an error. Hidden names (starting with ``.``: macOS's
    ``._x.png`` copies, ``.ipynb_checkpoints/``, ``.Trashes/``) are left out, files and
    folders; the image files among them, and the folders that hold image files (in them
    or below; not tools' folders: version control, virtual environments, MLflow stores),
    are counted in one warning.
    Symlinked folders are followed, each real folder at most once, so a link to a parent
    folder cannot cause an endless walk.
    Folders that cannot be listed, and files left out for their extension (an image
    saved as ``.heic``, say; hidden files and ``Thumbs.db`` aside), are logged as
    warnings, once per folder and tally.

    Args:
        root: The folder to search recursively.

    Returns:
        Paths below ``root`` (``root / relative``), sorted by their relative path, and the
        folders that could not be listed, with the reason.

    Raises:
        DataError: ``root`` is missing, is not a folder, cannot be listed, or holds no
            image files.
    """
    root = Path(root)
    check_image_folder(root)
    # Real folders are known first, so that a file reachable both directly and through a
    # symlinked folder is listed once, under its real path. A folder removed while the
    # tree is searched is passed over here; the walk below reports it.
    real_dirs: set[tuple[int, int]] = set()
    for d, dirnames, _ in walk_tree(os.fspath(root), follow_links=False):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        with contextlib.suppress(OSError):
            real_dirs.add(_dir_id(Path(d)))
    seen_dirs = set(real_dirs)
    linked: list[Path] = []
    walk_errors: list[OSError] = []
    # (relative path as bytes, folder, name): strings until the end, since a folder of
    # 50,000 images would otherwise spend most of the search building Path objects
    found: list[tuple[bytes, str, str]] = []
    others: collections.Counter[str] = collections.Counter()  # left out, by extension
    stores: list[Path] = []  # MLflow stores met below root, left out
    hidden: list[str] = []  # hidden image files below root, left out
    hidden_dirs: list[str] = []  # hidden folders below root holding image files, left out
    for dirpath, dirnames, filenames in walk_tree(os.fspath(root), follow_links=True,
                                                  onerror=walk_errors.append):
        below = os.path.relpath(dirpath, root)
        prefix = "" if below == os.curdir else below + os.sep
        hidden_dirs += [prefix + d for d in dirnames  # .git, .venv and the like: not a word
                        if d.startswith(".") and _holds_images(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and _enter(Path(dirpath, d), real_dirs, seen_dirs, linked)]
        for d in [d for d in dirnames if is_store(Path(dirpath, d))]:
            dirnames.remove(d)
            stores.append(Path(dirpath, d))
        for f in filenames:
            suffix = _suffix(f).lower()
            if f.startswith("."):  # clutter (.DS_Store) unless named like an image
                if suffix in IMAGE_EXTENSIONS:
                    hidden.append(prefix + f)
            elif suffix in IMAGE_EXTENSIONS:
                found.append((os.fsencode(prefix + f), dirpath, f))
            elif f.lower() not in _NOT_DATA:
                others[suffix or "no extension"] += 1
    if others:
        _warn_left_out(root, others)
    if hidden or hidden_dirs:
        _warn_hidden(root, hidden, hidden_dirs)
    if is_store(root):  # asked for by name, so searched: but likely a slip (mlruns<TAB>)
        logger.warning("%s is an MLflow store: its images are runs' plots and sample grids, "
                       "not data of yours; if that is not what you meant, pass the folder of "
                       "your images", display_path(root))
    if stores:
        logger.warning("left out %d MLflow store folder(s) under %s (e.g. %s): their files "
                       "are runs' plots and models, not images to use; move any images of "
                       "yours out of them", len(stores), display_path(root),
                       display_path(stores[0]))
    unlisted: list[tuple[Path, str]] = []
    for exc in walk_errors:
        where = one_line(display_path(exc.filename or root))
        if Path(exc.filename or root) == root:
            raise DataError(
                f"cannot list image folder {where}: {exc.strerror}; check its permissions"
            )
        logger.warning(
            "cannot list folder %s (%s); images inside it are not included", where, exc.strerror
        )
        unlisted.append((Path(exc.filename), exc.strerror or str(exc)))
    if not found:
        if unlisted:
            folder, reason = unlisted[0]
            raise DataError(
                f"no image files found in {display_path(root)}, and {len(unlisted)} "
                f"folder(s) inside it could not be listed (e.g. {display_path(folder)}: "
                f"{reason}); {unlisted_advice(reason)}")
        if hidden or hidden_dirs:
            raise DataError(
                f"no image files found in {display_path(root)} but hidden ones: "
                f"{_hidden_counted(hidden, hidden_dirs)} (names starting with '.', e.g. "
                f"{one_line(display_path(sorted(hidden + hidden_dirs)[0]))}) left out; "
                "rename the ones that hold your images without the leading '.'")
        raise DataError(
            f"no image files found in {display_path(root)} (looked recursively for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point to the folder that holds the images"
        )
    found.sort(key=lambda item: item[0])
    return ImageSearch([Path(folder, name) for _, folder, name in found], unlisted,
                       tuple(linked))


def check_decodable(folder: str | Path, mode: ImageMode, size: int,
                    resize: Resize = "stretch") -> None:
    """Refuse a folder none of whose image files decodes, before work that needs one of
    them (a pipeline's training, ahead of an evaluation that would find no image to
    score). Stops at the first file that decodes: a usable folder costs one decode.

    Raises:
        DataError: The folder is missing, holds no image files, or none decodes.
    """
    paths = find_images(Path(folder))
    first: tuple[Path, str | None] | None = None
    for path in paths:
        array, reason = try_load_image(path, mode, size, resize)
        if array is not None:
            return
        first = first or (path, reason)
    assert first is not None  # find_images raises on a folder without image files
    raise DataError(
        f"none of the {len(paths)} image file(s) in {display_path(folder)} can be decoded "
        f"(e.g. {one_line(display_path(first[0]))}: {first[1]}); put readable images there")


def walk_tree(top: str, *, follow_links: bool,
              onerror: Callable[[OSError], object] | None = None
              ) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(top, followlinks=follow_links, onerror=onerror)``, top-down, in the same
    order, without its recursion: Python 3.11's recurses once a level, and a tree deeper
    than about 980 folders raised RecursionError. As there, the caller may prune
    ``dirnames`` in place; a folder that cannot be listed goes to ``onerror`` (or is passed
    over) and is not entered; a symlinked folder is entered only with ``follow_links``."""
    stack = [top]
    while stack:
        folder = stack.pop()
        dirnames: list[str] = []
        filenames: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir()
                    except OSError:  # as os.walk: what cannot be looked at is a file
                        is_dir = False
                    (dirnames if is_dir else filenames).append(entry.name)
        except OSError as exc:
            if onerror is not None:
                onerror(exc)
            continue
        yield folder, dirnames, filenames
        below = [os.path.join(folder, name) for name in dirnames]
        stack.extend(reversed([path for path in below
                               if follow_links or not os.path.islink(path)]))


_TOOL_FOLDERS = frozenset({
    ".git", ".hg", ".svn", ".venv", ".tox", ".nox", ".cache", ".mypy_cache", ".pytest_cache",
    ".ruff_cache", ".idea", ".vscode", ".Trash", ".Trashes", "node_modules", "__pycache__"})
"""Folders tools keep beside data (whose images, if any, are not the user's): never searched
by :func:`_holds_images`."""

_TOOL_MARKS = frozenset({"pyvenv.cfg", "conda-meta"})
"""Names that make a folder a Python environment, whatever it is called (``.env``)."""

_HIDDEN_LOOK = 10_000
"""Entries :func:`_holds_images` looks at in one hidden folder before it gives up."""


def _holds_images(folder: str) -> bool:
    """Whether a hidden ``folder`` holds, in it or below, a file named like an image: a
    folder worth a word (``.ipynb_checkpoints``, ``.snapshot/day1``), unlike ``.git`` or
    ``.venv``. Looks at :data:`_HIDDEN_LOOK` entries at most, and not into tools' folders
    (:data:`_TOOL_FOLDERS`, :data:`_TOOL_MARKS`, MLflow stores) nor through symlinks."""
    if os.path.basename(folder) in _TOOL_FOLDERS:
        return False
    looked = 0
    for below, dirnames, filenames in walk_tree(folder, follow_links=False):
        if _TOOL_MARKS & set(filenames + dirnames) or is_store(Path(below)):
            dirnames.clear()  # a virtual environment or conda's, an MLflow store
            continue
        if any(_suffix(name).lower() in IMAGE_EXTENSIONS and not name.startswith(".")
               for name in filenames):
            return True
        looked += len(dirnames) + len(filenames)
        if looked > _HIDDEN_LOOK:
            return False
        dirnames[:] = [name for name in dirnames if name not in _TOOL_FOLDERS]
    return False


def make_folders(folder: Path) -> None:
    """``folder.mkdir(parents=True, exist_ok=True)`` one level at a time: pathlib's and
    ``os.makedirs`` recurse once a missing level, and a tree deeper than about 980
    folders raised RecursionError.

    Raises:
        OSError: As ``mkdir`` does.
    """
    missing = []
    while not folder.is_dir() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for level in reversed(missing):
        level.mkdir(exist_ok=True)


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole or not at all: beside it first, then
    renamed over it, so that a full disk or a kill leaves the file before it, never half
    of the new one; the file written beside it does not outlive a failure.

    Raises:
        OSError: As writing or renaming does.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_PATH_TOO_LONG = os.strerror(errno.ENAMETOOLONG)


def unlisted_advice(reason: str) -> str:
    """What to do about folders that could not be listed, the first for ``reason`` (an
    ``OSError.strerror``, as :class:`ImageSearch` keeps it)."""
    if reason == _PATH_TOO_LONG:  # the whole path is over the system's limit (4,096 bytes)
        return ("shorten the names of the folders on their path, or move them nearer the "
                "top of the tree")
    return "make them readable (or put back what was moved away)"


_NOT_DATA = frozenset({"thumbs.db", "desktop.ini"})
"""Files an operating system leaves in image folders (with hidden files, never counted)."""

_SEARCH_WARNED: set[tuple[object, ...]] = set()


def _first_time(*key: object) -> bool:
    """Whether the folder search's warning ``key`` (its kind, the folder, what it
    counts) is new to this process: a command searches a folder more than once."""
    if key in _SEARCH_WARNED:
        return False
    _SEARCH_WARNED.add(key)
    return True


def _warn_left_out(root: Path, others: collections.Counter[str]) -> None:
    """Say once per folder and tally which files :func:`find_images` leaves out."""
    tally = tuple(sorted(others.items(), key=lambda item: (-item[1], item[0])))
    if not _first_time("extensions", os.path.abspath(root), tally):
        return
    shown = ", ".join(f"{suffix} {n}" for suffix, n in tally[:6])
    more = f", and {len(tally) - 6} other kinds" if len(tally) > 6 else ""
    logger.warning("%d file(s) under %s are left out: their extensions are not of images "
                   "anomaly-flow reads (%s%s; it reads %s); convert or rename any images "
                   "among them", sum(others.values()), display_path(root), shown, more,
                   " ".join(sorted(IMAGE_EXTENSIONS)))


def _warn_hidden(root: Path, files: list[str], folders: list[str]) -> None:
    """Say once per folder and count which hidden names (``.x``) :func:`find_images`
    leaves out: the image files, and apart from them the folders holding image files
    (whose images are not counted one by one), with an example or two."""
    if not _first_time("hidden", os.path.abspath(root), len(files), len(folders)):
        return
    shown = ", ".join(one_line(display_path(name)) for name in sorted(files + folders)[:2])
    logger.warning("left out %s under %s (names starting with '.', e.g. %s): macOS's ._ "
                   "copies, .ipynb_checkpoints and .Trashes hold no images of yours; to "
                   "include one, rename it without the leading '.'",
                   _hidden_counted(files, folders), display_path(root), shown)


def _hidden_counted(files: list[str], folders: list[str]) -> str:
    """``2 hidden image files and 1 hidden folder holding images``, leaving out a kind
    there is none of."""
    return " and ".join(f"{n} hidden {what}{'' if n == 1 else 's'}{holding}"
                        for n, what, holding in ((len(files), "image file", ""),
                                                 (len(folders), "folder", " holding images"))
                        if n)


def _suffix(name: str) -> str:
    """``Path(name).suffix`` without building a Path: ``..png`` has the suffix ``.png``
    (``os.path.splitext`` would give none), ``.png`` and ``a.`` have none."""
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def is_store(folder: Path) -> bool:
    """Whether ``folder`` is a local MLflow store (``mlruns/``: its sqlite database beside
    the ``artifacts/`` of the runs), which :func:`find_images` does not search."""
    try:
        return (folder / "mlflow.db").is_file() and (folder / "artifacts").is_dir()
    except OSError:  # a folder that cannot be searched: os.walk reports it
        return False


def _dir_id(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _enter(path: Path, real_dirs: set[tuple[int, int]], seen: set[tuple[int, int]],
           linked: list[Path]) -> bool:
    """Enter every real folder of the tree, and a symlinked folder only if it is new (its
    real path then noted in ``linked``)."""
    try:
        folder = _dir_id(path)
    except OSError:
        return True  # os.walk reports it through onerror
    symlink = path.is_symlink()
    if folder in real_dirs and not symlink:
        return True
    if folder in seen:
        logger.info("not following %s: it leads to a folder already searched", display_path(path))
        return False
    seen.add(folder)
    if symlink:
        linked.append(Path(os.path.realpath(path)))
    return True
