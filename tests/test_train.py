"""Training on real image files written to a temp folder (PNG and JPEG, 28x28 sneakers
from the shipped sample, resized by the dataset to a 16x16 model).

All runs are on the CPU with one thread, a tiny Glow (L=2, K=2, width 16) and batches
of 16, so the whole file takes well under a minute on 2 cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

import anomaly_flow.fingerprint as fingerprint_module
import anomaly_flow.train as train_module
from anomaly_flow.checkpoint import TrainingError, latest_checkpoint, save_checkpoint
from anomaly_flow.complexity import coarse_complexity, coarse_png_bits_per_dim
from anomaly_flow.config import GlowConfig, RunConfig, TrainConfig
from anomaly_flow.data import ArrayDataset, display_path, write_image_folder
from anomaly_flow.fashion_mnist import load_sample
from anomaly_flow.glow import REFERENCE_KEYS, Glow, knn_grid, preprocess
from anomaly_flow.train import (
    TrainEvent,
    evaluate_bpd,
    fit_reference,
    folder_datasets,
    learning_rate,
    train,
)
from tests.conftest import ended_process_id, torchrun

MODEL = GlowConfig(in_channels=1, image_size=16, levels=2, steps_per_level=2,
                   hidden_channels=16)


def run_config(**train_fields) -> RunConfig:
    fields = {"epochs": 2, "batch_size": 16, "lr": 1e-2, "warmup_steps": 5,
              "val_fraction": 0.1, "seed": 0, "checkpoint_every": 1000,
              "init_batch_size": 64, **train_fields}
    return RunConfig(MODEL, TrainConfig(**fields))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sneakers() -> np.ndarray:
    return load_sample().train  # uint8 (2000, 1, 28, 28)


@pytest.mark.parametrize(("val_fraction", "n_train"), [(0.999, 1), (0.6, 8), (0.5, None)])
def test_a_validation_split_larger_than_the_training_one_is_warned_of(
        sneakers: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        val_fraction: float, n_train: int | None) -> None:
    """val_fraction = 0.999 trained on one image of 20, and the model was registered
    without a word."""
    write_image_folder(sneakers[:20], tmp_path, "s", "png")
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        data = folder_datasets(tmp_path, run_config(val_fraction=val_fraction))
    warned = [m for m in caplog.messages if "holds out" in m]
    if n_train is None:  # an even split is a choice, not a slip
        assert warned == [] and len(data.train) == 10
        return
    assert len(data.train) == n_train
    assert warned == [f"{tmp_path}: train.val_fraction = {val_fraction:g} holds out "
                      f"{20 - n_train} of the 20 image files for validation, so the model "
                      f"trains on {n_train}; lower val_fraction (the presets hold out 0.1)"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, sneakers: np.ndarray) -> Path:
    """320 images: 300 PNG and 20 JPEG. With val_fraction 0.1: 288 training images,
    18 full batches of 16 per epoch."""
    folder = tmp_path_factory.mktemp("sneakers")
    write_image_folder(sneakers[:300], folder / "png", "s", "png")
    write_image_folder(sneakers[300:320], folder / "jpg", "s", "jpg")
    return folder


def add_corrupt_files(folder: Path) -> dict[str, str]:
    """A text file named .png, a truncated PNG and a zero-byte .jpg: name -> reason part."""
    good = sorted(folder.rglob("*.png"))[0].read_bytes()
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    return {display_path(folder / "notes.png"): "cannot identify image file",
            display_path(folder / "cut.png"): "truncated",
            display_path(folder / "empty.jpg"): "empty file"}


def untrained_val_bpd(config: RunConfig, data) -> float:
    """Validation bits/dim of the model train() starts from (seeded init + ActNorm init)."""
    torch.manual_seed(config.train.seed)
    model = Glow(config.model)
    failed = train_module._FailedFiles(data.train, log=False)
    init = train_module._init_batch(data.train, config, failed)
    noise = train_module._step_noise(config.train.seed, -1, tuple(init.shape))
    model.initialize(preprocess(init, config.model.n_bits, noise))
    return evaluate_bpd(model, data.val, 64, torch.device("cpu"))


def final_checkpoint_files(folder: Path) -> tuple[dict, dict, dict]:
    path = latest_checkpoint(folder)
    assert path is not None
    return (load_file(str(path / "model.safetensors")),
            load_file(str(path / "optimizer.safetensors")),
            json.loads((path / "state.json").read_text()))


# --------------------------------------------------------------------------- learning


def test_a_folder_of_one_image_copied_or_of_many_copies_is_named(
        sneakers: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Thirty copies of one image trained without a word (validation bits/dim below 0,
    every other image an anomaly); a tenth or more copies inflate the validation figures."""
    same = tmp_path / "same"
    write_image_folder(np.repeat(sneakers[:1], 30, axis=0), same, "s", "png")
    copies = tmp_path / "copies"
    write_image_folder(np.concatenate([sneakers[:20], sneakers[:4]]), copies, "s", "png")
    few = tmp_path / "few"
    write_image_folder(np.concatenate([sneakers[:20], sneakers[:2]]), few, "s", "png")
    broken = tmp_path / "broken"  # the same broken download twice: no image to learn
    write_image_folder(sneakers[:3], broken, "s", "png")
    for name in ("a.png", "b.png"):
        (broken / name).write_text("not an image\n")
    config = run_config()
    opened: list[Path] = []
    opens = fingerprint_module._opens_as_image
    monkeypatch.setattr(fingerprint_module, "_opens_as_image",
                        lambda path: opened.append(path) or opens(path))
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        folder_datasets(same, config)
        assert len(opened) == 1  # one header read for the thirty copies of one content
        folder_datasets(copies, config)
        folder_datasets(few, config)  # 2 of 22: stray copies pass
        folder_datasets(broken, config)  # 1 of 5 a copy, but of no image
    notes = [r.getMessage() for r in caplog.records if "content" in r.getMessage()]
    assert len(notes) == 2, caplog.text
    assert notes[0].startswith(f"{same}: all 30 image files have the same content")
    assert notes[1].startswith(f"{copies}: 4 of 24 image files repeat another's content")


