"""Fingerprints of image folders and digests of their files: which data a run used.

:func:`fingerprint_and_digests` reads each file once and gives the folder's fingerprint
(SHA-256 over the files' relative paths, sizes and contents) and each file's own SHA-256.
The fingerprint tags the MLflow runs of training, calibration and evaluation
(``data_fingerprint``, ``normal_fingerprint``) and lets a resumed training refuse a folder
that changed since. The per-file digests find the same image under any name: calibration
and evaluation leave out the images a model was trained on, and copies within a folder
(:func:`notable_copies`, :func:`duplicate_note`), which make validation and calibration
figures look better than new images will, are named.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from anomaly_flow.data import warnings_caught

_UNREADABLE = "unreadable:"


def is_unreadable(digest: str) -> bool:
    """Whether a digest of :func:`fingerprint_and_digests` marks a file it could not read."""
    return digest.startswith(_UNREADABLE)


def _read_digest(path: Path) -> tuple[int, str]:
    """``(size, SHA-256 hex)`` of a regular file, or ``(-1, "unreadable:<errno>")``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            return size, hashlib.file_digest(file, "sha256").hexdigest()
    except OSError as exc:
        return -1, f"{_UNREADABLE}{errno.errorcode.get(exc.errno or 0, exc.errno)}"


def fingerprint(paths: Sequence[Path], root: Path) -> str:
    """A SHA-256 hex digest of a set of files: their paths relative to ``root``, sizes and contents.

    Every file's content is hashed (fine for image folders of up to a few GB), so the
    digest changes when any byte does and not when files are touched or copied. The order
    of ``paths`` does not matter. A file that cannot be read enters as its error code.
    """
    return fingerprint_and_digests(paths, root)[0]


def fingerprint_and_digests(paths: Sequence[Path], root: Path) -> tuple[str, list[str]]:
    """:func:`fingerprint`, and each file's SHA-256 hex digest in the order of ``paths``
    (``unreadable:<errno name>`` for a file that cannot be read), from one read of each."""
    records, digests = [], []
    for path in paths:
        relative = os.fsencode(os.path.relpath(path, root))
        size, content = _read_digest(path)
        digests.append(content)
        records.append(relative + f"\0{size}\0{content}\n".encode())
    digest = hashlib.sha256()
    for record in sorted(records):
        digest.update(record)
    return digest.hexdigest(), digests


def notable_copies(digests: Sequence[str]) -> int:
    """How many of ``digests`` (SHA-256 of readable files) repeat another's, when that is
    more than a few stray copies: every file the same (``len(digests) - 1``), or more than
    a tenth of them copies; 0 otherwise."""
    copies = len(digests) - len(set(digests))
    notable = copies == len(digests) - 1 or 10 * copies > len(digests)
    return copies if copies and notable else 0


def duplicate_note(digests: Sequence[str], paths: Sequence[Path]) -> str | None:
    """What repeated contents (:func:`notable_copies`) do to a training, or None.

    ``digests`` are :func:`fingerprint_and_digests`' for ``paths``. Copies of a file that
    is not an image (the same broken download twice) are no image the model learns: a
    repeated content counts only when one of its files opens as an image (its header;
    one file per repeated content is opened)."""
    files: dict[str, list[Path]] = collections.defaultdict(list)
    for digest, path in zip(digests, paths, strict=True):
        if not is_unreadable(digest):
            files[digest].append(path)
    digests = [digest for digest, same in files.items()
               if len(same) == 1 or _opens_as_image(same[0]) for _ in same]
    copies = notable_copies(digests)
    if not copies:
        return None
    if copies == len(digests) - 1:
        return (f"all {len(digests)} image files have the same content: the model learns "
                "that one image, validation bits/dim measures nothing else, and every other "
                "image will score as an anomaly; train on varied normal images")
    return (f"{copies} of {len(digests)} image files repeat another's content: copies on "
            "both sides of the training/validation split make validation bits/dim and the "
            "normal reference (typicality, knn, pixel_knn, ensemble) look better than new "
            "images will; remove the copies")


def _opens_as_image(path: Path) -> bool:
    """Whether PIL recognises ``path``'s header as an image (nothing is decoded)."""
    try:
        with warnings_caught():
            warnings.simplefilter("ignore")
            with Image.open(path):
                return True
    except Exception:  # PIL raises many types for what is not an image
        return False
