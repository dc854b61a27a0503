"""The PNG length behind the complexity scores, against Pillow's own PNG files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, features

from anomaly_flow import complexity

# the lengths equal Pillow's files only where both use the same zlib
ZLIB_AS_PILLOWS = pytest.mark.skipif(
    features.version("zlib") != zlib.ZLIB_RUNTIME_VERSION,
    reason="Pillow's zlib is not Python's: their deflate streams may differ")


def png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def pil_png_bits(k: np.ndarray, factor: int) -> int:
    """Bits of the quantised image ``k`` (C, H, W) box-downsampled by PIL's ``reduce``
    (the mean of each block, rounded half up) and saved as PNG at level 9."""
    mode = "L" if k.shape[0] == 1 else "RGB"
    img = Image.fromarray(k[0] if k.shape[0] == 1 else k.transpose(1, 2, 0), mode)
    if factor > 1:
        img = img.reduce(factor)
    return 8 * len(png_bytes(img, compress_level=9))


def test_png_length_downsamples_block_means_rounded_half_up() -> None:
    # 2x2 blocks of 5-bit values (low 3 bits set, to be dropped) with means .25 .. 2.5
    k = np.array([[0, 0, 0, 1, 2, 3, 1, 1],
                  [0, 1, 1, 1, 2, 3, 2, 2]], dtype=np.uint8)
    image = np.tile(k, (4, 1))[None] * 8 + 7  # (1, 8, 8), 8-bit pixels
    down = np.tile(np.array([[0, 1, 3, 2]], dtype=np.uint8), (4, 1))  # by hand
    expected = 8 * len(png_bytes(Image.fromarray(down), compress_level=9)) / 64
    assert complexity.png_bits_per_dim(image, 5, downsample=2) == expected
    assert complexity.coarse_png_bits_per_dim(image, 5, levels=2) == expected
    assert complexity.png_bits_per_dim(image, 5, downsample=1) == \
        complexity.png_bits_per_dim(image, 5) == complexity.coarse_png_bits_per_dim(image, 5, 1)
    with pytest.raises(ValueError, match="cannot box-downsample a 8x8 image by 3"):
        complexity.png_bits_per_dim(image, 5, downsample=3)


@st.composite
def image_batches(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """uint8 ``(N, C, H, W)`` batches with structure or noise, an ``n_bits`` and a
    downsampling factor that divides the sides."""
    factor = draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(1, 4))
    channels = draw(st.sampled_from([1, 3]))
    height, width = (factor * draw(st.integers(1, 24 // factor)) for _ in range(2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "smooth", "flat", "blocks"]))
    if kind == "noise":
        images = rng.integers(0, 256, (n, channels, height, width))
    elif kind == "smooth":
        y, x = np.mgrid[0:height, 0:width]
        slopes = rng.integers(-40, 40, (n, channels, 2, 1, 1))
        images = (slopes[:, :, 0] * x + slopes[:, :, 1] * y + rng.integers(0, 256)) % 256
    elif kind == "flat":
        images = np.broadcast_to(rng.integers(0, 256, (n, channels, 1, 1)),
                                 (n, channels, height, width))
    else:
        images = rng.integers(0, 256, (n, channels, height, 1, width, 1)).repeat(
            2, axis=3).repeat(2, axis=5)[:, :, :, 0, :, 0]
    return np.ascontiguousarray(images, dtype=np.uint8), draw(st.integers(1, 8)), factor


@ZLIB_AS_PILLOWS
@settings(max_examples=150, deadline=None)
@given(image_batches())
def test_batch_png_lengths_are_pillows(batch: tuple[np.ndarray, int, int]) -> None:
    images, n_bits, factor = batch
    lengths = complexity.batch_png_bits_per_dim(images, n_bits, downsample=factor)
    expected = [pil_png_bits(image >> (8 - n_bits), factor) / image.size for image in images]
    assert lengths.tolist() == expected
    assert [complexity.png_bits_per_dim(image, n_bits, factor) for image in images] == expected


def test_png_rows_are_a_png_encoding_of_the_image() -> None:
    # whatever the zlib build: the filtered rows, deflated, decode to the image itself
    rng = np.random.default_rng(3)
    for channels in (1, 3):
        y, x = np.mgrid[0:9, 0:13]
        images = np.stack([rng.integers(0, 256, (channels, 9, 13)),
                           np.broadcast_to((7 * x + 3 * y) % 256, (channels, 9, 13)),
                           np.full((channels, 9, 13), 200)]).astype(np.uint8)
        rows = complexity._png_filtered_rows(images)
        assert rows.shape == (3, 9, 1 + 13 * channels)
        assert set(np.unique(rows[..., 0]).tolist()) <= {0, 1, 2, 4}
        for image, image_rows in zip(images, rows, strict=True):
            decoded = np.asarray(Image.open(io.BytesIO(png_file(image_rows, 13, 9, channels))))
            pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)
            np.testing.assert_array_equal(decoded, pixels)


def png_file(rows: np.ndarray, width: int, height: int, channels: int) -> bytes:
    """A PNG file around filtered scanlines ``(H, 1 + W·C)``, 8-bit grey or RGB."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


@ZLIB_AS_PILLOWS
@pytest.mark.parametrize("shape", [
    (3, 160, 160),  # a ~77 kB stream: two chunks of Pillow's 64 KiB block
    (1, 19, 20000),  # wider than 16,384 pixels: blocks of 4 x width = 80,000 bytes, 5 chunks
    (1, 256, 256),  # exactly one block of uncompressed noise, and a little more
])
def test_png_length_over_several_idat_chunks_is_pillows(shape: tuple[int, int, int]) -> None:
    image = np.random.default_rng(0).integers(0, 256, (1, *shape), dtype=np.uint8)
    assert complexity.batch_png_bits_per_dim(image, 8).tolist() == \
        [pil_png_bits(image[0], 1) / image[0].size]
    assert pil_png_bits(image[0], 1) / 8 > ImageFile.MAXBLOCK


@ZLIB_AS_PILLOWS
def test_png_lengths_of_a_batch_filtered_in_slices_are_pillows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # the filters run on slices of the batch to bound memory: slice edges change nothing
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 3, 12, 10), dtype=np.uint8) // rng.integers(
        1, 64, (7, 1, 1, 1), dtype=np.uint8)
    whole = complexity.batch_png_bits_per_dim(images, 8)
    monkeypatch.setattr(complexity, "_FILTER_SLICE_BYTES", 2 * images[0].size)
    assert complexity.batch_png_bits_per_dim(images, 8).tolist() == whole.tolist() == \
        [pil_png_bits(image, 1) / image.size for image in images]


def test_an_empty_batch_has_no_lengths() -> None:
    for factor in (1, 2):
        lengths = complexity.batch_png_bits_per_dim(np.zeros((0, 3, 8, 8), np.uint8), 8, factor)
        assert lengths.shape == (0,) and lengths.dtype == np.float64
