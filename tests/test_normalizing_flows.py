"""models.bijections and models.normalizing_flows: invertibility, log-determinants against autograd,
autoregressive structure, network-evaluation counts, maximum-likelihood fits and the registrations."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models.bijections import (
    Additive, Affine, Autoregressive, Composed, Conv1x1, Coupling, Permutation, Reshape, Scale, Split, Squeeze,
)
from models.checkpoint import ModelSpec, load_model, save_model
from models.likelihoods import get_likelihood
from models.flow_layers import MADE, ActNorm, InvertibleConv1x1, MAFLayer
from models.normalizing_flows import NormalizingFlow, build_flow, checkerboard
from models.objectives import make_objective
from models.samplers import Setting, get_sampler, sample_with

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("nice", "realnvp", "glow", "maf", "iaf")
SMALL = {"hidden": 8, "depth": 1}


def small_flow(kind: str, shape: tuple[int, ...], seed: int = 0, **kwargs) -> NormalizingFlow:
    """A small float64 flow whose every weight is moved off its initialization (the zero last
    layers make a fresh flow the identity up to actnorm and 1x1 convolutions)."""
    torch.manual_seed(seed)
    flow = build_flow(kind, shape, **(SMALL | kwargs)).double()
    perturb(flow)
    return flow


def perturb(module: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log |det d fn / dx| by autograd, one example of ``x`` at a time."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0].flatten(), row)
        out.append(torch.linalg.slogdet(jac.reshape(row.numel(), row.numel())).logabsdet)
    return torch.stack(out)


# --------------------------------------------------------------------------- bijections


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


def _coupling_vector():
    a, b = _randn(4, 4, seed=1), _randn(4, 4, seed=2)
    meta = lambda h: Affine(torch.sin(h @ a), torch.tanh(h @ b))  # noqa: E731
    return Coupling(torch.tensor([True, False, True, False]), meta), _randn(3, 4)


def _coupling_image():
    wa, wb = _randn(2, 2, 3, 3, seed=1), _randn(2, 2, 3, 3, seed=2)

    def meta(h):
        return Affine(torch.tanh(F.conv2d(h, wa, padding=1)), 0.5 * torch.sin(F.conv2d(h, wb, padding=1)))

    return Coupling(checkerboard(4, 4), meta), _randn(2, 2, 4, 4)


def _autoregressive(passes: int = 4):
    """Entry i's shift and log-scale are functions of the entries before i (strictly lower weights)."""
    a, b = _randn(4, 4, seed=1).tril(-1), _randn(4, 4, seed=2).tril(-1)
    meta = lambda x: Affine(torch.sin(x @ a.T), torch.tanh(x @ b.T))  # noqa: E731
    return Autoregressive(meta, passes), _randn(3, 4)


def _lu_conv(shape):
    torch.manual_seed(0)
    conv = InvertibleConv1x1(shape[0]).double()
    perturb(conv, 0.3)
    return conv(), _randn(2, *shape)


TRANSFORMS = {
    "affine": lambda: (Affine(_randn(4, seed=1), _randn(4, seed=2)), _randn(3, 4)),
    "additive": lambda: (Additive(_randn(4, seed=1)), _randn(3, 4)),
    "scale": lambda: (Scale(_randn(4, seed=2)), _randn(3, 4)),
    "coupling_vector": _coupling_vector,
    "coupling_image": _coupling_image,
    "autoregressive": _autoregressive,
    "permutation": lambda: (Permutation(torch.tensor([2, 0, 3, 1])), _randn(3, 4)),
    "reversal": lambda: (Permutation.reversal(3), _randn(2, 3, 2, 2)),
    "conv1x1_image": lambda: _lu_conv((3, 2, 3)),
    "conv1x1_vector": lambda: _lu_conv((4,)),
    "conv1x1_slogdet": lambda: (Conv1x1(_randn(3, 3, seed=1)), _randn(2, 3, 2, 2)),
    "squeeze": lambda: (Squeeze(), _randn(2, 2, 4, 6)),
    "reshape": lambda: (Reshape((2, 2, 2), (8,)), _randn(2, 2, 2, 2)),
    "split": lambda: (Split(Affine(_randn(2, 1, 1, seed=1), _randn(2, 1, 1, seed=2)), 2), _randn(2, 3, 2, 2)),
    "composed": lambda: (Composed(Squeeze(), Scale(_randn(8, 1, 1, seed=3)), Squeeze().inv,
                                  Conv1x1(_randn(2, 2, seed=4))), _randn(2, 2, 2, 2)),
    "inverse": lambda: (_autoregressive()[0].inv, _randn(3, 4)),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_transform_inverts_and_its_ladj_is_the_log_det_jacobian(name):
    t, x = TRANSFORMS[name]()
    y, ladj = t.call_and_ladj(x)
    assert ladj.shape == (len(x),)
    torch.testing.assert_close(t(x), y)
    torch.testing.assert_close(t.inverse(y), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.inv(y), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.inv.inv(x), y)
    torch.testing.assert_close(ladj, jacobian_logdet(t, x), atol=1e-6, rtol=1e-6)
    x_back, inverse_ladj = t.inverse_and_ladj(y)
    torch.testing.assert_close(inverse_ladj, jacobian_logdet(t.inverse, y), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(t.inv.call_and_ladj(y)[1], -ladj, atol=1e-6, rtol=1e-6)


def test_autoregressive_inverse_needs_one_pass_per_dimension():
    exact, x = _autoregressive(passes=4)
    short, _ = _autoregressive(passes=3)
    y = exact(x)
    torch.testing.assert_close(exact.inverse(y), x, atol=1e-12, rtol=0)
    assert (short.inverse(y) - x).abs().max() > 1e-3


def test_squeeze_moves_each_2x2_square_into_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = Squeeze()(x)
    assert y.shape == (1, 4, 2, 2)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]  # the top-left square


# --------------------------------------------------------------------------- every flow kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(2,), (30,), (1, 8, 8)])
def test_every_flow_inverts(kind, shape):
    flow = small_flow(kind, shape)
    x = _randn(4, *shape, seed=5)
    z, _ = flow.encode(x)
    assert z.shape == x.shape
    assert (z - x).abs().max() > 1e-2  # the flow does something
    torch.testing.assert_close(flow.decode(z), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.encode(flow.decode(x))[0], x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3,), (1, 4, 4)])
