"""The whole Glow against the change-of-variables formula, in float64."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian
from torch.distributions import Normal

from anomaly_flow.config import (
    MAX_IMAGE_SIZE,
    ConfigError,
    GlowConfig,
    RunConfig,
    load_config,
    load_preset,
)
from anomaly_flow.glow import (
    DIGESTED_CONFIG,
    KNN_NEIGHBOURS,
    REFERENCE_STD_FLOOR,
    Glow,
    ModelFileError,
    SamplingError,
    _mean_nearest,
    knn_grid,
    pool_images,
    pool_to_grid,
    postprocess,
    preprocess,
)
from anomaly_flow.layers import squeeze
from tests.conftest import JSON_VALUES, json_paths


def make_model(channels: int, size: int, levels: int, seed: int = 0, **kw) -> Glow:
    torch.manual_seed(seed)
    config = GlowConfig(in_channels=channels, image_size=size, levels=levels,
                        steps_per_level=2, hidden_channels=6, **kw)
    model = Glow(config).double()
    x = torch.rand(16, channels, size, size, dtype=torch.float64) - 0.5
    model.initialize(x)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every parameter off its (partly zero) initial value
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def reference_log_prob(model: Glow, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log p_Z(f(x)) + log|det df/dx| with the Jacobian from autograd and the
    priors written out with torch.distributions."""

    def latents(flat: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.reshape(-1) for z in model(flat.view_as(x)).latents])

    _, logdet = torch.linalg.slogdet(jacobian(latents, x.reshape(-1)))
    log_pz = torch.zeros((), dtype=x.dtype)
    h = x
    for level in model.levels:
        h = squeeze(h)
        for step in level.steps:
            h, _ = step(h)
        if level.last:
            prior = Normal(level.prior.mean, level.prior.log_std.exp())
            log_pz = log_pz + prior.log_prob(h).sum()
        else:
            z1, z2 = h[:, : level.prior.kept], h[:, level.prior.kept :]
            params = level.prior.net(z1)
            prior = Normal(params[:, 0::2], params[:, 1::2].exp())
            log_pz = log_pz + prior.log_prob(z2).sum()
            h = z1
    return log_pz + logdet


CASES = [(1, 4, 2, {}), (3, 8, 2, {}), (3, 8, 3, {"coupling": "additive", "invconv": "plain"})]


@pytest.mark.parametrize(("channels", "size", "levels", "kw"), CASES)
def test_log_prob_is_change_of_variables(channels, size, levels, kw) -> None:
    model = make_model(channels, size, levels, **kw)
    x = torch.rand(1, channels, size, size, dtype=torch.float64) - 0.5
    expected = reference_log_prob(model, x)
    torch.testing.assert_close(model.log_prob(x)[0], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("channels", "size", "levels", "kw"), CASES)
def test_reconstruction_and_pieces_sum_to_total(channels, size, levels, kw) -> None:
    model = make_model(channels, size, levels, **kw)
    x = torch.rand(5, channels, size, size, dtype=torch.float64) - 0.5
    latents, logdet = model.encode(x)
    torch.testing.assert_close(model.inverse(latents), x, rtol=1e-6, atol=1e-10)

    log_prob = model.log_prob(x)
    parts = model.breakdown(x)
    config = model.config
    torch.testing.assert_close(parts.log_prob, log_prob)
    expected_bpd = (-log_prob + config.n_dims * math.log(256)) / (config.n_dims * math.log(2))
    torch.testing.assert_close(parts.bpd, expected_bpd)
    assert parts.level_bits.shape == (5, levels)
    torch.testing.assert_close(parts.level_bits.sum(1) + config.n_bits, parts.bpd)
    assert parts.pixel_bpd.shape == (5, size, size)
    torch.testing.assert_close(parts.pixel_bpd.mean(dim=(1, 2)), parts.bpd)
    # The log-det from encode is the flow part alone: log_prob minus the priors.
    out = model(x)
    priors = sum(m.sum(dim=(1, 2)) for m in out.prior_maps)
    torch.testing.assert_close(logdet + priors, log_prob)


def reference_level_maps(model: Glow, x: torch.Tensor) -> list[torch.Tensor]:
    """Each level's share of ``log p(x)`` per latent position ``(H_l, W_l)`` for one image
    ``x`` ``(1, C, H, W)``, in nats: for every flow step, ``log|det|`` of the C x C block of
    the step's autograd Jacobian at that position (its input channels to its output
    channels there), plus the prior's log-density of the latent there, written out with
    torch.distributions."""
    maps = []
    h = x
    for level in model.levels:
        h = squeeze(h)
        channels, height, width = h.shape[1:]
        nats = torch.zeros(height, width, dtype=x.dtype)
        for step in level.steps:
            jac = jacobian(lambda v, s=h, f=step: f(v.view_as(s))[0].reshape(-1),
                           h.reshape(-1)).view(channels, height, width, channels, height, width)
            blocks = torch.stack([torch.stack([jac[:, i, j, :, i, j] for j in range(width)])
                                  for i in range(height)])
            nats = nats + torch.linalg.slogdet(blocks)[1]
            h, _ = step(h)
        if level.last:
            prior = Normal(level.prior.mean, level.prior.log_std.exp())
            nats = nats + prior.log_prob(h)[0].sum(0)
        else:
            z1, z2 = h[:, : level.prior.kept], h[:, level.prior.kept :]
            params = level.prior.net(z1)
            nats = nats + Normal(params[:, 0::2], params[:, 1::2].exp()).log_prob(z2)[0].sum(0)
            h = z1
        maps.append(nats)
    return maps


