"""Tests for anomaly_flow.data, on real image files written to disk."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
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
    conversion_look,
    conversion_notes,
    decode_image,
    describe_shapes,
    find_images,
    image_to_array,
    load_image,
    one_line,
    search_images,
    split_train_val,
    try_load_image,
    write_image_folder,
)
from anomaly_flow.fashion_mnist import load_sample
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
    as_float = Image.fromarray(np.array([[-5.0, 300.7, 12.4, np.nan]], dtype=np.float32))
    assert as_float.mode == "F"
    np.testing.assert_array_equal(
        image_to_array(as_float.resize((4, 4)), "L", 4)[0, 0], [0, 255, 12, 0]
    )


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


def test_an_mlflow_store_inside_the_folder_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``anomaly-flow score .`` where ./mlruns is: its plots are not the user's images."""
    write_image_folder(np.zeros((2, 1, 8, 8), np.uint8), tmp_path / "parts", "p-")
    store = tmp_path / "mlruns"
    write_image_folder(np.zeros((3, 1, 8, 8), np.uint8), store / "artifacts" / "1", "plot-")
    (store / "mlflow.db").write_bytes(b"")
    (tmp_path / "like-a-store").mkdir()  # a database alone is not a store
    (tmp_path / "like-a-store" / "mlflow.db").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["parts/p-00000.png",
                                                                   "parts/p-00001.png"]
    assert f"left out 1 MLflow store folder(s) under {tmp_path} (e.g. {store})" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert len(find_images(store)) == 3  # asked for by name: searched, and said
    assert f"{store} is an MLflow store: its images are runs' plots and sample grids, not " \
        "data of yours" in caplog.text


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
from anomaly_flow.data import find_images, try_load_image
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


# --------------------------------------------------------------------------- discovery


def test_find_images_extensions_and_order(tmp_path: Path) -> None:
    names = ["b/z.PNG", "a.jpeg", "a.JPG", "c.bmp", "d.tif", "e.TIFF", "f.webp", "g.gif", "b/a.png",
             "h.x.png"]  # the extension is the last suffix, as Path's
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "readme.md").write_text("x")
    for hidden in ("..png", "b/...jpg"):  # hidden, though named like images
        (tmp_path / hidden).write_bytes(b"x")
    for no_suffix in (".png", "b/.jpg", "png.", "jpg"):  # no extension at all
        (tmp_path / no_suffix).write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()  # a folder is never listed as an image
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == sorted(names)
    assert find_images(tmp_path) == find_images(tmp_path)


def test_conversion_notes_say_what_a_grey_or_smaller_model_drops(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(
            tmp_path / f"colour-{i}.png")
        grey = np.repeat(rng.integers(0, 256, (40, 30, 1), dtype=np.uint8), 3, axis=2)
        Image.fromarray(grey).save(tmp_path / f"grey-as-rgb-{i}.jpg", quality=90)
    os.mkfifo(tmp_path / "pipe.png")  # listed by find_images; opening it would block
    paths = sorted(tmp_path.iterdir())
    colour, size = conversion_notes(paths, "L", 16)
    assert colour.startswith(f"4 of 8 colour-mode images looked at are in colour (e.g. "
                             f"{tmp_path / 'colour-0.png'}), and the model is grey")
    assert size.startswith("all images looked at are larger than 16×16 (e.g. 30×40) and are "
                           "resized to 16×16 (model.image_size)")
    assert size.endswith("to keep it, train with a larger model.image_size (preset small has "
                         "28×28, preset fashion-mnist has 32×32; or train --config FILE)")
    assert conversion_notes(paths, "RGB", 40) == []  # colour kept, nothing shrunk
    greys = [p for p in paths if p.suffix == ".jpg"]  # grey stored as RGB JPEG: no colour
    assert conversion_notes(greys, "L", 64) == []
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):  # the most common size is small, but most images are large
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(small / f"a-{i}.png")
    for i, side in enumerate((40, 48, 56, 64)):
        Image.fromarray(np.zeros((side, side), np.uint8)).save(small / f"b-{i}.png")
    (note,) = conversion_notes(sorted(small.iterdir()), "L", 32)
    assert note.startswith("4 of 7 images looked at are larger than 32×32")
    assert note.endswith("(train --config FILE)")  # no shipped preset is larger than 32
    assert conversion_notes(sorted(small.iterdir()), "L", 32, resizing=False) == []


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