def test_bits_per_dim_falls(image_folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Validation bits/dim falls from 7.78 (untrained, ActNorm initialised) to 6.37 after
    the first epoch and 5.47 after the fourth (72 steps of 16 images; measured on CPU,
    one thread: 7.78 -> 6.37, 5.83, 5.77, 5.47)."""
    config = run_config(epochs=4)
    data = folder_datasets(image_folder, config)
    before = untrained_val_bpd(config, data)
    steps: list[TrainEvent] = []
    result = train(config, data.train, data.val, device="cpu", progress=True,
                   callback=lambda e: steps.append(e) if e.kind == "step" else None)

    val = [h["val_bpd"] for h in result.history]
    assert before == pytest.approx(7.78, abs=0.1)
    assert result.val_bpd == val[-1] < val[0] - 0.5 < before - 1.0
    assert result.val_bpd < 5.6
    assert result.steps == len(steps) == 4 * 18 and result.skipped_steps == 0
    assert result.failed_files == {} and math.isfinite(result.train_bpd)
    # Warm-up, recomputed from the step.
    assert [e.metrics["lr"] for e in steps[:6]] == [learning_rate(config.train, s)
                                                    for s in range(6)]
    assert steps[5].metrics["lr"] == config.train.lr
    # images/s counts decoding; the first step of an epoch is in the same range.
    rates = [e.metrics["images_per_sec"] for e in steps]
    assert all(0 < r < math.inf for r in rates)
    assert rates[0] > result.images_per_sec / 20
    # The progress bar shows bits/dim and images/s when asked for.
    err = capfd.readouterr().err
    assert "bpd=" in err and "img_s=" in err
    assert result.samples.shape == (64, 64) and result.samples.dtype == np.uint8


def test_training_fits_the_normal_reference_on_the_validation_images(
        image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reference is the per-pixel mean and std of the validation images' bits/dim
    maps under the final weights; the final checkpoint keeps it; without a validation
    set there is none."""
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)
    with caplog.at_level(logging.INFO, logger="anomaly_flow.train"):
        result = train(config, data.train, data.val, device="cpu", checkpoint_dir=tmp_path,
                       progress=False)
    # no progress bar off a terminal: a line an epoch instead, so a log is not silent
    assert re.search(r"epoch 1 of 1: train \d+\.\d{4} bits/dim, validation "
                     f"{result.val_bpd:.4f}, \\d+(\\.\\d+)? images/s \\(start-up included\\)$",
                     caplog.text, re.MULTILINE), caplog.text
    model = result.model
    assert model.has_reference

    images = torch.stack([data.val[i][0] for i in range(len(data.val))])
    assert len(images) == 32 == result.history[-1]["reference_images"]
    with torch.no_grad():
        parts = model.breakdown(preprocess(images, MODEL.n_bits))
    maps = parts.pixel_bpd.double().numpy()
    np.testing.assert_allclose(model.reference_mean.numpy(), maps.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(model.reference_std.numpy(), maps.std(axis=0), rtol=1e-5)
    assert float(model.reference_std.min()) > 0
    # every validation map, in order, pooled to the knn grid (16x16 at L=2: 8x8)
    assert knn_grid(model.config) == 8 and model.reference_maps.shape == (32, 8, 8)
    pooled = maps.reshape(32, 8, 2, 8, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(model.reference_maps.numpy(), pooled, rtol=1e-5, atol=1e-6)
    # the same images' coarse_complexity, as scoring computes it, sets the ensemble's scale
    png = [coarse_png_bits_per_dim(image.numpy(), MODEL.n_bits, MODEL.levels) for image in images]
    coarse = coarse_complexity(parts.level_bits.numpy(), np.array(png))
    np.testing.assert_allclose(model.reference_scale[1].numpy(), [coarse.mean(), coarse.std()],
                               rtol=1e-5)
    # and the images themselves (flow inputs), pooled to the same grid, for pixel_knn
    x = preprocess(images, MODEL.n_bits).double().numpy()
    np.testing.assert_allclose(model.reference_images.numpy(),
                               x.reshape(32, MODEL.in_channels, 8, 2, 8, 2).mean(axis=(3, 5)),
                               rtol=1e-6, atol=1e-7)
    assert model.reference_scale.shape == (3, 2)
    weights, _, _ = final_checkpoint_files(tmp_path)
    for key in REFERENCE_KEYS:
        assert torch.equal(weights[key], getattr(model, key))

    no_val = run_config(epochs=1, val_fraction=0.0)
    data = folder_datasets(image_folder, no_val)
    assert data.val is None
    assert not train(no_val, data.train, None, device="cpu").model.has_reference


def test_validation_passes_build_no_autograd_graph(image_folder: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch's validation (the last one fits the reference too) runs with gradients
    off: with them on, each batch's graph would be kept alive by the running sums until
    the pass ends."""
    seen: list[bool] = []
    real = train_module.breakdown_from_output

    def recording(out, config, pixel_maps=True):
        seen.append(torch.is_grad_enabled())
        return real(out, config, pixel_maps)

    monkeypatch.setattr(train_module, "breakdown_from_output", recording)
    config = run_config(epochs=2)
    data = folder_datasets(image_folder, config)
    assert train(config, data.train, data.val, device="cpu").model.has_reference
    assert seen and not any(seen)


def initialised_model_and_held_out(sneakers: np.ndarray) -> tuple[Glow, ArrayDataset]:
    """A Glow of MODEL with its ActNorms initialised, and 40 held-out sneakers."""
    torch.manual_seed(0)
    model = Glow(MODEL)
    held_out = ArrayDataset(sneakers[:40], MODEL.mode, MODEL.image_size)
    model.initialize(preprocess(held_out.images[:32], MODEL.n_bits))
    return model, held_out


def test_fit_reference_without_a_usable_sampled_map_keeps_typicality(
        sneakers: np.ndarray, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Beyond the cap only every k-th image is kept for knn; when each of those overflows,
    the reference keeps its mean and std (typicality) without maps, and says so."""
    model, held_out = initialised_model_and_held_out(sneakers)
    real = train_module.breakdown_from_output

    def first_overflows(out, config, pixel_maps=True):  # image 0 of each batch of 20
        parts = real(out, config, pixel_maps)
        parts.pixel_bpd[0, 1, 1] = math.inf
        return parts

    monkeypatch.setattr(train_module, "breakdown_from_output", first_overflows)
    monkeypatch.setattr(train_module, "REFERENCE_MAX_MAPS", 2)  # every 20th: images 0, 20
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        assert fit_reference(model, held_out, 20, torch.device("cpu")) == 38
    assert model.has_reference and not model.has_knn_reference
    assert "none of the 2 validation images sampled for the knn reference (every 20-th)" \
        in caplog.text


@pytest.mark.parametrize("older", ["mean and std only", "no images"])
def test_resuming_a_finished_run_from_an_older_checkpoint_fits_the_whole_reference(
        image_folder: Path, tmp_path: Path, older: str) -> None:
    """A finished run whose last checkpoint holds an older reference (mean and std only, or
    maps and a two-row scale without images) gets the whole reference when resumed:
    nothing left to train, the reference refitted."""
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)
    first = train(config, data.train, data.val, device="cpu", checkpoint_dir=tmp_path)
    path = latest_checkpoint(tmp_path)
    weights = load_file(str(path / "model.safetensors"))
    del weights["reference_images"]
    if older == "no images":
        weights["reference_scale"] = weights["reference_scale"][:2].clone()
    else:
        del weights["reference_maps"], weights["reference_scale"]
    save_file(weights, str(path / "model.safetensors"))
    resumed = train(config, data.train, data.val, device="cpu", checkpoint_dir=tmp_path,
                    resume=True)
    assert resumed.steps == first.steps and resumed.model.has_image_reference
    for key in REFERENCE_KEYS:
        torch.testing.assert_close(getattr(resumed.model, key), getattr(first.model, key))


def test_fit_reference_leaves_out_images_with_non_finite_maps(
        sneakers: np.ndarray, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    model, held_out = initialised_model_and_held_out(sneakers)
    real = train_module.breakdown_from_output

    def one_overflow(out, config, pixel_maps=True):  # image 3 of each batch overflows
        parts = real(out, config, pixel_maps)
        parts.pixel_bpd[3, 2, 5] = math.inf
        return parts

    monkeypatch.setattr(train_module, "breakdown_from_output", one_overflow)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        assert fit_reference(model, held_out, 16, torch.device("cpu")) == 37
    assert "leaves out 3 validation image(s)" in caplog.text
    assert model.has_reference and bool(torch.isfinite(model.reference_std).all())
    assert len(model.reference_maps) == 37


@pytest.mark.parametrize(("cap", "stride"), [(20, 2), (15, 3), (39, 2)])
def test_fit_reference_keeps_an_evenly_spaced_subset_beyond_the_cap(
        sneakers: np.ndarray, monkeypatch: pytest.MonkeyPatch, cap: int, stride: int) -> None:
    """Beyond REFERENCE_MAX_MAPS held-out images the mean and std use them all, the knn
    maps every k-th image (k = ceil(N / cap)), in the held-out set's order."""
    model, held_out = initialised_model_and_held_out(sneakers)
    assert fit_reference(model, held_out, 16, torch.device("cpu")) == 40
    every_map = model.reference_maps.clone()
    monkeypatch.setattr(train_module, "REFERENCE_MAX_MAPS", cap)
    assert fit_reference(model, held_out, 16, torch.device("cpu")) == 40
    assert torch.equal(model.reference_maps, every_map[::stride])


def test_corrupt_files_are_skipped_counted_and_reported(
        tmp_path: Path, sneakers: np.ndarray, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "train"
    write_image_folder(sneakers[:60], folder, "s", "png")
    expected = add_corrupt_files(folder)
    config = run_config(epochs=2, val_fraction=0.0)
    data = folder_datasets(folder, config)
    assert len(data.train) == 63 and data.val is None

    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        result = train(config, data.train, device="cpu")

    assert set(result.failed_files) == set(expected)
    for name, reason in expected.items():
        assert reason in result.failed_files[name]
        per_file = [r for r in caplog.records if name in r.getMessage()
                    and "skipping" in r.getMessage()]
        assert len(per_file) == 1, "each bad file is reported once, not once per epoch"
    summary = [r.getMessage() for r in caplog.records
               if "3 file(s) of the data folder" in r.getMessage()]
    assert len(summary) == 1
    assert result.steps == 2 * 4 and result.skipped_steps == 0
    assert result.history[-1]["failed_files"] == 3
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # progress=None and stderr is not a terminal (captured): no bar.
    assert "img_s=" not in capfd.readouterr().err


def test_the_actnorm_init_reads_past_undecodable_files_to_a_full_batch(
        tmp_path: Path, sneakers: np.ndarray) -> None:
    """The init batch is the first init_batch_size decodable images of epoch 0's order:
    undecodable files at its start once left it short, or, all of them bad, stopped
    training although the folder held good images further on."""
    folder = tmp_path / "train"
    write_image_folder(sneakers[:12], folder, "s", "png")
    for i in range(12):
        (folder / f"junk-{i:02d}.png").write_text("not an image\n")
    data = folder_datasets(folder, run_config(val_fraction=0.0))
    base, indices = data.train.dataset, data.train.indices

    def junk(i: int) -> bool:
        return base.paths[indices[i]].name.startswith("junk")

    def order_of(seed: int) -> list[int]:
        return next(iter(train_module.GlobalBatchSampler(len(data.train), len(data.train),
                                                         seed, epoch=0)))

    seed = next(s for s in range(1000) if all(junk(i) for i in order_of(s)[:4]))
    config = run_config(val_fraction=0.0, init_batch_size=4, seed=seed)
    failed = train_module._FailedFiles(data.train, log=False)
    init = train_module._init_batch(data.train, config, failed)
    order = order_of(seed)
    good = [i for i in order if not junk(i)][:4]
    assert init.shape == (4, 1, 16, 16)
    assert torch.equal(init, torch.stack([data.train[i].image for i in good]))
    read = order[: order.index(good[-1]) + 1]
    assert len(failed.reasons) == sum(junk(i) for i in read) >= 4
    # a folder of which none of the first INIT_READ_LIMIT batches decode is refused then
    for i in range(12, 40):
        (folder / f"junk-{i:02d}.png").write_text("not an image\n")
    data = folder_datasets(folder, run_config(val_fraction=0.0))
    base, indices = data.train.dataset, data.train.indices
    seed = next(s for s in range(1000) if all(junk(i) for i in order_of(s)[:8]))
    config = run_config(val_fraction=0.0, init_batch_size=2, seed=seed)
    failed = train_module._FailedFiles(data.train, log=False)
    with pytest.raises(TrainingError, match=r"^none of the first 8 of the 52 image\(s\) of "
                                            r"the training split .* could be decoded \(e\.g\. "):
        train_module._init_batch(data.train, config, failed)
    assert len(failed.reasons) == 8


def test_undecodable_validation_files_are_named_by_their_own_split(
        tmp_path: Path, sneakers: np.ndarray) -> None:
    """A validation set of its own (train() takes one): its files were named by the
    training set's paths, the wrong file or an IndexError; a validation split none of
    whose images decodes is refused before any training step, naming one of them."""
    good = write_image_folder(sneakers[:8], tmp_path / "train", "t-", "png")
    bad = [tmp_path / "val" / f"v-{i}.png" for i in range(12)]
    bad[0].parent.mkdir()
    for path in bad:
        path.write_text("not an image\n")
    size = MODEL.image_size
    with pytest.raises(TrainingError, match=r"^none of the 12 image\(s\) of the validation "
                                            r"split .* could be decoded \(e\.g\. "
                                            r".*val/v-0\.png: cannot identify image file"):
        train(run_config(epochs=50, batch_size=4, init_batch_size=4),
              train_module.ImageFolderDataset(good, "L", size),
              train_module.ImageFolderDataset(bad, "L", size), device="cpu")
    # failures a checkpoint restores carry no split: they learn it when the resumed
    # training meets them again, and the refusal still names one
    folder = folder_datasets(tmp_path / "train", run_config(val_fraction=0.25))
    assert folder.val is not None
    val_paths = [folder.val.dataset.paths[i] for i in folder.val.indices]
    for path in val_paths:
        path.write_bytes(b"")  # damaged since the checkpoint
    val_file = display_path(val_paths[0])
    train_file = display_path(folder.train.dataset.paths[folder.train.indices[0]])
    failed = train_module._FailedFiles(folder.train, log=False, val_set=folder.val)
    failed.reasons[train_file] = "truncated"  # as the resume restores them
    failed.reasons[val_file] = "empty file (0 bytes)"
    assert failed.example("validation") == ""  # not met yet in this process
    with pytest.raises(TrainingError, match=re.escape(f"(e.g. {val_file}: empty file")):
        train_module._check_validation_decodes(folder.val, failed)
    assert failed.example("validation") == f" (e.g. {val_file}: empty file (0 bytes))"


def test_decoding_workers_train_the_same_model(tmp_path: Path, sneakers: np.ndarray) -> None:
    # batches decoded in 2 worker processes (their own collate: images in shared memory,
    # masks and indices in the pickle) train bit for bit the model of in-process decoding,
    # undecodable files skipped and reported alike
    folder = tmp_path / "train"
    write_image_folder(sneakers[:40], folder, "s", "png")
    expected = add_corrupt_files(folder)
    results = []
    for workers in (0, 2):
        config = run_config(epochs=2, val_fraction=0.0, num_workers=workers)
        results.append(train(config, folder_datasets(folder, config).train, device="cpu"))
    in_process, in_workers = results
    assert set(in_workers.failed_files) == set(in_process.failed_files) == set(expected)
    assert in_workers.steps == in_process.steps == 2 * 3
    for a, b in zip(in_process.model.state_dict().values(),
                    in_workers.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_workers_past_the_cores_are_cut_to_fit(tmp_path: Path, sneakers: np.ndarray,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """num_workers = 1000 started 1,000 processes (and as many again for each validation
    pass), enough to take a machine down: training starts one a batch and one a core at
    most, says so, and trains the model of in-process decoding."""
    folder = tmp_path / "train"
    write_image_folder(sneakers[:40], folder, "s", "png")
    results = []
    for workers in (0, 1000):
        config = run_config(epochs=1, batch_size=2, num_workers=workers)
        data = folder_datasets(folder, config)
        with caplog.at_level(logging.WARNING):
            results.append(train(config, data.train, data.val, device="cpu"))
    cores = len(os.sched_getaffinity(0))
    said = f"1000 decoding workers asked for, but this process may use {cores} CPU cores"
    assert caplog.text.count(said) == (1 if cores < 18 else 0)  # 18 batches an epoch
    for a, b in zip(results[0].model.state_dict().values(),
                    results[1].model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_is_ignored_on_cpu(tmp_path: Path, sneakers: np.ndarray,
                                caplog: pytest.LogCaptureFixture) -> None:
    """bf16 autocast is CUDA-only: on the CPU the run is the float32 run, bit for bit."""
    write_image_folder(sneakers[:48], tmp_path, "s", "png")
    results = []
    for bf16 in (False, True):
        config = run_config(epochs=1, bf16=bf16, val_fraction=0.0)
        data = folder_datasets(tmp_path, config)
        with caplog.at_level(logging.INFO, logger="anomaly_flow.train"):
            results.append(train(config, data.train, device="cpu").model.state_dict())
    assert any("bf16 autocast is CUDA-only" in r.getMessage() for r in caplog.records)
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]), key


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, sneakers: np.ndarray) -> None:
    """``compile=True`` trains the same model: the same losses step by step, up to the
    float32 reordering of Inductor's fused kernels, and a last partial batch of another
    shape is taken by the same compiled graph (the batch size is symbolic from the first
    step). The saved model is the eager module."""
    write_image_folder(sneakers[:28], tmp_path, "s", "png")  # 3 steps of 8, one of 4
    runs = []
    model = GlowConfig(in_channels=1, image_size=16, levels=2, steps_per_level=1,
                       hidden_channels=8)  # little to compile: the test stays short
    for compiled in (False, True):  # batches of 8, as each DDP rank's in the test below
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        config = RunConfig(model, run_config(epochs=1, val_fraction=0.0, batch_size=8,
                                             compile=compiled).train)
        data = folder_datasets(tmp_path, config)
        losses: list[float] = []
        result = train(config, data.train, device="cpu", callback=lambda e, out=losses:
                       out.append(e.metrics["train_bpd"]) if e.kind == "step" else None)
        runs.append((losses, result))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # not one per shape
    (eager, eager_result), (compiled_losses, compiled_result) = runs
    assert len(eager) == len(compiled_losses) == 4
    assert compiled_losses == pytest.approx(eager, rel=1e-4)
    assert type(compiled_result.model) is Glow
    for key, value in eager_result.model.state_dict().items():
        torch.testing.assert_close(compiled_result.model.state_dict()[key], value,
                                   rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- resume


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.mark.parametrize("written_by", ["this version", "per-tensor Adam"])
def test_resume_is_bit_identical(image_folder: Path, tmp_path: Path,
                                 written_by: str) -> None:
    """3 epochs of 18 steps = 2N steps with N = 27; the interrupted run is killed just
    after its checkpoint at step 27, half way through epoch 2, and resumed with the same
    configuration. A checkpoint as versions before fused Adam wrote it (``fused`` and
    ``foreach`` null in its parameter groups) resumes fused, with the same result."""
    n = 27
    config = run_config(epochs=3, checkpoint_every=n)
    data = folder_datasets(image_folder, config)
    full = train(config, data.train, data.val, device="cpu", checkpoint_dir=tmp_path / "full")

    def kill_after_checkpoint(event: TrainEvent) -> None:
        if event.kind == "checkpoint" and event.step == n:
            raise Killed

    with pytest.raises(Killed):
        train(config, data.train, data.val, device="cpu", checkpoint_dir=tmp_path / "cut",
              callback=kill_after_checkpoint)
    assert latest_checkpoint(tmp_path / "cut").name == f"step-{n:08d}"
    ended = ended_process_id()  # killed outright while writing the next checkpoint
    leftovers = [tmp_path / "cut" / f".tmp-step-{2 * n:08d}-{ended}",
                 tmp_path / "cut" / f".old-step-{n:08d}-{ended}"]
    for folder in leftovers:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"cut short")
    if written_by == "per-tensor Adam":
        state_file = latest_checkpoint(tmp_path / "cut") / "state.json"
        state = json.loads(state_file.read_text())
        assert state["param_groups"][0]["fused"] is True
        for group in state["param_groups"]:
            group.update(fused=None, foreach=None)
        state_file.write_text(json.dumps(state))
    resumed_steps: list[int] = []
    resumed = train(config, data.train, data.val, device="cpu",
                    checkpoint_dir=tmp_path / "cut", resume=True,
                    callback=lambda e: resumed_steps.append(e.step) if e.kind == "step"
                    else None)

    assert resumed_steps == list(range(n + 1, 2 * n + 1))
    assert not any(folder.exists() for folder in leftovers)
    assert full.steps == resumed.steps == 2 * n
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key, value in full_state.items():
        assert torch.equal(value, resumed_state[key]), key
    full_w, full_opt, full_meta = final_checkpoint_files(tmp_path / "full")
    cut_w, cut_opt, cut_meta = final_checkpoint_files(tmp_path / "cut")
    assert full_opt.keys() == cut_opt.keys() and any(k.endswith(".step") for k in full_opt)
    for key, value in full_opt.items():  # Adam's step, exp_avg, exp_avg_sq
        assert torch.equal(value, cut_opt[key]), key
    for key, value in full_w.items():
        assert torch.equal(value, cut_w[key]), key
    assert full_meta["param_groups"] == cut_meta["param_groups"]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert {k: v for k, v in a.items() if "per_sec" not in k} == \
               {k: v for k, v in b.items() if "per_sec" not in k}
    assert full.val_bpd == resumed.val_bpd
    assert np.array_equal(full.samples, resumed.samples)
    # Two checkpoints kept, nothing half-written left behind.
    for folder in (tmp_path / "full", tmp_path / "cut"):
        names = sorted(p.name for p in folder.iterdir())
        assert names == ["latest", f"step-{n:08d}", f"step-{2 * n:08d}"]


# --------------------------------------------------------------------------- non-finite


def poison_preprocess(monkeypatch: pytest.MonkeyPatch, steps: set[int] | None) -> None:
    """Put a NaN into the input of the given training steps (1-based; None: all)."""
    original = train_module.preprocess
    calls = {"train": 0}

    def poisoned(images, n_bits, noise=None):
        x = original(images, n_bits, noise)
        if noise is not None:  # training calls carry noise: the ActNorm init, then steps
            index = calls["train"]
            calls["train"] += 1
            if index > 0 and (steps is None or index in steps):
                x = x.clone()
                x[0, 0, 0, 0] = math.nan
        return x

    monkeypatch.setattr(train_module, "preprocess", poisoned)


def test_undecodable_validation_images_are_reported_too(tmp_path: Path,
                                                        sneakers: np.ndarray) -> None:
    folder = tmp_path / "train"
    write_image_folder(sneakers[:40], folder, "s", "png")
    for i in range(20):
        (folder / f"bad{i:02d}.png").write_text("not an image")
    config = run_config(epochs=1, val_fraction=0.3)
    data = folder_datasets(folder, config)
    assert data.val is not None
    val_names = {display_path(data.paths[i]) for i in data.val.indices}
    bad = {display_path(folder / f"bad{i:02d}.png") for i in range(20)}
    assert bad & val_names and bad - val_names  # some of each split
    result = train(config, data.train, data.val, device="cpu")
    assert set(result.failed_files) == bad
    assert result.history[-1]["failed_files"] == 20


@pytest.mark.parametrize("optimizer", ["adam", "adamax"])
def test_injected_nan_is_skipped_and_counted(image_folder: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture,
                                             optimizer: str) -> None:
    """Fused Adam skips the step on the device (the host reads the figures one step
    late); Adamax is told by the host. Either way the skipped step leaves the weights and
    the optimizer state exactly as they were: checkpoints 4 and 5 are identical."""
    config = run_config(epochs=1, optimizer=optimizer, checkpoint_every=1)
    data = folder_datasets(image_folder, config)
    poison_preprocess(monkeypatch, {5})
    events: list[TrainEvent] = []
    around_nan: dict[int, tuple[dict, dict]] = {}

    def callback(event: TrainEvent) -> None:
        events.append(event)
        if event.kind == "checkpoint" and event.step == 5:  # step 4 is still kept
            for step in (4, 5):
                folder = tmp_path / f"step-{step:08d}"
                around_nan[step] = (load_file(str(folder / "model.safetensors")),
                                    load_file(str(folder / "optimizer.safetensors")))

    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        result = train(config, data.train, data.val, device="cpu", callback=callback,
                       checkpoint_dir=tmp_path)

    for before, after in zip(around_nan[4], around_nan[5], strict=True):
        assert before.keys() == after.keys() and before
        for key, value in before.items():
            assert torch.equal(value, after[key]), key
    assert result.skipped_steps == 1 and result.steps == 18
    assert [e.metrics["skipped_steps"] for e in events if e.kind == "step"][3:6] == [0, 1, 1]
    assert any("step 5: non-finite" in r.getMessage() for r in caplog.records)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert math.isfinite(result.val_bpd) and math.isfinite(result.train_bpd)


def test_a_model_that_cannot_draw_samples_comes_back_without_a_grid(
        tmp_path: Path, sneakers: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    """lr = 1e6: the first step drives a 1x1 convolution singular. Training ends (the
    sample grid ended it with a LinAlgError), the grid is skipped with one warning, and
    the non-finite validation bits/dim is left for the caller to judge."""
    write_image_folder(sneakers[:40], tmp_path / "data", "s", "png")
    config = run_config(epochs=1, lr=1e6)
    data = folder_datasets(tmp_path / "data", config)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        result = train(config, data.train, data.val, device="cpu")
    assert result.steps == 3 and result.samples.size == 0
    assert not math.isfinite(result.val_bpd)
    assert result.samples_skipped is not None
    assert result.samples_skipped.startswith("the model cannot draw samples: a 1x1 "
                                             "convolution of level 2 has a singular weight")
    warnings = [r.getMessage() for r in caplog.records if "sample grid" in r.getMessage()]
    assert warnings == [f"no sample grid: {result.samples_skipped}"]


@pytest.mark.parametrize("workers", [0, 2])
def test_many_nans_in_a_row_stop_training(image_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                          workers: int) -> None:
    """... and a run that stops with an error leaves no decoding workers behind, though the
    error's traceback (kept here by pytest.raises) still holds the training's frames."""
    config = run_config(epochs=1, max_nonfinite_steps=3, num_workers=workers)
    data = folder_datasets(image_folder, config)
    poison_preprocess(monkeypatch, None)
    with pytest.raises(TrainingError, match=r"3 non-finite losses in a row \(step 3\)") as caught:
        train(config, data.train, data.val, device="cpu")
    assert caught.tb is not None and multiprocessing.active_children() == []


# --------------------------------------------------------------------------- errors


def test_errors(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)
    with pytest.raises(TrainingError, match="training set is empty"):
        train(config, Subset(data.train, []), device="cpu")
    with pytest.raises(TrainingError, match="no checkpoint in"):
        train(config, data.train, device="cpu", checkpoint_dir=tmp_path / "none", resume=True)
    with pytest.raises(TrainingError, match="no checkpoint_dir"):
        train(config, data.train, device="cpu", resume=True)

    model = Glow(MODEL)
    save_checkpoint(tmp_path / "old", model, torch.optim.Adam(model.parameters()), config,
                    7, {})
    with pytest.raises(TrainingError, match="already holds a run"):
        train(config, data.train, device="cpu", checkpoint_dir=tmp_path / "old")
    wider = RunConfig(GlowConfig(image_size=16, levels=2, steps_per_level=2,
                                 hidden_channels=8), config.train)
    with pytest.raises(TrainingError, match="another model configuration"):
        train(wider, data.train, device="cpu", checkpoint_dir=tmp_path / "old", resume=True)
    # the checkpoint holds Adam's state; a batch size would count its steps in other epochs
    for change, said in (({"optimizer": "adamax"}, "train.optimizer is 'adamax' but was "
                          "'adam'"), ({"batch_size": 8}, "train.batch_size is 8 but was 16")):
        with pytest.raises(TrainingError, match=f"cannot resume from the checkpoint "
                                                f".*old.*: {said}; resume with the same"):
            train(config.replace(**change), data.train, device="cpu",
                  checkpoint_dir=tmp_path / "old", resume=True)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="CUDA is not available"):
        train(config, data.train, device="cuda")
    with pytest.raises(TrainingError, match="--device cuda:7 was asked for but CUDA is not"):
        train(config, data.train, device="cuda:7")  # the device as given, index and all
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TrainingError, match=r"--device cuda:7 was asked for but this machine "
                                            r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        train(config, data.train, device="cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it; checked before joining
    with pytest.raises(TrainingError, match="batch_size 16 is not divisible by the 3"):
        train(config, data.train, device="cpu")
    # one GPU named for every process of a torchrun: each takes its own instead
    with pytest.raises(TrainingError, match=r"^--device cuda:1 names one GPU, but under "
                                            r"torchrun each process takes its own "
                                            r"\(LOCAL_RANK\); use cuda, and choose"):
        train(config, data.train, device="cuda:1")


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
           "allocate memory: you tried to allocate 2415919104 bytes. Error code 12 (Cannot "
           "allocate memory)")
"""What torch raised for image_size = 4096 (the tiny preset otherwise) on a 24 GB machine."""


@pytest.mark.parametrize(("error", "failed"), [
    (RuntimeError(CPU_OOM), "2.25 GiB"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                            "total capacity of 79.10 GiB of which 3.12 GiB is free."),
     "20.00 GiB"),
], ids=["cpu", "cuda"])
def test_running_out_of_memory_is_a_training_error(image_folder: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   error: RuntimeError, failed: str) -> None:
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)

    def forward(self: Glow, x: torch.Tensor) -> None:
        raise error

    monkeypatch.setattr(Glow, "forward", forward)
    with pytest.raises(TrainingError, match=(
            rf"^training ran out of memory on cpu \(an allocation of {failed} failed\) with "
            r"batch_size = 16, init_batch_size = 64, image_size = 16 and hidden_channels = "
            r"16; lower train.batch_size \(--batch-size\) or train.init_batch_size, or use a "
            r"smaller model.image_size \(the images are resized to it\) or "
            r"model.hidden_channels$")):
        train(config, data.train, data.val, device="cpu")


def test_other_runtime_errors_are_not_called_out_of_memory(image_folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)

    def forward(self: Glow, x: torch.Tensor) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Glow, "forward", forward)
    with pytest.raises(RuntimeError, match=r"^mat1 and mat2") as raised:
        train(config, data.train, data.val, device="cpu")
    assert not isinstance(raised.value, TrainingError)


# --------------------------------------------------------------------------- DDP


def run_two_ranks(folder: Path, config: RunConfig,
                  tmp_path: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """Train under torchrun (gloo, 2 CPU processes, tests/ddp_worker.py): each rank's
    report and final weights."""
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    out = tmp_path / "out"
    out.mkdir()
    worker = Path(__file__).with_name("ddp_worker.py")
    cmd, env = torchrun(str(worker), str(folder), str(config_file), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ([json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)],
            [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)])


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path: Path, sneakers: np.ndarray) -> None:
    """torchrun, gloo, 2 CPU processes, each taking 8 of every global batch of 16, against
    one process on the same folder (which holds a bad file, met by one rank only).

    Not bit-identical: DDP sums the two half-batch gradients in another order than one
    process summing the whole batch, so float32 rounding differs (max difference seen
    ~1e-7 after 12 Adam steps); hence allclose.
    """
    folder = tmp_path / "data"
    write_image_folder(sneakers[:100], folder, "s", "png")
    (folder / "notes.png").write_text("not an image")
    config = run_config(epochs=2, val_fraction=0.1, checkpoint_every=5)
    reports, weights = run_two_ranks(folder, config, tmp_path)

    data = folder_datasets(folder, config)
    single = train(config, data.train, data.val, device="cpu",
                   checkpoint_dir=tmp_path / "single")

    assert [r["world"] for r in reports] == [2, 2]
    assert all(r["group_left"] for r in reports), "train() leaves the group it joined"
    # and the group is gone with its threads (one left running into interpreter shutdown
    # can abort the process there)
    assert [r["gloo_threads"] for r in reports] == [[], []]
    for key, value in single.model.state_dict().items():
        assert torch.equal(weights[0][key], weights[1][key]), key  # ranks agree exactly
        torch.testing.assert_close(weights[0][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert reports[0]["steps"] == reports[1]["steps"] == single.steps == 2 * 6
    assert reports[0]["val_bpd"] == reports[1]["val_bpd"]
    assert reports[0]["val_bpd"] == pytest.approx(single.val_bpd, rel=1e-5)
    bad = {display_path(folder / "notes.png")}
    assert set(reports[0]["failed_files"]) == set(reports[1]["failed_files"]) == bad
    assert set(single.failed_files) == bad
    # Rank 0 alone writes checkpoints (two kept: steps 10 and 12) and draws samples.
    assert reports[0]["checkpoint_dir"].endswith("step-00000012")
    assert reports[1]["checkpoint_dir"] is None
    assert reports[1]["samples_shape"] == [0, 0]
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == [
        "latest", "step-00000010", "step-00000012"]



@pytest.mark.slow
def test_ddp_with_compile_matches_one_eager_process(tmp_path: Path,
                                                   sneakers: np.ndarray) -> None:
    """``compile=True`` under DDP: each rank compiles the DDP-wrapped model; a bad file
    met by one rank and the short last batch give the ranks batches of different sizes
    (each takes them with its one graph, the batch size symbolic). Same weights as one
    eager process, up to the float32 reordering of compiled kernels and DDP's reduction."""
    folder = tmp_path / "data"
    write_image_folder(sneakers[:56], folder, "s", "png")  # 3 global batches of 16, one of 8
    (folder / "notes.png").write_text("not an image")
    model = GlowConfig(in_channels=1, image_size=16, levels=2, steps_per_level=1,
                       hidden_channels=8)
    train_cfg = run_config(epochs=1, val_fraction=0.0, checkpoint_every=1000).train
    reports, weights = run_two_ranks(
        folder, RunConfig(model, dataclasses.replace(train_cfg, compile=True)), tmp_path)

    config = RunConfig(model, train_cfg)
    single = train(config, folder_datasets(folder, config).train, device="cpu")
    assert reports[0]["steps"] == reports[1]["steps"] == single.steps == 4
    for key, value in single.model.state_dict().items():
        assert torch.equal(weights[0][key], weights[1][key]), key
        torch.testing.assert_close(weights[0][key], value, rtol=1e-3, atol=1e-4,
                                   msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_ddp_rank_with_an_empty_share_of_the_last_batch(tmp_path: Path,
                                                       sneakers: np.ndarray) -> None:
    """17 training images in batches of 16 over 2 ranks: the last global batch holds one
    image, so rank 1 gets none; it still takes part, and the result matches one process."""
    folder = tmp_path / "data"
    write_image_folder(sneakers[:17], folder, "s", "png")
    config = run_config(epochs=1, val_fraction=0.0)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.to_json())
    out = tmp_path / "out"
    out.mkdir()
    cmd, env = torchrun(str(Path(__file__).with_name("ddp_worker.py")), str(folder),
                        str(config_file), str(out))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    single = train(config, folder_datasets(folder, config).train, device="cpu")
    assert single.steps == 2
    weights = load_file(str(out / "rank1.safetensors"))
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")


# --------------------------------------------------------------------------- GPU


@contextlib.contextmanager
def conv_output_dtypes() -> Iterator[set[torch.dtype]]:
    """The dtypes of every Conv2d output computed inside the block."""
    seen: set[torch.dtype] = set()

    def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
        if isinstance(module, torch.nn.Conv2d) and isinstance(output, torch.Tensor):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_training_and_samples_leave_the_callers_random_state_alone(
        image_folder: Path) -> None:
    """The seed decides the weights and the sample grid; the caller's own draws go on as
    if neither they nor a scoring had run (on a GPU, every device's generator too:
    test_cuda_paths)."""
    from anomaly_flow.scoring import ScoringDataset, score_dataset

    config = run_config(epochs=1, num_workers=1)
    data = folder_datasets(image_folder, config)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    result = train(config, data.train, data.val, device="cpu")
    grid = train_module.sample_grid(result.model, 4, 0.7, seed=5)
    np.testing.assert_array_equal(grid, train_module.sample_grid(result.model, 4, 0.7, seed=5))
    cfg = result.model.config
    score_dataset(result.model, ScoringDataset(sorted(image_folder.iterdir())[:4], cfg))
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_training_on_cuda(image_folder: Path) -> None:
    """A few steps with the coupling networks under bf16 autocast (their convolutions
    compute in bf16, the float32 run's do not): finite, and close to the float32 run."""
    runs, dtypes = {}, {}
    for bf16 in (False, True):
        config = run_config(epochs=1, bf16=bf16)
        data = folder_datasets(image_folder, config)
        with conv_output_dtypes() as dtypes[bf16]:
            runs[bf16] = train(config, data.train, data.val, device="cuda")
    assert torch.bfloat16 in dtypes[True] and torch.bfloat16 not in dtypes[False]
    result = runs[True]
    assert result.model.device.type == "cuda" and result.steps == 18
    assert result.skipped_steps == 0 and math.isfinite(result.val_bpd)
    assert result.val_bpd == pytest.approx(runs[False].val_bpd, abs=0.1)
    assert all(step.coupling.net.autocast_dtype is None
               for level in result.model.levels for step in level.steps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths(image_folder: Path, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What only runs on a GPU: the device skip of a step with a NaN (fused Adam's
    found_inf), the one-step-late read of the step's figures, the sample grid's seeding
    (every GPU's generator left alone), and scoring through pinned memory and events,
    which gives the CPU's bits/dim to float32 rounding."""
    from anomaly_flow.scoring import ScoringDataset, score_dataset

    poison_preprocess(monkeypatch, {3})
    config = run_config(epochs=1)
    data = folder_datasets(image_folder, config)
    torch.cuda.manual_seed_all(99)
    states = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    autotune = torch.backends.cudnn.benchmark
    result = train(config, data.train, data.val, device="cuda")
    assert torch.backends.cudnn.benchmark == autotune  # on during training only
    train_module.sample_grid(result.model, 4, 0.7, seed=5)
    assert result.skipped_steps == 1 and math.isfinite(result.val_bpd)
    assert all(torch.equal(torch.cuda.get_rng_state(i), state)
               for i, state in enumerate(states))

    cfg = result.model.config
    files = ScoringDataset(sorted(p for p in image_folder.rglob("*") if p.is_file()), cfg)
    on_gpu = score_dataset(result.model, files, batch_size=64)  # several batches in flight
    cpu_model = Glow(cfg)
    cpu_model.load_state_dict(result.model.state_dict())
    on_cpu = score_dataset(cpu_model.eval(), files, batch_size=64)
    assert on_gpu["error"].eq("").all() and len(on_gpu) == len(files) > 64
    np.testing.assert_allclose(on_gpu["bpd"], on_cpu["bpd"], rtol=1e-4)


def test_an_undecodable_file_name_cannot_forge_a_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """Its warning and its failed_files.txt line keep a line break in the name escaped."""
    from anomaly_flow.tracking.training import _failed_files_report

    dataset = train_module.ImageFolderDataset([Path("x.png\nERROR fake.png")], "L", 8)
    failed = train_module._FailedFiles(dataset, log=True)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        failed.add(failed._name(0), "cannot identify image file")
    [record] = caplog.records
    assert record.getMessage() == ("skipping undecodable image x.png\\nERROR fake.png "
                                   "(training split): cannot identify image file")
    assert _failed_files_report(failed.reasons) == [
        "x.png\\nERROR fake.png\tcannot identify image file"]


def test_a_folder_whose_files_all_fail_logs_ten_and_counts_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    """A folder emptied while it trains fails every file: ten warnings, the tenth saying
    the rest are counted (failed_files.txt and the outcome list and count them all), not
    a line for each of thousands."""
    names = [f"gone-{i:03d}.png" for i in range(25)]
    dataset = train_module.ImageFolderDataset([Path(name) for name in names], "L", 8)
    failed = train_module._FailedFiles(dataset, log=True)
    with caplog.at_level(logging.WARNING, logger="anomaly_flow.train"):
        for i in range(len(names)):
            failed.add(failed._name(i), "No such file or directory")
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == train_module.FAILED_FILES_LOGGED == 10
    assert said[0] == ("skipping undecodable image gone-000.png (training split): No such "
                       "file or directory")
    assert said[-1].endswith("gone-009.png (training split): No such file or directory; "
                             "further ones are counted, not listed")
    assert len(failed.reasons) == 25
