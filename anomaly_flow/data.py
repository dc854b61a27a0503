"""Finding, decoding and loading images: the one place pixels enter the package.

Training and scoring both go through :func:`load_image`, so an image file becomes the
same ``(C, H, W)`` uint8 array whichever command reads it. A file that cannot be read
never stops a run: :func:`find_images` lists every candidate file, and decoding turns
each failure into an :class:`ImageDecodeError` (or an ``error`` string) with a one-line
reason. What is not about reading images lives beside it: the fingerprints of the files
found in :mod:`anomaly_flow.fingerprint`, the Fashion-MNIST data the package reads and
ships in :mod:`anomaly_flow.fashion_mnist`.

Example:
    >>> paths = find_images(Path("parts/"))  # doctest: +SKIP
    >>> array, error = try_load_image(paths[0], mode="L", size=32)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import logging
import math
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch.utils.data import Dataset

from anomaly_flow.config import Resize
from anomaly_flow.errors import one_line

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ImageMode = Literal["L", "RGB"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File name extensions (compared in lower case) that :func:`find_images` lists."""

MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Images with more pixels are refused (decompression-bomb protection). PIL's own limit,
``PIL.Image.MAX_IMAGE_PIXELS``, applies as well: the lower of the two wins."""

MAX_FILE_BYTES: int = 8 * MAX_IMAGE_PIXELS + 2**20
"""Image files larger than this are refused unread: 8 bytes a pixel (uncompressed 16-bit
RGBA, the widest pixels PIL decodes) at the pixel limit, plus 1 MiB of headers. Every
file is read whole before decoding, so without it a multi-gigabyte file named like an
image would take that much memory in each decoding worker."""

RESAMPLE = Image.Resampling.BICUBIC
"""The one filter used to resize every image to the model's size."""

_FILTERS = threading.RLock()


def _new_filters_lock() -> None:
    global _FILTERS
    _FILTERS = threading.RLock()  # a fork may copy it held by a thread the child lacks


os.register_at_fork(after_in_child=_new_filters_lock)


@contextlib.contextmanager
def warnings_caught() -> Iterator[None]:
    """:func:`warnings.catch_warnings`, one thread at a time. It saves the process's
    warning filters on the way in and puts them back on the way out (per process before
    Python 3.14), so two threads' blocks interleaved would leave one's filters (PIL's
    warnings ignored, say) in force for the whole process after both."""
    with _FILTERS, warnings.catch_warnings():
        yield


_CHANNELS = {"L": 1, "RGB": 3}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_GREY_MODES = frozenset({"1", "L", "LA", "F", *_SIXTEEN_BIT_MODES})
_ALPHA_MODES = frozenset({"PA", "LA", "RGBa", "RGBA"})  # composited onto black
NARROW_SIXTEEN_BIT = 4096
"""A 16-bit image whose values all lie below this holds 12 bits or fewer (a camera's raw
range), which the scaling to 8 bits (``/ 257``) leaves in the darkest sixteenth."""
_UNIDENTIFIED = "cannot identify image file (not an image or unsupported format)"


class DataError(ValueError):
    """The images or data files given cannot be used; the message says why and what to do."""


class _UnscalableImage(DataError):
    """A decoded image whose pixel values the conversion to 8 bits has no scale for; the
    message says why, without the file name (decoding from a file adds it)."""