@pytest.mark.parametrize(("channels", "size", "levels", "kw"), CASES)
def test_level_bits_and_pixel_bpd_are_each_positions_own_share(channels, size, levels,
                                                               kw) -> None:
    """level_bits[:, l] is level l's own share of -log p(x) in bits/dim, and pixel_bpd puts
    each latent position's nats, spread evenly, on the block of pixels it came from
    (squeezes keep pixel (r, s) at position (r // 2**l, s // 2**l)): a breakdown with the
    right totals but the levels swapped or a map flipped, transposed or blurred fails."""
    model = make_model(channels, size, levels, **kw)
    x = torch.rand(2, channels, size, size, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(5)) - 0.5
    parts = model.breakdown(x)
    config, ln2 = model.config, math.log(2)
    for b in range(2):
        maps = reference_level_maps(model, x[b : b + 1])
        level_bits = torch.stack([-m.sum() / (config.n_dims * ln2) for m in maps])
        torch.testing.assert_close(parts.level_bits[b], level_bits, rtol=1e-9, atol=1e-9)
        pixel_nats = sum(torch.kron(m, torch.ones(size // len(m), size // len(m),
                                                  dtype=m.dtype)) / (size // len(m)) ** 2
                         for m in maps)
        pixel_bpd = -pixel_nats / (channels * ln2) + config.n_bits
        torch.testing.assert_close(parts.pixel_bpd[b], pixel_bpd, rtol=1e-9, atol=1e-9)


def test_bpd_of_uniform_density_is_n_bits() -> None:
    # An untrained flow is not uniform, but the formula is: log p = 0 on [-0.5, 0.5)^D
    # gives exactly n_bits bits/dim.
    from anomaly_flow.glow import bits_per_dim

    config = GlowConfig(image_size=8, levels=1, n_bits=5)
    assert bits_per_dim(torch.zeros(2), config).tolist() == [5.0, 5.0]


def test_preprocess_is_deterministic_and_inverts() -> None:
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = preprocess(images, 8)
    assert x.min() >= -0.5 and x.max() < 0.5
    torch.testing.assert_close(x, preprocess(images, 8))
    assert torch.equal(postprocess(x, 8), images)
    x5 = preprocess(images, 5)
    assert torch.equal(postprocess(x5, 5), (images // 8) * 8)
    # floats are refused, not truncated: 0-1 floats would all become black pixels
    for floats in (images / 255.0, images.to(torch.float64), images.bool()):
        with pytest.raises(TypeError, match=r"integer pixels in \[0, 255\] \(uint8\), not "
                                            r"torch\.(float32|float64|bool); convert"):
            preprocess(floats, 8)


def test_preprocess_refuses_pixels_and_bits_it_cannot_quantise() -> None:
    """16-bit pixels in an int32 tensor, or an n_bits of 0 or 9, gave flow inputs far
    outside [-0.5, 0.5), which the model scored without a word."""
    sixteen = torch.from_numpy(np.full((1, 1, 4, 4), 60000, dtype=np.uint16))  # a 16-bit PNG
    for pixels in (torch.full((1, 1, 4, 4), 300), torch.full((1, 1, 4, 4), -3, dtype=torch.int16),
                   sixteen, torch.full((1, 1, 4, 4), 2**32 + 7)):  # not wrapped to 7
        with pytest.raises(ValueError, match=r"pixels in \[0, 255\]; these torch.u?int\d+ pixels "
                                             r"run from -?\d+ to -?\d+: scale them to 8 bits"):
            preprocess(pixels, 8)
    for n_bits in (0, 9, 8.0):
        with pytest.raises(ValueError, match=rf"n_bits must be a whole number from 1 to 8 .*"
                                             rf"got {n_bits}$"):
            preprocess(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), n_bits)
    wide = torch.arange(256, dtype=torch.int64).view(1, 1, 16, 16)  # in range: as uint8
    assert torch.equal(preprocess(wide, 8), preprocess(wide.to(torch.uint8), 8))
    # noise of one image for a batch of two broadcast silently: both got the same noise
    pixels = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    for shape in ((1, 1, 4, 4), (2, 1, 4)):
        says = re.escape(f"noise must have the images' shape (2, 1, 4, 4), one value per "
                         f"pixel; got {shape}")
        with pytest.raises(ValueError, match=f"^{says}$"):
            preprocess(pixels, 8, torch.rand(shape))
    assert preprocess(pixels, 8, torch.rand(2, 1, 4, 4)).shape == (2, 1, 4, 4)


def test_sample_shape_and_temperature_zero_is_deterministic() -> None:
    model = make_model(3, 8, 2)
    assert model.sample(3, temperature=0.7).shape == (3, 3, 8, 8)
    torch.testing.assert_close(model.sample(2, temperature=0.0),
                               model.sample(2, temperature=0.0))


def test_inverse_and_sample_refuse_arguments_they_cannot_use() -> None:
    """Latents of another model, or too few, met torch's conv or unpacking errors deep in
    a level; a negative n a tensor-shape error; a NaN temperature was blamed on the
    model's training."""
    model = make_model(1, 8, 2)
    latents = model(torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5).latents
    assert [tuple(z.shape[1:]) for z in latents] == model._latent_shapes()
    expected = r"inverse takes this model's 2 latent\(s\), one per level, of shapes " \
               r"\(B, 2, 4, 4\), \(B, 8, 2, 2\) with one B.*got "
    for bad, got in ((latents[:1], r"1: \(3, 2, 4, 4\)$"), ([], "0: none$"),
                     ([latents[0], latents[1][:2]], r"2: \(3, 2, 4, 4\), \(2, 8, 2, 2\)$"),
                     ([latents[0], None], "2: \\(3, 2, 4, 4\\), NoneType$"),
                     (latents[::-1], r"2: \(3, 8, 2, 2\), \(3, 2, 4, 4\)$")):
        with pytest.raises(ValueError, match=expected + got):
            model.inverse(bad)
    for n in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"a whole number >= 0; got {n}$"):
            model.sample(n)
    for temperature in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"finite number >= 0 .*got {temperature}$"):
            model.sample(2, temperature=temperature)
    assert model.sample(np.int64(2), temperature=np.float32(0.5)).shape == (2, 1, 8, 8)


SINGULAR = r"a 1x1 convolution of level 2 has a singular weight, so the flow has no inverse there"


OVERFLOW = (r"\d+ of the 192 values sampled at temperature 0.7 are NaN or infinite, so the "
            r"flow's inverse overflows \(its actnorms divide by their scales")
AFFINE = ", its affine couplings by scales that can be near 0 for latents unlike the training"


@pytest.mark.parametrize(("damage", "message"), [
    ("lu", SINGULAR), ("plain", SINGULAR), ("overflow", OVERFLOW + AFFINE),
    ("coupling", OVERFLOW + AFFINE), ("additive", OVERFLOW + r"\); a briefly trained"),
], ids=["lu", "plain", "overflow", "coupling", "additive"])
def test_weights_of_a_diverged_training_refuse_to_sample(damage: str, message: str) -> None:
    """What a huge learning rate leaves: a 1x1 convolution driven singular (the LU
    variant's scales underflow to 0), or a scale whose inverse overflows (an actnorm's,
    or an affine coupling's; an additive coupling divides by none). The density side
    still runs; sampling says why it cannot, instead of a LinAlgError or a grid of NaNs
    turned into black pixels."""
    model = make_model(1, 8, 2, invconv="plain" if damage == "plain" else "lu",
                       coupling="additive" if damage == "additive" else "affine")
    step = model.levels[-1].steps[0]  # sampling inverts the last level first
    with torch.no_grad():
        if damage == "lu":
            step.invconv.log_s.fill_(-1000.0)  # exp(-1000) is 0: a zero on W's diagonal
        elif damage == "plain":
            step.invconv.weight.zero_()
        elif damage == "coupling":  # a scale sigmoid(-1000) whose inverse is exp(1000)
            step.coupling.net[-1].conv.bias[1::2] = -1000.0
        else:
            step.actnorm.log_scale.fill_(-1000.0)  # its inverse multiplies by exp(1000)
    model.log_prob(torch.rand(2, 1, 8, 8, dtype=torch.float64) - 0.5)  # still runs
    with pytest.raises(SamplingError, match=f"^the model cannot draw samples: {message}.*"
                                            r"train again with a lower lr"):
        model.sample(3, temperature=0.7)