def test_every_flow_ladj_is_the_log_det_jacobian(kind, shape):
    flow = small_flow(kind, shape)
    x = _randn(2, *shape, seed=6)
    z, ladj = flow.encode(x)
    expected = jacobian_logdet(lambda v: flow.encode(v)[0], x)
    assert expected.abs().min() > 1e-3  # not volume preserving, so the check can fail
    torch.testing.assert_close(ladj, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flow.transform().inverse_and_ladj(z)[1], -ladj, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flow.log_prob(x), flow.prior_log_prob(z) + ladj)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3,), (1, 4, 4)])
def test_gradients_reach_every_parameter(kind, shape):
    flow = small_flow(kind, shape)
    flow.data_init(_randn(8, *shape, seed=7))
    (-flow(_randn(8, *shape, seed=8)).mean()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_a_fitted_flow_recovers_the_gaussian_nll(kind):
    """250 Adam steps on N(mu, Sigma), 2-D and correlated: the mean NLL on held-out points is the
    closed form's on the same points to 0.02 nats (the identity map, where the flows start, is
    KL = 1.25 nats off)."""
    mu = torch.tensor([1.0, -0.5])
    cov = torch.tensor([[1.0, 0.8], [0.8, 0.9]])
    gaussian = torch.distributions.MultivariateNormal(mu, cov)
    torch.manual_seed(0)
    flow = build_flow(kind, (2,), hidden=16, depth=1, **({"steps": 2} if kind == "glow" else {"layers": 2}))
    torch.manual_seed(1)
    batches, test = gaussian.sample((250, 128)), gaussian.sample((4096,))
    flow.data_init(batches[0])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for x in batches:
        loss = -flow(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        gap = float((-flow.log_prob(test)).mean() - (-gaussian.log_prob(test)).mean())
    assert -0.01 < gap < 0.02, gap


# --------------------------------------------------------------------------- actnorm and LU


def test_actnorm_init_standardizes_the_batch_per_channel():
    torch.manual_seed(0)
    for shape, dims in [((3,), [0]), ((2, 4, 4), [0, 2, 3])]:
        channels = (shape[0],) + (1,) * (len(shape) - 1)
        flow = NormalizingFlow(ActNorm(channels), shape).double()
        x = 3.0 + 2.0 * _randn(64, *shape) * torch.arange(1.0, shape[0] + 1).view(channels)
        flow.data_init(x)
        z = flow.encode(x)[0]
        torch.testing.assert_close(z.mean(dims), torch.zeros(shape[0], dtype=z.dtype), atol=1e-6, rtol=0)
        torch.testing.assert_close(z.var(dims, correction=0), torch.ones(shape[0], dtype=z.dtype), atol=1e-5, rtol=0)


def test_glow_actnorms_initialize_in_sequence_and_never_again():
    x, other = _randn(64, 3, seed=1) * 3 + 1, _randn(64, 3, seed=2)
    torch.manual_seed(0)
    flow = build_flow("glow", (3,), steps=2, **SMALL).double()
    perturb(flow)
    flow.data_init(x)
    first, second = flow.transform.layers
    h = first()(x)
    for step, inputs in [(first, x), (second, h)]:  # each actnorm standardizes what reaches it
        out = step.layers[0]()(inputs)
        torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=x.dtype), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.var(0, correction=0), torch.ones(3, dtype=x.dtype), atol=1e-5, rtol=0)
    state = {k: v.clone() for k, v in flow.state_dict().items()}
    flow.data_init(other)  # already initialized: a no-op
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in state.items())
    torch.manual_seed(1)
    restored = build_flow("glow", (3,), steps=2, **SMALL).double()
    restored.load_state_dict(state)
    restored.data_init(other)  # a resumed run does not initialize again
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in state.items())
    fresh = build_flow("glow", (3,), steps=2, **SMALL).double()
    fresh.data_init(other)
    assert not torch.equal(fresh.transform.layers[0].layers[0].shift, state["transform.layers.0.layers.0.shift"])