def test_conversion_notes_say_when_images_differ_in_aspect_ratio(tmp_path: Path) -> None:
    """Each image is stretched to a square: a folder of one shape is distorted alike, one
    that mixes shapes is not, which was said nowhere."""
    for i in range(3):
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / f"wide-{i}.png")
    Image.fromarray(np.zeros((300, 400), np.uint8)).save(tmp_path / "wide-large.png")
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(tmp_path / "near.png")  # within 10%
    alike = sorted(tmp_path.iterdir())
    assert conversion_notes(alike, "L", 64, resizing=False) == []
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "tall.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 64, training=False)
    crop = ("or train with model.resize = 'crop' (train --config FILE): the centred square, "
            "undistorted and without bars, though what lies outside it goes unseen")
    assert note == ("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40), and "
                    "each is stretched to 64×64 (model.resize = 'stretch': the aspect ratio is "
                    "not kept): unequally distorted, an image of a shape the model rarely "
                    "trained on can be flagged for its shape alone; crop or pad the files to "
                    f"one aspect ratio, {crop}")
    mixed = sorted(tmp_path.iterdir())
    (padded,) = conversion_notes(mixed, "L", 64, training=False, resize="pad")
    assert padded == ("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40), "
                      "and each is fitted inside 64×64 on black bars of its own width "
                      "(model.resize = 'pad'): an image of a shape the model rarely trained "
                      "on can be flagged for its bars alone; crop or pad the files to one "
                      f"aspect ratio, {crop}")
    assert conversion_notes(mixed, "L", 64, resizing=False, resize="crop") == []
    # a crop shrinks only images whose shorter side is larger (here the 400×300 alone)
    assert conversion_notes(mixed, "L", 32, resize="crop") == []
    assert "6 of 6 images looked at are larger than 32×32" not in " ".join(
        conversion_notes(mixed, "L", 32))
    assert conversion_notes(mixed, "L", 32)[0].startswith("all images looked at are larger")
    assert conversion_notes([], "L", 64) == []


def test_conversion_notes_say_when_images_are_enlarged_or_mostly_cropped_away(
        tmp_path: Path) -> None:
    """Images at most half the model's side are enlarged (the model learns the
    interpolation); a crop of an image with one side more than twice the other keeps less
    than half of it. Which side counts follows ``resize``: a crop scales the shorter one."""
    for i in range(3):
        Image.fromarray(np.zeros((12, 40), np.uint8)).save(tmp_path / f"strip-{i}.png")
    strips = sorted(tmp_path.iterdir())
    (enlarged,) = conversion_notes(strips, "L", 80)  # 40 of 80: enlarged twice
    assert enlarged == ("all images looked at are at most half of 80×80 (e.g. 40×12) and are "
                        "enlarged to it (model.image_size): the model learns the interpolation "
                        "as much as the images, at several times the cost of their own size; "
                        "train with a model.image_size near 40 (a multiple of 2**levels; train "
                        "--config FILE)")
    assert conversion_notes(strips, "L", 80, resizing=False) == []  # scoring: training's say
    assert conversion_notes(strips, "L", 64) == []  # 40 of 64: more than half
    cropped = conversion_notes(strips, "L", 16, resize="crop")  # 12 of 16: more than half
    assert cropped == ["all images looked at have one side more than twice the other "
                       "(e.g. 40×12), and the centred square (model.resize = 'crop') keeps "
                       "less than half of each: what lies beyond it is neither learned nor "
                       "scored; cut the files to the part that matters, in one aspect "
                       "ratio, or train with model.resize = 'pad', which sees the whole "
                       "image, on black bars as wide as its shape leaves"]
    assert conversion_notes(strips, "L", 24, resize="crop")[0].startswith(
        "all images looked at are at most half of 24×24 (e.g. 40×12, whose centred square is "
        "12×12) and are enlarged")