def test_save_load_round_trip_keeps_actnorm_init(tmp_path) -> None:
    model = make_model(1, 8, 2).float()
    x = torch.rand(4, 1, 8, 8) - 0.5
    model.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["image_size"] == 8
    loaded = Glow.load(tmp_path)
    assert loaded.initialized
    assert torch.equal(loaded.log_prob(x), model.eval().log_prob(x))
    fresh = Glow(model.config)
    assert not fresh.initialized


def test_the_digest_is_the_models_wherever_it_is_and_changes_with_any_part(tmp_path) -> None:
    """What a calibration records: equal for the model as trained, saved and loaded, or
    converted (Glow.load gives float32); different for one weight one float32 step off,
    or a config field that changes the scores but no weight's shape (n_bits, resize)."""
    model = make_model(1, 8, 2).float()
    digest = model.digest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert Glow.load(model.save(tmp_path / "a")).digest() == digest
    assert copy.deepcopy(model).double().digest() == digest
    doubled = copy.deepcopy(model).double()
    assert Glow.load(doubled.save(tmp_path / "b")).digest() == doubled.digest() == digest
    model.training_shapes = ((28, 28, 1),)  # metadata: the scores do not depend on it
    assert model.digest() == digest
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        weight = next(nudged.parameters())
        weight.view(-1)[0] = torch.nextafter(weight.view(-1)[0], torch.tensor(math.inf))
    assert nudged.digest() != digest
    for field in ({"n_bits": 5}, {"resize": "pad"}):
        other = Glow(dataclasses.replace(model.config, **field))
        other.load_state_dict(model.state_dict())
        assert other.digest() != digest, field
    assert set(DIGESTED_CONFIG) <= set(GlowConfig().to_dict())


def test_the_training_images_sizes_are_saved_with_the_weights(tmp_path) -> None:
    """:attr:`Glow.training_shapes` travels in the weights file's metadata; a model saved
    without it, or with a record that is not a list of three positive integers each,
    loads with none (unknown) and the same weights."""
    import safetensors.torch

    model = make_model(1, 8, 2).float()
    assert model.training_shapes == ()
    model.training_shapes = ((28, 28, 60), (30, 40, 4))
    folder = model.save(tmp_path / "model")
    loaded = Glow.load(folder)
    assert loaded.training_shapes == ((28, 28, 60), (30, 40, 4))
    x = torch.rand(4, 1, 8, 8) - 0.5
    assert torch.equal(loaded.log_prob(x), model.eval().log_prob(x))
    model.training_shapes = ()
    assert Glow.load(model.save(tmp_path / "none")).training_shapes == ()
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    for damaged in ("[[28, 28]]", "[[28, 28, 0]]", "[[28, 28, 1.5]]", "{}", "[1]", "not json"):
        (folder / "model.safetensors").write_bytes(safetensors.torch.save(
            weights, metadata={"anomaly_flow.training_shapes": damaged}))
        assert Glow.load(folder).training_shapes == (), damaged


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_mode_the_umask_gives(tmp_path, umask: int) -> None:
    # safetensors' own writer makes its file 0600: unreadable to a serving account
    before = os.umask(umask)
    try:
        folder = make_model(1, 8, 2).float().save(tmp_path / "model")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert modes == {"config.json": 0o666 & ~umask, "model.safetensors": 0o666 & ~umask}