class ImageDecodeError(DataError):
    """One image could not be read or decoded.

    Attributes:
        source: The file, as printable text (see :func:`display_path`).
        reason: The cause in one line, without the file name.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = " ".join(reason.split())
        super().__init__(f"{source}: {self.reason}")


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that can always be printed or written as UTF-8.

    File names that are not valid UTF-8 reach Python as lone surrogates; they are shown as
    ``\\xff`` escapes instead of making a log handler or CSV writer fail.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate no file name decodes to (text a client sent)
        raw = os.fspath(path).encode("utf-8", errors="surrogatepass")
    return raw.decode("utf-8", errors="backslashreplace")


_BYTE_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")


def undisplayed_path(text: str) -> str:
    """The file a :func:`display_path` text names (a ``path`` from a scores table given
    back): ``text`` itself where such a file exists or it holds no ``\\xff`` escape,
    else the name with the escapes turned back into the bytes they stand for, where that
    file exists."""
    if "\\x" not in text or os.path.lexists(text):
        return text
    try:
        encoded = os.fsencode(text)
    except UnicodeEncodeError:  # no file name: reading it says so
        return text
    raw = _BYTE_ESCAPE.sub(lambda match: bytes([int(match[1], 16)]), encoded)
    name = os.fsdecode(raw)
    return name if os.path.lexists(name) else text


# --------------------------------------------------------------------------- discovery


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
    folders; the image files among them, and the folders that hold image files directly,
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
        for d in [d for d in dirnames if _is_store(Path(dirpath, d))]:
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
    if _is_store(root):  # asked for by name, so searched: but likely a slip (mlruns<TAB>)
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


def _holds_images(folder: str) -> bool:
    """Whether ``folder`` itself (not below) holds a file named like an image: a hidden
    folder worth a word (``.ipynb_checkpoints``), unlike ``.git`` or ``.venv``."""
    try:
        with os.scandir(folder) as entries:
            return any(_suffix(entry.name).lower() in IMAGE_EXTENSIONS
                       and not entry.name.startswith(".") for entry in entries)
    except OSError:
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


def _is_store(folder: Path) -> bool:
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


# --------------------------------------------------------------------------- decoding


def load_image(source: str | os.PathLike[str] | bytes, mode: ImageMode, size: int,
               resize: Resize = "stretch") -> np.ndarray:
    """Read one image file and convert it exactly as training and scoring expect.

    The steps: take the first frame (GIF, multi-page TIFF); apply the EXIF orientation;
    16-bit grey is scaled to 8 bits (``round(v / 257)``; 32-bit integer grey too where
    its values lie in 0..65535, and is refused where they do not), float grey is clipped to
    0..255; palette images with transparency and images with an alpha channel are
    composited onto **black** (``rgb * alpha / 255``); CMYK and other modes are converted
    by PIL; then to ``mode`` and to ``size × size`` with :data:`RESAMPLE`, as ``resize``
    says.

    Args:
        source: A file path, or the encoded file content as ``bytes``.
        mode: ``"L"`` (grey, C = 1) or ``"RGB"`` (C = 3).
        size: Side length in pixels of the square output.
        resize: ``"stretch"`` to the square (the aspect ratio is not kept), ``"crop"``
            the centred square first, or ``"pad"``: the whole image fitted inside the
            square, centred on black (:attr:`anomaly_flow.config.GlowConfig.resize`).

    Returns:
        uint8 array of shape ``(C, size, size)``.

    Raises:
        ImageDecodeError: The file cannot be read or decoded; ``reason`` says why.
    """
    return decode_image(source, mode, size, resize)[0]


class Decoded(NamedTuple):
    """An image as :func:`decode_image` gives it."""

    array: np.ndarray  # uint8 (C, size, size), as load_image returns it
    shape: tuple[int, int]  # upright (width, height) of the decoded first frame
    more_frames: bool  # the file holds frames or pages after the first, which is the image


def decode_image(source: str | os.PathLike[str] | bytes, mode: ImageMode, size: int,
                 resize: Resize = "stretch") -> Decoded:
    """:func:`load_image`, with the decoded image's upright ``(width, height)`` (after its
    EXIF orientation, before it is made square: the shape a heatmap is put back into; it
    comes from the decoded pixels, so it holds where a header does not tell it, as for a
    PNG's EXIF block after the image data) and whether the file holds more frames (an
    animated GIF, PNG or WebP, a multi-page TIFF: only the first is read, which scoring
    says)."""
    _check_mode_size(mode, size)
    if isinstance(source, bytes | bytearray | memoryview):
        name, data = "<bytes>", bytes(source)
    else:
        name, data = display_path(source), _read_regular_file(Path(source))
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    try:
        with warnings_caught():
            warnings.simplefilter("ignore")  # PIL's notes on odd files would flood the log
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                pixels = img.width * img.height
                if pixels > MAX_IMAGE_PIXELS:
                    raise ImageDecodeError(name, _too_large(pixels))
                img.load()  # decode everything now, so truncated files fail here
                array, shape = _to_input(img, mode, size, resize)
                return Decoded(array, shape, _has_more_frames(img))
    except ImageDecodeError:
        raise
    except _UnscalableImage as exc:
        raise ImageDecodeError(name, str(exc)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageDecodeError(name, _too_large(int(found[1])) if found else str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(name, _UNIDENTIFIED) from None
    except MemoryError:
        raise ImageDecodeError(name, "out of memory while decoding") from None
    except Exception as exc:  # PIL's plugins raise many types for damaged data
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(name, "truncated image file") from None
        if "could not create decoder object" in str(exc):  # WebP's word for cut-short data
            raise ImageDecodeError(name, "damaged or truncated image file (its decoder "
                                         "refused the data)") from None
        raise ImageDecodeError(name, f"cannot decode image ({type(exc).__name__}: {exc})") from None


def try_load_image(
    source: str | os.PathLike[str] | bytes, mode: ImageMode, size: int,
    resize: Resize = "stretch",
) -> tuple[np.ndarray | None, str | None]:
    """Like :func:`load_image`, but returns ``(array, None)`` or ``(None, reason)``."""
    try:
        return load_image(source, mode, size, resize), None
    except ImageDecodeError as exc:
        return None, exc.reason


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


_FRAMED_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF"})
"""Formats whose further frames or pages are further images. Not MPO: a JPEG whose
extra pictures (a phone's gain map, a preview) Pillow reads as frames holds one image."""


def _has_more_frames(img: Image.Image) -> bool:
    """Whether an opened image file holds frames or pages after the first (asked after the
    first is decoded: for a GIF it seeks to the second frame, never further)."""
    try:
        return img.format in _FRAMED_FORMATS and bool(getattr(img, "is_animated", False))
    except Exception:  # a damaged second frame: the first, read, is all there is
        return False


def image_to_array(img: Image.Image, mode: ImageMode, size: int,
                   resize: Resize = "stretch") -> np.ndarray:
    """Convert a decoded PIL image to the model's input; the conversion :func:`load_image` uses.

    Returns:
        uint8 array of shape ``(C, size, size)``.

    Raises:
        DataError: A 32-bit integer grey image (mode ``I``) with values outside 0..65535,
            which 8 bits have no scale for.
    """
    return _to_input(img, mode, size, resize)[0]


def _to_input(img: Image.Image, mode: ImageMode, size: int, resize: Resize
              ) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`image_to_array`, and the upright ``(width, height)`` it squared."""
    _check_mode_size(mode, size)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as exc:  # a damaged EXIF block should not cost an otherwise good image
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
    if img.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img, dtype=np.float64)
        # mode I holds 32-bit integers too (a 32-bit TIFF): clipped to 16 bits, most of such
        # an image would turn white, and scored, flagged for that alone
        low, high = (float(grey.min()), float(grey.max())) if grey.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise _UnscalableImage(
                f"32-bit integer grey image with values from {low:.0f} to {high:.0f}: only "
                "0..65535 (16-bit grey) is scaled to 8 bits; save it as a 16- or 8-bit image, "
                "scaled to that range")
        grey /= 257
        img = Image.fromarray(np.rint(grey).astype(np.uint8))
    elif img.mode == "F":
        grey = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64)), 0, 255)
        img = Image.fromarray(np.rint(grey).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        on_black = np.rint(rgba[..., :3] * rgba[..., 3:] / 255).astype(np.uint8)
        img = Image.fromarray(on_black)
    if img.mode not in ("L", "RGB"):  # CMYK, YCbCr, LAB, HSV, 1, RGBX: PIL knows them all
        img = img.convert("RGB")
    if img.mode != mode:
        img = img.convert(mode)
    upright = img.size
    if img.size != (size, size):
        img = _to_square(img, size, resize)
    array = np.array(img, dtype=np.uint8)
    return (array[None] if array.ndim == 2
            else np.ascontiguousarray(array.transpose(2, 0, 1))), upright


def content_box(width: int, height: int, size: int, resize: Resize
                ) -> tuple[int, int, int, int]:
    """Where an upright ``width × height`` image lies in its ``size × size`` square
    (:func:`load_image`), as ``(left, top, right, bottom)`` in the square's pixels: under
    ``pad`` the fitted image between its black bars (as ImageOps.pad fits it, except
    that a thin strip keeps a pixel, where it may vanish, or fail in older Pillow); under
    ``stretch`` and ``crop`` the whole square (all of it shows image)."""
    if resize != "pad":
        return 0, 0, size, size
    if width > height:
        fitted = (size, max(1, round(height / width * size)))
    else:
        fitted = (max(1, round(width / height * size)), size)
    left, top = round((size - fitted[0]) / 2), round((size - fitted[1]) / 2)
    return left, top, left + fitted[0], top + fitted[1]


def _to_square(img: Image.Image, size: int, resize: Resize) -> Image.Image:
    """``img`` (mode L or RGB) as ``size × size``, the way ``resize`` names."""
    width, height = img.size
    if resize == "crop":
        # the centred square on whole pixels: ImageOps.fit's box can fall half a pixel
        # off them (33×32), which resamples, and so blurs, an image that needed no resize
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif resize == "pad":
        left, top, right, bottom = content_box(width, height, size, resize)
        square = Image.new(img.mode, (size, size), 0)  # on black, as alpha is composited
        square.paste(img.resize((right - left, bottom - top), resample=RESAMPLE), (left, top))
        return square
    elif resize != "stretch":
        raise ValueError(f"unknown resize {resize!r}; choose 'stretch', 'crop' or 'pad'")
    return img if img.size == (size, size) else img.resize((size, size), resample=RESAMPLE)


def _spread(paths: Sequence[Path], sample: int) -> list[Path]:
    """Up to ``sample`` of ``paths``, evenly spaced over the whole list (a stride of
    ``len // sample`` would look only at the first ``sample`` files of a list up to twice
    as long, never at the last ones)."""
    looked = min(sample, len(paths))
    spread = sorted({round(i * (len(paths) - 1) / max(1, looked - 1)) for i in range(looked)})
    return [paths[i] for i in spread]


def _with_header(path: Path, look: Callable[[Image.Image], _T]) -> _T | None:
    """``look(img)`` for the image file at ``path`` opened (its header read; ``look``
    decodes what it needs), or None for a file that is not regular (a pipe named .png
    would block), cannot be opened, or is above the pixel limit, and where ``look`` fails
    to decode it: the callers note what they can, and training and scoring report the
    files themselves."""
    try:
        if not is_regular_file(path):
            return None
        with warnings_caught():
            # PIL's warnings (a bomb, corrupt EXIF data): the run reports the file itself
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                return look(img) if img.width * img.height <= MAX_IMAGE_PIXELS else None
    except Exception:  # PIL's plugins raise many types for damaged data (SyntaxError for
        return None    # a broken PNG chunk past the first IDAT)


def _look_at(paths: Sequence[Path], sample: int, look: Callable[[Image.Image], None]
             ) -> None:
    """Call ``look`` on up to ``sample`` of ``paths`` spread over the list, as
    :func:`_with_header` opens them."""
    for path in _spread(paths, sample):
        _with_header(path, look)


def _shape_table(shapes: collections.Counter[tuple[int, int]]
                 ) -> tuple[tuple[int, int, int], ...]:
    return tuple((w, h, n) for (w, h), n in shapes.most_common())


def conversion_notes(paths: Sequence[Path], mode: ImageMode, size: int,
                     sample: int = 64, *, resizing: bool = True,
                     training: bool = True, resize: Resize = "stretch",
                     trained_shapes: Sequence[tuple[int, int, int]] = ()) -> list[str]:
    """:func:`conversion_look`'s notes."""
    return conversion_look(paths, mode, size, sample, resizing=resizing, training=training,
                           resize=resize, trained_shapes=trained_shapes).notes


class ConversionLook(NamedTuple):
    """What :func:`conversion_look` found in one pass over a sample of a folder's headers."""

    notes: list[str]
    # (width, height, count) of the images looked at, each upright (EXIF orientation
    # applied, from the header), most common first: what a model records of its training
    # folder (Glow.training_shapes), so that scoring can say when images come in a size
    # it never saw
    shapes: tuple[tuple[int, int, int], ...]


_JUDGED_KINDS = {"judged": "coloured", "with_alpha": "transparent", "floats": "unit_floats",
                 "wide": "narrow"}
"""What :func:`conversion_look` finds by decoding an image, by the count of images it
was judged among."""


def conversion_look(paths: Sequence[Path], mode: ImageMode, size: int,
                    sample: int = 64, *, resizing: bool = True,
                    training: bool = True, resize: Resize = "stretch",
                    trained_shapes: Sequence[tuple[int, int, int]] = ()) -> ConversionLook:
    """What converting images to ``mode`` and ``size`` (by ``resize``) drops, judged from up to
    ``sample`` of them spread over ``paths``: colour seen in grey (a model of grey images
    cannot see a colour defect; judged on the first 16 colour-mode images), grey-mode images
    given to a colour model (repeated into three equal channels, unlike colour images: said
    of a folder that mixes the two, and for scoring (not ``training``) of one all grey,
    which a model trained on colour images would flag), detail lost when most of them are
    larger than ``size``, an interpolation learned when most are at most half of it (both
    left out without ``resizing``), floating-point images scaled to 0..1 (read as 0..255,
    they are near black), 16- or 32-bit integer grey images most of which use only values
    below 4096 (8- or 12-bit data stored in more bits: divided by 257, they are dark),
    aspect ratios that
    differ, where ``resize`` makes that visible to the model, images a ``crop`` keeps
    less than half of, for training, files with several frames (only the first is read;
    scoring counts every such file itself), and, for scoring, images most of which come in
    a size unlike any of ``trained_shapes`` (the ``shapes`` of the model's training
    folder; unknown when empty); and the shapes of the images looked at. Only regular
    files within the pixel limit are looked at; others are passed over (training and
    scoring report them)."""
    seen: collections.Counter[str] = collections.Counter()  # images looked at, by kind
    first: dict[str, str] = {}  # the first file of each kind a note is about, to name it
    larger: collections.Counter[tuple[int, int]] = collections.Counter()
    smaller: collections.Counter[tuple[int, int]] = collections.Counter()
    shapes: collections.Counter[tuple[int, int]] = collections.Counter()

    def count(kind: str, img: Image.Image, found: bool = True) -> None:
        seen[kind] += found
        if found and img.filename:
            first.setdefault(kind, one_line(display_path(img.filename)))

    def look(img: Image.Image) -> None:
        # what needs the pixels first: a file whose decoding fails here is not counted
        # at all (the run reports it), so no note speaks of it
        small = img.width * img.height <= 2**24  # decoded to judge it in a few ms
        judged: dict[str, bool] = {}  # kind -> found, under the kind's count of images
        if (mode == "L" and img.mode not in _GREY_MODES and seen["judged"] < 16
                and (img.format == "JPEG" or small)):
            judged["judged"] = _in_colour(img)
        if (img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)) \
                and seen["with_alpha"] < 16 and small:
            judged["with_alpha"] = _has_transparency(img)
        if img.mode == "F" and small:
            low, high = img.getextrema()
            judged["floats"] = low >= 0.0 and high <= 1.0
        if img.mode in _SIXTEEN_BIT_MODES and small:
            judged["wide"] = img.getextrema()[1] < NARROW_SIXTEEN_BIT
        # scoring counts them all, as it decodes them; a damaged later frame is not asked
        # about again: decoding reads the first alone
        layered = training and _has_more_frames(img)
        seen["checked"] += 1
        shape = _upright_size(img)
        shapes[shape] += 1
        scaled = min(shape) if resize == "crop" else max(shape)  # to size
        if scaled > size:
            larger[shape] += 1
        elif 2 * scaled <= size:
            smaller[shape] += 1
        count("grey", img, mode == "RGB" and img.mode in _GREY_MODES)  # a colour model takes
        for among, found in judged.items():
            seen[among] += 1
            count(_JUDGED_KINDS[among], img, found)
        seen["layered"] += layered

    _look_at(paths, sample, look)
    checked, grey, judged, coloured = (seen[k] for k in ("checked", "grey", "judged",
                                                           "coloured"))
    floats, unit_floats, wide, narrow = (seen[k] for k in ("floats", "unit_floats", "wide",
                                                           "narrow"))
    def eg(kind: str) -> str:
        return f" (e.g. {first[kind]})" if kind in first else ""

    notes = []
    if seen["layered"]:
        notes.append(f"{seen['layered']} of {checked} images looked at hold several frames or "
                     "pages (an animated GIF, PNG or WebP, a multi-page TIFF), and only the "
                     "first of each is read; to train on the others, save each frame as an "
                     "image file of its own")
    if coloured:
        notes.append(f"{coloured} of {judged} colour-mode images looked at are in colour"
                     f"{eg('coloured')}, and the model is grey (model.in_channels = 1): it "
                     "sees them in grey and cannot tell colours apart; for colour, train "
                     "with in_channels = 3 in a --config")
    if grey and grey < checked:
        notes.append(f"{grey} of {checked} images looked at are grey{eg('grey')}, and the "
                     "model is colour (model.in_channels = 3): each grey image is repeated "
                     "into three equal channels, so its likelihood is not comparable with a "
                     "colour image's" + (
                         ", and a model trained on both learns two kinds of image; use "
                         if training else " and it is likely flagged for being grey; use ")
                     + "colour images throughout, or a grey model (in_channels = 1) for grey "
                     "ones")
    elif grey and not training:  # a colour model trained on grey images knows them
        notes.append(f"all {grey} images looked at are grey{eg('grey')}, and the model is "
                     "colour "
                     "(model.in_channels = 3): each is repeated into three equal channels; "
                     "unless the model was trained on grey images too, their likelihoods "
                     "are unlike a colour image's and they are likely flagged for being grey")
    if unit_floats:
        notes.append(f"{unit_floats} of {floats} floating-point images looked at hold values "
                     f"in 0..1 only{eg('unit_floats')}, and float grey is read as 0..255 "
                     "(clipped), so they are near black to the model: save them scaled to "
                     "0..255, or as 8- or 16-bit images")
    if transparent := seen["transparent"]:
        notes.append(
            f"{transparent} of {seen['with_alpha']} images with an alpha channel or a "
            f"transparent colour looked at are partly transparent{eg('transparent')}, and "
            "transparent pixels are composited onto black: the model "
            + ("learns them on black" if training else "sees them on black, and where its "
               "training images were opaque or on another background, they are likely "
               "flagged for that alone")
            + "; to see them on their own background, flatten them onto it before "
            + ("training" if training else "scoring"))
    if 2 * narrow > wide:  # most: a stray dark frame among full-range ones is no sign
        notes.append(f"{narrow} of {wide} 16- or 32-bit integer grey images looked at use "
                     f"only values below {NARROW_SIXTEEN_BIT}{eg('narrow')} (8- or 12-bit "
                     "data stored in more bits?), and integer grey is scaled to 8 bits as "
                     "16-bit grey is, by 1/257, so they are dark to the model: scale them to "
                     "the full 0..65535 range, or save them as 8-bit images")
    n_larger = sum(larger.values())
    if resizing and checked and 2 * n_larger > checked:
        (width, height), _ = larger.most_common(1)[0]
        share = "all" if n_larger == checked else f"{n_larger} of {checked}"
        notes.append(f"{share} images looked at are larger than {size}×{size} (e.g. "
                     f"{width}×{height}) and are resized to {size}×{size} (model.image_size) "
                     "for training and scoring: detail finer than that is lost; to keep "
                     f"it, train with a larger model.image_size ({_larger_presets(mode, size)})")
    n_smaller = sum(smaller.values())
    if resizing and checked and 2 * n_smaller > checked:
        (width, height), _ = smaller.most_common(1)[0]
        share = "all" if n_smaller == checked else f"{n_smaller} of {checked}"
        side = min(width, height) if resize == "crop" else max(width, height)
        shown = (f"{width}×{height}, whose centred square is {side}×{side}"
                 if resize == "crop" and width != height else f"{width}×{height}")
        notes.append(f"{share} images looked at are at most half of {size}×{size} (e.g. "
                     f"{shown}) and are enlarged to it (model.image_size): the model learns "
                     "the interpolation as much as the images, at several times the cost of "
                     f"their own size; train with a model.image_size near {side} (a multiple "
                     "of 2**levels; train --config FILE)")
    if note := _mixed_shapes_note(shapes, size, resize):
        notes.append(note)
    if not training and (note := _unseen_shapes_note(shapes, trained_shapes, size, resize)):
        notes.append(note)
    long = collections.Counter({shape: n for shape, n in shapes.items()
                                if resize == "crop" and max(shape) > 2 * min(shape)})
    if long:
        (width, height), _ = long.most_common(1)[0]
        n_long = sum(long.values())
        share = "all" if n_long == checked else f"{n_long} of {checked}"
        notes.append(f"{share} images looked at have one side more than twice the other "
                     f"(e.g. {width}×{height}), and the centred "
                     "square (model.resize = 'crop') keeps less than half of each: what lies "
                     "beyond it is neither learned nor scored; cut the files to the part that "
                     "matters, in one aspect ratio, or train with model.resize = 'pad', which "
                     "sees the whole image, on black bars as wide as its shape leaves")
    return ConversionLook(notes, _shape_table(shapes))


