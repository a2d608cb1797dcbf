"""Seeded synthetic classifier outputs with a known truth, for tests and benchmarks.

`sample_classifier_outputs`: each example has true class logits z ~ N(0, logit_scale^2 I)
(plus an optional per-class bias) and a label drawn from softmax(z + bias), so the true
conditional distribution is known. The "model" reports `overconfidence * z` without the
bias: temperature scaling should recover T = overconfidence, and vector scaling can also
undo the bias. Examples are i.i.d., hence exchangeable, as split conformal assumes.

`sample_evidence_streams`: a sequence classifier that accumulates noisy evidence for the
true class step by step, so its probabilities sharpen over time (for early decisions).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_classifier_outputs(
    n: int,
    num_classes: int,
    generator: torch.Generator,
    logit_scale: float = 3.0,
    overconfidence: float = 1.0,
    class_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Model logits [n, C] (float64) and labels [n] drawn from the true distribution."""
    true_logits = logit_scale * torch.randn(
        n, num_classes, generator=generator, dtype=torch.float64
    )
    label_logits = true_logits if class_bias is None else true_logits + class_bias  # [n, C]
    labels = torch.multinomial(label_logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return overconfidence * true_logits, labels  # [n, C], [n]


def sample_evidence_streams(
    n: int,
    num_steps: int,
    num_classes: int,
    generator: torch.Generator,
    evidence_per_step: float = 0.6,
) -> tuple[Tensor, Tensor]:
    """Probabilities after every step [n, T, C] and labels [n].

    Step t adds `evidence_per_step` to the true class's logit plus N(0, 1) noise to every
    class; the model's posterior after t steps is the softmax of the running sum, which is
    the exact Bayes posterior for this generative model under a uniform prior.
    """
    labels = torch.randint(num_classes, (n,), generator=generator)  # [n]
    signal = evidence_per_step * torch.nn.functional.one_hot(labels, num_classes)  # [n, C]
    noise = torch.randn(n, num_steps, num_classes, generator=generator, dtype=torch.float64)
    evidence = signal[:, None, :].to(torch.float64) + noise  # [n, T, C]
    running_logits = evidence_per_step * evidence.cumsum(dim=1)  # [n, T, C]
    return running_logits.softmax(dim=2), labels