def test_conversion_notes_look_at_files_spread_over_the_whole_list(tmp_path: Path) -> None:
    """120 files, the last 20 tall: the 64 looked at reach the end of the list (a stride
    of 120 // 64 = 1 looked only at the first 64, all wide, and said nothing)."""
    for i in range(100):
        Image.fromarray(np.zeros((3, 4), np.uint8)).save(tmp_path / f"a-{i:03d}.png")
    for i in range(20):
        Image.fromarray(np.zeros((4, 3), np.uint8)).save(tmp_path / f"p-{i:02d}.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 4)
    assert note.startswith("the images looked at differ in aspect ratio (e.g. 4×3 and 3×4)")


def test_conversion_notes_judge_shapes_as_the_exif_orientation_turns_them(
        tmp_path: Path) -> None:
    """Two 40×30 JPEGs, one marked as turned a quarter (orientation 6): the model sees one
    wide and one tall image, so their aspect ratios differ."""
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = np.full((30, 40), 200, np.uint8)
    save(Image.fromarray(wide), tmp_path / "a.jpg")
    assert conversion_notes([tmp_path / "a.jpg"], "L", 64, resizing=False) == []
    save(Image.fromarray(wide), tmp_path / "b.jpg", exif=exif)
    # fitted as 48×64 (turned: tall) and 64×48: bars at the sides, then above and below
    tall, wide_too = (load_image(tmp_path / name, "L", 64, "pad")[0] for name in ("b.jpg",
                                                                               "a.jpg"))
    assert tall[:, :8].max() == 0 and tall[:8, 16:48].min() > 150
    assert wide_too[:8, :].max() == 0 and wide_too[16:48, :8].min() > 150
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 64, resize="pad")
    assert note.startswith("the images looked at differ in aspect ratio (e.g. 40×30 and 30×40)")


def test_image_shapes_record_the_upright_sizes_of_a_sample(tmp_path: Path) -> None:
    """What a model keeps of its training folder's sizes: counted upright (an EXIF
    quarter turn swaps the sides), most common first; files that are not images or not
    regular files are passed over, and a sample spreads over the whole list."""
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / f"a-{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(np.zeros((30, 40), np.uint8)), tmp_path / "b.jpg", exif=exif)
    (tmp_path / "c.png").write_text("not an image")
    os.mkfifo(tmp_path / "d.png")  # opening it would block
    paths = sorted(tmp_path.iterdir())

    def shapes(paths: list[Path], sample: int = 64) -> tuple[tuple[int, int, int], ...]:
        return conversion_look(paths, "L", 28, sample).shapes

    assert shapes(paths) == ((28, 28, 3), (30, 40, 1))
    assert describe_shapes(shapes(paths)) == "28×28 (3), 30×40 (1) of 4 looked at"
    assert describe_shapes(((28, 28, 64),)) == "28×28 (all 64 looked at)"
    assert describe_shapes(tuple((i, i, 1) for i in range(1, 8))) == (
        "1×1 (1), 2×2 (1), 3×3 (1), 4×4 (1), 5×5 (1) and 2 other sizes of 7 looked at")
    assert describe_shapes(()) == "unknown"
    assert shapes([]) == ()
    # two of a list of four: the first and the last
    assert shapes([*paths[:3], tmp_path / "b.jpg"], sample=2) == ((28, 28, 1), (30, 40, 1))


