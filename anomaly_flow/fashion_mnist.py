"""Fashion-MNIST: the data set read from its IDX files, and the subset the package ships.

The benchmarks and ``scripts/build_sample.py`` read the whole data set
(:func:`load_fashion_mnist`; Debian's ``dataset-fashion-mnist`` puts it in
:data:`FASHION_MNIST_DIR`). The demo, the tests and ``pipelines/end_to_end.py --sample``
need data without it: the small subset that script builds ships inside the package
(``sample_data/fashion_mnist_sample.npz``, :func:`load_sample`), and
:func:`write_sample_folders` writes it out as image folders, so that the demo reads it
through the same files as anyone's own images. A user's images never come through here:
they enter by :mod:`anomaly_flow.data`.

Example:
    >>> sample = load_sample()
    >>> sample.train.shape, sample.classes[sample.normal_class]
    ((2000, 1, 28, 28), 'Sneaker')
"""

from __future__ import annotations

import gzip
import math
import shutil
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from anomaly_flow.data import DataError, display_path, write_image_folder

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# --------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or plain.

    Returns:
        The array, in native byte order, with the shape the header gives.

    Raises:
        DataError: The file is missing, damaged or not an IDX file.
    """
    path, name = Path(path), display_path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {name}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{name} is a damaged gzip file ({exc}); download it again") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{name} is not an IDX file: it lacks the magic number 00 00 <type> <ndim>")
    ndim = raw[3]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is a damaged IDX file: header cut short; download it again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{name} is a damaged IDX file: its header promises shape {shape} ({expected} "
            f"bytes) but it holds {len(raw) - header} bytes of data; download it again"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(
    split: Literal["train", "test"], root: Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from its IDX files (``.gz`` or plain).

    Returns:
        ``(images, labels)``: uint8 ``(N, 1, 28, 28)`` and int64 ``(N,)`` class indices
        into :data:`FASHION_MNIST_CLASSES`.

    Raises:
        DataError: The files are missing or damaged.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        candidates = [root / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(
                f"Fashion-MNIST {split} file {candidates[0].name} not found in {root}; "
                "install it with `apt-get install dataset-fashion-mnist` or pass the folder as root"
            )
        found.append(read_idx(path))
    images, labels = found
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
        raise DataError(
            f"Fashion-MNIST files in {root} do not match: images {images.dtype} {images.shape}, "
            f"labels {labels.shape}; download them again"
        )
    return images[:, None], labels.astype(np.int64)


# --------------------------------------------------------------------------- shipped sample


@dataclass(frozen=True, eq=False)
class SampleData:
    """The Fashion-MNIST subset shipped for the demo (built by ``scripts/build_sample.py``).

    Attributes:
        train: uint8 ``(N, 1, 28, 28)``, the normal class, from the training split.
        calibration: uint8 ``(M, 1, 28, 28)``, more of the normal class, disjoint from ``train``.
        test_images: uint8 ``(T, 1, 28, 28)`` from the test split, normal and anomalous.
        test_labels: int64 ``(T,)`` class indices into ``classes``.
        normal_class: Index of the normal class.
        classes: Class names.
    """

    train: np.ndarray
    calibration: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    normal_class: int
    classes: tuple[str, ...]

    @property
    def test_is_anomaly(self) -> np.ndarray:
        """bool ``(T,)``: True for test images not of the normal class."""
        return self.test_labels != self.normal_class


def load_sample() -> SampleData:
    """Load the sample data shipped inside the package."""
    resource = resources.files("anomaly_flow") / "sample_data" / "fashion_mnist_sample.npz"
    with resource.open("rb") as file, np.load(file, allow_pickle=False) as npz:
        return SampleData(
            train=npz["train"],
            calibration=npz["calibration"],
            test_images=npz["test_images"],
            test_labels=npz["test_labels"].astype(np.int64),
            normal_class=int(npz["normal_class"]),
            classes=tuple(str(c) for c in npz["classes"]),
        )


SAMPLE_MARKER = ".anomaly-flow-sample"
"""The file :func:`write_sample_folders` leaves in a folder it wrote."""


def write_sample_folders(root: Path, limit: int | None = None) -> dict[str, Path]:
    """Write the shipped sample as PNG folders under ``root``: ``train``, ``calibration``
    (held-out normal images), ``test_normal`` (``test/normal``) and ``test_anomalous``
    (``test/anomalous/<class>``); ``test`` is their parent. Files are named after their
    class; with ``limit``, at most that many images go to each of the four folders.

    ``root`` must be new, empty, or a folder this function wrote before (it leaves
    :data:`SAMPLE_MARKER` there), whose three folders are then replaced: images of an
    earlier, larger sample must not stay among the new ones, nor the sample mix with
    someone's own images.

    Raises:
        DataError: ``root`` is a file, or a folder with other contents.
        ValueError: ``limit`` is below 1.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 image per folder, not {limit}")
    root = Path(root)
    if root.is_dir() and (root / SAMPLE_MARKER).is_file():
        for old in ("train", "calibration", "test"):
            shutil.rmtree(root / old, ignore_errors=True)
    elif root.is_dir() and any(root.iterdir()):
        raise DataError(f"{display_path(root)} is not empty, and the sample goes into a new "
                        "or empty folder (or one it was written to before, which it "
                        "replaces); give another folder, or empty this one")
    elif root.exists() and not root.is_dir():
        raise DataError(f"{display_path(root)} is a file, not a folder; give a folder for "
                        "the sample")
    root.mkdir(parents=True, exist_ok=True)
    (root / SAMPLE_MARKER).write_text(
        "The anomaly-flow sample images. Writing the sample here again replaces the "
        "train, calibration and test folders.\n")
    sample = load_sample()

    def slug(label: int) -> str:
        return sample.classes[label].lower().replace("/", "-").replace(" ", "-")

    folders = {"train": root / "train", "calibration": root / "calibration",
               "test": root / "test", "test_normal": root / "test" / "normal",
               "test_anomalous": root / "test" / "anomalous"}
    normal = f"{slug(sample.normal_class)}_"
    cap = slice(None, limit)
    write_image_folder(sample.train[cap], folders["train"], normal)
    write_image_folder(sample.calibration[cap], folders["calibration"], normal)
    is_anomaly = sample.test_is_anomaly
    write_image_folder(sample.test_images[~is_anomaly][cap], folders["test_normal"], normal)
    images, labels = sample.test_images[is_anomaly][cap], sample.test_labels[is_anomaly][cap]
    for label in np.unique(labels):
        write_image_folder(images[labels == label], folders["test_anomalous"] / slug(label),
                           f"{slug(label)}_")
    return folders
