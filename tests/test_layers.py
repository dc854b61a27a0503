"""Each bijection against an independent reference: its inverse and ``slogdet`` of the
autograd Jacobian, in float64 on a flattened 1xCx4x4 input."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from anomaly_flow.layers import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowStep,
    InvConv1x1,
    InvConv1x1LU,
    squeeze,
    unsqueeze,
)


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "invconv-plain": lambda c: InvConv1x1(c),
    "invconv-lu": lambda c: InvConv1x1LU(c),
    "affine-coupling": lambda c: AffineCoupling(c, hidden=6),
    "additive-coupling": lambda c: AdditiveCoupling(c, hidden=6),
    "flowstep-affine-lu": lambda c: FlowStep(c, 6, "affine", "lu"),
    "flowstep-additive-plain": lambda c: FlowStep(c, 6, "additive", "plain"),
}


def randomised(layer: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so zero-initialised parts do not hide errors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer.double()


@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_and_logdet_match_jacobian(name: str, channels: int) -> None:
    torch.manual_seed(0)
    layer = randomised(LAYERS[name](channels), seed=1)
    x = torch.randn(1, channels, 4, 4)

    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-6, atol=1e-9)
    assert logdet.shape == (1,)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-6, atol=1e-9)

    def flat_forward(v: torch.Tensor) -> torch.Tensor:
        return layer(v.view_as(x))[0].reshape(-1)

    jac = jacobian(flat_forward, x.reshape(-1))
    sign, ref = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_map_is_each_positions_jacobian_block(name: str) -> None:
    """Each position's entry of the log-det map is ``log|det|`` of the C x C block of the
    autograd Jacobian that maps that position's input channels to its output channels.

    Every layer here is pointwise or a coupling whose conditioner reads only the other
    half of the channels, so the full Jacobian is block-triangular and these blocks'
    log-dets add up to the whole one; a map with the right sum but its entries at the
    wrong positions (flipped, transposed, averaged) fails here, as the heatmaps would."""
    torch.manual_seed(0)
    layer = randomised(LAYERS[name](4), seed=2)
    x = torch.randn(3, 4, 4, 4)
    y_map, logdet_map = layer.forward_map(x)
    y, logdet = layer(x)
    assert logdet_map.shape == (3, 4, 4)
    torch.testing.assert_close(y_map, y)
    torch.testing.assert_close(logdet_map.sum(dim=(1, 2)), logdet)
    # Each sample's log-det depends on that sample alone.
    torch.testing.assert_close(layer(x[1:2])[1], logdet[1:2])

    for b in range(3):
        sample = x[b : b + 1]
        jac = jacobian(lambda v, s=sample: layer(v.view_as(s))[0].reshape(-1),
                       sample.reshape(-1)).view(4, 4, 4, 4, 4, 4)  # (c, i, j, c', i', j')
        blocks = torch.stack([torch.stack([jac[:, i, j, :, i, j] for j in range(4)])
                              for i in range(4)])  # (i, j, c, c')
        sign, by_block = torch.linalg.slogdet(blocks)
        assert bool((sign != 0).all())
        torch.testing.assert_close(logdet_map[b], by_block, rtol=1e-6, atol=1e-9)


def test_actnorm_initialisation_normalises_and_is_stored() -> None:
    torch.manual_seed(0)
    layer = ActNorm(3).double()
    x = 5.0 + 2.0 * torch.randn(64, 3, 4, 4)
    assert not layer.initialized
    layer.initialize(x)
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3),
                               atol=1e-5, rtol=0)
    state = layer.state_dict()
    assert bool(state["initialized"])
    fresh = ActNorm(3).double()
    fresh.load_state_dict(state)
    assert fresh.initialized
    torch.testing.assert_close(fresh(x)[0], y)


def test_actnorm_leaves_the_scale_of_a_channel_without_spread() -> None:
    """One image at a 1x1 level gives one value per channel: no spread to measure, so the
    scale stays 1 (1/eps would multiply the channel by a million)."""
    layer = ActNorm(3).double()
    x = torch.tensor([[[[2.0]], [[-1.0]], [[0.5]]]], dtype=torch.float64)
    layer.initialize(torch.cat([x, x + torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)]))
    torch.testing.assert_close(layer.log_scale.flatten()[:2], torch.zeros(2, dtype=torch.float64))
    assert layer.log_scale.flatten()[2].item() == pytest.approx(-torch.log(
        torch.tensor(0.5 + 1e-6)).item())  # a channel with spread: 1 / (std + eps)


def test_affine_coupling_starts_as_near_identity_with_scale_sigmoid_two() -> None:
    layer = AffineCoupling(4, hidden=8).double()
    x = torch.randn(2, 4, 4, 4)
    y, logdet = layer(x)
    # Zero-initialised last conv: shift 0, scale sigmoid(2) on the second half.
    scale = torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * scale)
    torch.testing.assert_close(logdet, torch.full((2,), 2 * 16 * torch.log(scale).item()))


def test_squeeze_round_trip_and_block_layout() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    s = squeeze(x)
    assert s.shape == (1, 4, 2, 2)
    # Channel k of the squeezed tensor holds pixel (k // 2, k % 2) of each 2x2 block.
    torch.testing.assert_close(s[0, :, 0, 0], torch.tensor([0.0, 1.0, 4.0, 5.0]))
    torch.testing.assert_close(unsqueeze(s), x)


@pytest.mark.parametrize("cls", [InvConv1x1, InvConv1x1LU], ids=["plain", "lu"])
def test_a_levels_stacked_weights_are_each_layers_own(cls: type[InvConv1x1]) -> None:
    """What Level.run_steps computes for its K steps at once: each row is the layer's own
    weight and log-det, and the gradients reach each layer's parameters as if alone."""
    torch.manual_seed(0)
    convs = [cls(6).double() for _ in range(4)]
    with torch.no_grad():
        for conv in convs:  # off the initial values (upper, log_s), as after training
            for parameter in conv.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
    weights, logdets = cls.stacked_weights(convs)
    assert weights.shape == (4, 6, 6) and logdets.shape == (4,)
    for conv, weight, logdet in zip(convs, weights, logdets, strict=True):
        own_weight, own_logdet = conv._weight_and_logdet()
        torch.testing.assert_close(weight, own_weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logdet, own_logdet, rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    sum(conv.transform(x, w).square().sum() + ld
        for conv, w, ld in zip(convs, weights, logdets, strict=True)).backward()
    stacked_grads = [[p.grad.clone() for p in conv.parameters()] for conv in convs]
    for conv in convs:
        conv.zero_grad()
        weight, logdet = conv._weight_and_logdet()
        (conv.transform(x, weight).square().sum() + logdet).backward()
        for p, stacked in zip(conv.parameters(), stacked_grads.pop(0), strict=True):
            torch.testing.assert_close(stacked, p.grad, rtol=1e-10, atol=1e-12)
