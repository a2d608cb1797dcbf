"""Chip-in-the-loop tuning (`service.finetuning.chip_loop`): the live weights on one chip per
call, answering exactly as serving's `AnalogIMCBackend.prepare` does for the same weights and
chip, with no copy of the model and no chip kept after its runner."""

from __future__ import annotations

import gc
import weakref

import torch

from hardware_backends.analog_imc import AnalogIMCBackend
from models.architectures import build_model
from service.finetuning.chip_loop import ChipInTheLoop
from service.finetuning.forward import BackendForward
from tests.service.conftest import lru_config


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lru", lru_config("features", 10)).eval()


def test_the_loop_answers_like_serving_for_the_same_weights_and_chip() -> None:
    model = tiny_model()
    inputs = torch.rand(4, 5, 8) * 16  # [B, T, F]
    loop = ChipInTheLoop(model, {"t_inference": 60.0})
    served = AnalogIMCBackend().prepare(
        model, model_key="reference", options={"t_inference": 60.0, "seed": 7}
    )
    ours = loop.runner(chip_seed=7)
    torch.testing.assert_close(ours.run(inputs)[0], served.run(inputs)[0], rtol=0, atol=0)


def test_the_loop_reads_the_live_weights_and_keeps_no_chip() -> None:
    model = tiny_model()
    inputs = torch.rand(2, 3, 8) * 16
    loop = ChipInTheLoop(model)
    runner = loop.runner(chip_seed=3)
    before = runner.run(inputs)[0]
    chip = weakref.ref(next(iter(runner.engines.values())))
    del runner
    gc.collect()
    assert chip() is None  # nothing but the runner held the chip
    with torch.no_grad():
        model.head.weight.add_(0.5)  # a perturbation in place, as ZO makes it
    after = loop.runner(chip_seed=3).run(inputs)[0]
    assert not torch.allclose(before, after)
    assert loop.programmed == 2 and runner_models_are_the_model(loop, model)


def runner_models_are_the_model(loop: ChipInTheLoop, model: torch.nn.Module) -> bool:
    return loop.runner().model is model  # no deep copy


def test_backend_forward_on_the_chip_uses_the_loop() -> None:
    model = tiny_model()
    forward = BackendForward(model, "analog_imc", {"seed": 1})
    logits = forward.final_logits(torch.rand(3, 4, 8) * 16, chip_seed=5)  # [N, C]
    assert logits.shape == (3, 10) and forward._chips.programmed == 1
