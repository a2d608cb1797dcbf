"""Chip-in-the-loop for zeroth-order tuning: one analog chip that measures every loss.

A ZO step measures the loss at theta + eps*z and theta - eps*z; on the analog backend each
measurement runs the model on a chip. `ChipInTheLoop` programs ONE chip for the whole job
(the job's own chip seed: the chip the server will deploy to) from the live weights, with
no copy of the model, and reprograms a matrix only when its weights changed in place since
it was programmed (the tensor's version counter moved). What is tuned decides the noise:

- digital parameters (the input adapter, applied to the inputs in front of the chip by
  `models.finetune.chip_view` / `adapt_inputs`, and the norms) never touch the crossbars:
  the chip stays programmed, its programming noise, drift and read noise are the same for
  every loss call, and only the periphery's output noise differs between calls;
- weights inside the crossbars (readout, all) are reprogrammed on every call that moved
  them, from their fixed per-matrix programming (and drift-compensation probe) streams, so
  a matrix programmed with the same values gets the same conductances and compensation (a
  physical chip would draw fresh programming noise on each write, which this simulation
  does not count);
- low-rank adapters compute their weights: `BackendForward` programs their merge onto a
  fresh chip per call instead (`merged_copy`).

`run(inputs, noise_seed)` gives the run's sequences noise streams named by the seed (output
noise is drawn per sequence and step from its stream, `hardware_backends.noise_streams`):
the two halves of a perturbation pair get the same seed and so the same output-noise draws
(common random numbers), and their difference measures the perturbation, not the noise.
Without a seed every run gets fresh streams, as a physical chip's periphery would. Objects
held: the model and one chip, whatever the number of steps (`bench/zo_chip_memory.py`
measures the RSS; when every matrix is rewritten on every call, glibc's allocator lets it
creep: docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardware_backends.analog_imc import (
    AnalogIMCBackend,
    AnalogIMCRunner,
    chip_engine,
    output_stream,
    program_model,
)
from hardware_backends.crossbar import AnalogMatmul
from hardware_backends.noise_streams import StepStreams, seed_streams, stream_of
from hardware_backends.routing import derived_generator, find_linear_weights
from models.base import StatefulModel
from models.finetune import adapt_inputs, chip_view


class ChipInTheLoop:
    """The current weights of `model` on one chip of the analog backend (`options` pick it)."""

    def __init__(self, model: StatefulModel, options: dict | None = None) -> None:
        self.model = model
        self.config = AnalogIMCBackend().config_for(options)  # validated like serving's
        self.view = chip_view(model)  # the live parameters; the input adapter left out
        # name -> the live matrix: ZO perturbs it in place, so a reprogramming reads the
        # weights of that moment.
        self.weights = find_linear_weights(self.view)
        self.chip = program_model({n: w.detach() for n, w in self.weights.items()}, self.config)
        self.programmed = len(self.chip)  # matrices written so far
        self._versions = {name: w._version for name, w in self.weights.items()}
        self._stream = output_stream(self.config)
        self._streams = StepStreams()  # the keys of the sequences being run, for every engine
        engines = {name: self._engine(name) for name in sorted(self.chip)}
        self._runner = AnalogIMCRunner(self.view, engines, self.config, self._streams)

    def _engine(self, name: str) -> AnalogMatmul:
        # The drift-compensation probe of each matrix draws from its own stream (serving's
        # draws from the output stream), so a matrix written again with the same values
        # gets the same factor: both halves of a pair see the same chip.
        probe = derived_generator(self.config.seed, f"probe:{name}:{self.config.t_inference!r}")
        return chip_engine(
            name, self.chip[name], self.config, self._stream, probe, streams=self._streams
        )

    def runner(self) -> AnalogIMCRunner:
        """The runner over the chip as it is now (matrices whose weights moved reprogrammed
        first)."""
        moved = sorted(n for n, w in self.weights.items() if w._version != self._versions[n])
        if moved:
            engines, self._runner = dict(self._runner.engines), None
            for name in moved:  # one matrix at a time: the old one goes before the new is written
                del engines[name], self.chip[name]
                weight = self.weights[name].detach()
                self.chip[name] = program_model({name: weight}, self.config)[name]
                engines[name] = self._engine(name)
                self._versions[name] = self.weights[name]._version
            self.programmed += len(moved)
            self._runner = AnalogIMCRunner(self.view, engines, self.config, self._streams)
        return self._runner

    def run(self, inputs: Tensor, noise_seed: int | None = None) -> Tensor:
        """inputs [B, T, F] -> logits [B, T, C] of the current weights, from a fresh state."""
        runner = self.runner()
        with torch.no_grad():
            adapted = adapt_inputs(self.model, inputs)  # [B, T, F], digital
        state = runner.init_state(inputs.shape[0])  # fresh noise streams
        if noise_seed is not None:  # streams named by the seed: the same seed, the same noise
            names = [
                f"chip-loop:{self.config.seed}:{noise_seed}:{row}" for row in range(len(inputs))
            ]
            state = seed_streams(state, [stream_of(name) for name in names])
        logits, _, _ = runner.run(adapted, state)
        return logits
