"""Tests for anomaly_flow.fashion_mnist: IDX files, the data set, and the shipped sample."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from anomaly_flow.data import DataError
from anomaly_flow.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_sample,
    read_idx,
    write_sample_folders,
)
from anomaly_flow.folders import find_images

# --------------------------------------------------------------------------- IDX


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_types_and_compression(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    cases = [
        (rng.integers(0, 256, (3, 4, 5), dtype=np.uint8), 0x08),
        (rng.integers(-(2**31), 2**31, (6, 2), dtype=np.int32), 0x0C),
        (rng.normal(size=7), 0x0E),
    ]
    for i, (array, code) in enumerate(cases):
        plain = tmp_path / f"case{i}-idx"
        plain.write_bytes(idx_bytes(array, code))
        packed = tmp_path / f"case{i}-idx.gz"
        packed.write_bytes(gzip.compress(idx_bytes(array, code)))
        for path in (plain, packed):
            out = read_idx(path)
            assert out.dtype.isnative and out.shape == array.shape
            np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    good = idx_bytes(np.zeros((2, 3), np.uint8), 0x08)
    cases = {
        "text": (b"hello world", "not an IDX file"),
        "type": (b"\0\0\x07\x01" + good[4:], "not an IDX file"),
        "header": (good[:6], "header cut short"),
        "short": (good[:-1], r"promises shape \(2, 3\) \(6 bytes\) but it holds 5"),
        "long": (good + b"\0", "but it holds 7"),
        "gzip": (gzip.compress(good)[:-6], "damaged gzip file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            read_idx(tmp_path / name)
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(tmp_path / "missing")


def test_fashion_mnist_missing_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist("val", root=tmp_path)  # type: ignore[arg-type]


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    assert len(FASHION_MNIST_CLASSES) == 10


# --------------------------------------------------------------------------- shipped sample


def test_shipped_sample() -> None:
    sample = load_sample()
    assert sample.classes == FASHION_MNIST_CLASSES
    assert sample.train.shape == (2000, 1, 28, 28) and sample.train.dtype == np.uint8
    assert sample.calibration.shape == (600, 1, 28, 28)
    assert sample.test_images.shape == (600, 1, 28, 28) and sample.test_labels.shape == (600,)
    assert int(sample.test_is_anomaly.sum()) == 300
    counts = np.bincount(sample.test_labels[sample.test_is_anomaly], minlength=10)
    assert counts[sample.normal_class] == 0 and set(np.delete(counts, sample.normal_class)) <= {
        33,
        34,
    }


def test_sample_folders_replace_an_earlier_sample_and_leave_other_folders_alone(
        tmp_path: Path) -> None:
    root = tmp_path / "sample"
    folders = write_sample_folders(root, limit=12)
    assert len(find_images(folders["train"])) == 12
    assert len(find_images(folders["test_anomalous"])) == 12
    again = write_sample_folders(root, limit=5)  # a smaller sample, none of the first
    assert {key: len(find_images(path)) for key, path in again.items()} == {
        "train": 5, "calibration": 5, "test": 10, "test_normal": 5, "test_anomalous": 5}

    own = tmp_path / "mine"
    own.mkdir()
    (own / "photo.png").write_bytes(b"someone's image")
    with pytest.raises(DataError, match=r"mine is not empty, and the sample goes into a "
                                        r"new or empty folder .* give another folder"):
        write_sample_folders(own)
    assert [p.name for p in own.iterdir()] == ["photo.png"]
    with pytest.raises(DataError, match="is a file, not a folder"):
        write_sample_folders(own / "photo.png")
    with pytest.raises(ValueError, match="limit must be at least 1 image per folder, not 0"):
        write_sample_folders(tmp_path / "new", limit=0)
