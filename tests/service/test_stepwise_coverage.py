"""Coverage at every step on all four backends, through the library: the digits test split run
through each backend as the server runs it, each step's logits calibrated by that step's
committed calibration (`bench/stepwise_coverage.py` prints the same figures).

At every step t = 1..8 and alpha in {0.05, 0.1, 0.2}, the plain sets' coverage must lie in
[1 - alpha - 3 SE, 1 - alpha + 1/(n+1) + 3 SE] (`coverage_interval`), for RAPS (the default)
and LAC, and every calibration must have 200 conformal scores per step.

Each band holds with probability ~0.997, so a family of checks needs few members: 48 per
model and backend already give a few percent chance that one lands just outside by chance.
The randomised scores are left to the server test with a client seed
(`test_guarantees_http.py`), which is about exactly what randomisation changes.
"""

from __future__ import annotations

import pytest
import torch

from calibration.position_report import position_report
from models.repository import ModelRepository, default_repository_root
from service.dataplane.calibration_data import (
    classifier_examples,
    digits_test_split,
    prepared_runner,
)
from service.dataplane.calibration_store import CalibrationStore

BACKENDS = ("torch", "onnxruntime", "analog_imc", "stochastic")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["digits-lru", "digits-snn", "digits-snn-lite"])
def test_every_step_covers_on_every_backend(model: str, backend: str) -> None:
    torch.manual_seed(0)  # the stochastic backend's draws
    repository = ModelRepository(default_repository_root())
    card = repository.card(model)
    stored = CalibrationStore(repository).get(model, card.version, backend)
    assert stored is not None and stored.positional.horizon == 8
    runner = prepared_runner(repository, card, backend, stored.backend_options)
    examples = classifier_examples(runner, digits_test_split(card))
    rows = position_report(
        stored.positional, examples.logits, examples.labels, scores=("raps", "lac")
    )
    assert len(rows) == 8 * 3 * 2 and {row.n_calibration for row in rows} == {200}
    outside = [
        f"t={r.position} {r.score} a={r.alpha}: {r.coverage:.3f} not in [{r.lower:.3f}, "
        f"{r.upper:.3f}]"
        for r in rows
        if not r.within
    ]
    assert not outside, outside
    # The never-empty sets served by default cover at least as often as the plain ones.
    assert all(r.never_empty_coverage >= r.coverage for r in rows)
