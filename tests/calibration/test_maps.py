"""Temperature scaling, vector scaling and the choice between maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from calibration.maps import IdentityMap, fit_best_map, map_from_dict
from calibration.synthetic import sample_classifier_outputs
from calibration.temperature import TemperatureScaling, fit_temperature_by_search
from calibration.vector_scaling import (
    VectorScaling,
    fit_vector_scaling_by_gradient_descent,
    vector_scaling_objective,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("overconfidence", [0.7, 1.0, 2.0])
def test_temperature_recovers_the_true_temperature(overconfidence: float) -> None:
    # Labels follow softmax(z) while the model reports overconfidence * z, so the NLL is
    # minimised at T = overconfidence. The MLE of beta = 1/T has standard error
    # 1 / sqrt(n * I), with Fisher information I = mean over examples of the variance of the
    # scaled logits under the model's own softmax (the NLL's second derivative in beta).
    n = 4000
    logits, labels = sample_classifier_outputs(n, 10, generator(0), overconfidence=overconfidence)
    fitted = TemperatureScaling.fit(logits, labels)
    beta = 1.0 / fitted.temperature
    probs = (beta * logits).softmax(dim=1)
    variance = (probs * logits**2).sum(1) - (probs * logits).sum(1) ** 2  # [N]
    standard_error = 1.0 / math.sqrt(n * float(variance.mean()))
    assert abs(beta - 1.0 / overconfidence) <= 4 * standard_error


def test_lbfgs_fit_agrees_with_golden_section_reference() -> None:
    logits, labels = sample_classifier_outputs(1000, 6, generator(1), overconfidence=1.7)
    lbfgs = TemperatureScaling.fit(logits, labels).temperature
    reference = fit_temperature_by_search(logits, labels)
    assert lbfgs == pytest.approx(reference, rel=1e-6)


def test_temperature_never_makes_in_sample_nll_worse_than_the_raw_model() -> None:
    logits, labels = sample_classifier_outputs(300, 5, generator(2), overconfidence=3.0)
    fitted = TemperatureScaling.fit(logits, labels)
    assert F.cross_entropy(fitted.calibrated_logits(logits), labels) < F.cross_entropy(
        logits, labels
    )


def test_separable_calibration_set_keeps_temperature_finite() -> None:
    labels = torch.arange(4)
    logits = 5.0 * F.one_hot(labels, 4).to(torch.float64)  # every example right by a margin
    fitted = TemperatureScaling.fit(logits, labels)
    # The NLL keeps falling as T -> 0; the fit sharpens but stays within the allowed range.
    assert 1e-2 <= fitted.temperature < 1.0
    assert torch.isfinite(fitted.apply(logits)).all()


def test_maps_round_trip_through_json() -> None:
    logits, labels = sample_classifier_outputs(200, 4, generator(3), overconfidence=1.5)
    maps = [
        IdentityMap(),
        TemperatureScaling.fit(logits, labels),
        VectorScaling.fit(logits, labels),
    ]
    for fitted in maps:
        restored = map_from_dict(json.loads(json.dumps(fitted.to_dict())))
        assert type(restored) is type(fitted)
        assert torch.equal(restored.apply(logits), fitted.apply(logits))


def test_apply_returns_probabilities() -> None:
    logits, _ = sample_classifier_outputs(50, 3, generator(4))
    probs = TemperatureScaling(2.0).apply(logits)
    assert torch.allclose(probs.sum(dim=1), torch.ones(50, dtype=torch.float64))
    assert torch.allclose(probs, (logits / 2.0).softmax(dim=1))


def test_vector_scaling_lbfgs_reaches_the_unique_optimum() -> None:
    logits, labels = sample_classifier_outputs(300, 4, generator(5), overconfidence=1.5)
    fitted = VectorScaling.fit(logits, labels)
    # First-order optimality: the gradient of the strictly convex objective vanishes.
    scale = torch.tensor(fitted.scale, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(fitted.bias, dtype=torch.float64, requires_grad=True)
    vector_scaling_objective(logits, labels, scale, bias, 1e-3).backward()
    assert float(torch.cat([scale.grad, bias.grad]).abs().max()) < 1e-6
    # ... and the slow reference (plain gradient descent) lands on the same point.
    reference = fit_vector_scaling_by_gradient_descent(logits, labels, steps=4000, lr=0.5)
    assert fitted.scale == pytest.approx(reference.scale, abs=1e-4)
    assert fitted.bias == pytest.approx(reference.bias, abs=1e-4)


def test_vector_scaling_undoes_a_class_bias_that_temperature_cannot() -> None:
    bias = torch.tensor([2.0, 0.0, -2.0, 0.0], dtype=torch.float64)
    train_logits, train_labels = sample_classifier_outputs(
        3000, 4, generator(6), overconfidence=1.5, class_bias=bias
    )
    test_logits, test_labels = sample_classifier_outputs(
        3000, 4, generator(7), overconfidence=1.5, class_bias=bias
    )
    vector = VectorScaling.fit(train_logits, train_labels)
    temperature = TemperatureScaling.fit(train_logits, train_labels)
    vector_nll = F.cross_entropy(vector.calibrated_logits(test_logits), test_labels)
    temperature_nll = F.cross_entropy(temperature.calibrated_logits(test_logits), test_labels)
    assert vector_nll < temperature_nll
    # The optimum is scale = 1/1.5 and bias = the true bias up to a common shift (softmax
    # ignores it). Standard errors come from the observed Fisher information: the Hessian
    # of the summed NLL at the fit; the shift is removed by centring the offsets.
    params = torch.tensor(vector.scale + vector.bias, dtype=torch.float64)

    def summed_nll(flat: torch.Tensor) -> torch.Tensor:
        scale, offset = flat[:4], flat[4:]
        return F.cross_entropy(train_logits * scale + offset, train_labels, reduction="sum")

    covariance = torch.linalg.pinv(torch.autograd.functional.hessian(summed_nll, params))
    centring = torch.eye(4, dtype=torch.float64) - 1.0 / 4  # [4, 4]
    centred_bias = centring @ params[4:]
    centred_se = torch.diagonal(centring @ covariance[4:, 4:] @ centring.T).sqrt()
    assert bool(((centred_bias - centring @ bias).abs() <= 4 * centred_se).all())
    scale_se = torch.diagonal(covariance[:4, :4]).sqrt()
    assert bool(((params[:4] - 1 / 1.5).abs() <= 4 * scale_se).all())


def test_best_map_picks_vector_scaling_when_classes_are_biased() -> None:
    bias = torch.tensor([1.5, 0.0, -1.5, 0.5, 0.0], dtype=torch.float64)
    logits, labels = sample_classifier_outputs(
        2000, 5, generator(8), overconfidence=1.5, class_bias=bias
    )
    selection = fit_best_map(logits, labels)
    assert selection.map.kind == "vector_scaling"
    assert selection.cv_nll["vector_scaling"] < selection.cv_nll["temperature"]


def test_best_map_does_not_reward_overfitting_on_small_sets() -> None:
    # Only a temperature is wrong. In-sample, vector scaling's 2C parameters always fit
    # better; held out, they do not, and cross-validation must see that.
    logits, labels = sample_classifier_outputs(150, 10, generator(9), overconfidence=2.0)
    vector, temperature = VectorScaling.fit(logits, labels), TemperatureScaling.fit(logits, labels)
    in_sample_vector = F.cross_entropy(vector.calibrated_logits(logits), labels)
    in_sample_temperature = F.cross_entropy(temperature.calibrated_logits(logits), labels)
    assert in_sample_vector < in_sample_temperature
    selection = fit_best_map(logits, labels)
    assert selection.map.kind == "temperature"
    assert selection.cv_nll["identity"] > selection.cv_nll["temperature"]


def test_best_map_is_deterministic_for_a_seed() -> None:
    logits, labels = sample_classifier_outputs(200, 4, generator(10), overconfidence=1.3)
    first, second = fit_best_map(logits, labels, seed=3), fit_best_map(logits, labels, seed=3)
    assert first.cv_nll == second.cv_nll
    assert first.map == second.map


def test_leave_one_out_when_there_are_fewer_examples_than_folds() -> None:
    logits, labels = sample_classifier_outputs(3, 3, generator(11))
    selection = fit_best_map(logits, labels, n_folds=5)
    assert set(selection.cv_nll) == {"identity", "temperature", "vector_scaling"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TemperatureScaling(0.0), "positive"),
        (lambda: TemperatureScaling(float("inf")), "positive"),
        (lambda: VectorScaling((1.0, 1.0), (0.0,)), "same non-zero length"),
        (lambda: map_from_dict({"kind": "platt"}), "unknown calibration map kind 'platt'"),
        (lambda: TemperatureScaling.from_dict({"kind": "identity"}), "not a temperature map"),
        (
            lambda: TemperatureScaling.fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
            "calibration set is empty",
        ),
        (lambda: fit_best_map(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long)), "at least 2"),
        (
            lambda: fit_best_map(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), n_folds=1),
            "n_folds",
        ),
        (
            lambda: fit_best_map(
                torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), candidates=("isotonic",)
            ),
            "unknown map candidates",
        ),
        (lambda: VectorScaling((1.0,) * 3, (0.0,) * 3).apply(torch.zeros(2, 4)), "3 classes"),
        (lambda: TemperatureScaling(1.0).apply(torch.zeros(4)), r"shape \[N, C\]"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