def test_normal_reference_gives_typicality_and_survives_save_load(tmp_path) -> None:
    model = make_model(1, 8, 2).float().eval()
    assert not model.has_reference and "reference_mean" not in model.state_dict()
    with pytest.raises(ValueError, match="no normal reference"):
        model.typicality(torch.zeros(1, 8, 8))
    with torch.no_grad():
        maps = model.breakdown(torch.rand(6, 1, 8, 8) - 0.5).pixel_bpd
    mean, std = maps[:4].mean(dim=0), maps[:4].std(dim=0)
    std[0, 0] = 0.0  # a pixel that never varies: the floor keeps the score finite
    assert knn_grid(model.config) == 8  # too small to pool
    model.set_reference(mean, std, maps[:4], torch.tensor([0.5, 1.0, 1.5, 2.0]))
    assert model.has_reference

    # By hand, pixel by pixel: mean of |m - mu| / (sigma + floor).
    m, mu, sd = maps.double().numpy(), mean.double().numpy(), std.double().numpy()
    by_hand = [sum(abs(m[b, i, j] - mu[i, j]) / (sd[i, j] + REFERENCE_STD_FLOOR)
                   for i in range(8) for j in range(8)) / 64 for b in range(6)]
    typicality = model.typicality(maps)
    torch.testing.assert_close(typicality.double(), torch.tensor(by_hand, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert float(model.typicality(mean[None])[0]) == 0.0  # the average normal map
    doubled = model.typicality(mean + 2 * (maps - mean))
    torch.testing.assert_close(doubled, 2 * typicality, rtol=1e-5, atol=0)

    loaded = Glow.load(model.save(tmp_path / "with"))
    assert loaded.has_reference
    assert torch.equal(loaded.reference_mean, mean) and torch.equal(loaded.reference_std, std)
    for key in ("reference_maps", "reference_scale"):
        assert torch.equal(getattr(loaded, key), getattr(model, key))
    assert torch.equal(loaded.typicality(maps), typicality)
    assert torch.equal(loaded.knn(maps), model.knn(maps))

    # A model saved without a reference (an older anomaly-flow's too) loads without one,
    # and loading such a state clears a reference the model had.
    bare = Glow.load(make_model(1, 8, 2).float().save(tmp_path / "without"))
    assert not bare.has_reference
    loaded.load_state_dict(bare.state_dict())
    assert not loaded.has_reference


@pytest.mark.parametrize(("size", "levels", "grid"), [
    (28, 2, 7), (32, 3, 8), (256, 4, 16), (16, 1, 8), (14, 1, 7), (8, 2, 8),
    # above 16, halved while even and at least 7
    (64, 1, 16), (256, 1, 16), (512, 3, 16), (96, 2, 12), (100, 2, 25), (36, 1, 9)])
def test_knn_grid_is_the_coarsest_level_grid_of_at_least_seven(size, levels, grid) -> None:
    config = GlowConfig(image_size=size, levels=levels, steps_per_level=1)
    assert knn_grid(config) == grid


def test_knn_by_hand_on_pooled_maps() -> None:
    """16x16 at L=1: maps are compared on the 8x8 grid of 2x2 block means, each position
    standardised by the reference maps' mean and (population) std plus the floor; the
    score is the mean distance to the 5 nearest reference maps (all of them when fewer)."""
    model = make_model(1, 16, 1).float().eval()
    assert knn_grid(model.config) == 8
    with pytest.raises(ValueError, match="cannot score knn"):
        model.knn(torch.zeros(1, 16, 16))
    with torch.no_grad():
        maps = model.breakdown(torch.rand(9, 1, 16, 16) - 0.5).pixel_bpd
    pooled = maps.double().numpy().reshape(9, 8, 2, 8, 2).mean(axis=(2, 4))
    model.set_reference(maps.mean(0), maps.std(0), torch.from_numpy(pooled[:7]).float(),
                        torch.zeros(7))
    for k, kept in ((5, 7), (3, 3)):
        model.reference_maps = torch.from_numpy(pooled[:kept]).float()
        refs = pooled[:kept].reshape(kept, -1)
        centre, spread = refs.mean(axis=0), refs.std(axis=0) + REFERENCE_STD_FLOOR
        by_hand = []
        for query in pooled.reshape(9, -1):
            distances = sorted(math.dist((query - centre) / spread, (ref - centre) / spread)
                               for ref in refs)
            by_hand.append(sum(distances[:k]) / k)
        np.testing.assert_allclose(model.knn(maps).double().numpy(), by_hand, rtol=1e-5)
    # A query equal to every reference map is at distance 0.
    model.reference_maps = torch.from_numpy(np.repeat(pooled[:1], 6, axis=0)).float()
    assert float(model.knn(maps[:1])[0]) == pytest.approx(0.0, abs=1e-5)


def test_neighbour_distances_are_exact_and_do_not_depend_on_the_batch() -> None:
    """A file that is one of the reference images (a validation image scored later) is at
    distance 0 from it; torch's matrix-product distance put it at ~1e-7 (the root of a
    cancellation's rounding), by an amount that changed with the number of queries, so a
    file's knn moved in its last bits with the batch it was scored in."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(300, 49, generator=g, dtype=torch.float64) * 3 + 2
    queries = torch.cat([keys[:3], torch.randn(5, 49, generator=g, dtype=torch.float64) * 3 + 2])
    together = _mean_nearest(queries, keys)
    assert torch.equal(together, torch.cat([_mean_nearest(q[None], keys) for q in queries]))
    exact = (queries[:, None] - keys[None]).square().sum(2).sqrt()
    assert torch.allclose(together, exact.topk(KNN_NEIGHBOURS, largest=False).values.mean(1),
                          rtol=0, atol=1e-12)
    mine = (keys[:3, None] - keys[None]).square().sum(2).sqrt()
    mine[torch.arange(3), torch.arange(3)] = float("inf")  # leave-one-out: not itself
    assert torch.allclose(_mean_nearest(keys[:3], keys, torch.arange(3)),
                          mine.topk(KNN_NEIGHBOURS, largest=False).values.mean(1), rtol=0,
                          atol=1e-12)


def test_ensemble_standardises_knn_and_coarse_complexity_by_the_reference_images() -> None:
    """reference_scale holds the mean and population std of each reference map's knn
    against the other maps (leave-one-out, by hand here) and of the given
    coarse_complexity values; ensemble sums the two standardised scores."""
    model = make_model(1, 16, 1).float().eval()
    with pytest.raises(ValueError, match="cannot score ensemble"):
        model.ensemble(torch.zeros(2), torch.zeros(2))
    with torch.no_grad():
        maps = model.breakdown(torch.rand(8, 1, 16, 16) - 0.5).pixel_bpd
    pooled = maps.double().reshape(8, 8, 2, 8, 2).mean(dim=(2, 4))
    coarse = torch.tensor([0.3, -0.2, 0.8, 0.1, 0.0, 0.5, -0.4, 0.2])
    model.set_reference(maps.mean(0), maps.std(0), pooled.float(), coarse)

    refs = pooled.float().double().reshape(8, -1).numpy()
    centre, spread = refs.mean(axis=0), refs.std(axis=0) + REFERENCE_STD_FLOOR
    loo = []
    for i, query in enumerate(refs):
        distances = sorted(math.dist((query - centre) / spread, (ref - centre) / spread)
                           for j, ref in enumerate(refs) if j != i)
        loo.append(sum(distances[:5]) / 5)
    expected = [[np.mean(loo), np.std(loo)], [coarse.double().mean(), coarse.double().std(
        correction=0)]]
    np.testing.assert_allclose(model.reference_scale.double().numpy(), expected, rtol=1e-5)
    knn, cc = torch.tensor([1.0, 4.0]), torch.tensor([0.2, -1.0])
    by_hand = [(k - expected[0][0]) / expected[0][1] + (c - expected[1][0]) / expected[1][1]
               for k, c in zip(knn.tolist(), cc.tolist(), strict=True)]
    np.testing.assert_allclose(model.ensemble(knn, cc).numpy(), by_hand, rtol=1e-5)

    # One reference image: no leave-one-out knn, and no spread: nothing to divide by 0.
    model.set_reference(maps.mean(0), maps.std(0), pooled[:1].float(), coarse[:1])
    assert model.reference_scale.tolist() == [[0.0, 1.0], [pytest.approx(0.3), 1.0]]


def test_pixel_knn_by_hand_and_the_three_term_ensemble() -> None:
    """16x16 RGB at L=1: images (flow inputs) are compared on the 8x8 grid of 2x2 block
    means of every channel, unstandardised; pixel_knn is the mean distance to the 5
    nearest reference images. reference_scale's third row is the mean and population std
    of each reference image's pixel_knn against the others (leave-one-out), and ensemble
    adds the standardised pixel_knn to the other two terms."""
    model = make_model(3, 16, 1).float().eval()
    assert knn_grid(model.config) == 8
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(9, 3, 16, 16, generator=generator) - 0.5
    with pytest.raises(ValueError, match="cannot score pixel_knn"):
        model.pixel_knn(x)
    with torch.no_grad():
        maps = model.breakdown(x).pixel_bpd
    pooled_maps = pool_to_grid(maps, 8)
    pooled = x.double().numpy().reshape(9, 3, 8, 2, 8, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(pool_images(x, 8).double().numpy(), pooled, rtol=1e-6)
    coarse = torch.linspace(-1, 1, 7)
    model.set_reference(maps.mean(0), maps.std(0), pooled_maps[:7], coarse,
                        torch.from_numpy(pooled[:7]).float())
    assert model.has_image_reference

    refs = torch.from_numpy(pooled[:7]).float().double().reshape(7, -1).numpy()

    def nearest(query: np.ndarray, skip: int | None = None) -> float:
        distances = sorted(math.dist(query, ref) for j, ref in enumerate(refs) if j != skip)
        return sum(distances[:5]) / 5

    by_hand = [nearest(query) for query in pooled.reshape(9, -1)]
    np.testing.assert_allclose(model.pixel_knn(x).double().numpy(), by_hand, rtol=1e-5)
    assert float(model.pixel_knn(x[:1])[0]) > 0 and by_hand[0] > 0
    loo = [nearest(query, i) for i, query in enumerate(refs)]
    np.testing.assert_allclose(model.reference_scale[2].double().numpy(),
                               [np.mean(loo), np.std(loo)], rtol=1e-5)

    knn, cc, pixel = torch.tensor([1.0, 4.0]), torch.tensor([0.2, -1.0]), torch.tensor([0.3, 2.0])
    (km, ks), (cm, cs), (pm, ps) = model.reference_scale.double().tolist()
    expected = [(k - km) / ks + (c - cm) / cs + (q - pm) / ps
                for k, c, q in zip(knn.tolist(), cc.tolist(), pixel.tolist(), strict=True)]
    np.testing.assert_allclose(model.ensemble(knn, cc, pixel).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="3 rows goes with a pixel_knn"):
        model.ensemble(knn, cc)


def test_a_reference_without_images_scores_knn_and_a_two_term_ensemble(tmp_path) -> None:
    """The reference of the anomaly-flow before pixel_knn had maps and a two-row scale but
    no images: it loads and scores knn and the ensemble it was calibrated with (knn +
    coarse_complexity), and says plainly that it cannot score pixel_knn."""
    model = make_model(1, 8, 2).float().eval()
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(4)) - 0.5
    with torch.no_grad():
        maps = model.breakdown(x).pixel_bpd
    coarse = torch.linspace(0, 1, 6)
    model.set_reference(maps.mean(0), maps.std(0), maps, coarse, pool_images(x, 8))
    older = Glow(model.config)
    state = model.state_dict()
    del state["reference_images"]
    state["reference_scale"] = state["reference_scale"][:2].clone()
    older.load_state_dict(state)
    older.eval()
    assert older.has_knn_reference and not older.has_image_reference
    assert torch.equal(older.knn(maps), model.knn(maps))
    with pytest.raises(ValueError, match=r"no images.*older anomaly-flow"):
        older.pixel_knn(x)
    knn, cc = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.0])
    (km, ks), (cm, cs) = older.reference_scale.double().tolist()
    np.testing.assert_allclose(older.ensemble(knn, cc).numpy(),
                               ((knn - km) / ks + (cc - cm) / cs).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="2 rows goes with no pixel_knn"):
        older.ensemble(knn, cc, torch.ones(2))
    # set_reference without images gives the same; saved and loaded, it stays so
    model.set_reference(maps.mean(0), maps.std(0), maps, coarse)
    assert torch.equal(model.reference_scale, older.reference_scale)
    loaded = Glow.load(model.save(tmp_path / "older"))
    assert loaded.has_knn_reference and not loaded.has_image_reference


def test_a_reference_without_maps_scores_typicality_only(tmp_path) -> None:
    """An older anomaly-flow saved only the reference's mean and std: such a state loads,
    and the model scores typicality but says plainly that it cannot score knn or
    ensemble. set_reference without maps gives the same."""
    model = make_model(1, 8, 2).float().eval()
    with torch.no_grad():
        maps = model.breakdown(torch.rand(6, 1, 8, 8) - 0.5).pixel_bpd
    model.set_reference(maps.mean(0), maps.std(0), maps, torch.zeros(6))
    old_state = {k: v for k, v in model.state_dict().items()
                 if k not in ("reference_maps", "reference_scale")}
    older = Glow(model.config)
    older.load_state_dict(old_state)
    older.eval()
    assert older.has_reference and not older.has_knn_reference
    assert torch.equal(older.typicality(maps), model.typicality(maps))
    for score in (lambda: older.knn(maps), lambda: older.ensemble(torch.ones(1), torch.ones(1))):
        with pytest.raises(ValueError, match=r"no reference maps.*older anomaly-flow"):
            score()
    # a full state loaded over it brings the maps back; set_reference without maps drops them
    older.load_state_dict(model.state_dict())
    assert older.has_knn_reference and torch.equal(older.knn(maps), model.knn(maps))
    older.set_reference(maps.mean(0), maps.std(0))
    assert older.has_reference and not older.has_knn_reference
    assert "reference_maps" not in older.state_dict()
    with pytest.raises(ValueError, match="go together"):
        older.set_reference(maps.mean(0), maps.std(0), maps)


def test_knn_follows_reference_maps_loaded_in_place() -> None:
    """The standardised reference maps are cached; loading other maps into the same
    buffer (load_state_dict copies in place) must not reuse the old ones."""
    model = make_model(1, 8, 2).float().eval()
    with torch.no_grad():
        maps = model.breakdown(torch.rand(6, 1, 8, 8) - 0.5).pixel_bpd
    model.set_reference(maps.mean(0), maps.std(0), maps[:3], torch.zeros(3))
    first = model.knn(maps)
    state = model.state_dict()
    state["reference_maps"] = maps[3:].clone()
    model.load_state_dict(state)
    fresh = Glow(model.config)
    fresh.load_state_dict(state)
    assert torch.equal(model.knn(maps), fresh.eval().knn(maps))
    assert not torch.equal(model.knn(maps), first)


def test_knn_follows_every_refit_of_the_reference() -> None:
    """A refit frees the old maps and allocates new ones of the same size, often at the
    same address: knn and reference_scale must come from the new maps each time, through
    set_reference and through load_state_dict (which allocates fresh buffers to copy
    into)."""
    model = make_model(1, 16, 1).float().eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        maps = model.breakdown(torch.rand(4, 1, 16, 16, generator=generator) - 0.5).pixel_bpd
    mean, std = maps.mean(0), maps.std(0)

    x = torch.rand(4, 1, 16, 16, generator=generator) - 0.5

    def reference(scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.rand(200, 8, 8, generator=generator) * scale,
                torch.rand(200, generator=generator),
                torch.rand(200, 1, 8, 8, generator=generator) * scale)

    def fresh_knn(pooled: torch.Tensor, coarse: torch.Tensor, images: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fresh = make_model(1, 16, 1).float().eval()
        fresh.set_reference(mean, std, pooled, coarse, images)
        return fresh.reference_scale, fresh.knn(maps), fresh.pixel_knn(x)

    for scale in range(1, 7):
        pooled, coarse, images = reference(scale)
        model.set_reference(mean, std, pooled, coarse, images)
        del pooled, images  # the model's copies are then the only ones
        expected_scale, expected_knn, expected_pixel = fresh_knn(
            model.reference_maps.clone(), coarse, model.reference_images.clone())
        assert torch.equal(model.reference_scale, expected_scale)
        assert torch.equal(model.knn(maps), expected_knn)
        assert torch.equal(model.pixel_knn(x), expected_pixel)
    for scale in range(1, 7):
        pooled, coarse, images = reference(scale)
        state = {**model.state_dict(), "reference_maps": pooled, "reference_images": images}
        model.load_state_dict(state)
        del state
        _, expected_knn, expected_pixel = fresh_knn(pooled, torch.zeros(200), images)
        assert torch.equal(model.knn(maps), expected_knn)
        assert torch.equal(model.pixel_knn(x), expected_pixel)


def test_normal_reference_is_checked(tmp_path) -> None:
    model = make_model(1, 8, 2).float()
    ones, cc = torch.ones(3, 8, 8), torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(8, 8\).*got \(4, 4\)"):
        model.set_reference(torch.zeros(4, 4), torch.ones(4, 4), ones, cc)
    with pytest.raises(ValueError, match=r"\(N, 8, 8\).*got \(3, 4, 4\)"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), torch.ones(3, 4, 4), cc)
    with pytest.raises(ValueError, match=r"1 <= N.*got \(0, 8, 8\)"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones[:0], cc[:0])
    with pytest.raises(ValueError, match=r"coarse_complexity must have shape \(3,\).*got \(2,\)"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc[:2])
    with pytest.raises(ValueError, match="non-finite"):
        model.set_reference(torch.full((8, 8), math.nan), torch.ones(8, 8), ones, cc)
    with pytest.raises(ValueError, match="maps has non-finite"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones * math.inf, cc)
    with pytest.raises(ValueError, match="coarse_complexity has non-finite"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc + math.nan)
    with pytest.raises(ValueError, match="negative"):
        model.set_reference(torch.zeros(8, 8), -torch.ones(8, 8), ones, cc)
    images = torch.zeros(3, 1, 8, 8)
    with pytest.raises(ValueError, match=r"images must have shape \(3, 1, 8, 8\).*got \(3, 8, 8\)"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc, images[:, 0])
    with pytest.raises(ValueError, match=r"images must have shape \(3, 1, 8, 8\).*got \(2, 1"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc, images[:2])
    with pytest.raises(ValueError, match="images has non-finite"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc, images + math.inf)
    with pytest.raises(ValueError, match="images need the reference maps"):
        model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), images=images)
    model.set_reference(torch.zeros(8, 8), torch.ones(8, 8), ones, cc, images)
    for key in ("reference_std", "reference_maps", "reference_scale"):
        state = model.state_dict()
        del state[key]
        with pytest.raises(RuntimeError, match="only part of the normal reference"):
            Glow(model.config).load_state_dict(state)
    state = model.state_dict()  # a full reference with an older reference's scale
    state["reference_scale"] = state["reference_scale"][:2]
    with pytest.raises(RuntimeError, match=r"shapes \[.*\(2, 2\), \(3, 1, 8, 8\)\]"):
        Glow(model.config).load_state_dict(state)
    state = model.state_dict()
    state["reference_images"] = torch.zeros(3, 3, 8, 8)
    with pytest.raises(RuntimeError, match=r"\(N, 1, 8, 8\)"):
        Glow(model.config).load_state_dict(state)
    state = model.state_dict()
    state["reference_mean"] = state["reference_std"] = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match=r"needs \(8, 8\) twice, then \(N, 8, 8\), \(3, 2\)"):
        Glow(model.config).load_state_dict(state)
    state = model.state_dict()
    state["reference_maps"] = torch.zeros(2, 4, 4)
    with pytest.raises(RuntimeError, match=r"needs \(8, 8\) twice, then \(N, 8, 8\), \(3, 2\)"):
        Glow(model.config).load_state_dict(state)
    # Any number of maps loads (with as many images): the buffer takes the saved shape.
    state["reference_maps"] = torch.full((5, 8, 8), 2.0)
    state["reference_images"] = torch.full((5, 1, 8, 8), 0.25)
    other = Glow(model.config)
    other.load_state_dict(state)
    assert torch.equal(other.reference_maps, state["reference_maps"])
    assert torch.equal(other.reference_images, state["reference_images"])
    # A wrapper's state dict (prefixed keys) loads the reference too.
    wrapper = torch.nn.ModuleDict({"glow": Glow(model.config)})
    wrapper.load_state_dict({f"glow.{k}": v for k, v in model.state_dict().items()})
    assert torch.equal(wrapper["glow"].reference_std, torch.ones(8, 8))


def test_load_refuses_a_device_the_model_cannot_go_on(tmp_path) -> None:
    """Glow.load("m", "cuda") on a machine without CUDA ended in torch's AssertionError
    ("Torch not compiled with CUDA enabled"); a mistyped device in its RuntimeError."""
    make_model(1, 8, 2).float().save(tmp_path)
    for device in ("gpu", "cuda:99"):  # cuda:99: no machine has it, CUDA or not
        with pytest.raises(ValueError, match=rf"^cannot put the model on device '{device}' "
                                             r"\(.+\); use 'cpu', or 'cuda'"):
            Glow.load(tmp_path, device)
    assert Glow.load(tmp_path, torch.device("cpu")).device == torch.device("cpu")


def test_load_on_a_device_whose_memory_is_taken_says_so(tmp_path, monkeypatch) -> None:
    """A GPU that is there but full (other processes) raises torch's OutOfMemoryError
    while the weights move; that is not a device to be replaced by 'cuda'."""
    make_model(1, 8, 2).float().save(tmp_path)

    def full(self: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(torch.nn.Module, "to", full)
    with pytest.raises(ModelFileError, match=r"^the model in .+ does not fit in the free memory "
                                             r"of cpu \(CUDA out of memory\. Tried to allocate "
                                             r"2\.00 MiB\); free it \(other processes on that "
                                             r"GPU\), or load the model on 'cpu'$"):
        Glow.load(tmp_path, "cpu")


def test_load_reports_missing_and_mismatched_files(tmp_path) -> None:
    with pytest.raises(ModelFileError, match=r"config\.json is missing"):
        Glow.load(tmp_path)
    make_model(1, 8, 2).float().save(tmp_path)
    (tmp_path / "config.json").write_text(GlowConfig(image_size=8, levels=2,
                                                     steps_per_level=3).to_json())
    with pytest.raises(ModelFileError, match=r"do not fit its config\.json \(\d+ "
                                             r"(missing|unexpected) tensor\(s\), e\.g\. "
                                             r"levels\.[^;)]+[;)].*\); copy or download "
                                             r"the model again") as info:
        Glow.load(tmp_path)
    # one line, not the hundreds of key names load_state_dict lists
    assert "\n" not in str(info.value) and len(str(info.value)) < 800
    (tmp_path / "config.json").write_text(GlowConfig(image_size=8, levels=2,
                                                     hidden_channels=16).to_json())
    with pytest.raises(ModelFileError, match=r"do not fit its config\.json \(.*\d+ tensor\(s\) "
                                             r"of another shape, e\.g\. levels\.") as info:
        Glow.load(tmp_path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 800
    # a config.json cut short, not UTF-8, of an unknown form, or of a size no memory holds
    make_model(1, 8, 2).float().save(tmp_path)
    config = tmp_path / "config.json"
    good = config.read_bytes()
    for damaged, said in ((b"{", r"is not a model configuration anomaly-flow can read "
                                 r"\(Expecting property name"),
                          (b"\xff\xfe", r"can read \('utf-8' codec can't decode"),
                          (b'{"image_size": "big"}', r"can read \(image_size"),
                          (good.replace(b'"image_size": 8', b'"image_size": 1048576'),
                           r"the model .*config\.json describes cannot be built here \(.+\); "
                           r"check its image_size")):
        config.write_bytes(damaged)
        with pytest.raises(ModelFileError, match=said) as info:
            Glow.load(tmp_path)
        assert "\n" not in str(info.value)
    # weights cut short (a failed copy or download): one line saying so, no traceback
    make_model(1, 8, 2).float().save(tmp_path)
    weights = tmp_path / "model.safetensors"
    for damaged in (weights.read_bytes()[:1000], weights.read_bytes()[:-1000], b""):
        weights.write_bytes(damaged)
        with pytest.raises(ModelFileError, match=r"model\.safetensors is damaged or "
                                                 r"incomplete \(.+\); copy or download"):
            Glow.load(tmp_path)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("image_size", {"image_size": 30, "levels": 2}), ("steps_per_level",
      {"steps_per_level": 0}), ("in_channels", {"in_channels": 2}),
     ("coupling", {"coupling": "spline"}), ("levels", {"levels": 0}),
     ("resize", {"resize": "squash"})],
)
def test_config_validation_names_the_field(field, kwargs) -> None:
    with pytest.raises(ConfigError, match=field):
        GlowConfig(**kwargs)


def test_config_refuses_an_image_size_too_large_for_memory(tmp_path) -> None:
    """4096 ended in "DefaultCPUAllocator: can't allocate memory", 100000 in the OOM
    killer (no message, the MLflow run left RUNNING): refused with the reason instead."""
    fits = RunConfig.from_dict({"model": {"image_size": MAX_IMAGE_SIZE, "levels": 2}})
    assert fits.model.image_size == 1024
    for size in (2048, 4096, 100_000):
        with pytest.raises(ConfigError, match=rf"^image_size = {size} is invalid: must be at "
                                              r"most 1024 for training: the memory a flow's "
                                              r"activations take in training grows with "
                                              r"image_size² .*; use a smaller image_size "
                                              r"\(the images are resized to it"):
            RunConfig.from_dict({"model": {"image_size": size, "levels": 2}})
    # a training limit: a model saved at any size still loads
    assert GlowConfig(image_size=2048, levels=2).image_size == 2048


def test_config_json_round_trip() -> None:
    config = GlowConfig(in_channels=3, image_size=16, levels=2, coupling="additive",
                        resize="pad")
    assert GlowConfig.from_json(config.to_json()) == config
    # a model saved before model.resize existed was trained on stretched images
    older = {k: v for k, v in config.to_dict().items() if k != "resize"}
    assert GlowConfig.from_dict(older).resize == "stretch"
    with pytest.raises(ConfigError, match="unknown field"):
        GlowConfig.from_dict({**config.to_dict(), "depth": 3})


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks() -> None:
    model = make_model(1, 8, 2).float().eval()
    x = torch.rand(4, 1, 8, 8) - 0.5
    expected = model.log_prob(x)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    from anomaly_flow.glow import log_prob_from_output

    with torch.no_grad():
        got = log_prob_from_output(compiled(x))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-4, atol=1e-3)


def test_one_image_initialises_a_model_whose_top_level_is_one_pixel() -> None:
    """image_size = 2**levels leaves a 1x1 top level; initialised on a single image (a
    two-image folder's training split), its ActNorms saw no spread there and scaled by
    1/eps: bits/dim ~1e11, finite, so the model was registered."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_size=16, levels=4, steps_per_level=1, hidden_channels=4))
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 1, 16, 16), generator=gen, dtype=torch.uint8)
    x = preprocess(images, 8)
    model.initialize(x[:1])
    assert model.bpd(x).max().item() < 20


def test_training_lowers_bits_per_dim() -> None:
    """A tiny Glow on a structured image set (random-width bars) drops well below its
    starting bits/dim in 300 Adam steps: from about 8.35 to about 4.0 (asserted < 5)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n, size = 256, 8
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    widths = torch.randint(1, size, (n,), generator=gen)
    for i, w in enumerate(widths.tolist()):
        images[i, 0, :, :w] = 200
    model = Glow(GlowConfig(image_size=size, levels=2, steps_per_level=2, hidden_channels=16))
    x_all = preprocess(images, 8)
    model.initialize(x_all[:64])
    start = model.bpd(x_all).mean().item()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(300):
        idx = torch.randint(0, n, (32,), generator=gen)
        x = preprocess(images[idx], 8, noise=torch.rand(32, 1, size, size, generator=gen))
        loss = model.bpd(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = model.bpd(x_all).mean().item()
    assert start > 7.5, start
    assert end < 5.0, (start, end)


@pytest.mark.parametrize(("field", "value"), [
    ("lr", float("inf")), ("lr", float("nan")), ("sample_temperature", float("inf")),
    ("grad_clip", float("nan")), ("grad_clip", float("inf")),
])
def test_train_config_refuses_non_finite_numbers(field: str, value: float) -> None:
    from anomaly_flow.config import TrainConfig

    with pytest.raises(ConfigError, match=f"{field} = {value!r} is invalid: must be a .*finite"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(("field", "value", "said"), [
    ("seed", -1, "must be from 0 to 2**42 - 1"), ("seed", 2**63, "must be from 0 to 2**42 - 1"),
    ("batch_size", 0, "must be from 1 to 65536"), ("batch_size", 10**20, "must be from 1 to"),
    ("init_batch_size", 65537, "must be from 1 to 65536"),
])
def test_train_config_refuses_integers_out_of_range(field: str, value: int, said: str) -> None:
    """Past these, numpy's and torch's own errors came instead (a negative seed, an
    int64 overflow, a batch no tensor can hold)."""
    from anomaly_flow.config import TrainConfig

    with pytest.raises(ConfigError, match=rf"^{field} = {value} is invalid: {re.escape(said)}"):
        TrainConfig(**{field: value})
    TrainConfig(seed=2**42 - 1, batch_size=65536, init_batch_size=65536)
    from anomaly_flow.train import _step_noise

    _step_noise(2**42 - 1, 10**9, (1, 1, 2, 2), torch.device("cpu"))  # seeds that fit


@pytest.mark.parametrize(("kind", "field", "value", "said"), [
    ("train", "batch_size", 2.5, "2.5 is invalid: must be a whole number"),
    ("train", "epochs", "2", "'2' is invalid: must be a whole number"),
    ("train", "bf16", 1, "1 is invalid: must be true or false"),
    ("train", "lr", "1e-3", "'1e-3' is invalid: must be a number"),
    ("model", "coupling", 1, "1 is invalid: must be a string"),
])
def test_a_config_built_in_python_refuses_values_of_another_type(
        kind: str, field: str, value: object, said: str) -> None:
    """As a config file's are: a 2.5 batch size was refused later for the wrong reason
    (not divisible by the processes), a "2" epochs with a TypeError from a comparison."""
    import dataclasses

    from anomaly_flow.config import load_preset

    tiny = load_preset("tiny")
    with pytest.raises(ConfigError, match=rf"^{field} = {re.escape(said)}\.$"):
        dataclasses.replace(getattr(tiny, kind), **{field: value})
    numbers = dataclasses.replace(tiny.train, lr=np.float32(0.5), batch_size=np.int64(8),
                                  grad_clip=50)  # numbers of other types: plain ones
    assert (type(numbers.lr), type(numbers.batch_size), type(numbers.grad_clip)) == (
        float, int, float)
    assert RunConfig(tiny.model, numbers).to_json()  # as JSON writes them
    with pytest.raises(ConfigError, match=r"^model must be a GlowConfig, got dict; "
                                          r"RunConfig\.from_dict reads"):
        RunConfig(tiny.model.to_dict(), tiny.train)  # type: ignore[arg-type]


@pytest.mark.parametrize(("field", "value", "said"), [
    ("hidden_channels", 2**63 - 1, "must be a width from 1 to 65536"),
    ("hidden_channels", 10**30, "must be a width from 1 to 65536"),
    ("steps_per_level", 10**6, "need from 1 to 1024 flow steps per level"),
])
def test_model_config_refuses_sizes_no_model_can_be_built_with(field: str, value: int,
                                                               said: str) -> None:
    """A hidden_channels past int64 (JSON) ended in torch's "Overflow when unpacking long
    long" traceback, int64's largest (TOML) in "Storage size calculation overflowed", and a
    million steps_per_level hung building the model: refused as settings instead."""
    with pytest.raises(ConfigError, match=rf"^{field} = {value} in \[model\] is invalid: "
                                          rf"{re.escape(said)}\.$"):
        RunConfig.from_dict({"model": {field: value, "image_size": 16, "levels": 2}})
    GlowConfig(hidden_channels=65536, steps_per_level=1024)  # the largest, still settings


def test_wrong_inputs_are_refused_with_what_the_model_takes() -> None:
    model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=4))
    good = preprocess(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), n_bits=8)
    model.initialize(good)
    for bad in (good[:, :, :4, :4], good.expand(2, 3, 8, 8), good[0]):
        with pytest.raises(ValueError, match=r"takes flow inputs of shape \(B, 1, 8, 8\), not"):
            model.breakdown(bad)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 8, 8\), not \(2, 1, 4, 4\)"):
        model.initialize(good[:, :, :4, :4])
    with pytest.raises(ValueError, match=r"not torch.uint8 pixels; pass preprocess\(images, "
                                         r"n_bits=8\)"):
        model.breakdown(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"weights are torch.float32 .* not torch.float64; "
                                         r"convert the inputs with x.to\(torch.float32\)"):
        model.log_prob(good.double())  # torch's own refusal named conv biases
    torch.testing.assert_close(model.bpd(good.half()), model.bpd(good))  # narrower: fine
    with pytest.raises(ValueError, match=r"the model is on cpu but the flow inputs are on "
                                         r"meta; move them with x.to\(model.device\)"):
        model.bpd(good.to("meta"))  # as for inputs on cpu to a model on cuda
    assert model.double().bpd(good.double()).dtype == torch.float64  # converted: fine


def test_raw_pixels_and_a_second_initialisation_are_refused() -> None:
    """Floats in 0-1 got a plausible bits/dim (about 8), 0-255 floats up to inf; a second
    ``initialize`` (the README's line after ``load_model``) replaced the trained ActNorm
    and changed every score, without a word."""
    model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=4))
    pixels = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    good = preprocess(pixels, n_bits=8)
    model.initialize(good)
    before = model.bpd(good)
    for raw, top in ((pixels.float() / 255, 1), (pixels.float(), 255)):
        raw[0, 0, 0, :2] = torch.tensor([0.0, top])  # both ends of the range present
        shown = f"from 0 to {top}"
        for method in (model.bpd, model.breakdown):
            with pytest.raises(ValueError, match=rf"takes flow inputs in \[-0\.5, 0\.5\], as "
                                                 rf"preprocess\(images, n_bits\) gives them; "
                                                 rf"these run {shown} \(raw pixels\?\)"):
                method(raw)
    with pytest.raises(ValueError, match="these hold NaN"):
        model.bpd(torch.full_like(good, float("nan")))
    # preprocess's noise just below 1 rounds a white pixel to 0.5 in float32: taken
    top = preprocess(torch.full_like(pixels, 255), n_bits=8,
                     noise=torch.full(pixels.shape, 1 - 2**-24))
    assert top.max().item() == 0.5
    assert torch.isfinite(model.bpd(top)).all()
    with pytest.raises(ValueError, match="the model is already initialised"):
        model.initialize(preprocess(torch.zeros_like(pixels), n_bits=8))
    torch.testing.assert_close(model.bpd(good), before, rtol=0, atol=0)
    fresh = Glow(model.config)  # a first try stopped part way (out of memory) may go again
    fresh.levels[0].steps[0].actnorm.initialized.fill_(True)
    fresh.initialize(good)
    assert fresh.initialized


def test_a_narrower_model_under_autocast_takes_preprocess_output() -> None:
    """Autocast casts a bfloat16 model's float32 inputs for its convolutions, as it did
    before the dtype check: only float64, which autocast leaves alone, is refused."""
    model = Glow(GlowConfig(image_size=8, levels=2, steps_per_level=1, hidden_channels=4))
    good = preprocess(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), n_bits=8)
    model.initialize(good)
    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"weights are torch.bfloat16 .* not torch.float32"):
        model.bpd(good)  # no autocast: the convolution would refuse
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bpd = model.bpd(good)
        with pytest.raises(ValueError, match=r"weights are torch.bfloat16 .* not torch.float64"):
            model.bpd(good.double())
    assert bpd.shape == (2,) and torch.isfinite(bpd).all()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_an_edited_config_loads_or_is_refused_clearly(data: st.DataObject) -> None:
    """A preset's fields deleted or given any JSON value, up to three times (a config
    file a user edited): a valid RunConfig that round-trips, or a one-line ConfigError,
    never another exception (a mistyped levels = 14285 made 2**levels unprintable; 20,000
    examples clean in a one-off run since)."""
    edited = load_preset(data.draw(st.sampled_from(["tiny", "small", "fashion-mnist"]))
                         ).to_dict()
    for _ in range(data.draw(st.integers(1, 3))):
        places = json_paths(edited)[1:]
        if not places:
            break
        place = data.draw(st.sampled_from(places))
        parent = edited
        for key in place[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()):
            parent[place[-1]] = data.draw(JSON_VALUES | st.integers(2**40, 2**80))
        elif isinstance(parent, dict):
            del parent[place[-1]]
    try:
        config = RunConfig.from_dict(edited)
    except ConfigError as error:
        assert str(error).strip() and "\n" not in str(error)
        return
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(("text", "said"), [
    ('resize = "crop"\n[model]\nlevels = 2\n',
     "resize is outside any table: it goes under [model]."),
    ('epochs = 2\nresize = "crop"\n', "epochs is outside any table: it goes under [train]; "
                                        "resize is outside any table: it goes under [model]."),
    ('[train]\nresize = "crop"\n', "resize in [train] belongs in [model]; move it there."),
    ("[model]\nepochs = 2\nlr = 0.1\n", "epochs, lr in [model] belong in [train]; move them "
                                         "there."),
    ("[models]\nlevels = 2\n", "unknown section(s) ['models']; use [model] and [train]."),
])
def test_a_field_in_the_wrong_table_is_named_with_its_table(tmp_path, text, said) -> None:
    """TOML keys above the first header, or under the other table, were called unknown
    sections or fields: the message now says where they go."""
    path = tmp_path / "glow.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == said


def test_the_readmes_colour_config_loads_as_written(tmp_path, caplog) -> None:
    """The README's example config file sets every field a config is warned of leaving
    out, and means what its comments say."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    path = tmp_path / "parts.toml"
    path.write_text(block)
    with caplog.at_level(logging.WARNING):
        config = load_config(path)
    assert caplog.text == ""
    assert (config.model.mode, config.model.image_size, config.model.resize) == \
        ("RGB", 64, "crop")
