"""`epistemic` lives on the same calibrated basis as `entropy`: 0 <= epistemic <= entropy.

Sampled logits [S, N, C] are answered with the calibration map applied to their predictive
mean; the epistemic part runs every sample through that same map. With the raw softmax (or
the identity map) it is exactly the mutual information between label and sample.
"""

from __future__ import annotations

import torch

from calibration.maps import IdentityMap
from calibration.temperature import TemperatureScaling
from calibration.vector_scaling import VectorScaling
from hardware_backends.stochastic import mutual_information
from service.dataplane.predictions import _entropy, calibration_inputs, epistemic_part

CLASSES = 10


def _sampled_logits(seed: int, samples: int = 16, rows: int = 400) -> torch.Tensor:
    """[S, N, C]: rows from confident to uncertain, with samples that agree or disagree."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(1, rows, CLASSES, generator=g) * torch.linspace(0.1, 8.0, rows).view(
        1, rows, 1
    )
    spread = torch.rand(1, rows, 1, generator=g) * 6.0
    return centre + spread * torch.randn(samples, rows, CLASSES, generator=g)


MAPS = [
    None,
    IdentityMap(),
    TemperatureScaling(0.4),  # sharpens: the raw MI often exceeds the calibrated entropy
    TemperatureScaling(2.5),
    VectorScaling(tuple(torch.linspace(0.3, 2.0, CLASSES).tolist()), (0.5,) * CLASSES),
]


def test_epistemic_never_exceeds_the_entropy_of_the_answer_under_any_map() -> None:
    for seed in range(3):
        log_mean, samples = calibration_inputs(_sampled_logits(seed))  # [N, C], [S, N, C]
        n = log_mean.shape[0]
        for calibration_map in MAPS:
            probs = (
                torch.softmax(log_mean, dim=-1)
                if calibration_map is None
                else calibration_map.apply(log_mean)
            )  # [N, C] the answer
            epistemic = epistemic_part(probs, samples, [calibration_map] * n)
            entropy = _entropy(probs)
            assert epistemic.shape == (n,)
            assert bool((epistemic >= 0).all())
            assert bool((epistemic <= entropy).all())
            assert float(epistemic.max()) > 1e-2  # the samples do disagree on some rows


def test_raw_and_identity_answers_report_the_mutual_information() -> None:
    sampled = _sampled_logits(7)
    log_mean, samples = calibration_inputs(sampled)
    n = log_mean.shape[0]
    sample_probs = torch.softmax(sampled.double(), dim=-1)  # [S, N, C]
    mean_entropy = _entropy(sample_probs.reshape(-1, CLASSES)).view(sampled.shape[0], -1)
    expected = _entropy(sample_probs.mean(dim=0)) - mean_entropy.mean(dim=0)  # H(mean) - mean H
    probs = torch.softmax(log_mean, dim=-1)
    for calibration_map in (None, IdentityMap()):
        got = epistemic_part(probs, samples, [calibration_map] * n)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


def test_the_raw_mutual_information_would_exceed_a_sharpened_entropy() -> None:
    # What the calibrated basis fixes: the raw samples' MI set beside a sharpened answer.
    sampled = _sampled_logits(3)
    log_mean, samples = calibration_inputs(sampled)
    sharpen = TemperatureScaling(0.4)
    probs = sharpen.apply(log_mean)
    raw_mi = mutual_information(sampled.double()).double()
    assert bool((raw_mi > _entropy(probs) + 1e-6).any())
    assert bool((epistemic_part(probs, samples, [sharpen] * len(probs)) <= _entropy(probs)).all())


def test_rows_use_their_own_maps() -> None:
    sampled = _sampled_logits(11, rows=6)
    log_mean, samples = calibration_inputs(sampled)
    maps = [None, TemperatureScaling(0.5), None, TemperatureScaling(2.0), IdentityMap(), None]
    probs = torch.stack(
        [
            torch.softmax(log_mean[i], dim=-1) if m is None else m.apply(log_mean[i : i + 1])[0]
            for i, m in enumerate(maps)
        ]
    )
    together = epistemic_part(probs, samples, maps)
    for i, m in enumerate(maps):
        alone = epistemic_part(probs[i : i + 1], samples[:, i : i + 1], [m])
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-12, rtol=0)
