"""Chip-in-the-loop for zeroth-order tuning: the analog chip that measures each loss.

A ZO step measures the loss at theta + eps*z and theta - eps*z. On the analog backend each
measurement runs the model on a chip programmed with those weights. Serving's
`AnalogIMCBackend.prepare` is built for a few long-lived models: it deep-copies the model
into a frozen snapshot and keeps its programmed chips in a cache keyed by the weights' hash.
Per loss call that is a copy of the model and a chip that no later call can reuse (every
call's weights differ), held until the cache's 8 entries roll over.

`ChipInTheLoop` programs the live, perturbed weights in place of a copy, onto one chip per
perturbation pair: both halves of a pair use the same chip seed (the same device: the same
programming-noise and read-noise draws, common random numbers), and only the chip of the
current call is alive. Memory stays the model plus one chip, whatever the number of steps
(`bench/zo_chip_memory.py` measures it).
"""

from __future__ import annotations

import dataclasses

from hardware_backends.analog_imc import (
    AnalogIMCBackend,
    AnalogIMCRunner,
    chip_runner,
    program_model,
)
from hardware_backends.routing import find_linear_weights
from models.base import StatefulModel

CHIP_SEEDS = 2**31  # analog_imc accepts chip seeds below this


class ChipInTheLoop:
    """Runners for the current weights of `model` on chips of the analog backend."""

    def __init__(self, model: StatefulModel, options: dict | None = None) -> None:
        self.model = model
        self.config = AnalogIMCBackend().config_for(options)  # validated like serving's
        # name -> the live parameter: ZO perturbs it in place, so each programming reads
        # the weights of that moment.
        self.weights = find_linear_weights(model)
        self.programmed = 0  # chips programmed so far (one per loss call)

    def runner(self, chip_seed: int | None = None) -> AnalogIMCRunner:
        """The current weights on the chip `chip_seed` picks (the job's own chip when None).
        Nothing is kept here: the chip lives as long as the runner the caller holds."""
        config = self.config
        if chip_seed is not None:
            config = dataclasses.replace(config, seed=chip_seed % CHIP_SEEDS)
        weights = {name: weight.detach() for name, weight in self.weights.items()}
        chip = program_model(weights, config)
        self.programmed += 1
        return chip_runner(self.model, chip, config)
