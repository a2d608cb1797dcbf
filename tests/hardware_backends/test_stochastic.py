"""Stochastic computing arithmetic and the stochastic backend's two modes.

Statistical checks use 5 standard errors of the estimator they test (binomial streams have
closed-form variances), so they fail only when the simulation departs from the math.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hardware_backends.base import Runner
from hardware_backends.energy import STOCHASTIC_BITSTREAM_PLACEHOLDER
from hardware_backends.stochastic import (
    StochasticBackend,
    expected_entropy,
    gaussian_weight_samples,
    mutual_information,
    predictive_entropy,
    predictive_probabilities,
)
from hardware_backends.stochastic_computing import (
    BitSource,
    StochasticMatmul,
    StreamConfig,
    decode,
    encode,
    reference_sc_matvec,
    sc_matvec,
    xnor,
)
from models.lru import LRUConfig, LRUModel
from models.selective import SelectiveConfig, SelectiveModel

LENGTHS = [64, 256, 1024, 4096]


def _uniform(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _product_rmse(kind: str, length: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pair squared errors of XNOR products of streams from one source: [M]."""
    source = BitSource(kind, length, seed=1)
    bits_a = encode(a, source.uniforms(0, tuple(a.shape)))
    bits_b = encode(b, source.uniforms(1, tuple(b.shape)))
    return (decode(xnor(bits_a, bits_b)) - a * b) ** 2


# --- bitstream arithmetic ----------------------------------------------------------------------


def test_bipolar_encoding_is_unbiased() -> None:
    values = torch.tensor([-1.0, -0.6, 0.0, 0.3, 0.95])
    m, length = 2000, 128
    source = BitSource("random", length, seed=0)
    decoded = decode(encode(values.expand(m, -1), source.uniforms(0, (m, 5))))  # [M, 5]
    se = torch.sqrt((1 - values**2) / (length * m)).clamp_min(1e-9)
    assert torch.all((decoded.mean(0) - values).abs() <= 5 * se)


def test_xnor_product_has_binomial_mean_and_variance() -> None:
    m, length = 4000, 128
    for a, b in [(0.5, 0.5), (-0.8, 0.3), (0.9, -0.9), (0.0, 0.7)]:
        source = BitSource("random", length, seed=2)
        bits_a = encode(torch.full((m,), a), source.uniforms(0, (m,)))
        bits_b = encode(torch.full((m,), b), source.uniforms(1, (m,)))
        est = decode(xnor(bits_a, bits_b))  # [M]
        var = (1 - (a * b) ** 2) / length
        assert abs(float(est.mean()) - a * b) <= 5 * math.sqrt(var / m)
        centred = est - est.mean()
        var_se = math.sqrt(float((centred**4).mean() - (centred**2).mean() ** 2) / m)
        assert abs(float(est.var()) - var) <= 5 * var_se


def test_error_falls_as_one_over_sqrt_length() -> None:
    m = 2000
    a, b = _uniform((m,), 3), _uniform((m,), 4)
    log_rmse = []
    for length in LENGTHS:
        sq = _product_rmse("random", length, a, b)
        mse = float(sq.mean())
        theory = float((1 - (a * b) ** 2).mean()) / length  # exact E[MSE] for these pairs
        assert abs(mse - theory) <= 5 * float(sq.std()) / math.sqrt(m)
        log_rmse.append(0.5 * math.log(mse))
    slope = (log_rmse[-1] - log_rmse[0]) / (math.log(LENGTHS[-1]) - math.log(LENGTHS[0]))
    # Each log-RMSE has a standard error of about 1/(2·sqrt(m/2)) (squared errors are ~χ²₁
    # scaled), so the slope over a factor 64 in N is known to ±5·sqrt(2)/(sqrt(2m)·ln 64).
    tolerance = 5 * math.sqrt(2) / (math.sqrt(2 * m) * math.log(64))
    assert abs(slope + 0.5) <= tolerance


def test_low_discrepancy_streams_beat_independent_ones() -> None:
    m = 2000
    a, b = _uniform((m,), 5), _uniform((m,), 6)
    sobol = [math.sqrt(float(_product_rmse("sobol", n, a, b).mean())) for n in LENGTHS]
    random = [math.sqrt(float(_product_rmse("random", n, a, b).mean())) for n in LENGTHS]
    for s, r in zip(sobol, random, strict=True):
        assert s < r / 3
    slope = (math.log(sobol[-1]) - math.log(sobol[0])) / math.log(LENGTHS[-1] / LENGTHS[0])
    assert slope < -0.75  # closer to 1/N than to 1/sqrt(N)


