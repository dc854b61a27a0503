"""Tests for anomaly_flow.data, on real image files written to disk."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from anomaly_flow import data
from anomaly_flow.data import (
    ArrayDataset,
    DataError,
    ImageDecodeError,
    ImageFolderDataset,
    decode_image,
    image_to_array,
    load_image,
    split_train_val,
    try_load_image,
    write_image_folder,
)
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.folders import find_images
from anomaly_flow.survey import conversion_notes
from tests.conftest import FILE_EDITS, damaged, obeying_file_modes

REPO = Path(__file__).resolve().parent.parent
FORMATS = {"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP", "gif": "GIF"}
LOSSLESS = {"png", "bmp", "tiff", "webp"}


def rgb_pattern(width: int = 40, height: int = 30) -> Image.Image:
    """A smooth RGB image with a distinct value in each channel."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    return Image.fromarray(array.astype(np.uint8))


def save(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and IEND claiming ``width × height``, with no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def reason_of(path: Path | bytes, mode: str = "L", size: int = 8) -> str:
    array, reason = try_load_image(path, mode, size)
    assert array is None and reason is not None
    assert "\n" not in reason
    return reason


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_each_format_decodes_to_mode_and_size(tmp_path: Path, ext: str) -> None:
    img = rgb_pattern()
    options = {"lossless": True} if ext == "webp" else {}
    path = save(img, tmp_path / f"pattern.{ext}", format=FORMATS[ext], **options)
    rgb = load_image(path, "RGB", 16)
    grey = load_image(path, "L", 16)
    assert rgb.shape == (3, 16, 16) and grey.shape == (1, 16, 16)
    assert rgb.dtype == grey.dtype == np.uint8
    expected = image_to_array(img, "RGB", 16)
    tolerance = 0 if ext in LOSSLESS else 40  # JPEG and GIF (256 colours) are lossy
    assert np.abs(rgb.astype(int) - expected).max() <= tolerance


def test_bytes_and_path_decode_identically(tmp_path: Path) -> None:
    path = save(rgb_pattern(), tmp_path / "a.png")
    np.testing.assert_array_equal(
        load_image(path, "RGB", 8), load_image(path.read_bytes(), "RGB", 8)
    )


def test_native_size_is_not_resampled(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    path = save(Image.fromarray(array), tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(path, "L", 12)[0], array)


def test_resize_stretches_crops_or_pads_to_the_square(tmp_path: Path) -> None:
    """A 4×2 image (two columns of 50, two of 250, above a row of 100s) made 2×2 each way:
    stretched (both halves squeezed), its centred square cropped, or fitted whole inside
    the square on black; a square image of the model's size is left as it is by all."""
    pixels = np.array([[50, 50, 250, 250], [100, 100, 100, 100]], np.uint8)  # (H=2, W=4)
    path = save(Image.fromarray(pixels), tmp_path / "wide.png")
    stretched = load_image(path, "L", 2)
    np.testing.assert_array_equal(stretched, image_to_array(Image.fromarray(pixels), "L", 2))
    assert stretched[0, 0, 0] < stretched[0, 0, 1]  # both columns of the left half squeezed
    cropped = load_image(path, "L", 2, "crop")
    np.testing.assert_array_equal(cropped[0], pixels[:, 1:3])  # the centre, not resampled
    padded = load_image(path, "L", 2, "pad")  # 4×2 fitted as 2×1, centred: a bar below
    np.testing.assert_array_equal(padded[0, 1], [0, 0])
    assert padded[0, 0, 0] < padded[0, 0, 1]
    # a crop falls on whole pixels: 33×32 loses one column and keeps the rest as it is
    # (a box half a pixel off, as ImageOps.fit's, would blur a one-pixel defect)
    odd = np.full((32, 33), 100, np.uint8)
    odd[10, 10] = 255
    cropped = load_image(save(Image.fromarray(odd), tmp_path / "odd.png"), "L", 32, "crop")
    np.testing.assert_array_equal(cropped[0], odd[:, :32])
    square = np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8)
    for resize in ("stretch", "crop", "pad"):
        np.testing.assert_array_equal(load_image(save(Image.fromarray(square), tmp_path / "s.png"),
                                                 "L", 6, resize)[0], square)
        assert load_image(path.read_bytes(), "RGB", 8, resize).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="unknown resize 'squash'"):
        image_to_array(Image.fromarray(pixels), "L", 2, "squash")  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@example(width=56, height=29, size=28, colour=False)  # Pillow's own rounding: 15 rows