def _larger_presets(mode: ImageMode, size: int) -> str:
    """Where a larger ``model.image_size`` than ``size`` comes from: the shipped presets
    for ``mode`` that have one, smallest first, then a config file."""
    from anomaly_flow.config import PRESETS, load_preset  # config is above data

    sizes = {name: load_preset(name).model for name in PRESETS}
    larger = sorted((model.image_size, name) for name, model in sizes.items()
                    if model.mode == mode and model.image_size > size)
    named = ", ".join(f"preset {name} has {side}×{side}" for side, name in larger)
    return f"{named}; or train --config FILE" if named else "train --config FILE"


def _mixed_shapes_note(shapes: collections.Counter[tuple[int, int]], size: int,
                       resize: Resize) -> str | None:
    """A note when the images looked at (their ``(width, height)`` counts) differ in aspect
    ratio by more than a tenth and ``resize`` shows it: stretched to a square, their shapes
    are distorted unequally; padded, their black bars differ; either way an image whose
    shape the model did not learn looks unlikely for that alone. A centred crop keeps
    the content undistorted and shows no bars (what it cuts off is documented)."""
    if not shapes or resize == "crop":
        return None
    ratios = {shape: shape[0] / shape[1] for shape in shapes}
    widest, tallest = max(ratios, key=ratios.__getitem__), min(ratios, key=ratios.__getitem__)
    if ratios[widest] <= 1.1 * ratios[tallest]:
        return None
    shown = " and ".join(f"{w}×{h}" for w, h in (widest, tallest))
    crop = ("or train with model.resize = 'crop' (train --config FILE): the centred square, "
            "undistorted and without bars, though what lies outside it goes unseen")
    if resize == "pad":
        return (f"the images looked at differ in aspect ratio (e.g. {shown}), and each is "
                f"fitted inside {size}×{size} on black bars of its own width (model.resize "
                "= 'pad'): an image of a shape the model rarely trained on can be flagged "
                f"for its bars alone; crop or pad the files to one aspect ratio, {crop}")
    return (f"the images looked at differ in aspect ratio (e.g. {shown}), and each is "
            f"stretched to {size}×{size} (model.resize = 'stretch': the aspect ratio is not "
            "kept): unequally distorted, an image of a shape the model rarely trained on "
            "can be flagged for its shape alone; crop or pad the files to one aspect "
            f"ratio, {crop}")