def test_lu_conv_logdet_is_slogdet_of_its_weight_times_positions():
    torch.manual_seed(0)
    conv = InvertibleConv1x1(4).double()
    perturb(conv, 0.3)
    weight = conv.weight()
    assert torch.linalg.slogdet(weight).logabsdet.abs() > 0.1
    x = _randn(2, 4, 3, 5)
    _, ladj = conv().call_and_ladj(x)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(weight).logabsdet.expand(2) * 15)
    torch.testing.assert_close(conv()(x), torch.einsum("ij,bjhw->bihw", weight, x))


# --------------------------------------------------------------------------- MADE, MAF, IAF


@pytest.mark.parametrize("degrees", ["cyclic", "random"])
def test_made_outputs_depend_only_on_earlier_inputs_in_its_order(degrees):
    torch.manual_seed(0)
    order = torch.tensor([2, 0, 4, 1, 3])
    made = MADE(5, outputs=2, hidden=12, depth=2, order=order, degrees=degrees).double()
    perturb(made, 0.5)
    jac = torch.autograd.functional.jacobian(made, _randn(1, 5))[0, :, 0]  # (2 * 5, 5)
    for block in jac.view(2, 5, 5):
        in_order = block[order][:, order]  # rows and columns in the autoregressive order
        assert torch.equal(in_order.triu(), torch.zeros_like(in_order))
        if degrees == "cyclic":  # every earlier input is connected
            assert (in_order.tril(-1).abs() > 0).sum() == 10


def test_maf_transform_jacobian_is_triangular_in_its_order():
    torch.manual_seed(0)
    layer = MAFLayer(4, hidden=8, depth=1, order=torch.tensor([3, 2, 1, 0])).double()
    perturb(layer, 0.5)
    jac = torch.autograd.functional.jacobian(lambda v: layer()(v[None])[0], _randn(4))
    assert torch.equal(jac.tril(-1), torch.zeros_like(jac))  # reversed order: upper triangular
    assert (jac.diagonal() > 0).all() and (jac.triu(1) != 0).sum() == 6  # and dense above


def _count_calls(flow: NormalizingFlow, fn) -> int:
    """Calls of the flow's conditioner networks while ``fn`` runs."""
    calls = []
    hooks = [net.register_forward_pre_hook(lambda *_: calls.append(1)) for net in flow.conditioners()]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


@pytest.mark.parametrize("kind, sample_nfe, density_calls", [("maf", 3 * 5, 3), ("iaf", 3, 3 * 5),
                                                              ("realnvp", 3, 3), ("nice", 3, 3)])
def test_network_evaluations_of_sampling_and_density(kind, sample_nfe, density_calls):
    """MAF samples one dimension per pass (D passes a layer) and IAF in one; density the reverse."""
    flow = small_flow(kind, (5,), layers=3)
    z = flow.prior((5,), 7, _gen()).double()
    out = sample_with(Setting("invert"), flow, z)
    assert (out.nfe, out.rounds) == (sample_nfe, sample_nfe)
    assert _count_calls(flow, lambda: flow.log_prob(out.x)) == density_calls


def test_multiscale_flows_count_one_evaluation_per_coupling():
    realnvp = small_flow("realnvp", (1, 8, 8), layers=2, scales=2)  # 2 + 2 couplings, then 2 at the last scale
    glow = small_flow("glow", (1, 8, 8), steps=3, levels=2)
    z = _randn(3, 1, 8, 8)
    assert sample_with(Setting("invert"), realnvp, z).nfe == 6
    assert sample_with(Setting("invert"), glow, z).nfe == 6


# --------------------------------------------------------------------------- sampling, likelihood, checkpoints


