"""Tests for anomaly_flow.scoring and anomaly_flow.heatmap, on real image files.

The model is a tiny, untrained but initialised Glow saved with ``Glow.save``: scores are
meaningless as anomaly scores but exact as likelihoods, which is all these tests need.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomaly_flow import score_table, scoring
from anomaly_flow.calibration import Calibration, benjamini_hochberg, calibrate
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import (
    ArrayDataset,
    DataError,
    display_path,
    find_images,
    load_image,
    write_image_folder,
)
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.glow import Glow, preprocess
from anomaly_flow.heatmap import colormap_table, heatmap_names, render_heatmap
from anomaly_flow.score_table import ScoringError, read_table, write_table
from anomaly_flow.scoring import (
    NON_FINITE_ERROR,
    ScoringDataset,
    default_score,
    output_columns,
    score_dataset,
    score_folder,
    score_images,
    score_names,
)
from anomaly_flow.train import fit_reference
from tests.conftest import ended_process_id
from tests.test_complexity import pil_png_bits

TINY = GlowConfig(image_size=16, levels=2, steps_per_level=2, hidden_channels=16)
ULPS = 4e-6
"""Scores are float32 sums: computed another way (``Glow.bpd`` sums all levels at once,
the breakdown level by level) their last bit or two may differ (one float32 ulp is
9.5e-7 at 4 to 8 bits/dim, 1.9e-6 at 8 to 16), never more. The same file scored again,
in any batch, gives the same bits."""
BOMB_SIDE = 9_500  # 90.25 M pixels: above PIL's 89.48 M-pixel limit, below twice it

# file name -> the one-line reason it cannot be scored (None: it must be scored)
MESSY = {
    "a_good.png": None,
    "b_good.jpg": None,
    "sub/c_good.png": None,
    "sub/dup.png": None,  # dup.png and dup.jpg would share a heatmap name
    "sub/dup.jpg": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette_alpha.png": None,
    "rgba.png": None,
    # chmod 000: root reads it anyway (test_cli_score drops root's rights to see the refusal)
    "secret.png": None if os.geteuid() == 0 else "permission denied",
    "bad\udcff.png": None,  # a name that is not valid UTF-8
    "text.png": "cannot identify image file (not an image or unsupported format)",
    "truncated.png": "truncated image file",
    "truncated.jpg": "truncated image file",
    "empty.png": "empty file (0 bytes)",
    "bomb.png": (
        f"image too large: {BOMB_SIDE**2} pixels exceeds the "
        f"{Image.MAX_IMAGE_PIXELS}-pixel safety limit"
    ),
    "loop.png": "symlink loop",
}
N_GOOD = sum(reason is None for reason in MESSY.values())
N_BAD = len(MESSY) - N_GOOD


# --------------------------------------------------------------------------- real files


def sample_images(n: int, offset: int = 0) -> np.ndarray:
    """uint8 ``(n, 1, 28, 28)`` Fashion-MNIST images from the shipped sample."""
    return load_sample().test_images[offset : offset + n]


def png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def blank_png(width: int, height: int, depth: int = 8) -> bytes:
    """A valid grey PNG of ``width × height`` black pixels (tiny once compressed), of 8 or
    16 bits a pixel (``depth``)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body)
        )

    packer = zlib.compressobj(9)
    row = bytes(width * depth // 8 + 1)  # filter byte 0 + pixels
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def make_messy_folder(root: Path) -> Path:
    """Good images and one of each kind of troublesome file (see :data:`MESSY`)."""
    (root / "sub").mkdir(parents=True)
    grey = sample_images(5)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(grey[0, 0]).save(root / "a_good.png")
    Image.fromarray(grey[1, 0]).save(root / "b_good.jpg", quality=95)
    Image.fromarray(grey[2, 0]).save(root / "sub" / "c_good.png")
    Image.fromarray(grey[3, 0]).save(root / "sub" / "dup.png")
    Image.fromarray(grey[4, 0]).save(root / "sub" / "dup.jpg")
    Image.new("CMYK", (20, 18), (0, 128, 255, 30)).save(root / "cmyk.jpg")
    ramp = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 113).astype(np.uint16)
    Image.fromarray(ramp).save(root / "gray16.png")  # mode I;16: a 16-bit PNG
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "palette_alpha.png", transparency=0)
    alpha = np.dstack([rgb, np.linspace(0, 255, 20, dtype=np.uint8)[None].repeat(24, 0)])
    Image.fromarray(alpha, "RGBA").save(root / "rgba.png")
    (root / "secret.png").write_bytes(png_bytes(Image.fromarray(grey[0, 0])))
    (root / "secret.png").chmod(0o000)
    with open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb") as file:
        file.write(png_bytes(Image.fromarray(grey[1, 0])))
    (root / "text.png").write_text("this is a text file, not a PNG\n")
    full = png_bytes(Image.fromarray(rgb))
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.png").touch()
    (root / "bomb.png").write_bytes(blank_png(BOMB_SIDE, BOMB_SIDE))
    (root / "loop.png").symlink_to("loop.png")
    (root / "notes.txt").write_text("not an image extension: not listed")
    return root


def make_tiny_model() -> Glow:
    """The tiny Glow, its ActNorms initialised on sample images, with a normal reference
    from other sample images (so it scores ``typicality``, ``knn`` and ``ensemble`` too)."""
    torch.manual_seed(0)
    model = Glow(TINY)
    images = ArrayDataset(load_sample().train[:64], TINY.mode, TINY.image_size).images
    model.initialize(preprocess(images, TINY.n_bits))
    held_out = ArrayDataset(load_sample().train[64:128], TINY.mode, TINY.image_size)
    assert fit_reference(model, held_out, 32, torch.device("cpu")) == 64
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Glow:
    return make_tiny_model()


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("messy") / "images")


@pytest.fixture(scope="module")
def full_table(model: Glow, messy: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> pd.DataFrame:
    """An uninterrupted run over the messy folder, read back from CSV."""
    out = tmp_path_factory.mktemp("full") / "scores.csv"
    score_folder(model, None, messy, out, batch_size=64)
    return read_csv(out)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, **score_table.EXACT_FLOATS, keep_default_na=False,
                       na_values={c: [""] for c in ("bpd", "complexity", "coarse_complexity",
                                                    "typicality", "knn", "pixel_knn", "ensemble",
                                                    "level_1", "level_2",
                                                    "score", "p_value", "is_anomaly")})


def relative(table: pd.DataFrame, root: Path) -> list[str]:
    prefix = str(root) + "/"
    assert all(p.startswith(prefix) for p in table["path"])
    return [p[len(prefix):] for p in table["path"]]


# --------------------------------------------------------------------------- every file


