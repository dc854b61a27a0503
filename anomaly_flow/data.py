"""Decoding and loading images: the one place pixels enter the package.

Training and scoring both go through :func:`load_image`, so an image file becomes the
same ``(C, H, W)`` uint8 array whichever command reads it. A file that cannot be read
never stops a run: decoding turns each failure into an :class:`ImageDecodeError` (or an
``error`` string) with a one-line reason. What is not about reading one image lives
beside it: finding the files in :mod:`anomaly_flow.folders`, the notes on what
converting a folder's images drops in :mod:`anomaly_flow.survey`, the fingerprints of
the files found in :mod:`anomaly_flow.fingerprint`, the Fashion-MNIST data the package
reads and ships in :mod:`anomaly_flow.fashion_mnist`.

Example:
    >>> array, error = try_load_image(Path("parts/a.png"), mode="L", size=32)  # doctest: +SKIP
"""

from __future__ import annotations

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from anomaly_flow.config import Resize

logger = logging.getLogger(__name__)

ImageMode = Literal["L", "RGB"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File name extensions (compared in lower case) of the files
:func:`anomaly_flow.folders.find_images` lists."""

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
SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
"""PIL's modes of 16-bit grey (and of 32-bit integer grey, ``I``): scaled to 8 bits by 1/257."""
GREY_MODES = frozenset({"1", "L", "LA", "F", *SIXTEEN_BIT_MODES})
"""PIL's modes of grey images: bilevel, 8-bit (alone or with alpha), float and the above."""
ALPHA_MODES = frozenset({"PA", "LA", "RGBa", "RGBA"})
"""PIL's modes with an alpha channel, whose pixels are composited onto black."""
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


# --------------------------------------------------------------------------- decoding


def load_image(source: str | os.PathLike[str] | bytes, mode: ImageMode, size: int,
               resize: Resize = "stretch") -> np.ndarray:
    """Read one image file and convert it exactly as training and scoring expect.

    The steps: take the first frame (GIF, multi-page TIFF); apply the EXIF orientation;
    16-bit grey is scaled to 8 bits (``round(v / 257)``; 32-bit integer grey too where
    its values lie in 0..65535, and is refused where they do not), float grey is clipped to
    0..255 (and refused where it holds NaN); palette images with transparency and images
    with an alpha channel are composited onto **black** (``rgb * alpha / 255``); CMYK and
    other modes are converted by PIL; then to ``mode`` and to ``size × size`` with
    :data:`RESAMPLE`, as ``resize`` says.

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
                return Decoded(array, shape, has_more_frames(img))
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


_FRAMED_FORMATS = frozenset({"GIF", "PNG", "WEBP", "TIFF"})
"""Formats whose further frames or pages are further images. Not MPO: a JPEG whose
extra pictures (a phone's gain map, a preview) Pillow reads as frames holds one image."""


def has_more_frames(img: Image.Image) -> bool:
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
            which 8 bits have no scale for, or a float grey one (mode ``F``) holding NaN.
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
    if img.mode in SIXTEEN_BIT_MODES:
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
        grey = np.asarray(img, dtype=np.float64)
        if n_nan := int(np.isnan(grey).sum()):  # a "no data" mark (depth, thermal): as black,
            raise _UnscalableImage(  # it would be scored as a dark patch and nothing said
                f"float grey image with {n_nan} NaN pixel(s) of {grey.size}: NaN has no grey "
                "level; replace them (with the background's value, say) and save it again")
        grey = np.clip(grey, 0, 255)  # ±inf too
        img = Image.fromarray(np.rint(grey).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ALPHA_MODES:
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
        paths: Image files, e.g. from :func:`anomaly_flow.folders.find_images`.
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
