"""Tests for anomaly_flow.scoring and anomaly_flow.heatmap, on real image files (most
through folder runs, whose table, resuming and heatmap folder are tested in
``tests/test_folder_scoring.py``).

The model is a tiny, untrained but initialised Glow saved with ``Glow.save``: scores are
meaningless as anomaly scores but exact as likelihoods, which is all these tests need.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import struct
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
from PIL import Image, ImageOps

from anomaly_flow import score_table, scoring
from anomaly_flow.calibration import Calibration, benjamini_hochberg, calibrate
from anomaly_flow.config import GlowConfig
from anomaly_flow.data import ArrayDataset, display_path, load_image, write_image_folder
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.folder_scoring import score_folder
from anomaly_flow.folders import find_images
from anomaly_flow.glow import Glow, preprocess
from anomaly_flow.heatmap import colormap_table, heatmap_names, render_heatmap
from anomaly_flow.score_table import ScoringError
from anomaly_flow.scoring import (
    NON_FINITE_ERROR,
    ScoringDataset,
    default_score,
    output_columns,
    score_dataset,
    score_images,
    score_names,
)
from anomaly_flow.train import fit_reference
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
        f"{Image.MAX_IMAGE_PIXELS}-pixel safety limit; save it smaller (the model sees "
        "every image at its image_size anyway)"
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


# --------------------------------------------------------------------------- scores of each file


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
    dataset = ScoringDataset(sources, TINY)
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
    empty = ScoringDataset([None] * 10, config)
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
        dataset = ScoringDataset([files[path].read_bytes()], TINY)
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


def test_score_images_refuses_what_it_cannot_score_in_the_callers_terms(model: Glow) -> None:
    """A shape error named the padded batch ((1, 1, 28, 28) was "not (2, 1, 28, 28)") and
    advised preprocess(), which score_images then refuses; a numpy array or a LoadedModel
    met an AttributeError; an untrained model was scored, as score_folder refuses to."""
    from anomaly_flow.tracking import LoadedModel

    images = ArrayDataset(load_sample().train[:3], TINY.mode, TINY.image_size).images
    for bad in (torch.zeros(1, 1, 28, 28, dtype=torch.uint8), images[0]):
        with pytest.raises(ValueError, match=rf"score_images takes uint8 pixels of shape "
                                             rf"\(B, 1, 16, 16\), channels first, not "
                                             rf"{re.escape(str(tuple(bad.shape)))}; convert"):
            score_images(model, bad)
    with pytest.raises(TypeError, match="preprocess takes integer pixels"):
        score_images(model, images.float())  # its message says how to convert
    flipped = images.numpy()[:, :, :, ::-1]  # negative strides, as BGR-to-RGB views have
    flipped.flags.writeable = False
    torch.testing.assert_close(score_images(model, flipped).bpd,
                               score_images(model, images.flip(3)).bpd, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"score_images takes a Glow, not a LoadedModel; "
                                        r"pass its \.model"):
        score_images(LoadedModel(model, None, "folder"), images)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a list"):
        score_images(model, images.tolist())
    with pytest.raises(ScoringError, match="never initialised"):
        score_images(Glow(TINY), images)


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


# --------------------------------------------------------------------------- compiling


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


@pytest.mark.parametrize("n", [19, 40, 98, 159, 1000, 9999, 12345])
def test_the_fdr_the_refusal_advises_is_accepted_when_typed_back(n: int) -> None:
    """The refusal prints the smallest usable --fdr rounded up, never down: 1/41 is
    0.024390..., and an advice of 0.02439 (rounded to nearest) would be refused again.
    Nor a step too far up where 1/(n+1) is a short decimal (1/160 = 0.00625, not
    0.006251)."""
    cal = calibrate("bpd", np.arange(float(n)), alpha=0.5)
    row = pd.DataFrame({"bpd": [n + 1.0]})  # above every calibration score: p = 1/(n+1)
    with pytest.raises(ScoringError, match=r"raise --fdr to at least ") as refused:
        scoring.apply_calibration(row, cal, 1 / (n + 1) * 0.999)
    advice = re.search(r"at least ([0-9.e-]+),", str(refused.value))
    assert advice is not None
    typed = float(advice.group(1))
    assert 1 / (n + 1) <= typed < 1 / (n + 1) * 1.001  # four significant digits, rounded up
    nearest = float(f"{1 / (n + 1):.3e}")
    if nearest >= 1 / (n + 1):
        assert typed == nearest
    flagged = scoring.apply_calibration(row, cal, typed)
    assert flagged["is_anomaly"].tolist() == [True]


# --------------------------------------------------------------------------- heatmaps


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


def test_pixel_maps_average_to_bpd(model: Glow, messy: Path) -> None:
    """The maps scoring hands to the heatmap writer are each image's per-pixel bits/dim
    (the breakdown of its decoded pixels), and average to the row's bpd."""
    received: list[tuple[list[int], torch.Tensor, torch.Tensor, np.ndarray]] = []
    paths = find_images(messy)
    dataset = ScoringDataset(paths, TINY)
    table = score_dataset(model, dataset, batch_size=5,
                          heatmaps=lambda i, x, m, s: received.append((list(i), x, m, s)))
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
    # with each file's decoded (width, height), the shape its heatmap takes
    shapes = np.concatenate([batch[3] for batch in received])
    assert shapes.dtype == np.int64 and shapes.shape == (N_GOOD, 2)
    for i, shape in zip(indices, shapes.tolist(), strict=True):
        with Image.open(paths[i]) as img:
            img.load()
            assert tuple(shape) == ImageOps.exif_transpose(img).size
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