def test_every_file_gets_a_row_with_scores_or_a_reason(model: Glow, messy: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    summary = score_folder(model, None, messy, out, batch_size=4)
    assert (summary.n_files, summary.n_scored, summary.n_failed) == (len(MESSY), N_GOOD, N_BAD)
    assert summary.n_anomalous is None and summary.out == out
    assert sorted(os.listdir(tmp_path)) == ["scores.csv"]  # the temp file was renamed away

    table = read_csv(out)
    assert list(table.columns) == output_columns(model)
    names = relative(table, messy)
    assert names == sorted(names, key=lambda n: os.fsencode(n.replace("\\xff", "\udcff")))
    assert set(names) == {n.replace("\udcff", "\\xff") for n in MESSY}
    for name, row in zip(names, table.itertuples(index=False), strict=True):
        expected = MESSY[name.replace("\\xff", "\udcff")]
        if expected is None:
            assert row.error == "", name
            assert np.isfinite([row.bpd, row.complexity, row.coarse_complexity, row.level_1,
                                row.level_2]).all(), name
            assert row.score == row.bpd
            assert row.bpd == pytest.approx(TINY.n_bits + row.level_1 + row.level_2, abs=1e-5)
        else:
            assert row.error == expected, name
            assert np.isnan([row.bpd, row.complexity, row.coarse_complexity, row.level_1,
                             row.level_2, row.score]).all()
        assert np.isnan(row.p_value) and np.isnan(row.is_anomaly)  # uncalibrated


def test_scoring_says_when_images_lose_their_range_in_the_conversion(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Float TIFFs in 0..1 and 12-bit data in 16-bit PNGs are scored (near) black, without
    an error: the run says so, as training does, and only of the files it scores."""
    folder = tmp_path / "camera"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.random((16, 16), dtype=np.float32), mode="F").save(
            folder / f"unit-{i}.tiff")
        Image.fromarray(rng.integers(0, 4096, (16, 16), dtype=np.uint16)).save(
            folder / f"twelve-{i}.png")
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.scoring"):
        summary = score_folder(model, None, folder, out)
    assert (summary.n_scored, summary.n_failed) == (4, 0)
    notes = [r.getMessage() for r in caplog.records]
    assert any("2 of 2 floating-point images looked at hold values in 0..1" in n
               for n in notes), notes
    assert any("2 of 2 16-bit images looked at use only values below 4096" in n
               for n in notes), notes
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.scoring"):
        score_folder(model, None, folder, out, resume=True)  # nothing left to score
    assert not [r for r in caplog.records if "images looked at" in r.getMessage()]


def test_scores_are_the_models_bits_per_dim(model: Glow, messy: Path,
                                            full_table: pd.DataFrame) -> None:
    names = ["cmyk.jpg", "gray16.png", "palette_alpha.png", "rgba.png", "sub/c_good.png"]
    images = torch.stack([
        torch.from_numpy(load_image(messy / n, TINY.mode, TINY.image_size)) for n in names
    ])
    with torch.no_grad():
        expected = model.bpd(preprocess(images, TINY.n_bits)).double().numpy()
    rows = full_table.set_index(pd.Index(relative(full_table, messy)))
    np.testing.assert_allclose(rows.loc[names, "bpd"], expected, rtol=0, atol=ULPS)
    # complexity = bpd - 8 · (bytes of the image saved as PNG, level 9) / D
    png = [8 * len(png_bytes(Image.fromarray(a[0].numpy()), compress_level=9)) / a.numel()
           for a in images]
    np.testing.assert_allclose(rows.loc[names, "complexity"], expected - png, rtol=0,
                               atol=ULPS)


def hand_built_images(channels: int) -> np.ndarray:
    """Three uint8 ``(channels, 16, 16)`` images with structure at several scales: a
    ramp, a blocky pattern whose 2×2 block means end in exactly .5, and a checkerboard."""
    y, x = np.mgrid[0:16, 0:16]
    ramp = (x * 16 + y).astype(np.uint8)
    halves = np.where(x % 2 == 0, 2, 3) * (1 + (y // 4) * 20) + 8 * (x // 8)  # means k + .5
    checker = np.where((x // 2 + y // 2) % 2 == 0, 250, 5)
    planes = [ramp, halves.astype(np.uint8), checker.astype(np.uint8)]
    return np.stack([np.stack([np.roll(p, 3 * c, axis=1) for c in range(channels)])
                     for p in planes]).astype(np.uint8)


def test_scoring_dataset_measures_a_batch_as_single_items(tmp_path: Path) -> None:
    # batched fetch (the DataLoader's) and one by one agree, failed items in between
    images = sample_images(5)
    sources: list[str | Path | bytes] = [png_bytes(Image.fromarray(image[0])) for image in images]
    sources.insert(2, b"not an image")
    sources.append(tmp_path / "missing.png")
    dataset = ScoringDataset(sources, TINY.mode, TINY.image_size, TINY.n_bits, TINY.levels)
    batch = dataset.__getitems__(range(len(sources)))
    singles = [dataset[i] for i in range(len(sources))]
    assert [item.ok for item in batch] == [True, True, False, True, True, True, False]
    for got, want in zip(batch, singles, strict=True):
        assert (got.index, got.ok, got.error) == (want.index, want.ok, want.error)
        torch.testing.assert_close(got.image, want.image, rtol=0, atol=0)
        np.testing.assert_array_equal([got.png_bpd, got.coarse_png_bpd],
                                      [want.png_bpd, want.coarse_png_bpd])
        assert np.isnan(got.png_bpd) != got.ok
    only_bad = dataset.__getitems__([2, 6])
    assert [item.ok for item in only_bad] == [False, False]


@pytest.mark.parametrize(("channels", "levels", "n_bits"),
                         [(1, 2, 8), (3, 2, 5), (1, 1, 8), (3, 1, 8), (1, 3, 6)])
def test_coarse_complexity_is_level_L_minus_the_coarse_png_length(
        tmp_path: Path, channels: int, levels: int, n_bits: int) -> None:
    config = GlowConfig(in_channels=channels, image_size=16, levels=levels,
                        steps_per_level=2, hidden_channels=8, n_bits=n_bits)
    images = hand_built_images(channels)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = Glow(config)
    model.initialize(preprocess(torch.from_numpy(gray_or_rgb(channels, 32)), n_bits))
    model.eval()

    for name in ("a.csv", "b.csv", "c.parquet"):
        score_folder(model, None, folder, tmp_path / name, batch_size=2)
    table = read_csv(tmp_path / "a.csv")
    assert list(table.columns) == output_columns(model)
    assert table["coarse_complexity"].dtype == np.float64
    parquet = pd.read_parquet(tmp_path / "c.parquet")
    assert parquet["coarse_complexity"].dtype == np.float64
    # deterministic: the same files give the same numbers in every run and format
    np.testing.assert_array_equal(read_csv(tmp_path / "b.csv")["coarse_complexity"],
                                  table["coarse_complexity"])
    np.testing.assert_array_equal(parquet["coarse_complexity"], table["coarse_complexity"])

    # the reference: level_L from the model's own breakdown, the PNG length from PIL
    with torch.no_grad():
        level_l = model.breakdown(preprocess(torch.from_numpy(images), n_bits)).level_bits
    k = images >> (8 - n_bits)
    d = channels * 16 * 16
    png = np.array([pil_png_bits(image, 2 ** (levels - 1)) / d for image in k])
    expected = level_l[:, -1].double().numpy() - png
    np.testing.assert_allclose(table["coarse_complexity"], expected, rtol=0, atol=ULPS)
    np.testing.assert_allclose(table["coarse_complexity"],
                               table[f"level_{levels}"] - png, rtol=0, atol=1e-12)
    if levels == 1:  # level_1 − L(x)/D = complexity − n_bits, up to float32 sums
        np.testing.assert_allclose(table["coarse_complexity"],
                                   table["complexity"] - n_bits, rtol=0, atol=ULPS)


@pytest.mark.parametrize("name", ["typicality", "knn", "pixel_knn"])
def test_reference_columns_are_the_models_scores_of_each_file(
        model: Glow, messy: Path, full_table: pd.DataFrame, name: str) -> None:
    """Per file: ``Glow.typicality`` and ``Glow.knn`` of the file's per-pixel bits/dim map
    and ``Glow.pixel_knn`` of the image, as the library computes them from the decoded
    image."""
    assert model.has_reference
    scored = full_table[full_table["error"] == ""]
    files = {display_path(path): path for path in find_images(messy)}
    images = torch.from_numpy(np.stack([load_image(files[key], TINY.mode, TINY.image_size)
                                        for key in scored["path"]]))
    x = preprocess(images, TINY.n_bits)
    with torch.no_grad():
        maps = model.breakdown(x).pixel_bpd
        expected = getattr(model, name)(x if name == "pixel_knn" else maps).double().numpy()
    np.testing.assert_allclose(scored[name], expected, rtol=1e-5, atol=0)
    assert (scored[name] > 0).all()
    failed = full_table[full_table["error"] != ""]
    assert failed[name].isna().all()


def test_ensemble_column_sums_standardised_knn_coarse_complexity_and_pixel_knn(
        model: Glow, full_table: pd.DataFrame) -> None:
    """Per file: knn, coarse_complexity and pixel_knn, each standardised by the mean and
    std over the normal reference images (reference_scale), summed; empty where the file
    failed."""
    (knn_mean, knn_std), (cc_mean, cc_std), (px_mean, px_std) = \
        model.reference_scale.double().tolist()
    assert knn_std > 0 and cc_std > 0 and px_std > 0
    by_hand = ((full_table["knn"] - knn_mean) / knn_std
               + (full_table["coarse_complexity"] - cc_mean) / cc_std
               + (full_table["pixel_knn"] - px_mean) / px_std)
    np.testing.assert_allclose(full_table["ensemble"], by_hand, rtol=1e-9, atol=1e-9)
    assert full_table.loc[full_table["error"] != "", "ensemble"].isna().all()


def gray_or_rgb(channels: int, n: int) -> np.ndarray:
    """``n`` random uint8 ``(channels, 16, 16)`` images to initialise ActNorm on."""
    return np.random.default_rng(1).integers(0, 256, (n, channels, 16, 16), dtype=np.uint8)


@pytest.mark.parametrize("score_name", ["bpd", "complexity", "level_1", "level_2"])
def test_calibrations_from_before_coarse_complexity_still_drive_decisions(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        score_name: str) -> None:
    """A calibration.json as older versions stored it (schema 1, one of the old scores)
    loads unchanged and decides on its own score column."""
    scored = full_table[full_table["error"] == ""]
    values = np.sort(scored[score_name].to_numpy())
    stored = json.dumps({
        "schema_version": 1, "score_name": score_name, "created_at": "2025-01-01T00:00:00+00:00",
        "threshold": {"value": float(values[-2]), "method": "conformal", "alpha": 0.2,
                      "n_calibration": len(values), "fpr": 1 / len(values), "n_anomalous": 0,
                      "precision": None, "recall": None, "f1": None, "cost_fp": None,
                      "cost_fn": None},
        "calibration_scores": values.tolist(),
    })
    calibration = Calibration.from_json(stored)
    assert calibration.score_name == score_name
    out = tmp_path / "scores.csv"
    score_folder(model, calibration, messy, out)
    table = read_csv(out)
    ok = table["error"] == ""
    np.testing.assert_array_equal(table.loc[ok, "score"], table.loc[ok, score_name])
    np.testing.assert_array_equal(table.loc[ok, "is_anomaly"] == 1.0,
                                  table.loc[ok, score_name] > values[-2])


def test_same_numbers_whatever_the_batching_workers_or_format(
    model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path
) -> None:
    # batch 64 in one process (full_table) vs batches of 3 decoded by 2 worker processes
    out = tmp_path / "scores.parquet"
    score_folder(model, None, messy, out, batch_size=3, num_workers=2)
    table = pd.read_parquet(out)
    assert table["is_anomaly"].dtype == "boolean" and table["is_anomaly"].isna().all()
    assert table["error"].tolist() == full_table["error"].tolist()
    # Same file, same numbers, to the bit
    for column in ("bpd", "complexity", "coarse_complexity", "level_1", "level_2", "score"):
        np.testing.assert_array_equal(table[column], full_table[column])


def test_no_more_workers_start_than_there_are_batches(model: Glow, messy: Path,
                                                      tmp_path: Path) -> None:
    """64 workers asked for a folder of one batch: one starts (torch warns about more
    workers than cores, and each would be a process with nothing to do)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the worker count included
        score_folder(model, None, messy, tmp_path / "s.csv", batch_size=256, num_workers=64)


def test_a_batch_with_nothing_decoded_skips_the_model(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """20,000 empty cells sent to the served model took minutes of forward passes."""
    launches, depth = 0, 0
    real_launch = scoring._launch

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal launches, depth
        launches += depth == 0  # a batch padded to the smallest size calls itself
        depth += 1
        try:
            return real_launch(*args, **kwargs)
        finally:
            depth -= 1

    monkeypatch.setattr(scoring, "_launch", counted)
    config = model.config
    empty = ScoringDataset([None] * 10, config.mode, config.image_size, config.n_bits,
                           config.levels)
    table = score_dataset(model, empty, batch_size=4)
    assert launches == 0 and len(table) == 10
    assert table["error"].eq("no image given (empty value)").all()
    assert table[score_names(model)].isna().all().all()
    # batches of one: the bad files' batches skip the model, the rest match the table
    score_folder(model, None, messy, tmp_path / "s.csv", batch_size=1)
    assert launches == int((full_table["error"] == "").sum())
    pd.testing.assert_frame_equal(read_csv(tmp_path / "s.csv"), full_table, check_exact=True)


def test_workers_past_the_cores_and_a_batch_past_any_size_are_cut_to_fit(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """1,000 workers for one image each would start 1,000 processes on 2 cores; a batch
    size past sys.maxsize made torch's sampler raise."""
    cores = len(os.sched_getaffinity(0))
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")  # torch's own worker-count warning included
        score_folder(model, None, messy, tmp_path / "s.csv", batch_size=1, num_workers=1000)
    assert f"1000 decoding workers asked for, but this process may use {cores} CPU " \
        f"cores; using {cores}" in caplog.text
    pd.testing.assert_frame_equal(read_csv(tmp_path / "s.csv"), full_table, check_exact=True)
    score_folder(model, None, messy, tmp_path / "big.csv", batch_size=10**20)
    pd.testing.assert_frame_equal(read_csv(tmp_path / "big.csv"), full_table, check_exact=True)


def test_a_file_scored_alone_gets_its_folder_run_numbers(
    model: Glow, messy: Path, full_table: pd.DataFrame
) -> None:
    # One image at a time (a served request, the last row of a Spark batch) and with the
    # PNG bytes instead of the path: every number equals the folder run's, to the bit.
    # (This model's sums happen to agree even unpadded; the next test's wider ones not.)
    rows = full_table[full_table["error"] == ""]
    files = {display_path(path): path for path in find_images(messy)}
    columns = ["bpd", "level_1", "level_2", "typicality", "knn"]
    alone = []
    for path in rows["path"]:
        dataset = ScoringDataset([files[path].read_bytes()], TINY.mode, TINY.image_size,
                                 TINY.n_bits, TINY.levels)
        scores = score_images(model, ScoringDataset.collate([dataset[0]]).images)
        alone.append([float(scores.bpd[0]), *scores.level_bits[0].tolist(),
                      float(scores.typicality[0]), float(scores.knn[0])])
    np.testing.assert_array_equal(np.array(alone), rows[columns].to_numpy())


@pytest.fixture(scope="module")
def wide_model() -> tuple[Glow, torch.Tensor]:
    """A Glow with 96-channel couplings and 256 sample images: enough for a few images
    to come out otherwise in an unpadded small batch (4 of 256 with one image per batch,
    at any thread count; 4 in batches of 2 to 15 with one thread)."""
    config = GlowConfig(image_size=28, levels=2, steps_per_level=2, hidden_channels=96)
    torch.manual_seed(1)
    model = Glow(config)
    images = ArrayDataset(load_sample().train[:256], config.mode, config.image_size).images
    model.initialize(preprocess(images[:64], config.n_bits))
    with torch.no_grad():  # a trained model's couplings are not the identity
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval(), images


@pytest.mark.parametrize("threads", [1, 2])
def test_scores_do_not_depend_on_the_batch_size(wide_model: tuple[Glow, torch.Tensor],
                                                threads: int) -> None:
    model, images = wide_model
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = score_images(model, images)
        for size in (1, 2, 7, 15):
            parts = [score_images(model, images[i:i + size])
                     for i in range(0, len(images), size)]
            torch.testing.assert_close(torch.cat([p.bpd for p in parts]), together.bpd,
                                       rtol=0, atol=0)
            torch.testing.assert_close(torch.cat([p.level_bits for p in parts]),
                                       together.level_bits, rtol=0, atol=0)
    finally:
        torch.set_num_threads(saved)


def test_threads_scoring_one_model_take_turns(wide_model: tuple[Glow, torch.Tensor]) -> None:
    """numerics sets the model's coupling autocast and restores it on the way out: a
    thread scoring meanwhile would lose its float32 to the restored bf16 half way."""
    model, images = wide_model
    exact = score_images(model, images[:8]).bpd
    model.set_coupling_autocast(torch.bfloat16)  # as a bf16 training leaves it
    try:
        results: dict[str, torch.Tensor] = {}
        with scoring.numerics(model, "bf16"):
            other = threading.Thread(
                target=lambda: results.update(bpd=score_images(model, images[:8]).bpd))
            other.start()
            other.join(timeout=1.0)
            assert other.is_alive()  # waiting for this thread's numerics to end
            pid = os.fork()  # a child has no thread to wait for: it gets the lock at once
            if pid == 0:
                with scoring.numerics(model):
                    os._exit(0)
            for _ in range(100):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("a child forked during numerics waited for a thread it lacks")
        other.join(timeout=60)
        assert not other.is_alive()
        torch.testing.assert_close(results["bpd"], exact, rtol=0, atol=0)  # float32's
        assert model.levels[0].steps[0].coupling.net.autocast_dtype == torch.bfloat16
    finally:
        model.set_coupling_autocast(None)


def test_model_overflow_is_an_error_row(model: Glow, messy: Path, tmp_path: Path) -> None:
    broken = make_tiny_model()
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    out = tmp_path / "scores.csv"
    summary = score_folder(broken, None, messy, out)
    assert (summary.n_scored, summary.n_failed) == (0, len(MESSY))
    table = read_csv(out)
    assert (table["error"] == NON_FINITE_ERROR).sum() == N_GOOD
    assert table["bpd"].isna().all()


# --------------------------------------------------------------------------- outputs


def test_output_problems_are_found_before_scoring(model: Glow, messy: Path,
                                                  tmp_path: Path) -> None:
    (tmp_path / "file.csv").write_text("a file, not a folder")
    cases = {
        tmp_path / "scores.xlsx": "use a file name ending in .csv, .parquet",
        tmp_path / "file.csv" / "out.csv": "file.csv is not a folder",
        tmp_path / "missing" / "out.csv": "does not exist; create it",
        tmp_path / "dir.csv": "it is a folder",
    }
    (tmp_path / "dir.csv").mkdir()
    for out, message in cases.items():
        with pytest.raises(ScoringError, match=message) as info:
            score_folder(model, None, messy, out)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="image folder not found"):
        score_folder(model, None, tmp_path / "nowhere", tmp_path / "out.csv")
    with pytest.raises(ScoringError, match="no calibration"):
        score_folder(model, None, messy, tmp_path / "out.csv", fdr=0.1)
    assert sorted(os.listdir(tmp_path)) == ["dir.csv", "file.csv"]


def test_compiled_scoring_matches_eager(model: Glow, messy: Path, full_table: pd.DataFrame,
                                       tmp_path: Path) -> None:
    # batches of 4 leave a short last batch: padded, compiled once, its rows kept
    out = tmp_path / "compiled.csv"
    summary = score_folder(model, None, messy, out, batch_size=4, compile=True,
                           heatmaps=tmp_path / "heat")
    assert len(full_table) % 4 and summary.n_heatmaps == N_GOOD
    compiled = read_csv(out)
    assert compiled["error"].tolist() == full_table["error"].tolist()
    # the same float32 sums in another order: ~1e-6 relative (knn, in normal standard
    # deviations, carries it to ~1e-5 absolute)
    pd.testing.assert_frame_equal(compiled, full_table, check_exact=False, rtol=1e-5,
                                  atol=1e-5)
    np.testing.assert_allclose(compiled["bpd"], full_table["bpd"], rtol=0, atol=5e-6)


@pytest.mark.parametrize("fails_at", ["torch.compile", "first batch", "second batch"])
def test_scoring_without_compiling_where_compiling_fails(
        fails_at: str, model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def no_compiler(module: torch.nn.Module) -> Callable[[torch.Tensor], Any]:
        if fails_at == "torch.compile":
            raise RuntimeError("torch.compile is not supported on this platform")

        def compiled(x: torch.Tensor) -> Any:
            calls.append(len(x))
            if fails_at == "first batch" or len(calls) == 2:
                raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
            return module(x)
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.scoring"):
        score_folder(model, None, messy, tmp_path / "out.csv", batch_size=4, compile=True)
    warned = [r.getMessage() for r in caplog.records if "could not compile" in r.getMessage()]
    assert len(warned) == 1
    assert ("not supported" if fails_at == "torch.compile" else "InvalidCxxCompiler") \
        in warned[0]
    assert calls == {"torch.compile": [], "first batch": [4], "second batch": [4, 4]}[fails_at]
    # eager's numbers, every row, the short last batch unpadded once uncompiled
    pd.testing.assert_frame_equal(read_csv(tmp_path / "out.csv"), full_table)


def test_compiled_scoring_reports_the_models_own_error(
        model: Glow, messy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # a batch the model itself cannot run is not a compiling problem: its error is raised
    # and nothing claims compiling failed
    def broken(self: Glow, x: torch.Tensor) -> Any:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(torch, "compile", lambda module: module)
    monkeypatch.setattr(Glow, "forward", broken)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.scoring"), \
            pytest.raises(RuntimeError, match="mat1 and mat2 shapes"):
        score_folder(model, None, messy, tmp_path / "out.csv", batch_size=4, compile=True)
    assert not [r for r in caplog.records if "could not compile" in r.getMessage()]
    assert not (tmp_path / "out.csv").exists()


def test_running_out_of_memory_on_a_resumed_run_says_to_resume_again(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first batch of a resumed run does not fit: nothing new is written, but the
    output still holds the rows kept from before, and the advice says so."""
    calls = []
    forward = Glow.forward

    def out_of_memory(self: Glow, x: torch.Tensor) -> Any:
        calls.append(len(x))
        if len(calls) == 1:  # the resume's check rescores a few kept files first: they fit
            return forward(self, x)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 123456789 bytes. Error code 12 (Cannot allocate memory)")

    out = tmp_path / "scores.csv"
    write_table(full_table.head(10), out)
    monkeypatch.setattr(Glow, "forward", out_of_memory)
    with pytest.raises(ScoringError, match=(
            r"^scoring ran out of memory on cpu \(an allocation of 117\.7 MiB failed\) with "
            rf"batch_size = 256 \(--batch-size\), \d+ images a forward pass here; lower it, "
            rf"e\.g\. to \d+; 10 of {len(full_table)} files are in {re.escape(str(out))}: run "
            r"again with resume \(--resume\) to score the rest$")):
        score_folder(model, None, messy, out, resume=True)
    pd.testing.assert_frame_equal(read_csv(out), full_table.head(10), check_exact=True)
    # the check of the kept rows, which rescores a few of them first, does not fit either
    calls.append(0)
    with pytest.raises(ScoringError, match=(
            rf"^checking that {re.escape(str(out))} was scored by this model ran out of "
            r"memory on cpu \(an allocation of 117\.7 MiB failed\) on 4 of its files; free "
            r"memory, or score on a device with more$")):
        score_folder(model, None, messy, out, resume=True)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_resume_after_a_killed_run_gives_the_uninterrupted_table(
    model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"scores{suffix}"
    k = 7
    partial = full_table.head(k).copy()  # what a run killed after k files leaves
    partial["is_anomaly"] = partial["is_anomaly"].astype("boolean")
    assert partial.loc[0, "error"] == ""
    partial.loc[0, "bpd"] = np.nan  # neither a score nor a reason: to be scored again
    write_table(partial, out)
    # and, killed outright, its unfinished copies of the table and a heatmap
    ended, alive = ended_process_id(), os.getpid()
    (tmp_path / "heat" / "sub").mkdir(parents=True)
    leftovers = [tmp_path / f".{out.name}.{ended}.0badf00d.tmp",
                 tmp_path / "heat" / "sub" / f".hm.{ended}.12345678.tmp"]
    running = tmp_path / f".{out.name}.{alive}.0badf00d.tmp"  # a live writer's: kept
    for path in [*leftovers, running]:
        path.write_bytes(b"cut short")
    summary = score_folder(model, None, messy, out, batch_size=4, resume=True,
                           heatmaps=tmp_path / "heat")
    assert not any(path.exists() for path in leftovers) and running.exists()
    assert summary.n_resumed == k - 1 and summary.n_files == len(MESSY)
    # only the missing files were scored: heatmaps exist for those alone
    n_good_missing = int((full_table["error"].iloc[k:] == "").sum()) + 1
    assert summary.n_heatmaps == n_good_missing
    resumed = read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert not resumed["path"].duplicated().any()
    pd.testing.assert_frame_equal(
        resumed.astype({"is_anomaly": float, "path": str, "error": str}),
        full_table.astype({"is_anomaly": float, "path": str, "error": str}),
        check_exact=True,
    )
    # resuming a finished table scores nothing and changes nothing
    again = score_folder(model, None, messy, out, resume=True)
    assert again.n_resumed == len(MESSY)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError])
def test_an_interrupted_run_writes_what_it_has(model: Glow, messy: Path,
                                               full_table: pd.DataFrame, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture,
                                               stop: type[BaseException]) -> None:
    """Ctrl-C (or SIGTERM, through the CLI), or an error no one expected (out of memory
    on the device), mid-run: the rows scored so far are kept for --resume."""
    launches = 0
    real_launch = scoring._launch

    def launch_then_stop(*args: object, **kwargs: object) -> object:
        nonlocal launches
        launches += 1
        if launches == 4:
            raise stop
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(scoring, "_launch", launch_then_stop)
    out = tmp_path / "scores.csv"
    with pytest.raises(stop), caplog.at_level(logging.WARNING):
        score_folder(model, None, messy, out, batch_size=3, flush_every_s=float("inf"))
    said = "interrupted" if stop is KeyboardInterrupt else "stopped by an error"
    # after Ctrl-C the command's own line says what to do next; after an error, this one
    advice = "" if stop is KeyboardInterrupt else "; once the error is dealt with, run again"
    assert f"{said}: 6 of {len(MESSY)} files are in {out}{advice}" in caplog.text
    assert ("run again" in caplog.text) == (stop is not KeyboardInterrupt)
    partial = read_csv(out)
    assert len(partial) == 6  # batches 1 and 2 finished; batch 3 was still on the device
    assert partial["path"].tolist() == full_table["path"].head(6).tolist()
    monkeypatch.setattr(scoring, "_launch", real_launch)
    summary = score_folder(model, None, messy, out, batch_size=5, resume=True)
    assert summary.n_resumed == 6
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)


REAL_LAUNCH = scoring._launch


def before_launch(monkeypatch: pytest.MonkeyPatch, number: int,
                  action: Callable[[], object]) -> None:
    """Run ``action`` just before the ``number``-th batch goes to the model (a call of
    ``scoring._launch``), as something outside the run would at that moment; a second
    call replaces the first's hook."""
    launches = 0
    real_launch = REAL_LAUNCH

    def launch(*args: object, **kwargs: object) -> object:
        nonlocal launches
        launches += 1
        if launches == number:
            action()
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(scoring, "_launch", launch)


def test_a_file_changed_while_the_run_goes_on_is_read_again_on_resume(
        model: Glow, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its row holds the old content's score, written after the change: the table's
    time is that of the run's start, so --resume sees the file as newer."""
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(12), folder, "x-")
    def change_a_read_file() -> None:
        write_image_folder(sample_images(1, offset=50), folder, "x-00001-new")
        os.replace(folder / "x-00001-new00000.png", folder / "x-00001.png")

    before_launch(monkeypatch, 3, change_a_read_file)  # x-00001 was read in the first batch
    stale = read_csv(score_folder(model, None, folder, out, batch_size=3).out)
    monkeypatch.setattr(scoring, "_launch", REAL_LAUNCH)
    summary = score_folder(model, None, folder, out, batch_size=3, resume=True)
    assert summary.n_resumed == 11  # all but the changed file
    fresh = score_folder(model, None, folder, tmp_path / "fresh.csv", batch_size=3)
    pd.testing.assert_frame_equal(read_csv(out), read_csv(fresh.out), check_exact=True)
    assert not stale.equals(read_csv(out))


def test_rows_the_output_folder_refuses_are_kept_elsewhere(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The output's folder is gone when the table is written (a full disk alike): the
    scored rows go to the temporary-files folder, and the error says where."""
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "scores.csv"
    spare_folder = tmp_path / "spare"
    spare_folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spare_folder))
    lost: list[int] = []

    def lose_the_folder() -> None:
        lost.append(time.time_ns())
        shutil.rmtree(out.parent)

    before_launch(monkeypatch, 2, lose_the_folder)
    with pytest.raises(score_table.OutputWriteError) as info:
        score_folder(model, None, messy, out, batch_size=5, flush_every_s=float("inf"))
    (spare,) = spare_folder.iterdir()
    assert str(info.value).startswith(f"cannot write the output {out}: No such file")
    assert f"its {len(MESSY)} rows are kept in {spare}: once there is room, move that " \
        f"file to {out} and run again with resume" in str(info.value)
    pd.testing.assert_frame_equal(read_csv(spare), full_table, check_exact=True)
    # dated as the table would be: the run's start, for a --resume after moving it back
    assert spare.stat().st_mtime_ns < lost[0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # no place at all
    before_launch(monkeypatch, 2, lose_the_folder)
    out.parent.mkdir()
    with pytest.raises(score_table.OutputWriteError, match=f"; {len(MESSY)} rows are lost"):
        score_folder(model, None, messy, out, batch_size=5, flush_every_s=float("inf"))


def test_partial_table_is_flushed_during_the_run(model: Glow, messy: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "scores.csv"
    sizes: list[int] = []
    real_write = score_table.write_table

    def spy(table: pd.DataFrame, path: Path) -> None:
        sizes.append(len(table))
        real_write(table, path)

    monkeypatch.setattr(score_table, "write_table", spy)
    score_folder(model, None, messy, out, batch_size=5, flush_every_s=0)
    assert sizes == [5, 10, 15, len(MESSY), len(MESSY)]  # after each batch, then the final


@pytest.mark.parametrize("resume", [False, True], ids=["replace", "resume"])
def test_a_table_saved_under_the_other_format_s_name_is_named_as_such(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
        resume: bool) -> None:
    """A Parquet table renamed .csv (or a CSV one renamed .parquet) is neither called
    "not a scores table" nor read as damaged text: the message says what it is, and it
    is left as it was."""
    fake_csv, fake_parquet = tmp_path / "fake.csv", tmp_path / "fake.parquet"
    write_table(full_table, tmp_path / "real.parquet")
    (tmp_path / "real.parquet").rename(fake_csv)
    write_table(full_table, tmp_path / "real.csv")
    (tmp_path / "real.csv").rename(fake_parquet)
    before = fake_csv.read_bytes(), fake_parquet.read_bytes()
    with pytest.raises(ScoringError) as refused:
        score_folder(model, None, messy, fake_csv, resume=resume)
    assert str(refused.value) == (f"{fake_csv} is a Parquet file, not CSV as its name says; "
                                  "name the output .parquet (or move that file away)")
    with pytest.raises(ScoringError) as refused:
        score_folder(model, None, messy, fake_parquet, resume=resume)
    assert str(refused.value) == (f"{fake_parquet} is a CSV file, not Parquet as its name "
                                  "says; name the output .csv (or move that file away)")
    assert (fake_csv.read_bytes(), fake_parquet.read_bytes()) == before


def test_resume_refuses_an_output_it_cannot_use(model: Glow, messy: Path, full_table: pd.DataFrame,
                                                tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ScoringError, match=r"cannot read the earlier output .*garbage\.parquet"):
        score_folder(model, None, messy, garbage, resume=True)
    other = tmp_path / "other.csv"
    full_table[["path", "bpd"]].to_csv(other, index=False)
    with pytest.raises(ScoringError, match=r"lacks column\(s\) \['complexity'"):
        score_folder(model, None, messy, other, resume=True)
    unrelated = tmp_path / "unrelated.csv"
    unrelated.write_text("name,price\nwidget,3\n")
    with pytest.raises(ScoringError, match=r"unrelated\.csv is not a scores table \(no path "
                                           r"or bpd column; its columns are \['name', "
                                           r"'price'\]\); choose another output path"):
        score_folder(model, None, messy, unrelated, resume=True)
    deeper = tmp_path / "deeper.csv"
    full_table.assign(level_3=1.0).to_csv(deeper, index=False)
    with pytest.raises(ScoringError,
                       match=r"score column\(s\) \[.level_3.\] this model does not give"):
        score_folder(model, None, messy, deeper, resume=True)
    # a column the user added (a label, a note) would be dropped by the rewrite
    noted = tmp_path / "noted.csv"
    full_table.assign(note="checked").to_csv(noted, index=False)
    before = noted.read_bytes()
    with pytest.raises(ScoringError, match=r"noted\.csv has column\(s\) \['note'\] that "
                                           r"scoring does not write, so resuming would drop"):
        score_folder(model, None, messy, noted, resume=True)
    assert noted.read_bytes() == before
    indexed = tmp_path / "indexed.csv"  # pandas' index written back: nothing of the user's
    full_table.to_csv(indexed)
    assert len(read_table(indexed, score_names(model))) == len(full_table)
    # a column added without a header is named "Unnamed: N" too, but holds values; an
    # empty one (a trailing separator) holds nothing to lose
    unnamed = tmp_path / "unnamed.csv"
    full_table.assign(**{"": "checked"}).to_csv(unnamed, index=False)
    with pytest.raises(ScoringError, match=r"has column\(s\) \['Unnamed: \d+'\] that scoring"):
        read_table(unnamed, score_names(model))
    full_table.assign(**{"": None}).to_csv(unnamed, index=False)
    assert len(read_table(unnamed, score_names(model))) == len(full_table)
    with pytest.raises(ScoringError, match="lacks column"):
        read_table(other, score_names(model))
    # damaged text: Parquet stores strings unchecked, and pandas reads them lazily, so
    # the bad byte would surface later, in a traceback, as the rows are matched to files
    import pyarrow as pa
    import pyarrow.parquet as pq

    not_utf8 = tmp_path / "not-utf8.parquet"
    arrow = pa.Table.from_pandas(full_table, preserve_index=False)
    paths = pa.array([p.encode("utf-8", "surrogateescape") + b"\x80"
                      for p in full_table["path"]], pa.binary()).view(pa.string())
    pq.write_table(arrow.set_column(0, "path", paths), not_utf8)
    with pytest.raises(ScoringError, match=r"cannot read the earlier output .*not-utf8\.parquet"):
        score_folder(model, None, messy, not_utf8, resume=True)


def test_resume_refuses_a_table_another_model_or_folder_made(
    model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path,
    caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "scores.csv"
    write_table(full_table.head(10), out)
    other = make_tiny_model()
    with torch.no_grad():  # a fine-tuned model: the same architecture, other weights
        other.levels[0].steps[0].actnorm.log_scale.add_(0.01)
    with pytest.raises(ScoringError, match=r"scores\.csv was scored by another model or "
                       r"precision, or its files changed since: .* has bpd .* there and .* "
                       r"now; resume only with the model and --precision"):
        score_folder(other, None, messy, out, resume=True)
    changed = full_table.head(10).copy()
    changed.loc[9, "bpd"] += 1e-3  # a file rewritten since it was scored
    write_table(changed, out)
    with pytest.raises(ScoringError, match="or its files changed since"):
        score_folder(model, None, messy, out, resume=True)
    assert read_csv(out)["bpd"].equals(changed["bpd"])  # a refusal writes nothing

    # a table of another folder: resuming would throw away every row
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(sample_images(1)[0, 0]).save(elsewhere / "a.png")
    write_table(full_table.head(10), out)
    with pytest.raises(ScoringError, match=r"none of the 10 rows of .*scores\.csv is a file "
                       r"under .*elsewhere \(its first row is .*messy.*/a_good\.png\), so "
                       r"resuming would drop them all"):
        score_folder(model, None, elsewhere, out, resume=True)
    # some rows of files gone: dropped, with a warning
    table = full_table.head(10).copy()
    table.loc[10] = table.loc[9].copy()
    table.loc[10, "path"] = str(messy / "gone.png")
    write_table(table, out)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, messy, out, resume=True)
    assert summary.n_resumed == 10
    assert "dropping 1 row(s) of" in caplog.text and "no longer under" in caplog.text
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)
    # a row of a file with a hidden name (a table from before they were left out): it is
    # there, so not called gone
    table.loc[10, "path"] = str(messy / "._a_good.png")
    write_table(table, out)
    caplog.clear()
    (messy / "._a_good.png").write_bytes(b"\x00\x05\x16\x07")  # in the module's folder:
    try:  # taken away whatever happens
        with caplog.at_level(logging.WARNING):
            score_folder(model, None, messy, out, resume=True)
    finally:
        (messy / "._a_good.png").unlink()
    assert "no longer under" not in caplog.text
    assert "dropping 1 row(s) of" in caplog.text and "whose files have hidden names " \
        "(starting with '.'), which the folder search now leaves out" in caplog.text
    pd.testing.assert_frame_equal(read_csv(out), full_table, check_exact=True)


@pytest.mark.parametrize(("suffix", "dropped", "named"), [
    (".csv", ["coarse_complexity"], "coarse_complexity column"),
    (".parquet", ["coarse_complexity"], "coarse_complexity column"),
    (".csv", ["typicality"], "typicality column"),
    (".parquet", ["coarse_complexity", "typicality"], "coarse_complexity or typicality columns"),
    (".csv", ["knn"], "knn column"),
    (".parquet", ["knn", "ensemble"], "knn or ensemble columns"),
    (".csv", ["pixel_knn"], "pixel_knn column"),
])
def test_resume_from_a_table_without_a_later_score_rescores_its_files(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, suffix: str,
        dropped: list[str], named: str, caplog: pytest.LogCaptureFixture) -> None:
    """A table written before a later score (:data:`LATER_SCORES`) existed: resuming
    scores its files again to fill the columns, keeps its failed rows, and finishes the
    whole table."""
    out = tmp_path / f"scores{suffix}"
    k = 7
    older = full_table.head(k).drop(columns=dropped)
    older["is_anomaly"] = older["is_anomaly"].astype("boolean")
    n_failed = int((older["error"] != "").sum())
    assert 0 < n_failed < k
    write_table(older, out)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.score_table"):
        summary = score_folder(model, None, messy, out, batch_size=4, resume=True,
                               heatmaps=tmp_path / "heat")
    assert summary.n_resumed == n_failed and summary.n_files == len(MESSY)
    assert summary.n_heatmaps == N_GOOD  # every file with scores was scored by this run
    [message] = [r.getMessage() for r in caplog.records if "has no" in r.getMessage()]
    assert f"has no {named} (it was written by an older anomaly-flow, or by a model without " \
           f"that score); scoring its {k - n_failed} scored file(s) again" in message
    resumed = read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(resumed.columns) == output_columns(model)
    pd.testing.assert_frame_equal(
        resumed.astype({"is_anomaly": float, "path": str, "error": str}),
        full_table.astype({"is_anomaly": float, "path": str, "error": str}),
        check_exact=True,
    )


# --------------------------------------------------------------------------- calibration


def test_calibrated_run_fills_p_values_and_verdicts(model: Glow, messy: Path,
                                                    full_table: pd.DataFrame,
                                                    tmp_path: Path) -> None:
    folder = tmp_path / "normal"
    write_image_folder(sample_images(19, offset=100), folder, "n")
    score_folder(model, None, folder, tmp_path / "normal.csv")
    normal = read_csv(tmp_path / "normal.csv")["bpd"].to_numpy()
    cal = Calibration.from_json(calibrate("bpd", normal, alpha=0.1).to_json())
    out = tmp_path / "scores.parquet"
    summary = score_folder(model, cal, messy, out)
    table = pd.read_parquet(out)
    scored = table["error"] == ""
    assert table.loc[~scored, "p_value"].isna().all()
    assert table.loc[~scored, "is_anomaly"].isna().all()
    values = table.loc[scored, "score"].to_numpy()
    np.testing.assert_array_equal(table.loc[scored, "p_value"], cal.p_values(values))
    verdict = table.loc[scored, "is_anomaly"].to_numpy(dtype=bool)
    np.testing.assert_array_equal(verdict, values > cal.threshold.value)
    assert summary.n_anomalous == int(verdict.sum())
    # Benjamini-Hochberg over the whole table instead of the threshold
    score_folder(model, cal, messy, out, fdr=0.2)
    bh = pd.read_parquet(out)
    np.testing.assert_array_equal(bh.loc[scored, "is_anomaly"].to_numpy(dtype=bool),
                                  benjamini_hochberg(cal.p_values(values), 0.2))
    # 19 calibration scores: no p-value is below 1/20, so BH at q < 0.05 never flags
    never = tmp_path / "never.csv"
    with pytest.raises(ScoringError, match=r"--fdr 0\.04 can never flag an image: the "
                                           r"calibration holds 19 scores, so the smallest "
                                           r"p-value is 1/20 = 0\.05.*at least 24 held-out"):
        score_folder(model, cal, messy, never, fdr=0.04)
    assert not never.exists()  # refused before scoring
    score_folder(model, cal, messy, never, fdr=0.05)  # the smallest p-value can be flagged


# --------------------------------------------------------------------------- heatmaps


def test_heatmaps_for_every_scored_image(model: Glow, messy: Path, full_table: pd.DataFrame,
                                         tmp_path: Path) -> None:
    heat = tmp_path / "heat"
    summary = score_folder(model, None, messy, tmp_path / "s.csv", batch_size=4, heatmaps=heat)
    assert summary.n_heatmaps == N_GOOD and summary.heatmaps == heat
    heatmap_of = {n: str(Path(n).with_suffix(".png")) for n, r in MESSY.items() if r is None}
    heatmap_of.update({"sub/dup.png": "sub/dup.png.png", "sub/dup.jpg": "sub/dup.jpg.png"})
    assert len(list(heat.rglob("*.png"))) == N_GOOD
    bpd = dict(zip(relative(full_table, messy), full_table["bpd"], strict=True))
    for name, heatmap in heatmap_of.items():
        with Image.open(heat / heatmap) as img:
            assert img.mode == "RGB" and img.size == (256, 256)  # 16 px, upsampled × 16
            # the map's mean is the image's bpd (float32 map, averaged in float64)
            stored = float(img.text["anomaly-flow:bpd"])
            assert stored == pytest.approx(bpd[name.replace("\udcff", "\\xff")], abs=1e-5)
            assert img.text["anomaly-flow:scale"] == "inferno 0..8 bits/dim (fixed)"


def test_default_score_and_a_calibration_the_model_cannot_serve(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path) -> None:
    assert default_score(model) == "ensemble"
    # The reference of the anomaly-flow before pixel_knn (maps, a two-row scale, no
    # images): no pixel_knn column, and its ensemble the two-term sum it was calibrated on.
    before = Glow(model.config)
    state = model.state_dict()
    del state["reference_images"]
    state["reference_scale"] = state["reference_scale"][:2].clone()
    before.load_state_dict(state)
    assert default_score(before) == "ensemble" and "pixel_knn" not in score_names(before)
    before_out = tmp_path / "before.csv"
    score_folder(before.eval(), None, messy, before_out, batch_size=4)
    before_table = read_csv(before_out)
    assert list(before_table.columns) == output_columns(before)
    (knn_mean, knn_std), (cc_mean, cc_std) = before.reference_scale.double().tolist()
    np.testing.assert_allclose(
        before_table["ensemble"], (full_table["knn"] - knn_mean) / knn_std
        + (full_table["coarse_complexity"] - cc_mean) / cc_std, rtol=1e-9, atol=1e-9)
    bare = Glow(model.config)
    bare.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("reference_")})
    assert default_score(bare) == "bpd"
    assert not {"typicality", "knn", "pixel_knn", "ensemble"} & set(score_names(bare))
    # An older reference (mean and std, no maps): typicality, the default, and no knn.
    older = Glow(model.config)
    older.load_state_dict({k: v for k, v in model.state_dict().items()
                           if k not in ("reference_maps", "reference_scale",
                                        "reference_images")})
    assert default_score(older) == "typicality"
    assert score_names(older) == ["bpd", "complexity", "coarse_complexity", "typicality",
                                  "level_1", "level_2"]
    older_out = tmp_path / "older.csv"
    score_folder(older.eval(), None, messy, older_out, batch_size=4)
    older_table = read_csv(older_out)
    assert list(older_table.columns) == output_columns(older)
    np.testing.assert_allclose(older_table["typicality"], full_table["typicality"], rtol=1e-6)
    scored = full_table[full_table["error"] == ""]
    cal = calibrate("typicality", scored["typicality"].to_numpy(), alpha=0.25)
    out = tmp_path / "never.csv"
    with pytest.raises(ScoringError, match="uses score 'typicality', which this model does "
                                           "not produce"):
        score_folder(bare.eval(), cal, messy, out)
    assert not out.exists()  # refused before scoring anything


@pytest.mark.parametrize("score", ["typicality", "knn", "pixel_knn", "ensemble"])
def test_heatmaps_of_a_reference_calibration_show_the_typicality_terms(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path, score: str) -> None:
    """Calibrated on typicality, knn, pixel_knn or ensemble: each heatmap draws the typicality terms
    |m - mu| / (sigma + floor), whose mean is the image's typicality, on the fixed 0..5
    standard-deviation scale."""
    scored = full_table[full_table["error"] == ""]
    cal = calibrate(score, scored[score].to_numpy(), alpha=0.25)
    heat = tmp_path / "heat"
    summary = score_folder(model, cal, messy, tmp_path / "s.csv", batch_size=4, heatmaps=heat)
    assert summary.n_heatmaps == N_GOOD
    typicality = dict(zip(relative(full_table, messy), full_table["typicality"], strict=True))
    for name, reason in MESSY.items():
        if reason is not None or name.startswith("sub/dup"):
            continue
        with Image.open(heat / Path(name).with_suffix(".png")) as img:
            assert "anomaly-flow:bpd" not in img.text
            stored = float(img.text["anomaly-flow:typicality"])
            assert stored == pytest.approx(typicality[name.replace("\udcff", "\\xff")],
                                           rel=1e-5)
            assert img.text["anomaly-flow:scale"] == \
                "inferno 0..5 normal standard deviations (fixed)"
            drawn = np.asarray(img.convert("RGB"))
        if score != "typicality":
            continue
        # the map itself, pixel by pixel: |m - mu| / (sigma + 0.1) of the image's per-pixel
        # bits/dim from the model's own breakdown, drawn as render_heatmap draws
        image = load_image(messy / name, TINY.mode, TINY.image_size)
        with torch.no_grad():
            pixel_bpd = model.breakdown(preprocess(torch.from_numpy(image)[None], 8)).pixel_bpd
        terms = ((pixel_bpd[0] - model.reference_mean) / (model.reference_std + 0.1)).abs()
        expected = render_heatmap(image, terms.numpy(), vmin=0.0, vmax=5.0,
                                  table=colormap_table("inferno"))
        assert drawn.shape == expected.shape
        differ = np.abs(drawn.astype(int) - expected).max(axis=-1)
        assert differ.max() <= 8 and (differ == 0).mean() > 0.95  # float32 rounding only


def test_heatmap_kind_overrides_the_deciding_scores_map(
        model: Glow, messy: Path, full_table: pd.DataFrame, tmp_path: Path) -> None:
    scored = full_table[full_table["error"] == ""]
    cal = calibrate("ensemble", scored["ensemble"].to_numpy(), alpha=0.25)
    values = {"bpd": dict(zip(relative(full_table, messy), full_table["bpd"], strict=True)),
              "typicality": dict(zip(relative(full_table, messy), full_table["typicality"],
                                     strict=True))}
    name = next(n for n, reason in MESSY.items() if reason is None and n.isascii()
                and not n.startswith("sub/dup"))
    # per-pixel bits/dim although ensemble decides; typicality terms although uncalibrated
    for calibration, kind in ((cal, "bpd"), (None, "typicality")):
        heat = tmp_path / f"heat-{kind}"
        score_folder(model, calibration, messy, tmp_path / f"{kind}.csv", batch_size=4,
                     heatmaps=heat, heatmap_kind=kind)  # type: ignore[arg-type]
        with Image.open(heat / Path(name).with_suffix(".png")) as img:
            assert float(img.text[f"anomaly-flow:{kind}"]) == pytest.approx(
                values[kind][name], rel=1e-5)
    # a model without a normal reference has no typicality map: refused before scoring
    bare = Glow(model.config)
    bare.load_state_dict({k: v for k, v in model.state_dict().items()
                          if not k.startswith("reference_")})
    out = tmp_path / "never.csv"
    with pytest.raises(ScoringError, match=r"typicality heatmaps need the model's normal "
                                           r"reference.*--heatmap-kind bpd"):
        score_folder(bare.eval(), None, messy, out, heatmaps=tmp_path / "never",
                     heatmap_kind="typicality")
    assert not out.exists() and not (tmp_path / "never").exists()


def test_pixel_maps_average_to_bpd(model: Glow, messy: Path) -> None:
    """The maps scoring hands to the heatmap writer are each image's per-pixel bits/dim
    (the breakdown of its decoded pixels), and average to the row's bpd."""
    received: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
    paths = find_images(messy)
    dataset = ScoringDataset(paths, TINY.mode, TINY.image_size, TINY.n_bits, TINY.levels)
    table = score_dataset(model, dataset, batch_size=5,
                          heatmaps=lambda i, x, m: received.append((list(i), x, m)))
    indices = [i for batch in received for i in batch[0]]
    assert indices == [i for i in range(len(paths)) if table.loc[i, "error"] == ""]
    maps = torch.cat([batch[2] for batch in received]).double()
    assert maps.shape == (N_GOOD, 16, 16)
    np.testing.assert_allclose(maps.mean(dim=(1, 2)).numpy(), table.loc[indices, "bpd"],
                               rtol=0, atol=1e-5)
    images = torch.cat([batch[1] for batch in received])
    assert images.dtype == torch.uint8 and images.shape == (N_GOOD, 1, 16, 16)
    # each map is its own image's, pixel for pixel: the decoded file's Glow.breakdown map
    decoded = torch.stack([torch.from_numpy(load_image(paths[i], TINY.mode, TINY.image_size))
                           for i in indices])
    assert torch.equal(images, decoded)
    with torch.no_grad():
        expected = model.breakdown(preprocess(decoded, TINY.n_bits)).pixel_bpd.double()
    assert float((expected - expected.mean(dim=(1, 2), keepdim=True)).abs().max()) > 0.1
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


def test_render_heatmap_uses_the_fixed_scale() -> None:
    table = colormap_table("inferno")
    image = np.zeros((1, 4, 4), dtype=np.uint8)  # black: the blend shows colour × alpha
    pixel_bpd = np.array([[-3.0, 0.0, 4.0, 8.0]] * 4)
    rgb = render_heatmap(image, pixel_bpd, vmin=0.0, vmax=8.0, table=table, min_side=10)
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8  # factor ceil(10 / 4) = 3
    low, mid, top = table[0] * 0.2, table[128] * 0.5, table[255] * 0.8
    for column, expected in [(0, low), (1, low), (2, mid), (3, top)]:
        np.testing.assert_allclose(rgb[0, 3 * column], expected, atol=0.51)
    white = np.full((3, 4, 4), 255, dtype=np.uint8)
    rgb = render_heatmap(white, np.zeros((4, 4)), vmin=0.0, vmax=8.0, table=table, min_side=4)
    np.testing.assert_allclose(rgb[0, 0], 0.8 * 255 + 0.2 * table[0], atol=0.51)
    with pytest.raises(ValueError, match="vmax > vmin"):
        render_heatmap(image, pixel_bpd, vmin=1.0, vmax=1.0)


def test_a_resumed_run_does_not_overwrite_an_earlier_heatmap(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "scores.csv"
    folder.mkdir()
    first, second = sample_images(2)
    Image.fromarray(first[0]).save(folder / "x.png")
    score_folder(model, None, folder, out, heatmaps=heat)
    before = (heat / "x.png").read_bytes()
    Image.fromarray(second[0]).save(folder / "x.bmp")  # added later, same stem
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_resumed == 1 and summary.n_heatmaps == 1
    assert f"1 kept file(s) keep the heatmap an earlier run wrote, under another name than " \
        f"a run over the folder as it is now would give (e.g. x.png's heatmap is " \
        f"{heat / 'x.png'}); run without --resume" in caplog.text
    assert "have no heatmap" not in caplog.text  # x.png has one, under its old name
    assert (heat / "x.png").read_bytes() == before
    assert (heat / "x.bmp.png").is_file()


def test_a_resumed_run_never_draws_over_a_kept_files_heatmap(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each heatmap records its source, so a resumed run knows whose it is: a new b.png,
    whose name is now b.png.png, does not take the heatmap of the kept file b.png.png."""
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "scores.csv"
    folder.mkdir()
    images = sample_images(3)
    Image.fromarray(images[0, 0]).save(folder / "b.jpg", quality=95)
    Image.fromarray(images[1, 0]).save(folder / "b.png.png")
    score_folder(model, None, folder, out, heatmaps=heat)
    assert sorted(p.name for p in heat.iterdir()) == ["b.png", "b.png.png"]
    before = {name: (heat / name).read_bytes() for name in ("b.png", "b.png.png")}
    Image.fromarray(images[2, 0]).save(folder / "b.png")  # added later
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_resumed == 2 and summary.n_heatmaps == 1
    assert {name: (heat / name).read_bytes() for name in before} == before
    with Image.open(heat / "b.png~2.png") as drawn:
        assert drawn.info["anomaly-flow:source"] == "b.png"
    assert "2 kept file(s) keep the heatmap an earlier run wrote" in caplog.text
    assert "have no heatmap" not in caplog.text
    # a file scored again (changed since the table) draws over its own heatmap, wherever
    # it lies, leaving no stale copy
    Image.fromarray(images[0, 0]).save(folder / "b.png.png")
    os.utime(folder / "b.png.png", (time.time() + 5, time.time() + 5))
    summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 1
    assert sorted(p.name for p in heat.iterdir()) == ["b.png", "b.png.png", "b.png~2.png"]
    assert (heat / "b.png.png").read_bytes() != before["b.png.png"]


def test_two_files_printing_as_one_name_are_refused(model: Glow, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    image = Image.fromarray(sample_images(1)[0, 0])
    image.save(os.fsdecode(bytes(folder) + b"/lat\xe9.png"), format="PNG")  # Latin-1 name
    image.save(folder / "lat\\xe9.png")  # its printed form, as a real name
    with pytest.raises(ScoringError, match=r"two files under .*images print as the same "
                                           r"name, .*lat\\xe9\.png .* rename one"):
        score_folder(model, None, folder, tmp_path / "scores.csv")
    assert not (tmp_path / "scores.csv").exists()


def test_a_kept_file_unreadable_now_is_scored_again(model: Glow, tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "scores.csv"
    write_image_folder(sample_images(3), folder, "x-")
    first = score_folder(model, None, folder, out)
    (folder / "x-00000.png").write_bytes(b"overwritten")  # changed since: read again
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    summary = score_folder(model, None, folder, out, resume=True)
    assert (first.n_files, summary.n_resumed, summary.n_files) == (3, 2, 4)
    assert summary.n_failed == 1


def test_heatmap_names_avoid_collisions() -> None:
    names = heatmap_names([Path("a/x.jpg"), Path("a/x.png"), Path("b/y.tif"), Path("z.png")])
    assert names == [Path("a/x.jpg.png"), Path("a/x.png.png"), Path("b/y.png"), Path("z.png")]


def test_a_batch_size_below_one_is_refused_before_anything_is_written(model: Glow, messy: Path,
                                                                     tmp_path: Path) -> None:
    """batch_size=0 ended in ZeroDivisionError, -1 in DataLoader's complaint about
    num_workers (which the caller had not set), and 2.5 in DataLoader's own words."""
    config = model.config
    dataset = ScoringDataset([None] * 3, config.mode, config.image_size, config.n_bits,
                             config.levels)
    for size in (0, -1, 2.5):
        with pytest.raises(ScoringError, match=rf"^batch_size is the number of images per "
                                               rf"forward pass, a whole number >= 1; got {size}$"):
            score_folder(model, None, messy, tmp_path / "s.csv", batch_size=size)
        with pytest.raises(ScoringError, match=rf"got {size}$"):
            score_dataset(model, dataset, batch_size=size)
    assert not list(tmp_path.iterdir())


def test_a_model_never_initialised_is_refused(model: Glow, messy: Path, tmp_path: Path) -> None:
    """A Glow fresh from its config has identity ActNorms and the couplings' zero last
    convolutions: it scores every file, and the numbers mean nothing."""
    fresh = Glow(model.config).eval()
    config = model.config
    dataset = ScoringDataset([None], config.mode, config.image_size, config.n_bits,
                             config.levels)
    for call in (lambda: score_folder(fresh, None, messy, tmp_path / "s.csv"),
                 lambda: score_dataset(fresh, dataset)):
        with pytest.raises(ScoringError, match=r"^the model's ActNorm layers were never "
                                               r"initialised, so it has learned nothing"):
            call()
    assert not list(tmp_path.iterdir())
    fresh.load_state_dict(model.state_dict())  # a trained model's weights: scored
    assert fresh.initialized
    assert len(score_dataset(fresh, dataset)) == 1


# --------------------------------------------------------------------------- precision


def test_bf16_is_close_to_float32_and_repeatable(model: Glow, messy: Path,
                                                 full_table: pd.DataFrame, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    for run in ("a", "b"):
        score_folder(model, None, messy, tmp_path / f"{run}.csv", precision="bf16")
    first, second = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(first, second)  # deterministic
    assert first["error"].tolist() == full_table["error"].tolist()
    np.testing.assert_allclose(first["bpd"], full_table["bpd"], atol=0.05)
    assert model.levels[0].steps[0].coupling.net.autocast_dtype is None  # restored
    with pytest.raises(ScoringError, match="unknown precision 'fp8'"):
        score_folder(model, None, messy, tmp_path / "c.csv", precision="fp8")  # type: ignore[arg-type]
    # a table resumes only in the precision that scored it: bf16 numbers come within the
    # loose tolerance of float32's, so they are told apart by float32's own numbers (a
    # model whose coupling networks, zero at the start, give something for bf16 to round)
    rounded = make_tiny_model()
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator()
                                              .manual_seed(parameter.numel())))
    exact, half = tmp_path / "exact.csv", tmp_path / "half.csv"
    score_folder(rounded, None, messy, exact)
    score_folder(rounded, None, messy, half, precision="bf16")
    exact_rows, half_rows = read_csv(exact), read_csv(half)
    ok = exact_rows["error"] == ""
    gap = np.abs(half_rows["bpd"][ok] / exact_rows["bpd"][ok] - 1)
    assert 1e-5 < gap.max() < 1e-3, gap.max()  # within the loose tolerance, not the tight
    resumed = tmp_path / "resumed.csv"
    write_table(exact_rows.head(10), resumed)
    with pytest.raises(ScoringError, match=r"resumed\.csv was scored in float32 \(its bpd "
                                           r"is float32's to 1e-5\), and this run is bf16: "
                                           r"the table would mix the two; resume with "
                                           r"--precision float32"):
        score_folder(rounded, None, messy, resumed, resume=True, precision="bf16")
    write_table(half_rows.head(10), resumed)  # bf16's rows, resumed in bf16
    score_folder(rounded, None, messy, resumed, resume=True, precision="bf16")
    pd.testing.assert_frame_equal(read_csv(resumed), half_rows)
    write_table(exact_rows.head(10), resumed)  # tf32 on a CPU is float32: the same numbers
    caplog.clear()
    scoring._SAID_ONCE.clear()
    with caplog.at_level(logging.WARNING):
        score_folder(rounded, None, messy, resumed, resume=True, precision="tf32")
        score_folder(rounded, None, messy, tmp_path / "again.csv", precision="tf32")
    pd.testing.assert_frame_equal(read_csv(resumed), exact_rows)
    assert caplog.text.count("precision tf32 changes nothing on CPU (TF32 is CUDA's): the "
                             "scores are float32's") == 1  # once a process, not a batch


# --------------------------------------------------------------------------- what a run may touch


def test_heatmaps_refuse_a_folder_overlapping_the_scored_one(model: Glow,
                                                             tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for heat, where in [(folder, "is the scored folder"),
                        (folder / "heat", "is inside the scored folder"),
                        (tmp_path, "contains the scored folder")]:
        with pytest.raises(ScoringError, match=f"the heatmap folder .* {where} .*images: its "
                                               "heatmaps would overwrite or mix with the "
                                               "images .* choose a heatmap folder outside"):
            score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not (folder / "heat").exists() and not (tmp_path / "s.csv").exists()


def test_heatmaps_refuse_a_folder_the_scored_one_links_to(model: Glow, tmp_path: Path) -> None:
    """A symlinked folder inside the scored folder that leads to the heatmap folder (or to
    a folder around it) would have the next run score the heatmaps as images."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    for heat, target in [(tmp_path / "heat", tmp_path / "heat"),
                         (tmp_path / "around" / "heat", tmp_path / "around"),
                         (tmp_path / "maps", tmp_path / "maps" / "sub")]:  # a folder in it
        link = folder / "link"
        target.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=True)
        said = (f"the heatmap folder {heat} is reached from the scored folder {folder} "
                f"through a symlinked folder inside it (to {target}), so the next run would "
                "score the heatmaps as images")
        with pytest.raises(ScoringError, match=re.escape(said)):
            score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
        assert not (tmp_path / "s.csv").exists() and not list(heat.rglob("*.png"))
        link.unlink()
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=tmp_path / "heat")
    assert summary.n_heatmaps == 2


def test_a_heatmap_never_replaces_a_file_it_did_not_write(model: Glow, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")
    heat.mkdir()
    (heat / "x-00000.png").write_bytes(b"the user's own file")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert (heat / "x-00000.png").read_bytes() == b"the user's own file"
    assert "x-00000.png exists and is not a heatmap; it is left as it is" in caplog.text
    assert summary.n_heatmaps == 1
    # its own heatmaps it does replace
    before = (heat / "x-00001.png").stat().st_mtime_ns
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 1 and (heat / "x-00001.png").stat().st_mtime_ns >= before


@pytest.mark.timeout(120, method="thread")  # the bug it guards against hangs
def test_a_pipe_named_like_a_heatmap_does_not_hang_the_run(model: Glow, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """Telling a heatmap from a user's file, or finding earlier heatmaps on resuming,
    never opens a pipe (which would block the writer thread and the run for good)."""
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")
    heat.mkdir()
    os.mkfifo(heat / "x-00000.png")
    out = tmp_path / "s.csv"
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat)
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert "x-00000.png exists and is not a heatmap; it is left as it is" in caplog.text
    assert summary.n_files == 2 and (heat / "x-00001.png").is_file()


def test_a_heatmap_is_written_whole_or_not_at_all(model: Glow, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Each heatmap goes to a temporary file first: a write that fails before the rename
    leaves neither a cut PNG under the heatmap's name nor the temporary file."""
    from anomaly_flow import heatmap as heatmap_module

    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(2), folder, "x-")

    real_replace = os.replace

    def refused(source: Path, target: Path) -> None:
        if Path(target).parent != heat:  # the table's own rename
            return real_replace(source, target)
        assert Path(source).stat().st_size > 0 and Path(source).parent == heat
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heatmap_module.os, "replace", refused)  # os itself: one module
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 0 and list(heat.iterdir()) == []
    assert caplog.text.count("No space left on device") == 2


def test_a_heatmap_writer_that_fails_outright_still_stops_its_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure that is not one file's (here, rendering itself) is raised by close, and
    the writer's threads end all the same."""
    from anomaly_flow import heatmap as heatmap_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("renderer broken")

    monkeypatch.setattr(heatmap_module, "render_heatmap", broken)
    writer = heatmap_module.HeatmapWriter(tmp_path, [Path("a.png")], vmin=0, vmax=8)
    writer([0], torch.zeros(1, 1, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8))
    with pytest.raises(RuntimeError, match="renderer broken"):
        writer.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("heatmap")]


def test_a_heatmap_of_a_file_with_a_long_name_is_written(model: Glow, tmp_path: Path) -> None:
    """Its temporary file's name is short: a name near the 255-byte limit still fits."""
    folder, heat = tmp_path / "images", tmp_path / "heat"
    write_image_folder(sample_images(1), folder, "a" * 240)
    summary = score_folder(model, None, folder, tmp_path / "s.csv", heatmaps=heat)
    assert summary.n_heatmaps == 1 and (heat / f"{'a' * 240}00000.png").is_file()


def test_an_output_with_a_name_of_255_bytes_is_written(model: Glow, tmp_path: Path) -> None:
    """The table's temporary file takes a cut of its name: the longest name a file system
    takes for the table itself still works, and so does resuming it."""
    folder = tmp_path / "images"
    write_image_folder(sample_images(3), folder, "x-")
    out = tmp_path / ("é" * 125 + "t.csv")  # 255 bytes in UTF-8
    assert len(os.fsencode(out.name)) == 255
    score_folder(model, None, folder, out)
    summary = score_folder(model, None, folder, out, resume=True)
    assert len(read_csv(out)) == 3 and summary.n_scored == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["images", out.name])


def test_heatmap_names_stay_apart_from_each_other_and_from_folders() -> None:
    names = heatmap_names([Path("x.jpg"), Path("x.png"), Path("x.png.png")])
    assert names == [Path("x.jpg.png"), Path("x.png.png"), Path("x.png~2.png")]
    # a heatmap file may not take the name of a folder of heatmaps
    assert heatmap_names([Path("x.jpg"), Path("x.png/a.png")]) == [Path("x~2.png"),
                                                                   Path("x.png/a.png")]


def test_a_file_that_fails_now_loses_its_old_heatmap(model: Glow, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(2), folder, "x-")
    score_folder(model, None, folder, out, heatmaps=heat)
    (folder / "x-00000.png").write_bytes(b"junk")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat)
    assert summary.n_failed == 1 and not (heat / "x-00000.png").exists()
    assert (heat / "x-00001.png").is_file()
    assert "removed 1 heatmap(s) an earlier run drew of files that cannot be scored now" \
        in caplog.text


def test_resume_with_heatmaps_names_the_kept_files_without_one(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out)  # no heatmaps
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, heatmaps=heat, resume=True)
    assert summary.n_heatmaps == 1
    assert re.search(r"3 file\(s\) kept from .*s\.csv have no heatmap under .*heat \(e\.g\. "
                     r"x-00000\.png: no earlier run drew one there\); run without "
                     r"--resume to draw them", caplog.text)


def test_resume_warns_when_its_heatmaps_would_mix_two_scales(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, heat, out = tmp_path / "images", tmp_path / "heat", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="typicality")
    write_image_folder(sample_images(1, offset=3), folder, "y-")
    with caplog.at_level(logging.WARNING):
        score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="bpd", resume=True)
    assert re.search(r"the kept heatmaps under .*heat draw typicality, and this run draws "
                     r"bpd: the folder would mix colour scales; resume with --heatmap-kind "
                     r"typicality", caplog.text)
    caplog.clear()
    write_image_folder(sample_images(1, offset=4), folder, "z-")
    with caplog.at_level(logging.WARNING):  # now both kinds are there, whichever is drawn
        score_folder(model, None, folder, out, heatmaps=heat, heatmap_kind="bpd",
                     resume=True)
    assert "draw typicality, and this run draws bpd" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # nothing left to score: nothing redrawn either
        summary = score_folder(model, None, folder, out, heatmaps=heat,
                               heatmap_kind="typicality", resume=True)
    assert summary.n_heatmaps == 0
    assert re.search(r"the kept heatmaps under .*heat draw bpd, not typicality, and no file "
                     r"is left to score, so none is drawn again; run without --resume to "
                     r"draw them all as typicality", caplog.text)
    caplog.clear()
    write_image_folder(sample_images(1, offset=5), folder, "w-")
    (out.parent / "same.csv").write_bytes(out.read_bytes())
    shutil.rmtree(heat)
    score_folder(model, None, folder, out.parent / "same.csv", heatmaps=heat,
                 heatmap_kind="bpd")
    write_image_folder(sample_images(1, offset=6), folder, "v-")
    with caplog.at_level(logging.WARNING):  # the same kind again: nothing to say
        score_folder(model, None, folder, out.parent / "same.csv", heatmaps=heat,
                     heatmap_kind="bpd", resume=True)
    assert "mix colour scales" not in caplog.text


def test_resume_scores_again_the_files_changed_since_the_table(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(8), folder, "x-")
    score_folder(model, None, folder, out)
    # a file replaced by another image (not one of the rows a resume scores again first)
    replacement = sample_images(1, offset=20)
    Image.fromarray(replacement[0, 0]).save(folder / "x-00002.png")
    fresh = score_folder(model, None, folder, tmp_path / "fresh.csv")
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, resume=True)
    assert summary.n_resumed == 7
    assert re.search(r"1 file\(s\) changed since .*s\.csv was written \(e\.g\. .*x-00002\.png\)"
                     r"; scoring them again", caplog.text)
    assert read_csv(out)["bpd"].equals(read_csv(tmp_path / "fresh.csv")["bpd"])
    assert fresh.n_files == 8


def test_resume_from_a_subfolder_keeps_the_tables_other_rows(model: Glow,
                                                             tmp_path: Path) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(2), folder / "a", "x-")
    write_image_folder(sample_images(2, offset=2), folder / "b", "y-")
    score_folder(model, None, folder, out)
    table = out.read_bytes()
    with pytest.raises(ScoringError, match=r"2 row\(s\) of .*s\.csv are files outside .*a that "
                                           r"still exist \(e\.g\. .*y-00000\.png\), so "
                                           "resuming would drop them; resume with the folder"):
        score_folder(model, None, folder / "a", out, resume=True)
    assert out.read_bytes() == table
    (folder / "b" / "y-00000.png").unlink()  # a file gone: its row goes, with a warning
    summary = score_folder(model, None, folder, out, resume=True)
    assert (summary.n_resumed, summary.n_files) == (3, 3)


