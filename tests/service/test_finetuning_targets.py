"""The fine-tuning job with its default targets and ε: a short real job improves a tiny model
on a shift, keeps its best checkpoint, and picks ε above the chip's noise floor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.repository import ModelRepository
from models.zo import EPS_CANDIDATES, SIGNAL_TO_NOISE
from service.finetuning.forward import BackendForward
from service.finetuning.job import load_finetune_data, run_finetune
from service.finetuning.spec import CHIP_DEFAULTS, DEFAULT_TARGETS, FinetuneSpec
from tests.service.conftest import copied_repository

INVERTED = {"kind": "builtin", "shift": "inverted"}
DIGITS_LABELS = [str(d) for d in range(10)]


@pytest.fixture
def repo(tiny_lru_root: Path, tmp_path: Path) -> ModelRepository:
    return copied_repository(tiny_lru_root, tmp_path)


def test_the_defaults() -> None:
    spec = FinetuneSpec(model="tiny", data=INVERTED)
    assert spec.parameters == DEFAULT_TARGETS == "all"
    assert (spec.optimizer, spec.eps, spec.n_perturbations, spec.lr) == ("mezo", "auto", 1, 5e-4)
    chip = FinetuneSpec(model="tiny", data=INVERTED, backend="analog_imc")
    assert {key: getattr(chip, key) for key in CHIP_DEFAULTS} == CHIP_DEFAULTS
    assert chip.parameters == "input" and chip.common_noise and chip.eps == "auto"
    given = FinetuneSpec(model="tiny", data=INVERTED, backend="analog_imc", lr=0.01, steps=7)
    assert (given.lr, given.steps, given.parameters) == (0.01, 7, "input")  # given ones win


def test_an_input_adapter_job_adapts_a_model_to_inverted_inputs_and_keeps_its_best_checkpoint(
    repo,
) -> None:
    spec = FinetuneSpec(
        model="tiny", data=INVERTED, steps=300, eval_every=50, parameters="input", lr=0.05
    )
    result = run_finetune(spec, repo)
    assert result.after.accuracy > result.before.accuracy + 0.05, (result.before, result.after)
    assert result.tuned_parameters == 2 * 8  # a scale and a bias per input feature
    assert result.eps == EPS_CANDIDATES[0] and result.noise_floor == 0.0  # torch: exact

    # The published version is the best evaluated checkpoint, not the last step.
    best = max(result.history, key=lambda p: (p.validation_accuracy, -p.validation_loss))
    assert result.best_step == best.step
    published = repo.load("tiny", result.version).model
    data = load_finetune_data(spec, DIGITS_LABELS, published.config.d_input)
    logits = BackendForward(published).final_logits(data.validation.inputs)  # [N, C]
    accuracy = float((logits.argmax(-1) == data.validation.labels).float().mean())
    assert accuracy == best.validation_accuracy
    # Only the encoder (where the input adapter folds in) moved.
    base = dict(repo.load("tiny", "1").model.named_parameters())
    for name, value in published.named_parameters():
        assert torch.equal(value, base[name]) != name.startswith("encoder."), name


@pytest.mark.parametrize("common_noise", [True, False])
def test_chip_in_the_loop_picks_eps_above_the_noise_floor(repo, common_noise: bool) -> None:
    spec = FinetuneSpec(
        model="tiny",
        data=INVERTED,
        backend="analog_imc",
        steps=2,
        batch_size=16,
        eval_every=1,
        common_noise=common_noise,  # False: fresh noise per reading, as on a physical chip
    )
    result = run_finetune(spec, repo)
    assert result.noise_floor > 0.0  # the chip's output noise, not cancelled within a pair
    assert result.loss_noise > 0.0  # one loss reading repeated with fresh noise varies
    assert result.eps in EPS_CANDIDATES
    assert result.eps_signal >= SIGNAL_TO_NOISE * result.noise_floor or (
        result.eps == EPS_CANDIDATES[-1]
    )


def test_a_chip_in_the_loop_job_improves_on_a_small_budget(repo) -> None:
    """The chip defaults (the input adapter on one programmed chip) with 300 steps. The bar
    is the promotion rule's: the held-out accuracy on the chip rises by more than 1.645
    standard errors of the paired difference (one-sided 95 %), the version is calibrated on
    every backend its base was, and it becomes latest."""
    spec = FinetuneSpec(model="tiny", data=INVERTED, backend="analog_imc", steps=300, eval_every=50)
    result = run_finetune(spec, repo)
    decision = result.promotion
    assert decision.improvement > decision.margin > 0.0, decision
    assert decision.promoted and repo.latest("tiny") == result.version, decision.reason
    assert result.tuned_parameters == 2 * 8 and result.best_step > 0
    assert result.after.accuracy == decision.accuracy_after  # measured on the chip


def test_a_job_can_tune_low_rank_adapters_and_every_parameter_too(repo) -> None:
    for parameters in ("input+lora2", "all"):
        spec = FinetuneSpec(
            model="tiny", data=INVERTED, steps=6, eval_every=3, parameters=parameters
        )
        result = run_finetune(spec, repo)
        assert result.status == "completed" and result.tuned_parameters > 0
        repo.load("tiny", result.version)  # replays and checks its digest