@example(width=200, height=75, size=28, colour=True)  # and 10, not 11
@given(width=st.integers(1, 300), height=st.integers(1, 300),
       size=st.sampled_from([4, 8, 16, 28, 32]), colour=st.booleans())
def test_pad_is_pillows_pad_and_keeps_a_thin_strip(width: int, height: int, size: int,
                                                   colour: bool) -> None:
    """``pad`` is ``ImageOps.pad`` (bicubic, black, centred) wherever that keeps the image;
    where Pillow's fitted side would round to 0 pixels (a strip thinner than ``1/(2·size)``
    of its length), ``pad`` keeps it one pixel thick instead of losing it."""
    from PIL import ImageOps

    shape = (height, width, 3) if colour else (height, width)
    img = Image.fromarray(np.random.default_rng(width * 71 + height).integers(
        0, 256, shape, dtype=np.uint8))
    mode = "RGB" if colour else "L"
    padded = image_to_array(img, mode, size, "pad")
    assert padded.shape == ((3 if colour else 1), size, size)
    if round((height / width if width > height else width / height) * size) >= 1:
        expected = np.asarray(ImageOps.pad(img, (size, size), method=data.RESAMPLE, color=0))
        expected = expected.transpose(2, 0, 1) if colour else expected[None]
        np.testing.assert_array_equal(padded, expected)
    else:  # Pillow's pad would give a black square: the strip is kept one pixel thick
        rows, cols = padded.any(axis=(0, 2)), padded.any(axis=(0, 1))
        assert (rows.sum(), cols.sum()) in ((1, size), (size, 1))


def test_first_frame_of_gif_and_tiff(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 8), 40), Image.new("L", (8, 8), 200)]
    for ext in ("gif", "tiff"):
        path = save(frames[0], tmp_path / f"anim.{ext}", save_all=True, append_images=frames[1:])
        assert Image.open(path).n_frames == 2
        assert np.all(load_image(path, "L", 8) == 40)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = np.zeros((32, 32), dtype=np.uint8)
    array[:, 16:] = 255  # white right half
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180°
    path = save(Image.fromarray(array), tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(path, "L", 32)[0].astype(int)
    assert out[:, :12].mean() > 200 and out[:, 20:].mean() < 50


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = load_image(path, "RGB", 16)
    np.testing.assert_allclose(out.reshape(3, -1).mean(1), [0, 255, 255], atol=3)  # cyan


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16).repeat(4, 0)
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, "L", 4)[0]
    np.testing.assert_array_equal(out[0], [0, 100, 255, 4])  # round(v / 257)


def test_int32_and_float_images() -> None:
    as_int = Image.fromarray(np.array([[0, 65535, 257 * 7, 3]], dtype=np.int32))
    assert as_int.mode == "I"
    np.testing.assert_array_equal(  # values 16 bits hold: scaled as 16-bit grey
        image_to_array(as_int.resize((4, 4)), "L", 4)[0, 0], [0, 255, 7, 0]
    )
    for wide in ([0, 65535, 70000, 3], [0, 65535, 20, -3]):  # clipped, they would be lost
        with pytest.raises(DataError, match=r"^32-bit integer grey image with values from "
                                            rf"{min(wide)} to {max(wide)}: only 0\.\.65535"):
            image_to_array(Image.fromarray(np.array([wide], dtype=np.int32)), "L", 4)
    as_float = Image.fromarray(np.array([[-5.0, 300.7, 12.4, np.inf]], dtype=np.float32))
    assert as_float.mode == "F"
    np.testing.assert_array_equal(
        image_to_array(as_float.resize((4, 4)), "L", 4)[0, 0], [0, 255, 12, 255]
    )
    # NaN, a "no data" mark, was taken as black: scored as a dark patch, nothing said
    with_nan = Image.fromarray(np.array([[1.0, np.nan], [np.nan, 3.0]], dtype=np.float32))
    with pytest.raises(DataError, match=r"^float grey image with 2 NaN pixel\(s\) of 4: NaN "
                                        "has no grey level; replace them"):
        image_to_array(with_nan, "L", 4)