def test_heatmap_names_avoid_collisions() -> None:
    names = heatmap_names([Path("a/x.jpg"), Path("a/x.png"), Path("b/y.tif"), Path("z.png")])
    assert names == [Path("a/x.jpg.png"), Path("a/x.png.png"), Path("b/y.png"), Path("z.png")]


def test_a_batch_size_below_one_is_refused_before_anything_is_written(model: Glow, messy: Path,
                                                                     tmp_path: Path) -> None:
    """batch_size=0 ended in ZeroDivisionError, -1 in DataLoader's complaint about
    num_workers (which the caller had not set), and 2.5 in DataLoader's own words."""
    config = model.config
    dataset = ScoringDataset([None] * 3, config)
    for size in (0, -1, 2.5):
        with pytest.raises(ScoringError, match=rf"^batch_size is the number of images per "
                                               rf"forward pass, a whole number >= 1; got {size}$"):
            score_folder(model, None, messy, tmp_path / "s.csv", batch_size=size)
        with pytest.raises(ScoringError, match=rf"got {size}$"):
            score_dataset(model, dataset, batch_size=size)
    assert not list(tmp_path.iterdir())


def test_a_dataset_built_for_another_model_is_refused(model: Glow) -> None:
    """The dataset converts the images: one built from another config (a pad where the
    model stretches, other levels for the PNG lengths) would score them otherwise."""
    for change in ({"resize": "pad"}, {"levels": 1}):
        other = ScoringDataset([None], dataclasses.replace(model.config, **change))
        with pytest.raises(ValueError, match=r"the dataset prepares images for another model "
                                             r"\(mode, size, resize, n_bits, levels: "):
            score_dataset(model, other)


def test_a_model_never_initialised_is_refused(model: Glow, messy: Path, tmp_path: Path) -> None:
    """A Glow fresh from its config has identity ActNorms and the couplings' zero last
    convolutions: it scores every file, and the numbers mean nothing."""
    fresh = Glow(model.config).eval()
    config = model.config
    dataset = ScoringDataset([None], config)
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
                                                 full_table: pd.DataFrame, tmp_path: Path
                                                 ) -> None:
    for run in ("a", "b"):
        score_folder(model, None, messy, tmp_path / f"{run}.csv", precision="bf16")
    first, second = read_csv(tmp_path / "a.csv"), read_csv(tmp_path / "b.csv")
    pd.testing.assert_frame_equal(first, second)  # deterministic
    assert first["error"].tolist() == full_table["error"].tolist()
    np.testing.assert_allclose(first["bpd"], full_table["bpd"], atol=0.05)
    assert model.levels[0].steps[0].coupling.net.autocast_dtype is None  # restored
    with pytest.raises(ScoringError, match="unknown precision 'fp8'"):
        score_folder(model, None, messy, tmp_path / "c.csv", precision="fp8")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- heatmap files


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


def test_heatmap_names_longer_than_a_file_system_takes_are_cut_apart() -> None:
    """A file named to the 255-byte limit, beside one of the same stem, got the name plus
    .png, which no file system took: its heatmap could never be written."""
    stem = "b" * 251
    names = heatmap_names([Path(f"d/{stem}.png"), Path(f"d/{stem}.jpg"), Path("d/é" * 1),
                           Path("é" * 200 + ".tif")])
    # 255 - 17 (~, 12 hex digits, .png) - 8 (room for a ~N) bytes of the name kept, in
    # whole characters (é is 2 bytes)
    assert [len(os.fsencode(name.name)) for name in names] == [247, 247, 6, 247]
    assert all(name.parent == Path("d") for name in names[:3])
    first, second = names[0].name, names[1].name
    assert re.fullmatch("b{230}~[0-9a-f]{12}[.]png", first) and first != second
    assert names[2] == Path("d/é.png")
    assert re.fullmatch("é{115}~[0-9a-f]{12}[.]png", names[3].name)
    (odd,) = heatmap_names([Path("a" + "é" * 200 + ".tif")])  # the cut falls inside an é
    assert re.fullmatch("aé{114}~[0-9a-f]{12}[.]png", odd.name)
    # a name that is not UTF-8 is cut near the mark too, not back to its first character
    (raw,) = heatmap_names([Path(os.fsdecode(b"a\xc3" + b"\xa9" * 299 + b".tif"))])
    assert len(os.fsencode(raw.name)) == 244 and os.fsencode(raw.name).startswith(b"a\xc3")
    assert heatmap_names([Path(f"d/{stem}.png"), Path(f"d/{stem}.jpg")]) == names[:2]
    # a cut name that is taken (here by a folder of heatmaps) gets ~2 within the limit
    beside = heatmap_names([Path(f"d/{stem}.png"), Path(f"d/{stem}.jpg"), names[0] / "a.png"])
    assert beside[0] == names[0].with_name(f"{names[0].stem}~2.png")
    assert len(os.fsencode(beside[0].name)) == 249


def test_heatmap_names_stay_apart_from_each_other_and_from_folders() -> None:
    names = heatmap_names([Path("x.jpg"), Path("x.png"), Path("x.png.png")])
    assert names == [Path("x.jpg.png"), Path("x.png.png"), Path("x.png~2.png")]
    # a heatmap file may not take the name of a folder of heatmaps
    assert heatmap_names([Path("x.jpg"), Path("x.png/a.png")]) == [Path("x~2.png"),
                                                                   Path("x.png/a.png")]




def test_a_score_item_is_an_image_item_and_its_png_lengths() -> None:
    """ScoringDataset builds each ScoreItem from an ImageItem positionally (in the
    workers' loop, no per-image dict): the fields must stay in step."""
    from anomaly_flow.data import ImageItem
    from anomaly_flow.scoring import ScoreItem

    assert ScoreItem._fields == (*ImageItem._fields, "png_bpd", "coarse_png_bpd")