@pytest.mark.parametrize("accumulation", ["count", "mux"])
@pytest.mark.parametrize("length", [8, 100, 256])
def test_sobol_matvec_equals_packed_bit_reference_exactly(length: int, accumulation: str) -> None:
    x, w = _uniform((6, 5), 7), _uniform((4, 5), 8)  # lengths not a multiple of 8 included
    fast = sc_matvec(x, w, BitSource("sobol", length, seed=9), accumulation)
    slow = reference_sc_matvec(x, w, BitSource("sobol", length, seed=9), accumulation)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)
    # Memory-bounded: rows in chunks of one (4 outputs x 5 inputs = 20 entries) change nothing.
    chunked = sc_matvec(x, w, BitSource("sobol", length, seed=9), accumulation, 20)
    torch.testing.assert_close(chunked, fast, rtol=0, atol=0)


def _expected_moments(x: torch.Tensor, w: torch.Tensor, length: int, accumulation: str):
    """Exact mean [O], variance [O] and covariance of outputs 0 and 1 of one row's estimate.

    In bipolar form a product bit is A·W_i with A = ±1 from x's stream (shared by the
    outputs) and W_i = ±1 from w_i's own stream; E[A·W_i·A·W_k] = w_i·w_k since A² = 1.
    """
    n = x.shape[0]
    products = w * x  # [O, n]
    if accumulation == "count":
        mean = products.sum(1)
        var = (1 - products**2).sum(1) / length
        cov = float((w[0] * w[1] * (1 - x**2)).sum()) / length
    else:  # each output bit takes one input at random: bits iid with bipolar mean m
        m = products.mean(1)
        mean, var = n * m, n**2 * (1 - m**2) / length
        cov = n**2 * (float((w[0] * w[1]).mean()) - float(m[0] * m[1])) / length
    return mean, var, cov


def _assert_matches_moments(est: torch.Tensor, mean, var, cov) -> None:
    """est [R, O]: R independent estimates of one row; 5-standard-error checks."""
    rows = est.shape[0]
    est = est.double()
    assert torch.all((est.mean(0) - mean).abs() <= 5 * torch.sqrt(var / rows))
    # Sample (co)variances of ~normal estimates: standard error ≈ scale·sqrt(2/(R − 1)).
    assert torch.all((est.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (rows - 1)))
    centred = est - est.mean(0)
    sample_cov = float((centred[:, 0] * centred[:, 1]).sum()) / (rows - 1)
    cov_se = math.sqrt(float(var[0] * var[1]) + cov**2) / math.sqrt(rows - 1)
    assert abs(sample_cov - cov) <= 5 * cov_se


@pytest.mark.parametrize("accumulation", ["count", "mux"])
def test_random_streams_give_the_adders_mean_variance_and_output_correlation(
    accumulation: str,
) -> None:
    n, length = 6, 64
    x = _uniform((n,), 10)
    w = torch.cat([_uniform((1, n), 11), _uniform((1, n), 11) * 0.8, _uniform((1, n), 12)])
    mean, var, cov = _expected_moments(x, w.double(), length, accumulation)
    # Fast path: every row gets fresh streams, so identical rows are independent trials.
    fast = sc_matvec(x.expand(20_000, n), w, BitSource("random", length, 13), accumulation)
    _assert_matches_moments(fast, mean, var, cov)
    # The same law when the rows run in memory-bounded chunks of 100.
    chunks = sc_matvec(x.expand(20_000, n), w, BitSource("random", length, 15), accumulation, 1800)
    _assert_matches_moments(chunks, mean, var, cov)
    # Reference path: the same law from explicitly drawn, packed bits.
    slow = reference_sc_matvec(x.expand(600, n), w, BitSource("random", length, 14), accumulation)
    _assert_matches_moments(slow, mean, var, cov)


def test_low_discrepancy_matvec_beats_independent_streams() -> None:
    x, w = _uniform((200, 16), 15), _uniform((8, 16), 16)
    exact = x @ w.T
    for length in (64, 1024):
        errors = {
            kind: float(
                (sc_matvec(x, w, BitSource(kind, length, 0), "count") - exact).pow(2).mean()
            )
            for kind in ("random", "sobol")
        }
        assert errors["sobol"] < errors["random"] / 4