def test_temperature_scales_the_prior_draw():
    flow = small_flow("realnvp", (3,))
    x = _randn(4, 3)
    zero = sample_with(Setting("invert", None, (("temperature", 0.0),)), flow, x).x
    torch.testing.assert_close(zero, flow.decode(torch.zeros_like(x)))
    assert zero.abs().min() > 1e-3  # decode(0) is not 0: the flow is not the identity
    half = sample_with(Setting("invert", None, (("temperature", 0.5),)), flow, x).x
    torch.testing.assert_close(half, flow.decode(0.5 * x))
    torch.testing.assert_close(flow.sample(4, _gen(3), temperature=0.0), flow.decode(torch.zeros_like(x)))
    torch.testing.assert_close(flow.sample(4, _gen(3)), flow.decode(flow.prior((3,), 4, _gen(3)).double()))
    assert get_sampler("invert").needs <= NormalizingFlow.provides


def test_exact_likelihood_dequantizes_like_the_ode_estimator():
    levels, delta = 17, 2.0 / 16
    flow = small_flow("glow", (1, 4, 4))
    x = torch.randint(0, levels, (5, 1, 4, 4), generator=_gen(1)).double() * delta - 1
    spec = get_likelihood("exact")
    assert spec.needs == {"log_prob"}
    nll = spec.fn(flow, x, generator=_gen(2), levels=levels)
    u = (torch.rand(x.shape, generator=_gen(2), dtype=torch.float64) - 0.5) * delta
    with torch.no_grad():
        expected = -flow.log_prob(x + u) - 16 * math.log(delta)
    torch.testing.assert_close(nll, expected)
    with torch.no_grad():
        torch.testing.assert_close(spec.fn(flow, x, generator=_gen(2)), -flow.log_prob(x))


@pytest.mark.parametrize("kind, shape", [("nice", (2,)), ("realnvp", (1, 4, 4)), ("glow", (1, 4, 4)),
                                         ("maf", (3,)), ("iaf", (3,))])
def test_the_family_round_trips_through_safetensors(kind, shape, tmp_path):
    spec = ModelSpec(kind, shape, family="normalizing_flow", network_kwargs=SMALL)
    assert spec.provides() == NormalizingFlow.provides
    torch.manual_seed(0)
    model = spec.build()
    perturb(model)
    x = torch.randn(6, *shape)
    model.data_init(x)
    save_model(model, spec, tmp_path)
    torch.manual_seed(1)  # another initialization: everything must come from the file
    loaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    actnorms = [m for m in loaded.modules() if isinstance(m, ActNorm)]
    assert all(bool(m.initialized) for m in actnorms) and (kind == "glow") == bool(actnorms)


def test_maximum_likelihood_objective_dequantizes_and_backpropagates():
    torch.manual_seed(0)
    flow = build_flow("glow", (1, 4, 4), **SMALL)
    objective = make_objective("maximum_likelihood", flow, {}, levels=17)
    assert objective.needs == {"data"}
    x1 = torch.randint(0, 17, (8, 1, 4, 4)).float() / 8 - 1
    objective.data_init(x1)
    assert all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))
    torch.manual_seed(5)
    loss = objective.loss(flow, SimpleNamespace(x1=x1))
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in flow.parameters())
    torch.manual_seed(5)
    u = (torch.rand(x1.shape, dtype=torch.float64).float() - 0.5) / 8
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), -flow.log_prob(x1 + u).mean() / 16)
    with pytest.raises(ValueError, match="levels"):
        make_objective("maximum_likelihood", flow, {}, levels=1)
    with pytest.raises(ValueError, match="model"):
        make_objective("maximum_likelihood", torch.nn.Linear(2, 2), {})


@pytest.mark.parametrize("kind, shape, kwargs, key", [
    ("realnvp", (2,), {"layrs": 3}, "layrs"),
    ("glow", (2,), {"levels": 2}, "levels"),
    ("realnvp", (4,), {"scales": 2}, "scales"),
    ("maf", (2,), {"hidden": 0}, "hidden"),
    ("nice", (2,), {"depth": 1.5}, "depth"),
    ("iaf", (2,), {"layers": True}, "layers"),
    ("glow", (1, 6, 6), {"levels": 2}, "levels"),
    ("realnvp", (1, 6, 6), {"scales": 3}, "scales"),
    ("nice", (1, 8, 8), {"scales": 2}, "scales"),
    ("realnvp", (2, 3), {}, "data_shape"),
    ("maf", (1,), {}, "data_shape"),
    ("flowy", (2,), {}, "flowy"),
])
def test_bad_settings_name_the_key(kind, shape, kwargs, key):
    with pytest.raises(ValueError, match=key):
        build_flow(kind, shape, **kwargs)