def test_resume_scores_again_a_row_with_both_scores_and_an_error(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    score_folder(model, None, folder, out)
    table = read_csv(out)
    clean = table.copy()
    table.loc[1, "error"] = "a note added by hand"
    write_table(table, out)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, out, resume=True)
    assert "1 row(s) with both scores and an error" in caplog.text
    assert summary.n_resumed == 2 and summary.n_failed == 0
    assert read_csv(out)["bpd"].equals(clean["bpd"])


def test_an_output_link_is_written_through_and_a_replaced_table_is_named(
        model: Glow, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "images"
    write_image_folder(sample_images(2), folder, "x-")
    (tmp_path / "shared").mkdir()
    target, link = tmp_path / "shared" / "real.csv", tmp_path / "link.csv"
    target.write_text("path,bpd,error\n")  # an earlier table, with no rows
    link.symlink_to(target)
    with caplog.at_level(logging.WARNING):
        summary = score_folder(model, None, folder, link)
    assert link.is_symlink() and summary.out == target
    assert len(read_csv(link)) == 2
    assert f"replacing the earlier output {target} (resuming, --resume, would keep its rows)" \
        in caplog.text


def test_resume_scores_again_a_last_row_cut_short(model: Glow, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A table cut mid-row (a copy or an edit, not our writes, which are atomic): the rows
    before the cut stand, the cut one is scored again, wherever in the row the cut fell
    (in a number, which would read as another number, or in a quoted path holding a line
    end, which the CSV parser would refuse)."""
    folder, out = tmp_path / "images", tmp_path / "s.csv"
    write_image_folder(sample_images(3), folder, "x-")
    Image.fromarray(sample_images(1, offset=3)[0, 0]).save(folder / 'z "odd"\nname.png')
    score_folder(model, None, folder, out)
    whole = out.read_bytes()
    last = whole.rindex(b"\n", 0, whole.index(b'z ""odd""')) + 1  # the last row's start
    assert whole[last:].startswith(b'"') and whole.count(b"\n", last) == 2  # it sorts last
    in_the_path = last + whole[last:].index(b"\n") + 1  # past the line end in the name
    in_a_number = whole.rindex(b".", 0, len(whole) - 3) + 3  # two digits of a decimal
    for cut in (in_the_path, in_a_number, len(whole) - 1):
        out.write_bytes(whole[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            summary = score_folder(model, None, folder, out, resume=True)
        assert f"ends in a row cut short ({cut - last} bytes after its last complete line)" \
            in caplog.text
        assert (summary.n_resumed, summary.n_files) == (3, 4)
        assert out.read_bytes() == whole