@pytest.mark.parametrize("mode", ["1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "I;16B"])
def test_unusual_modes_convert(mode: str) -> None:
    img = Image.new(mode, (6, 4))
    assert image_to_array(img, "L", 8).shape == (1, 8, 8)
    assert image_to_array(img, "RGB", 8).shape == (3, 8, 8)


def test_palette_with_transparency_composites_onto_black(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # 0 = red, 1 = green
    img.putpixel((0, 0), 1)
    path = save(img, tmp_path / "palette.png", transparency=0)
    out = load_image(path, "RGB", 4)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 255, 0])
    np.testing.assert_array_equal(out[:, 1, 1], [0, 0, 0])  # transparent red → black


def test_alpha_composites_onto_black(tmp_path: Path) -> None:
    rgba = save(Image.new("RGBA", (4, 4), (200, 100, 50, 128)), tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(rgba, "RGB", 4)[:, 0, 0], [100, 50, 25])
    la = save(Image.new("LA", (4, 4), (200, 64)), tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(la, "L", 4)[0, 0, 0], 50)


def test_bad_mode_or_size_is_a_value_error(tmp_path: Path) -> None:
    path = save(rgb_pattern(), tmp_path / "a.png")
    with pytest.raises(ValueError, match="'L' or 'RGB'"):
        load_image(path, "RGBA", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        load_image(path, "L", 0)


# --------------------------------------------------------------------------- bad files


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A folder with good images and one of each kind of bad file."""
    root = tmp_path / "messy"
    (root / "sub").mkdir(parents=True)
    save(rgb_pattern(), root / "good.png")
    save(rgb_pattern(), root / "sub" / "good.JPG")
    (root / "text.png").write_text("this is not an image\n")
    (root / "empty.png").touch()
    full_png = png_bytes(rgb_pattern())
    (root / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    jpeg = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "loop.png").symlink_to("loop2.png")
    (root / "loop2.png").symlink_to("loop.png")
    (root / "dangling.png").symlink_to("missing.png")
    os.mkfifo(root / "pipe.png")
    (root / "notes.txt").write_text("not listed: not an image extension")
    with open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb") as file:
        file.write(full_png)
    return root


EXPECTED_REASONS = {
    "text.png": "cannot identify image file (not an image or unsupported format)",
    "empty.png": "empty file (0 bytes)",
    "truncated.png": "truncated image file",
    "truncated.jpg": "truncated image file",
    "loop.png": "symlink loop",
    "loop2.png": "symlink loop",
    "dangling.png": "dangling symlink (target missing)",
    "pipe.png": "not a regular file (a pipe, socket or device)",
}


def test_find_images_lists_every_candidate(messy_folder: Path) -> None:
    found = find_images(messy_folder)
    names = [str(p.relative_to(messy_folder)) for p in found]
    assert sorted(names, key=os.fsencode) == names
    assert set(names) == {*EXPECTED_REASONS, "good.png", "sub/good.JPG", "bad\udcff.png"}
    assert all(p.parent == messy_folder or p.parent.parent == messy_folder for p in found)


def test_each_bad_file_gets_a_one_line_reason(messy_folder: Path) -> None:
    for name, expected in EXPECTED_REASONS.items():
        assert reason_of(messy_folder / name) == expected, name
        with pytest.raises(ImageDecodeError) as info:
            load_image(messy_folder / name, "L", 8)
        assert str(info.value) == f"{messy_folder / name}: {expected}"


def test_non_utf8_name_decodes_and_prints(messy_folder: Path) -> None:
    (path,) = [p for p in find_images(messy_folder) if p.name.startswith("bad")]
    assert load_image(path, "RGB", 8).shape == (3, 8, 8)
    assert data.display_path(path).endswith("bad\\xff.png")
    assert data.undisplayed_path(data.display_path(path)) == str(path)  # read back
    assert data.undisplayed_path("gone\\xff.png") == "gone\\xff.png"  # no such file
    broken = Path(str(path).replace("bad", "worse"))
    os.replace(path, broken)
    broken.write_bytes(b"garbage")
    with pytest.raises(ImageDecodeError) as info:
        load_image(broken, "L", 8)
    str(info.value).encode("utf-8")  # printable: no lone surrogates


def test_folder_dataset_reports_failures_without_raising(messy_folder: Path) -> None:
    paths = find_images(messy_folder)
    dataset = ImageFolderDataset(paths, "L", 8)
    batches = list(DataLoader(dataset, batch_size=4))
    ok = torch.cat([b.ok for b in batches])
    errors = [e for b in batches for e in b.error]
    indices = torch.cat([b.index for b in batches])
    assert batches[0].image.shape == (4, 1, 8, 8) and batches[0].image.dtype == torch.uint8
    assert indices.tolist() == list(range(len(paths)))
    assert int(ok.sum()) == 3  # good.png, sub/good.JPG, bad\xff.png
    for path, good, error in zip(paths, ok.tolist(), errors, strict=True):
        assert good == (error == "")
        if path.name in EXPECTED_REASONS:
            assert error == EXPECTED_REASONS[path.name]
    failed = [item for item in dataset if not item.ok]
    assert all(int(item.image.abs().sum()) == 0 for item in failed)


def test_dataset_works_in_worker_processes(messy_folder: Path) -> None:
    dataset = ImageFolderDataset(find_images(messy_folder), "RGB", 8)
    copy = pickle.loads(pickle.dumps(dataset))  # what spawn-started workers receive
    assert [item.error for item in copy] == [item.error for item in dataset]
    batches = list(DataLoader(dataset, batch_size=5, num_workers=2))
    ok = torch.cat([b.ok for b in batches])
    assert int(ok.sum()) == 3
    assert int((~ok).sum()) == len(EXPECTED_REASONS)
    assert all(b.image.shape[1:] == (3, 8, 8) for b in batches)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = data.MAX_IMAGE_PIXELS
    assert limit == Image.MAX_IMAGE_PIXELS == 89_478_485
    # Above PIL's warning level and above twice it (where PIL raises): both refused.
    for width, height in [(10_000, 10_000), (20_000, 10_000)]:
        path = tmp_path / f"bomb{width}.png"
        path.write_bytes(png_header_only(width, height))
        expected = (
            f"image too large: {width * height} pixels exceeds the {limit}-pixel safety limit"
            "; save it smaller (the model sees every image at its image_size anyway)"
        )
        assert reason_of(path) == expected
    # The module constant is the policy: lower it and a small real image is refused.
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)
    small = save(Image.new("L", (20, 20)), tmp_path / "small.png")
    assert reason_of(small).startswith(
        "image too large: 400 pixels exceeds the 100-pixel safety limit; save it smaller")


def test_a_truncated_webp_is_said_to_be_damaged_not_a_decoder_error(tmp_path: Path) -> None:
    """Pillow's WebP decoder says "could not create decoder object" for data cut short,
    where PNG and JPEG say "truncated"."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                    ).save(buffer, "WEBP", quality=90)
    (tmp_path / "cut.webp").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=r"damaged or truncated image file \(its "
                                               r"decoder refused the data\)"):
        load_image(tmp_path / "cut.webp", "RGB", 16)


def test_a_file_too_large_to_be_an_image_is_refused_unread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = data.MAX_FILE_BYTES
    assert limit == 8 * data.MAX_IMAGE_PIXELS + 2**20
    huge = tmp_path / "video.png"
    with open(huge, "wb") as file:  # sparse: no disk or memory spent on its bytes
        file.truncate(limit + 1)
    assert reason_of(huge) == (f"file too large: {limit + 1} bytes exceeds the {limit}-byte "
                               "safety limit for an image file")
    # The module constant is the policy: a real image one byte over it is refused, one at
    # it decodes.
    image = save(Image.fromarray(np.full((8, 8), 77, np.uint8)), tmp_path / "x.png")
    monkeypatch.setattr(data, "MAX_FILE_BYTES", image.stat().st_size - 1)
    assert reason_of(image).startswith("file too large: ")
    monkeypatch.setattr(data, "MAX_FILE_BYTES", image.stat().st_size)
    assert int(load_image(image, "L", 8).max()) == 77


def test_a_file_longer_than_its_size_says_is_read_whole_up_to_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that has grown since its size was read (as /proc's files, whose size is 0,
    always have) is read to its end, and refused once past the limit: the read follows
    the file, not the size it gave."""
    grown = tmp_path / "grown.png"
    grown.symlink_to("/proc/self/status")
    assert os.stat(grown).st_size == 0
    assert reason_of(grown) == "cannot identify image file (not an image or unsupported format)"
    assert len(data._read_regular_file(grown)) > 100
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    assert reason_of(grown) == ("file too large: more bytes exceeds the 100-byte safety "
                                "limit for an image file")


PERMISSION_CHECK = """
import json, sys
from anomaly_flow.folders import find_images
from anomaly_flow.data import try_load_image
root = sys.argv[1]
found = [p.name for p in find_images(root)]
print(json.dumps({"found": found, "reason": try_load_image(root + "/secret.png", "L", 8)[1]}))
"""


def test_permission_denied_is_reported(tmp_path: Path) -> None:
    save(rgb_pattern(), tmp_path / "open.png")
    save(rgb_pattern(), tmp_path / "secret.png").chmod(0o000)
    (tmp_path / "locked").mkdir(mode=0o000)
    save(rgb_pattern(), tmp_path / "locked" / "hidden.png")
    command = [sys.executable, "-c", PERMISSION_CHECK, str(tmp_path)]
    command = obeying_file_modes(command)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {"found": ["open.png", "secret.png"], "reason": "permission denied"}
    assert "cannot list folder" in result.stderr  # the unreadable folder is logged


def save_frames(path: Path, values: Sequence[int], **options: Any) -> None:
    """An image file of 16×16 grey frames (or pages), one per value."""
    frames = [Image.fromarray(np.full((16, 16), v, np.uint8)) for v in values]
    frames[0].save(path, save_all=len(frames) > 1, append_images=frames[1:], **options)


def test_a_file_of_several_frames_is_read_by_its_first_and_counted(tmp_path: Path) -> None:
    """An animated GIF, PNG or WebP, or a multi-page TIFF: the first frame is the image,
    and decoding counts the frames, so scoring can say what it did not read; training's
    notes say it of the folder."""
    for name in ("anim.gif", "anim.png", "anim.webp", "pages.tiff"):
        save_frames(tmp_path / name, [10, 200, 90], lossless=True)
        decoded = decode_image(tmp_path / name, "L", 8)
        assert decoded.more_frames and decoded.shape == (16, 16), name
        assert (decoded.array == 10).all(), name
    for name in ("still.gif", "still.png", "still.tiff", "still.jpg"):
        save_frames(tmp_path / name, [10])
        assert not decode_image(tmp_path / name, "L", 8).more_frames, name
    # a JPEG with a second picture (a phone's gain map, a preview) is one image: Pillow
    # reads it as an MPO of two frames, which are not two images
    save_frames(tmp_path / "camera.jpg", [10, 90], format="MPO")
    with Image.open(tmp_path / "camera.jpg") as img:
        assert img.format == "MPO" and img.is_animated
    assert not decode_image(tmp_path / "camera.jpg", "L", 8).more_frames
    paths = sorted(tmp_path.iterdir())
    assert conversion_notes(paths, "L", 16) == [
        "4 of 9 images looked at hold several frames or pages (an animated GIF, PNG or "
        "WebP, a multi-page TIFF), and only the first of each is read; to train on the "
        "others, save each frame as an image file of its own"]
    assert conversion_notes(paths, "L", 16, training=False) == []  # scoring counts them


def test_a_32_bit_tiff_beyond_16_bits_is_an_error_not_white(tmp_path: Path) -> None:
    """A 32-bit integer TIFF using its range (here an 8-bit image times 2^23, as some
    scientific cameras write) would be clipped to white in most pixels and flagged for
    that; it is an undecodable file instead, its reason saying what to do. One whose values
    fit 16 bits reads as the same image in a 16-bit PNG does."""
    rng = np.random.default_rng(3)
    eight = rng.integers(0, 256, (16, 16))
    Image.fromarray((eight * 2 ** 23).astype(np.int32), mode="I").save(tmp_path / "wide.tiff")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(tmp_path / "wide.tiff", "L", 16)
    assert caught.value.reason.startswith(
        f"32-bit integer grey image with values from {eight.min() * 2 ** 23} to "
        f"{eight.max() * 2 ** 23}: only 0..65535 (16-bit grey) is scaled to 8 bits; save "
        "it as a 16- or 8-bit image"), caught.value.reason
    assert try_load_image(tmp_path / "wide.tiff", "L", 16) == (None, caught.value.reason)
    sixteen = eight * 257
    Image.fromarray(sixteen.astype(np.int32), mode="I").save(tmp_path / "fits.tiff")
    Image.fromarray(sixteen.astype(np.uint16)).save(tmp_path / "fits.png")
    np.testing.assert_array_equal(load_image(tmp_path / "fits.tiff", "L", 16),
                                  load_image(tmp_path / "fits.png", "L", 16))
    np.testing.assert_array_equal(load_image(tmp_path / "fits.png", "L", 16)[0], eight)


def test_a_float_tiff_with_nan_pixels_is_an_error_not_black(tmp_path: Path) -> None:
    """NaN marks "no data" in float images (depth maps, thermal cameras); read as black,
    such a file was scored as a dark patch with nothing said. It is an undecodable file,
    its reason saying what to do; the same image with the NaNs filled reads as before."""
    depth = np.random.default_rng(4).uniform(0, 255, (16, 16)).astype(np.float32)
    depth[:, :8] = np.nan
    Image.fromarray(depth).save(tmp_path / "depth.tiff")
    reason = ("float grey image with 128 NaN pixel(s) of 256: NaN has no grey level; replace "
              "them (with the background's value, say) and save it again")
    with pytest.raises(ImageDecodeError) as caught:
        load_image(tmp_path / "depth.tiff", "L", 16)
    assert caught.value.reason == reason
    assert try_load_image(tmp_path / "depth.tiff", "L", 16) == (None, reason)
    Image.fromarray(np.nan_to_num(depth)).save(tmp_path / "filled.tiff")
    assert load_image(tmp_path / "filled.tiff", "L", 16)[0, :, :8].max() == 0


# --------------------------------------------------------------------------- in-memory data


def test_array_dataset_converts_exactly_like_files(tmp_path: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 1, 28, 28), dtype=np.uint8)
    paths = write_image_folder(images, tmp_path / "out", "img")
    assert [p.name for p in paths] == [f"img{i:05d}.png" for i in range(5)]
    from_files = ImageFolderDataset(paths, "L", 32)
    from_arrays = ArrayDataset(images, "L", 32)
    for i in range(5):
        assert from_files[i].ok and from_arrays[i].ok and from_arrays[i].index == i
        torch.testing.assert_close(from_files[i].image, from_arrays[i].image, atol=0, rtol=0)
    same_size = ArrayDataset(images)
    np.testing.assert_array_equal(same_size[2].image.numpy(), images[2])
    np.testing.assert_array_equal(load_image(paths[2], "L", 28), images[2])
    as_rgb = ArrayDataset(images, "RGB", 28)[0].image
    assert as_rgb.shape == (3, 28, 28) and torch.equal(as_rgb[0], as_rgb[2])
    with pytest.raises(ValueError, match="both mode and size"):
        ArrayDataset(images, "L")


def test_write_image_folder_formats_and_validation(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    for fmt in ("png", "bmp", "tiff", "webp"):
        (path, _) = write_image_folder(images, tmp_path / fmt, "x", fmt=fmt)
        np.testing.assert_array_equal(load_image(path, "RGB", 8), images[0])
    with pytest.raises(ValueError, match="unknown image format"):
        write_image_folder(images, tmp_path, "x", fmt="xcf")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        write_image_folder(images.astype(np.float32), tmp_path, "x")


# --------------------------------------------------------------------------- bookkeeping


def test_split_is_reproducible_and_disjoint() -> None:
    train, val = split_train_val(100, 0.2, seed=7)
    again = split_train_val(100, 0.2, seed=7)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    assert len(val) == 20 and not set(train) & set(val)
    assert not np.array_equal(val, split_train_val(100, 0.2, seed=8)[1])
    train, val = split_train_val(5, 0.0, seed=0)
    assert train.tolist() == list(range(5)) and val.size == 0


def test_split_errors() -> None:
    with pytest.raises(DataError, match=r"at least 2 images are needed.*found 1"):
        split_train_val(1, 0.1, seed=0)
    with pytest.raises(DataError, match="no images"):
        split_train_val(0, 0.0, seed=0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
            split_train_val(10, bad, seed=0)


@given(n=st.integers(2, 500), fraction=st.floats(0.001, 0.999), seed=st.integers(0, 2**32))
def test_split_properties(n: int, fraction: float, seed: int) -> None:
    train, val = split_train_val(n, fraction, seed)
    assert len(train) >= 1 and len(val) >= 1
    assert sorted([*train.tolist(), *val.tolist()]) == list(range(n))


def encoded_samples() -> dict[str, bytes]:
    """One small real image in every format the folders are searched for, as file bytes:
    a grey 28x28 sneaker (PNG, GIF, BMP, TIFF, WebP), in colour as JPEG and RGBA PNG."""
    grey = Image.fromarray(load_sample().train[0, 0])
    colour = Image.merge("RGB", (grey, grey.transpose(Image.Transpose.FLIP_LEFT_RIGHT), grey))
    encoded = {}
    for name, img, fmt in (("png", grey, "PNG"), ("gif", grey, "GIF"), ("bmp", grey, "BMP"),
                           ("tiff", grey, "TIFF"), ("webp", grey, "WEBP"),
                           ("jpeg", colour, "JPEG"), ("rgba", colour.convert("RGBA"), "PNG")):
        buffer = io.BytesIO()
        img.save(buffer, fmt)
        encoded[name] = buffer.getvalue()
    return encoded


ENCODED = encoded_samples()


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(ENCODED)), edits=FILE_EDITS,
       mode=st.sampled_from(["L", "RGB"]))
def test_damaged_image_bytes_are_answered_never_raised(
        kind: str, edits: list[tuple[str, float, bytes]], mode: str) -> None:
    """Scoring's contract for every file: decoded to the model's shape, or a one-line
    reason; never an exception that would stop the run (PIL's decoders raise many types
    for damaged data, and a mangled header can announce a huge image). The damage hits
    headers, chunk lengths, palette sizes and compressed data alike."""
    item = data.load_item(damaged(ENCODED[kind], edits), mode, 16, index=3)
    assert item.index == 3 and item.image.dtype == torch.uint8
    assert item.image.shape == (1 if mode == "L" else 3, 16, 16)
    if item.ok:
        assert item.error == ""
    else:
        assert item.error and "\n" not in item.error and len(item.error) < 500, item.error
        assert not item.image.any()


def test_threads_decoding_take_turns_with_the_warning_filters(tmp_path: Path) -> None:
    """catch_warnings saves and restores the process's filters: a thread decoding inside
    another's block would, leaving after it, put that block's filters (PIL's warnings
    ignored) back for good. Decoding waits for the block instead, and a process forked
    while a thread holds it (a DataLoader worker) decodes all the same."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    before = list(warnings.filters)
    decoded: list[np.ndarray] = []
    with data.warnings_caught():
        warnings.simplefilter("ignore")
        other = threading.Thread(target=lambda: decoded.append(load_image(path, "L", 8)))
        other.start()
        other.join(timeout=0.5)
        assert other.is_alive() and not decoded  # waiting for this block to end
    other.join(timeout=30)
    assert len(decoded) == 1 and warnings.filters == before
    # the lock held by a thread the forked child does not have
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with data.warnings_caught():
            entered.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: exit 0 once it has decoded
            os._exit(0 if load_image(path, "L", 8).shape == (1, 8, 8) else 1)
        for _ in range(300):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("a child forked while a thread held the filters lock hung decoding")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        holder.join()
