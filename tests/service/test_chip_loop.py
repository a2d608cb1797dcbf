"""Chip-in-the-loop tuning (`service.finetuning.chip_loop`): the live weights on one chip
for the whole job, answering exactly as serving's `AnalogIMCBackend.prepare` does for the
same weights and chip, reprogramming only the matrices whose weights moved, with the input
adapter applied digitally in front of the chip, and no copy of the model."""

from __future__ import annotations

import gc
import weakref

import torch

from hardware_backends.analog_imc import AnalogIMCBackend
from models.architectures import build_model
from models.finetune import adapt_inputs, attach_targets, merged_copy
from service.finetuning.chip_loop import ChipInTheLoop
from service.finetuning.forward import BackendForward
from tests.service.conftest import lru_config


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lru", lru_config("features", 10)).eval()


def test_the_loop_answers_like_serving_for_the_same_weights_and_chip() -> None:
    model = tiny_model()
    inputs = torch.rand(4, 5, 8) * 16  # [B, T, F]
    # Without drift compensation: its probe draws from per-matrix streams in the loop (so a
    # rewritten matrix gets the same factor) and from the output stream in serving.
    options = {"t_inference": 60.0, "seed": 7, "drift_compensation": False}
    served = AnalogIMCBackend().prepare(model, model_key="reference", options=options)
    ours = ChipInTheLoop(model, options)
    torch.testing.assert_close(ours.run(inputs), served.run(inputs)[0], rtol=0, atol=0)
    assert ours.view is model  # a plain model runs as it is: no copy


def test_only_matrices_whose_weights_moved_are_reprogrammed() -> None:
    model = tiny_model()
    inputs = torch.rand(2, 3, 8) * 16
    loop = ChipInTheLoop(model)
    matrices = len(loop.chip)
    assert loop.programmed == matrices
    first = loop.run(inputs, noise_seed=1)
    torch.testing.assert_close(loop.run(inputs, noise_seed=1), first, rtol=0, atol=0)
    assert loop.programmed == matrices  # reading again writes nothing
    old_head = weakref.ref(loop.chip["head.weight"])
    base, perturbed = model.head.weight.detach().clone(), []
    for _ in range(2):
        with torch.no_grad():
            model.head.weight.add_(0.5)  # a perturbation in place, as ZO makes it
        perturbed.append(loop.run(inputs, noise_seed=1))
        with torch.no_grad():
            model.head.weight.copy_(base)
    assert not torch.allclose(perturbed[0], first)
    # The same values written again: the same conductances and compensation (per-matrix
    # programming and probe streams), so the two halves of a pair see the same chip.
    torch.testing.assert_close(perturbed[1], perturbed[0], rtol=0, atol=0)
    assert loop.programmed == matrices + 2  # the head alone, once per write
    gc.collect()
    assert old_head() is None  # a replaced matrix is not kept


def test_a_noise_seed_replays_the_output_noise_and_none_draws_afresh() -> None:
    loop = ChipInTheLoop(tiny_model())
    inputs = torch.rand(3, 4, 8) * 16
    seeded = loop.run(inputs, noise_seed=5)
    torch.testing.assert_close(loop.run(inputs, noise_seed=5), seeded, rtol=0, atol=0)
    assert not torch.equal(loop.run(inputs, noise_seed=6), seeded)
    assert not torch.equal(loop.run(inputs), loop.run(inputs))


def test_the_input_adapter_runs_digitally_in_front_of_an_unchanged_chip() -> None:
    model = tiny_model()
    base = merged_copy(tiny_model())  # the same base weights, a separate model
    tuned = attach_targets(model, "input")
    inputs = torch.rand(3, 4, 8) * 16
    loop, reference = ChipInTheLoop(model, {"seed": 3}), ChipInTheLoop(base, {"seed": 3})
    matrices = loop.programmed
    with torch.no_grad():
        for _, parameter in tuned:  # scale and shift
            parameter.copy_(torch.linspace(-1.0, 1.0, parameter.numel()))
    adapted = adapt_inputs(model, inputs)  # [B, T, F]
    torch.testing.assert_close(
        loop.run(inputs, noise_seed=2), reference.run(adapted, noise_seed=2), rtol=0, atol=0
    )
    assert loop.programmed == matrices  # nothing was written to the chip


def test_backend_forward_on_the_chip_uses_one_loop() -> None:
    model = tiny_model()
    forward = BackendForward(model, "analog_imc", {"seed": 1})
    logits = forward.final_logits(torch.rand(3, 4, 8) * 16, noise_seed=5)  # [N, C]
    forward.final_logits(torch.rand(3, 4, 8) * 16, noise_seed=6)
    assert logits.shape == (3, 10) and forward._chips.programmed == len(forward._chips.chip)