def test_scoring_notes_say_when_images_come_in_a_size_the_model_never_trained_on(
        tmp_path: Path) -> None:
    """A model trained on 28×28 images scores a folder of 64×48 ones: each is resized
    from another size, which alone can make it look anomalous. Said for scoring only,
    when most images are of such a size, a side more than 10 % from every training
    size's (under crop, the centred square's: all the model sees); not when the training
    sizes are unknown."""
    for i in range(3):
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(tmp_path / f"photo-{i}.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "known.png")
    paths = sorted(tmp_path.iterdir())
    trained = ((28, 28, 60), (30, 30, 4))
    score = {"resizing": False, "training": False, "resize": "crop"}  # crop: no aspect note
    (note,) = conversion_notes(paths, "L", 16, **score, trained_shapes=trained)
    assert note == ("3 of 4 images looked at are of a size none of the model's training "
                    "images looked at had (e.g. 64×48; the training images were 28×28 and "
                    "30×30): brought to 16×16 (model.image_size) from another size than "
                    "they were, their detail (and proportions, where the aspect ratio "
                    "differs) is unlike every training image's, which alone can make them "
                    "score as anomalous; score images from the same source and size as the "
                    "training images, or train a model on images like these")
    assert conversion_notes(paths, "L", 16, **score) == []  # sizes unknown
    assert conversion_notes(paths, "L", 16, resizing=False, resize="crop",
                            trained_shapes=trained) == []  # training judges its own folder
    assert conversion_notes(paths[1:], "L", 16, **score, trained_shapes=trained) != []
    half = paths[:2]  # known.png and one photo: not most
    assert conversion_notes(half, "L", 16, **score, trained_shapes=trained) == []
    # within 10 % of a training size on each side counts as that size
    stretch = {**score, "resize": "stretch"}

    def unseen(way: dict[str, object], trained: tuple[tuple[int, int, int], ...],
               size: int = 16) -> bool:
        notes = conversion_notes(paths, "L", size, **way, trained_shapes=trained)
        return any("of a size none of" in note for note in notes)  # (stretch: aspect too)

    for way in (score, stretch):
        assert not unseen(way, ((60, 52, 1), (28, 28, 5))), way
        assert unseen(way, ((25, 19, 1),)), way  # smaller than the model: enlarged
        # at 32×32 the photo is not halved on its way: the 10 % tolerance alone decides
        assert not unseen(way, ((60, 52, 1),), size=32), way  # 64/60, 48/52: within
        assert unseen(way, ((57, 43, 1),), size=32), way  # 48 is 12 % above 43
    # brought down from twice the model's size or more, a 64×48 photo loses its finest
    # detail as a 57×43 one does (48 is 12 % above 43, but the aspect ratio is the same)
    assert not unseen(stretch, ((57, 43, 1),)) and not unseen(score, ((57, 43, 1),))
    assert not unseen(stretch, ((200, 150, 1),))
    assert unseen(stretch, ((150, 150, 1),))  # square: not the photo's proportions
    assert not unseen(score, ((150, 150, 1),))  # under crop, only the square counts
    # a crop sees 48×48 of a 64×48 photo and of an 80×48 one alike; a stretch does not
    wider = ((80, 48, 1), (28, 28, 5))
    assert not unseen(score, wider) and unseen(stretch, wider)
    many = tuple((20 + i, 20, 1) for i in range(5))
    (listed,) = conversion_notes(paths, "L", 16, **score, trained_shapes=many)
    assert "the training images came in 5 sizes, among them 20×20, 21×20 and 22×20)" in listed


def test_conversion_notes_say_when_a_colour_model_takes_grey_images(tmp_path: Path) -> None:
    """The reverse of a grey model seeing colour: grey images (8- and 16-bit) repeated
    into three channels are nothing like the colour images a colour model knows."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"colour-{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "g.png")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
        tmp_path / "g16.png")
    paths = sorted(tmp_path.iterdir())
    (note,) = conversion_notes(paths, "RGB", 16)
    assert note == (f"2 of 5 images looked at are grey (e.g. {tmp_path / 'g.png'}), and the "
                    "model is colour (model.in_channels = 3): each grey image is repeated into "
                    "three equal channels, so its likelihood is not comparable with a colour "
                    "image's, and a model trained on both learns two kinds of image; use "
                    "colour images throughout, or a grey model (in_channels = 1) for grey ones")
    (scored,) = conversion_notes(paths, "RGB", 16, training=False)
    assert scored.startswith(f"2 of 5 images looked at are grey (e.g. {tmp_path / 'g.png'})")
    assert "colour image's and it is likely flagged for being grey; use colour" in scored
    assert int(load_image(tmp_path / "g.png", "RGB", 16).std(axis=0).max()) == 0  # as said
    assert conversion_notes([p for p in paths if "colour" in p.name], "RGB", 16) == []
    # all grey: a colour model may be trained on them (MVTec's grey categories), and
    # knows them; scored, they are what a model trained on colour would flag
    greys = [p for p in paths if p.name.startswith("g")]
    assert conversion_notes(greys, "RGB", 16) == []
    assert conversion_notes(greys, "RGB", 16, resizing=False, training=False) == [
        f"all 2 images looked at are grey (e.g. {tmp_path / 'g.png'}), and the model is "
        "colour (model.in_channels = 3): "
        "each is repeated into three equal channels; unless the model was trained on grey "
        "images too, their likelihoods are unlike a colour image's and they are likely "
        "flagged for being grey"]


def test_conversion_notes_say_when_transparent_pixels_are_seen_on_black(
        tmp_path: Path) -> None:
    """A cut-out product shot on a transparent background is seen on black: scored by a
    model of opaque images, every one was flagged, and nothing said why."""
    rng = np.random.default_rng(3)
    disc = np.zeros((16, 16, 4), dtype=np.uint8)
    disc[..., :3] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    disc[4:12, 4:12, 3] = 255  # opaque in the middle, transparent around it
    Image.fromarray(disc, "RGBA").save(tmp_path / "a-cutout.png")
    half = disc.copy()
    half[..., 3] = 128  # half transparent throughout
    Image.fromarray(half, "RGBA").save(tmp_path / "b-faded.webp", lossless=True)
    palette = Image.fromarray(rng.integers(0, 4, (16, 16), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(tmp_path / "c-palette.png", transparency=0)
    opaque = disc.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "d-opaque.png")
    Image.fromarray(opaque[..., :3]).save(tmp_path / "e-plain.png")
    paths = sorted(tmp_path.iterdir())
    (trained,) = conversion_notes(paths, "RGB", 16)
    assert trained == (f"3 of 4 images with an alpha channel or a transparent colour looked at "
                       f"are partly transparent (e.g. {tmp_path / 'a-cutout.png'}), and "
                       "transparent pixels are composited onto black: the model learns them "
                       "on black; to see them on their own background, flatten them onto it "
                       "before training")
    assert load_image(tmp_path / "a-cutout.png", "RGB", 16)[:, 0, 0].tolist() == [0, 0, 0]
    notes = conversion_notes(paths, "RGB", 16, training=False)
    assert any(note.endswith("they are likely flagged for that alone; to see them on their "
                             "own background, flatten them onto it before scoring")
               for note in notes), notes
    assert conversion_notes(paths[3:], "RGB", 16, training=False) == []  # opaque: no word


def test_conversion_notes_say_when_float_images_are_scaled_to_one(tmp_path: Path) -> None:
    """Float grey is read as 0..255: a float TIFF in 0..1 is near black to the model."""
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.random((16, 16), dtype=np.float32), mode="F").save(
            tmp_path / f"unit-{i}.tiff")
    Image.fromarray(rng.random((16, 16), dtype=np.float32) * 255, mode="F").save(
        tmp_path / "full.tiff")
    paths = sorted(tmp_path.iterdir())
    (note,) = conversion_notes(paths, "L", 16)
    assert note.startswith("3 of 4 floating-point images looked at hold values in 0..1 only")
    assert load_image(tmp_path / "unit-0.tiff", "L", 16).max() <= 1  # as the note says
    assert conversion_notes([tmp_path / "full.tiff"], "L", 16) == []


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


def test_conversion_notes_say_when_16_bit_images_hold_fewer_bits(tmp_path: Path) -> None:
    """16-bit grey is scaled by 1/257: 12-bit camera data, or 8-bit values in a 32-bit
    TIFF, come out in the darkest sixteenth."""
    rng = np.random.default_rng(2)
    for i in range(2):  # 12-bit data in a 16-bit PNG
        Image.fromarray(rng.integers(0, 4096, (16, 16), dtype=np.uint16)).save(
            tmp_path / f"twelve-{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16)).astype(np.int32), mode="I").save(
        tmp_path / "eight-in-32.tiff")
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
        tmp_path / "full.png")
    (note,) = conversion_notes(sorted(tmp_path.iterdir()), "L", 16)
    assert note.startswith("3 of 4 16- or 32-bit integer grey images looked at use only "
                           "values below 4096")
    assert load_image(tmp_path / "twelve-0.png", "L", 16).max() <= 16  # as the note says
    assert conversion_notes([tmp_path / "full.png"], "L", 16) == []
    # one dark frame among full-range images is no sign of 12-bit data: scaling it to the
    # full range, as the note would say, is wrong for it
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(
            mixed / f"full-{i}.png")
    Image.fromarray(rng.integers(0, 100, (16, 16), dtype=np.uint16)).save(mixed / "dark.png")
    assert conversion_notes(sorted(mixed.iterdir()), "L", 16) == []


def test_find_images_says_which_files_it_leaves_out(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """An image in a format it does not read (HEIC, say) is not silently dropped; hidden
    files and the files operating systems leave in folders are not worth a word."""
    save(rgb_pattern(8, 8), tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    for name in ("sub/photo.heic", "sub/other.HEIC", "notes.txt", "README", ".DS_Store",
                 "Thumbs.db", "sub/desktop.ini"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.data"):
        assert find_images(tmp_path) == [tmp_path / "a.png"]
        find_images(tmp_path)  # the same folder again: said once
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"4 file(s) under {tmp_path} are left out: their extensions "
                              "are not of images anomaly-flow reads (.heic 2, .txt 1, no "
                              "extension 1; it reads .bmp .gif .jpeg .jpg .png .tif .tiff "
                              ".webp); convert or rename any images among them")


def test_find_images_leaves_out_hidden_files_and_folders_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What macOS (``._x.png`` beside each copied file, ``.Trashes``) and Jupyter
    (``.ipynb_checkpoints``) leave in a folder is not the user's images: left out, in one
    warning that counts them and says how to include one; hidden clutter that is not named
    like an image (``.DS_Store``) is not worth a word, nor a hidden folder that holds no
    image file itself (``.git``, a ``.Trashes`` of per-user folders)."""
    for folder in ("sub/.Trashes/501", ".ipynb_checkpoints", ".git/objects"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    save(rgb_pattern(8, 8), tmp_path / "a.png")
    save(rgb_pattern(8, 8), tmp_path / "sub" / "b.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (tmp_path / "sub" / "._b.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    save(rgb_pattern(8, 8), tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    save(rgb_pattern(8, 8), tmp_path / "sub" / ".Trashes" / "501" / "old.png")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.data"):
        assert find_images(tmp_path) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
        find_images(tmp_path)  # the same folder again: said once
    (message,) = [r.getMessage() for r in caplog.records]
    assert message == (f"left out 2 hidden image files and 1 hidden folder holding images "
                       f"under {tmp_path} (names starting with '.', e.g. ._a.png, "
                       ".ipynb_checkpoints): macOS's ._ "
                       "copies, .ipynb_checkpoints and .Trashes hold no images of yours; to "
                       "include one, rename it without the leading '.'")
    # the folder given may itself be hidden: only what is inside it is left out
    trash = tmp_path / "sub" / ".Trashes"
    assert find_images(trash) == [trash / "501" / "old.png"]
    # a folder of hidden images only: the refusal says where the images went
    only = tmp_path.parent / f"{tmp_path.name}-only"
    (only / ".ipynb_checkpoints").mkdir(parents=True)
    save(rgb_pattern(8, 8), only / ".ipynb_checkpoints" / "a-checkpoint.png")
    with pytest.raises(DataError) as refused:
        find_images(only)
    assert str(refused.value) == (
        f"no image files found in {only} but hidden ones: 1 hidden folder holding images "
        "(names starting with '.', e.g. .ipynb_checkpoints) left out; rename the ones that "
        "hold your images without the leading '.'")
    # a folder of a git checkout only: nothing hidden to speak of, the plain refusal
    checkout = tmp_path.parent / f"{tmp_path.name}-checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(DataError, match=r"^no image files found in .* \(looked recursively"):
        find_images(checkout)


DEEP = 1_100
"""Folders nested deeper than Python 3.11's recursive ``os.walk`` could go (about 980)."""


def remove_tree(folder: Path) -> None:
    """``shutil.rmtree(folder)`` without its recursion, which fails on a deep tree."""
    folders, stack = [], [folder]
    while stack:
        folders.append(stack.pop())
        with os.scandir(folders[-1]) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    os.unlink(entry.path)
    for each in reversed(folders):
        each.rmdir()


@contextlib.contextmanager
def deep_folder(root: Path, depth: int = DEEP) -> Iterator[Path]:
    """``root/d/d/.../d``, ``depth`` folders deep (the deepest given), removed after (as
    pytest's clean-up, recursive, could not)."""
    folder = root
    for _ in range(depth):
        folder = folder / "d"
        folder.mkdir()
    try:
        yield folder
    finally:
        remove_tree(root / "d")


def test_find_images_searches_a_folder_tree_a_thousand_folders_deep(tmp_path: Path) -> None:
    save(rgb_pattern(), tmp_path / "top.png")
    with deep_folder(tmp_path) as bottom:
        save(rgb_pattern(), bottom / "bottom.png")
        (bottom / "up").symlink_to(tmp_path)  # a loop at the bottom is still not followed
        found = search_images(tmp_path)
        assert found.paths == [tmp_path / ("d/" * DEEP + "bottom.png"), tmp_path / "top.png"]
        assert found.unlisted == []


@contextlib.contextmanager
def too_long_a_path(root: Path, levels: int = 20) -> Iterator[Path]:
    """``levels`` nested folders of 250-character names under ``root``: the whole path
    is longer than the system takes (4,096 bytes), so they are made, and removed after,
    from inside one another. Gives the first folder whose path is too long to list."""
    name, back = "x" * 250, os.getcwd()
    os.chdir(root)
    try:
        for _ in range(levels):
            os.mkdir(name)
            os.chdir(name)
        depth = next(i for i in range(1, levels + 1)
                     if len(os.fsencode(root)) + i * (len(name) + 1) >= 4096)
        yield root.joinpath(*[name] * depth)
    finally:
        for _ in range(levels):
            os.chdir("..")
            os.rmdir(name)
        os.chdir(back)


def test_a_folder_whose_path_is_too_long_is_named_with_what_to_do(tmp_path: Path) -> None:
    """Making it readable would not help: the names on its path must be shorter."""
    with too_long_a_path(tmp_path) as unlistable:
        with pytest.raises(DataError) as refused:
            find_images(tmp_path)
        save(rgb_pattern(), tmp_path / "a.png")
        found = search_images(tmp_path)
    assert str(refused.value) == (
        f"no image files found in {tmp_path}, and 1 folder(s) inside it could not be listed "
        f"(e.g. {unlistable}: File name too long); shorten the names of the folders on "
        "their path, or move them nearer the top of the tree")
    assert found.paths == [tmp_path / "a.png"]
    assert found.unlisted == [(unlistable, "File name too long")]


def test_find_images_survives_a_symlinked_folder_loop(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save(rgb_pattern(), tmp_path / "sub" / "a.png")
    (tmp_path / "sub" / "up").symlink_to("..")
    (tmp_path / "again").symlink_to("sub")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["sub/a.png"]


def test_find_images_survives_a_folder_removed_while_it_searches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that goes between being listed and being looked at (an ingest job
    moving it away) is passed over, not a raw FileNotFoundError with a traceback."""
    save(rgb_pattern(), tmp_path / "a.png")
    (tmp_path / "gone").mkdir()
    save(rgb_pattern(), tmp_path / "gone" / "b.png")
    scandir = os.scandir

    def list_then_remove(path: str | int) -> object:
        if isinstance(path, int) or Path(path).name != "gone":  # rmtree lists by descriptor
            return scandir(path)
        with scandir(path) as entries:
            listed = list(entries)
        shutil.rmtree(path)  # listed already, and now away
        return contextlib.nullcontext(iter(listed))

    monkeypatch.setattr(os, "scandir", list_then_remove)
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.png"]


def test_search_images_names_the_folders_it_could_not_list(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    save(rgb_pattern(), tmp_path / "a.png")
    (tmp_path / "locked").mkdir()
    save(rgb_pattern(), tmp_path / "locked" / "b.png")
    scandir = os.scandir

    def refuse_locked(path: object = ".") -> object:
        if Path(os.fsdecode(path)).name == "locked":  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fsdecode(path))  # type: ignore[arg-type]
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with caplog.at_level(logging.WARNING):
        paths, unlisted, _ = search_images(tmp_path)
    assert [p.name for p in paths] == ["a.png"]
    assert unlisted == [(tmp_path / "locked", "Permission denied")]
    assert "cannot list folder" in caplog.text
    (tmp_path / "a.png").unlink()  # nothing found: the error says a folder was not listed
    with pytest.raises(DataError, match=r"no image files found in .*, and 1 folder\(s\) "
                                        r"inside it could not be listed \(e\.g\. .*locked: "
                                        r"Permission denied\); make them readable"):
        find_images(tmp_path)


def test_a_folder_name_that_cannot_be_listed_cannot_forge_a_log_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    save(rgb_pattern(), tmp_path / "a.png")
    forged = "locked\nERROR anomaly_flow: all fine"
    (tmp_path / forged).mkdir()
    scandir = os.scandir

    def refuse_locked(path: object = ".") -> object:
        if Path(os.fsdecode(path)).name == forged:  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fsdecode(path))  # type: ignore[arg-type]
        return scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", refuse_locked)
    with caplog.at_level(logging.WARNING):
        search_images(tmp_path)
    [message] = [r.getMessage() for r in caplog.records if "cannot list" in r.getMessage()]
    assert "\n" not in message and "locked\\nERROR anomaly_flow: all fine" in message


def test_one_line_escapes_control_characters() -> None:
    assert one_line("x.png\nERROR fake\r\t\x1b[31m\x7f") == (
        "x.png\\nERROR fake\\r\\t\\x1b[31m\\x7f")
    assert one_line("plain é name.png") == "plain é name.png"


def test_find_images_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"not found: .*nowhere"):
        find_images(tmp_path / "nowhere")
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(DataError, match=f"no image files found in {tmp_path}"):
        find_images(tmp_path)
    with pytest.raises(DataError, match="is not a folder"):
        find_images(tmp_path / "only.txt")


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


@settings(max_examples=100, deadline=None)
@given(kind=st.sampled_from(sorted(ENCODED)), edits=FILE_EDITS,
       mode=st.sampled_from(["L", "RGB"]), training=st.booleans())
def test_damaged_image_files_are_passed_over_by_the_conversion_look(
        kind: str, edits: list[tuple[str, float, bytes]], mode: str, training: bool) -> None:
    """The look before training and scoring decodes a sample of the files (colour,
    transparency, value range): a damaged one is left to the run to report, never raised."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        path = Path(folder) / f"damaged.{kind}"
        path.write_bytes(damaged(ENCODED[kind], edits))
        looked = conversion_look([path], mode, 16, training=training)
    assert all(isinstance(note, str) and note for note in looked.notes)
    assert not said, [str(w.message) for w in said]  # PIL's, raw on the user's terminal


def broken_past_first_idat(path: Path, img: Image.Image) -> None:
    """Save ``img`` as a PNG of several IDAT chunks whose second chunk's type is zeroed:
    the header and the first rows read, then PIL raises SyntaxError ("broken PNG file")."""
    img.save(path)
    encoded = bytearray(path.read_bytes())
    second = encoded.find(b"IDAT", encoded.find(b"IDAT") + 4)
    assert second > 0, "the image is too small to be written in several IDAT chunks"
    encoded[second:second + 4] = bytes(4)
    path.write_bytes(bytes(encoded))


def test_a_png_broken_past_its_first_chunk_is_reported_by_the_run_not_raised_by_the_look(
        tmp_path: Path) -> None:
    """The colour and transparency checks decode the whole image; PIL's SyntaxError for a
    chunk broken after the first IDAT once stopped training and scoring with a traceback."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
            tmp_path / f"grey-{i}.png")
    pixels = rng.integers(0, 256, (300, 300, 4), dtype=np.uint8)
    broken_past_first_idat(tmp_path / "colour.png", Image.fromarray(pixels[..., :3]))
    broken_past_first_idat(tmp_path / "alpha.png", Image.fromarray(pixels, "RGBA"))
    paths = sorted(tmp_path.iterdir())
    for mode in ("L", "RGB"):
        for training in (True, False):
            looked = conversion_look(paths, mode, 16, training=training)
            if mode == "L":  # both decoded to judge their colour, and found damaged:
                # neither counted, so no note speaks of their 300×300
                assert looked.shapes == ((28, 28, 3),)
                assert not any("300" in note for note in looked.notes), looked.notes
    for name in ("colour.png", "alpha.png"):
        image, reason = try_load_image(tmp_path / name, "RGB", 16)
        assert image is None and "broken PNG file" in reason, reason


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
