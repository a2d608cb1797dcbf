"""The loss through a backend for ZO tuning: losses, streamed and parallel logits from a fresh
state, in-place perturbations seen by the torch forward, the analog chip in the loop."""

from __future__ import annotations

import pytest
import torch

from models.architectures import build_model
from models.zo import ZOConfig, ZOOptimizer
from service.finetuning.forward import BackendForward, classification_loss

TINY_LRU = {"d_input": 3, "d_output": 4, "d_model": 8, "d_state": 4, "n_layers": 2}


def _lru(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("lru", dict(TINY_LRU, dropout=0.0)).eval()


def test_classification_losses() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    assert classification_loss(logits, labels, "zero_one") == pytest.approx(1 / 3)
    expected = float(torch.nn.functional.cross_entropy(logits, labels))
    assert classification_loss(logits, labels, "cross_entropy") == pytest.approx(expected)
    with pytest.raises(ValueError, match="objective"):
        classification_loss(logits, labels, "hinge")


def test_streamed_and_parallel_final_logits_agree_and_start_from_fresh_state() -> None:
    model = _lru()
    x = torch.rand(70, 9, 3)
    parallel = BackendForward(model).final_logits(x, batch_size=32)
    streamed = BackendForward(model, stream=True).final_logits(x)
    with torch.no_grad():
        reference = model(x)[0][:, -1]
    torch.testing.assert_close(parallel, reference, rtol=0, atol=0)
    torch.testing.assert_close(streamed, reference, rtol=1e-5, atol=1e-5)
    # No state is carried from call to call.
    torch.testing.assert_close(BackendForward(model).final_logits(x), parallel, rtol=0, atol=0)


def test_the_torch_forward_sees_in_place_perturbations() -> None:
    model = _lru()
    optimizer = ZOOptimizer(list(model.named_parameters()), ZOConfig(eps=1e-2))  # snaps
    forward = BackendForward(model)
    x = torch.rand(3, 4, 3)
    before = forward.final_logits(x)
    optimizer.perturb_(1, +1)
    assert not torch.equal(forward.final_logits(x), before)
    optimizer.perturb_(1, -1)
    torch.testing.assert_close(forward.final_logits(x), before, rtol=0, atol=0)


def test_chip_in_the_loop_reprograms_from_the_current_weights() -> None:
    model = _lru()
    optimizer = ZOOptimizer(list(model.named_parameters()), ZOConfig(eps=1e-2))  # snaps
    forward = BackendForward(model, "analog_imc")
    x = torch.rand(3, 4, 3)
    first = forward.final_logits(x, noise_seed=11)
    # Same noise seed: the same output-noise draws (common random numbers); another: others.
    torch.testing.assert_close(forward.final_logits(x, noise_seed=11), first, rtol=0, atol=0)
    assert not torch.equal(forward.final_logits(x, noise_seed=12), first)
    optimizer.perturb_(3, +1)
    assert not torch.equal(forward.final_logits(x, noise_seed=11), first)
    optimizer.perturb_(3, -1)
    torch.testing.assert_close(forward.final_logits(x, noise_seed=11), first, rtol=0, atol=0)


def test_backend_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="ZO tuning runs on one of"):
        BackendForward(_lru(), "onnxruntime")
    with pytest.raises(ValueError, match="takes no backend options"):
        BackendForward(_lru(), "torch", {"device": "cpu"})