def describe_shapes(shapes: Sequence[tuple[int, int, int]], most: int = 5) -> str:
    """:attr:`ConversionLook.shapes` in words: ``28×28 (all 64 looked at)``, or the
    ``most`` commonest with their counts, ``640×480 (60), 480×640 (4) of 64 looked at``;
    ``unknown`` for none."""
    if not shapes:
        return "unknown"
    total = sum(n for _, _, n in shapes)
    if len(shapes) == 1:
        return f"{shapes[0][0]}×{shapes[0][1]} (all {total} looked at)"
    listed = ", ".join(f"{w}×{h} ({n})" for w, h, n in shapes[:most])
    more = f" and {len(shapes) - most} other sizes" if len(shapes) > most else ""
    return f"{listed}{more} of {total} looked at"


SHAPE_TOLERANCE = 0.1
"""How far (a fraction of each side) an image's size may be from a training image's for
:func:`conversion_notes` to count it as a size the model trained on."""


def _unseen_shapes_note(shapes: collections.Counter[tuple[int, int]],
                        trained: Sequence[tuple[int, int, int]], size: int,
                        resize: Resize = "stretch") -> str | None:
    """A note when most of the images looked at (their ``(width, height)`` counts) have a
    size no training image looked at had (within :data:`SHAPE_TOLERANCE` of each side;
    under ``crop``, of the centred square's side, all the model sees): brought to the
    model's size from another one, their detail, and with another aspect ratio their
    proportions or bars, differ from every training image's, so they can score as
    anomalous for that alone. Images brought down to the model's size from twice it or
    more, as a training image of their aspect ratio (within the same tolerance; any,
    under ``crop``) was, count as seen: both lose their finest detail alike, whatever
    their size. None when the training shapes are unknown."""
    if not trained or not shapes:
        return None

    def near(a: float, b: float) -> bool:
        return abs(a - b) <= SHAPE_TOLERANCE * b

    def reduced(width: int, height: int) -> bool:  # halved or more on the way to size
        # pad scales by the longer side; crop, and stretch (each side on its own), by
        # the shorter one, or what is enlarged there too
        return (max(width, height) if resize == "pad" else min(width, height)) >= 2 * size

    def alike(shape: tuple[int, int], w: int, h: int) -> bool:
        if reduced(*shape) and reduced(w, h) and (
                resize == "crop" or near(shape[0] / shape[1], w / h)):
            return True
        if resize == "crop":
            return near(min(shape), min(w, h))
        return near(shape[0], w) and near(shape[1], h)

    def seen(shape: tuple[int, int]) -> bool:
        return any(alike(shape, w, h) for w, h, _ in trained)

    unseen = collections.Counter({shape: n for shape, n in shapes.items() if not seen(shape)})
    n_unseen, checked = sum(unseen.values()), sum(shapes.values())
    if 2 * n_unseen <= checked:
        return None
    (width, height), _ = unseen.most_common(1)[0]
    share = "all" if n_unseen == checked else f"{n_unseen} of {checked}"
    listed = [f"{w}×{h}" for w, h, _ in trained[:3]]
    known = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} and {listed[-1]}"
    came = (f"came in {len(trained)} sizes, among them {known}" if len(trained) > 3
            else f"were {known}")
    return (f"{share} images looked at are of a size none of the model's training images "
            f"looked at had (e.g. {width}×{height}; the training images {came}): "
            f"brought to {size}×{size} (model.image_size) from another size than they were, "
            "their detail (and proportions, where the aspect ratio differs) is unlike every "
            "training image's, which alone can make them score as anomalous; score images "
            "from the same source and size as the training images, or train a model on "
            "images like these")