def test_stochastic_matmul_converges_to_the_float_product() -> None:
    weight, bias = _uniform((16, 32), 13) * 3, _uniform((16,), 14)
    x = _uniform((64, 32), 15) * 5
    exact = F.linear(x, weight, bias)
    errors = []
    for length in (64, 4096):
        config = StreamConfig(length=length)
        matmul = StochasticMatmul(weight, config, BitSource("random", length, seed=0))
        errors.append(float((matmul(x, bias) - exact).norm() / exact.norm()))
        assert matmul.macs == 64 * 32 * 16
    assert errors[1] < errors[0] / 4  # sqrt(64) = 8 in theory


def test_stream_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="stream length"):
        StreamConfig(length=0)
    with pytest.raises(ValueError, match="at most 4096"):
        StreamConfig(length=8192)
    with pytest.raises(ValueError, match="source"):
        StreamConfig(source="halton")
    with pytest.raises(ValueError, match="accumulation"):
        StreamConfig(accumulation="tree")


# --- uncertainty from samples ------------------------------------------------------------------


def test_mutual_information_separates_disagreement_from_ambiguity() -> None:
    confident = torch.tensor([[20.0, 0.0], [20.0, 0.0]])  # [S=2, C=2], agreeing
    disagree = torch.tensor([[20.0, 0.0], [0.0, 20.0]])  # confident, opposite
    ambiguous = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # both 50/50
    assert float(mutual_information(confident)) == pytest.approx(0.0, abs=1e-6)
    assert float(mutual_information(disagree)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(mutual_information(ambiguous)) == pytest.approx(0.0, abs=1e-6)
    assert float(expected_entropy(ambiguous)) == pytest.approx(math.log(2), abs=1e-6)

    logits = torch.randn(8, 5, 10, generator=torch.Generator().manual_seed(0)) * 3  # [S, B, C]
    torch.testing.assert_close(
        predictive_entropy(logits), expected_entropy(logits) + mutual_information(logits)
    )
    torch.testing.assert_close(predictive_probabilities(logits).sum(-1), torch.ones(5))
    with pytest.raises(ValueError, match="sample"):
        mutual_information(torch.ones(3))


# --- the backend: sampling mode ----------------------------------------------------------------


def _lru() -> LRUModel:
    torch.manual_seed(0)
    return LRUModel(LRUConfig(d_model=16, d_state=12, n_layers=2)).eval()


def _selective_tokens() -> SelectiveModel:
    # Untied head: with tied weights only the head's matmul is sampled, the embedding lookup
    # stays digital, and the per-sample reference below would need to untie them.
    torch.manual_seed(0)
    cfg = SelectiveConfig(
        vocab_size=20, d_output=20, d_model=16, d_state=4, n_layers=1, tie_embeddings=False
    )
    return SelectiveModel(cfg).eval()


def _inputs(model) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if model.input_kind == "tokens":
        return torch.randint(0, 20, (3, 5), generator=generator)
    return torch.rand(3, 5, 8, generator=generator) * 16


def test_zero_noise_samples_all_equal_the_float_model() -> None:
    model = _lru()
    runner = StochasticBackend().prepare(
        model, model_key="lru/1", options={"samples": 4, "relative_std": 0.0}
    )
    assert isinstance(runner, Runner) and runner.samples == 4
    x = _inputs(model)
    with torch.no_grad():
        expected, _ = model(x)
    logits, state, usage = runner.run(x)
    assert logits.shape == (4, 3, 5, 10)
    for s in range(4):
        torch.testing.assert_close(logits[s], expected, rtol=1e-5, atol=1e-5)
    assert all(t.shape[0] == 12 for t in state.values())  # S·B rows
    assert usage.macs == 4 * model.macs_per_step()["dense_macs"] * 3 * 5
    step_logits, _, _ = runner.step(x[:, 0], runner.init_state(3))
    assert step_logits.shape == (4, 3, 10)


@pytest.mark.parametrize("factory", [_lru, _selective_tokens], ids=["lru", "selective"])
@pytest.mark.parametrize("noise", ["gaussian", "pcm"])
def test_each_chain_is_the_model_with_its_own_weight_sample(factory, noise: str) -> None:
    model = factory()
    options = {"samples": 3, "noise": noise, "seed": 5}
    runner = StochasticBackend().prepare(model, model_key="m/1", options=options)
    x = _inputs(model)
    logits, _, _ = runner.run(x)  # [S, B, T, C]
    stepped, _, _ = runner.run_by_steps(x)
    torch.testing.assert_close(stepped, logits, rtol=1e-4, atol=1e-4)
    # Slow reference: one plain copy of the model per sample, weights loaded in.
    for s in range(3):
        chain = copy.deepcopy(model)
        parameters = dict(chain.named_parameters())
        with torch.no_grad():
            for name, engine in runner.engines.items():
                parameters[name].copy_(engine.weights[s])
            expected, _ = chain(x)
        torch.testing.assert_close(logits[s], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits[0], logits[1])


def test_sequences_states_concatenate_into_one_batch() -> None:
    # Each sequence owns S consecutive state rows, so a server can batch sessions by
    # concatenating their states and split the result back by rows.
    model = _lru()
    runner = StochasticBackend().prepare(model, model_key="lru/1", options={"samples": 3})
    x = _inputs(model)  # [3, 5, 8]
    alone = [runner.run(x[b : b + 1, :4]) for b in range(3)]
    state = {name: torch.cat([a[1][name] for a in alone]) for name in alone[0][1]}
    together, _, _ = runner.step(x[:, 4], state)  # [S, 3, C]
    for b in range(3):
        single, _, _ = runner.step(x[b : b + 1, 4], alone[b][1])  # [S, 1, C]
        torch.testing.assert_close(together[:, b : b + 1], single, rtol=1e-5, atol=1e-5)


def test_gaussian_weight_noise_has_the_requested_relative_std() -> None:
    weight = _uniform((32, 64), 16) * 2
    samples = gaussian_weight_samples(weight, 50, 0.1, torch.Generator().manual_seed(0))
    noise = samples - weight
    expected = 0.1 * float(weight.abs().max())
    assert abs(float(noise.std()) - expected) <= 5 * expected / math.sqrt(2 * noise.numel())


def test_same_seed_same_samples() -> None:
    model = _lru()
    backend = StochasticBackend()
    a = backend.prepare(model, model_key="lru/1", options={"samples": 2, "seed": 3})
    b = backend.prepare(model, model_key="lru/1", options={"samples": 2, "seed": 3})
    c = backend.prepare(model, model_key="lru/1", options={"samples": 2, "seed": 4})
    x = _inputs(model)
    assert torch.equal(a.run(x)[0], b.run(x)[0])
    assert not torch.equal(a.run(x)[0], c.run(x)[0])


# --- the backend: bitstream mode ---------------------------------------------------------------


def test_bitstream_mode_approaches_the_float_model_with_longer_streams() -> None:
    model = _lru()
    x = _inputs(model)
    with torch.no_grad():
        expected, _ = model(x)
    errors = []
    for length in (64, 4096):
        options = {"mode": "bitstream", "stream_length": length, "source": "sobol"}
        runner = StochasticBackend().prepare(model, model_key="lru/1", options=options)
        assert runner.samples == 1
        logits, _, usage = runner.run(x)
        assert logits.shape == expected.shape
        errors.append(float((logits - expected).norm() / expected.norm()))
    assert errors[1] < errors[0] / 4
    dense = model.macs_per_step()["dense_macs"] * 3 * 5
    placeholder = STOCHASTIC_BITSTREAM_PLACEHOLDER
    assert usage.energy_joules == pytest.approx(dense * placeholder.mac_joules, rel=1e-9)
    assert placeholder.source.startswith("placeholder")  # labelled for what it is


def test_options_that_do_not_fit_the_mode_are_refused() -> None:
    backend, model = StochasticBackend(), _lru()
    cases = [
        ({"stream_length": 256}, "stream_length"),
        ({"mode": "bitstream", "samples": 4}, "samples"),
        ({"noise": "pcm", "relative_std": 0.1}, "relative_std"),
        ({"t_inference": 10.0}, "t_inference"),
        ({"samples": 0}, "samples"),
        ({"mode": "bitstream", "source": "halton"}, "source"),
        ({"sample": 3}, "sample"),
    ]
    for options, word in cases:
        with pytest.raises(ValueError, match=word):
            backend.prepare(model, model_key="lru/1", options=options)