_HEADER_EXIF = frozenset({"JPEG", "MPO", "TIFF", "WEBP"})
"""Formats whose EXIF block Pillow reads with the header, before any pixel is decoded."""


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as the model sees the image: after its EXIF orientation (a
    quarter turn, 5 to 8, swaps them), which decoding applies (:func:`image_to_array`)."""
    if img.format not in _HEADER_EXIF and "exif" not in img.info:
        return img.size  # a PNG's getexif() would decode the whole image to look for it
    try:
        turned = img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    except Exception:  # a damaged EXIF block: decoding ignores it too
        turned = False
    return (img.height, img.width) if turned else img.size


def _has_transparency(img: Image.Image) -> bool:
    """Whether any pixel of an image with alpha (or a palette's transparent colour) is
    less than opaque, as decoding composites it (:func:`image_to_array`)."""
    alpha = img.convert("RGBA").getchannel("A")
    return alpha.getextrema()[0] < 255


def _in_colour(img: Image.Image) -> bool:
    """Whether an image's pixels differ between channels beyond a JPEG's rounding (grey
    stored as RGB is not colour)."""
    img.draft("RGB", (64, 64))  # JPEG: decode at a fraction of the size
    small = img.convert("RGB")
    small.thumbnail((64, 64))
    rgb = np.asarray(small, dtype=np.int16)
    return bool(np.abs(rgb - rgb.mean(axis=2, keepdims=True)).mean() > 2)


def _check_mode_size(mode: str, size: int) -> None:
    if mode not in _CHANNELS:
        raise ValueError(f"image mode must be 'L' or 'RGB', got {mode!r}")
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")


def _too_large(pixels: int) -> str:
    limit = min(MAX_IMAGE_PIXELS, Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS)
    return (f"image too large: {pixels} pixels exceeds the {limit}-pixel safety limit; save "
            "it smaller (the model sees every image at its image_size anyway)")


def _file_too_large(size: int | None) -> str:
    found = "more" if size is None else f"{size}"
    return (f"file too large: {found} bytes exceeds the {MAX_FILE_BYTES}-byte safety limit "
            "for an image file")


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``; refuses folders, pipes and devices before opening (no hang)."""
    name = display_path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, socket or device"
            raise ImageDecodeError(name, f"not a regular file ({kind})")
        if st.st_size > MAX_FILE_BYTES:
            raise ImageDecodeError(name, _file_too_large(st.st_size))
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size  # another file may have taken the name
            if size > MAX_FILE_BYTES:
                raise ImageDecodeError(name, _file_too_large(size))
            data = _read_up_to_limit(file, size)
        if len(data) > MAX_FILE_BYTES:
            raise ImageDecodeError(name, _file_too_large(None))
        return data
    except ImageDecodeError:
        raise
    except MemoryError:
        raise ImageDecodeError(name, "out of memory while reading the file") from None
    except ValueError:  # what the system calls raise for a name no file can have
        why = ("a NUL character" if "\0" in os.fspath(path)
               else "a character no file name can (a lone surrogate)")
        raise ImageDecodeError(name, f"not a file name: it holds {why}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "symlink loop"
        elif exc.errno == errno.ENOENT:
            reason = "dangling symlink (target missing)" if path.is_symlink() else "file not found"
        elif isinstance(exc, PermissionError):
            reason = "permission denied"
        else:
            reason = f"cannot read file ({exc.strerror or exc})"
        raise ImageDecodeError(name, reason) from None


def _read_up_to_limit(file: io.BufferedReader, size: int) -> bytes:
    """What ``file`` holds, up to one byte past :data:`MAX_FILE_BYTES`: ``size`` bytes
    (its size when opened, at most the limit) and one more, to see whether it has grown
    since; where it has, the rest in steps of 1 MiB. One read of the limit would allocate
    it whole (CPython sizes the buffer to the request), which fails in a process whose
    memory is capped (``ulimit -v``)."""
    wanted = size + 1
    data = file.read(wanted)
    if len(data) < wanted:
        return data
    pieces, total = [data], len(data)
    while total <= MAX_FILE_BYTES:
        piece = file.read(min(2**20, MAX_FILE_BYTES + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


# --------------------------------------------------------------------------- datasets


class ImageItem(NamedTuple):
    """One dataset item; PyTorch's default collate batches a list of them field by field."""

    image: torch.Tensor  # uint8 (C, H, W); zeros when ok is False
    ok: bool
    error: str  # one-line reason when ok is False, else ""
    index: int  # position in the dataset
    shape: tuple[int, int]  # the decoded file's upright (width, height); (0, 0) when not ok
    more_frames: bool  # the file holds frames or pages after the first (not read)


@dataclass(frozen=True)
class InvalidSource:
    """In place of a path or bytes: a table cell that cannot name an image (a number, a
    list). Its item fails with ``reason``, as an unreadable file does, so the row is kept."""

    reason: str


def load_item(source: str | Path | bytes | InvalidSource | None, mode: ImageMode, size: int,
              index: int, resize: Resize = "stretch") -> ImageItem:
    """Decode one image (a path or encoded bytes) into an :class:`ImageItem`; a failure,
    a missing source (``None`` or NaN, as an empty table cell reads) or an
    :class:`InvalidSource` included, gives a blank image with ``ok=False`` and the
    one-line reason."""
    if source is None or (isinstance(source, float) and math.isnan(source)):
        error = "no image given (empty value)"
    elif isinstance(source, InvalidSource):
        error = source.reason
    else:
        try:
            array, shape, more_frames = decode_image(source, mode, size, resize)
            return ImageItem(torch.from_numpy(array), True, "", index, shape, more_frames)
        except ImageDecodeError as exc:
            error = exc.reason
    blank = torch.zeros(_CHANNELS[mode], size, size, dtype=torch.uint8)
    return ImageItem(blank, False, error or "unknown error", index, (0, 0), False)


class ImageFolderDataset(Dataset[ImageItem]):
    """Image files decoded on access by :func:`try_load_image`; never raises for a bad file.

    Holds only paths and settings (no open files), so it works with DataLoader workers.

    Args:
        paths: Image files, e.g. from :func:`find_images`.
        mode: ``"L"`` or ``"RGB"``.
        size: Output side length.
        resize: How other sizes become ``size × size`` (see :func:`load_image`).
    """

    def __init__(self, paths: Sequence[Path], mode: ImageMode, size: int,
                 resize: Resize = "stretch") -> None:
        _check_mode_size(mode, size)
        self.paths = [Path(p) for p in paths]
        self.mode: ImageMode = mode
        self.size = size
        self.resize: Resize = resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageItem:
        return load_item(self.paths[index], self.mode, self.size, index, self.resize)


class ArrayDataset(Dataset[ImageItem]):
    """In-memory uint8 images ``(N, C, H, W)`` with the same items as :class:`ImageFolderDataset`.

    Given ``mode`` and ``size``, images of another shape are converted once, up front, by
    :func:`image_to_array` (with ``resize``), exactly as if they had been read from files.
    """

    def __init__(
        self, images: np.ndarray, mode: ImageMode | None = None, size: int | None = None,
        resize: Resize = "stretch",
    ) -> None:
        _check_image_array(images)
        if (mode is None) != (size is None):
            raise ValueError("give ArrayDataset both mode and size, or neither")
        if mode is not None and size is not None:
            wanted = (_CHANNELS[mode], size, size)
            if images.shape[1:] != wanted:
                images = np.stack([image_to_array(_to_pil(a), mode, size, resize)
                                   for a in images])
        self.images = torch.from_numpy(np.ascontiguousarray(images))

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> ImageItem:
        image = self.images[index]
        return ImageItem(image, True, "", index, (image.shape[-1], image.shape[-2]), False)


def _check_image_array(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, C, H, W) with C = 1 or 3, "
            f"got {images.dtype} {images.shape}"
        )


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))


def write_image_folder(
    images: np.ndarray, folder: Path, prefix: str, fmt: str = "png"
) -> list[Path]:
    """Write uint8 images ``(N, C, H, W)`` as files ``folder/<prefix><00000>.<fmt>``.

    ``fmt`` is ``png``, ``bmp``, ``tiff``, ``webp`` (lossless) or ``jpg`` (lossy).
    """
    _check_image_array(images)
    formats = {"png": "PNG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP", "jpg": "JPEG"}
    if fmt not in formats:
        raise ValueError(f"unknown image format {fmt!r}; choose one of {sorted(formats)}")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(images) - 1)))
    paths = []
    for i, array in enumerate(images):
        path = folder / f"{prefix}{i:0{width}d}.{fmt}"
        _to_pil(array).save(
            path, format=formats[fmt], **({"lossless": True} if fmt == "webp" else {})
        )
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- bookkeeping


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is (or links to) a regular file: one that opening cannot block, as
    a pipe named ``x.png`` would."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted, disjoint training and validation indices, reproducibly.

    ``round(n * val_fraction)`` indices (at least 1, at most ``n - 1``) go to validation
    when ``val_fraction > 0``.

    Raises:
        ValueError: ``val_fraction`` is outside ``[0, 1)``.
        DataError: Too few images to give both sides at least one.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 1:
        raise DataError("no images to split; the image folder is empty")
    if val_fraction > 0 and n < 2:
        raise DataError(
            f"at least 2 images are needed to hold out a validation set, found {n}; "
            "add images or set the validation fraction to 0"
        )
    n_val = min(max(round(n * val_fraction), 1), n - 1) if val_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
