"""The reference backend: the model itself under `torch.inference_mode()`, on CPU or CUDA.

`prepare` takes an eval-mode snapshot of the model (a deep copy), so later changes to the
caller's model (a fine-tuning job) never leak into a runner cached under the old model_key.
Tensors cross the runner boundary on the caller's device: inputs and state are moved to the
runner's device, and logits and state come back on the device the input came from.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from hardware_backends.base import (
    BackendOptions,
    BackendUnavailableError,
    State,
    Usage,
    check_batch,
    parse_options,
    run_by_steps,
)
from hardware_backends.energy import DIGITAL_FP32, EnergyModel, usage_of_steps

if TYPE_CHECKING:
    from models.base import StatefulModel


class TorchOptions(BackendOptions):
    # "auto" picks CUDA when this machine has it, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("torch backend: device 'cuda' requested but CUDA is absent")
    return torch.device(choice)


def _to(state: State, device: torch.device) -> State:
    return {name: tensor.to(device) for name, tensor in state.items()}


class TorchRunner:
    """Runs a model snapshot step by step (and whole sequences with its `forward`)."""

    backend = "torch"
    samples = 1

    def __init__(
        self, model: StatefulModel, device: torch.device, energy: EnergyModel = DIGITAL_FP32
    ) -> None:
        self.model = model
        self.device = device
        self.energy = energy
        self.op_counts = model.macs_per_step()
        # Spiking models report activity per step, which their `forward` does not return, so
        # their sequences run step by step; dense models use the (parallel) forward.
        self.event_driven = "synaptic_ops_max" in self.op_counts

    def init_state(self, batch: int) -> State:
        check_batch(batch)
        return self.model.init_state(batch)  # on the CPU, the caller's side

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        self.model.check_step_input(x_t)
        home = x_t.device
        with torch.inference_mode():
            logits, new_state, activity = self.model.step_with_activity(
                x_t.to(self.device), _to(state, self.device)
            )  # [B, C]
        usage = usage_of_steps(self.op_counts, x_t.shape[0], 1, activity, self.energy)
        return logits.to(home), _to(new_state, home), usage

    def run(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        if self.event_driven:
            return self.run_by_steps(x, state)
        self.model.check_sequence_input(x)
        home = x.device
        if state is None:
            state = self.init_state(x.shape[0])
        with torch.inference_mode():
            logits, new_state = self.model(x.to(self.device), _to(state, self.device))  # [B, T, C]
        usage = usage_of_steps(self.op_counts, x.shape[0], x.shape[1], {}, self.energy)
        return logits.to(home), _to(new_state, home), usage

    def run_by_steps(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        """The reference path: `run` as repeated `step`."""
        self.model.check_sequence_input(x)
        return run_by_steps(self.step, self.init_state, x, state)


class TorchBackend:
    name = "torch"

    def availability(self) -> str | None:
        return None  # torch is a hard dependency; the CPU is always there

    def prepare(
        self, model: StatefulModel, *, model_key: str, options: dict | None = None
    ) -> TorchRunner:
        parsed = parse_options(self.name, TorchOptions, options)
        device = resolve_device(parsed.device)
        snapshot = copy.deepcopy(model).to(device).eval()
        for parameter in snapshot.parameters():
            parameter.requires_grad_(False)
        return TorchRunner(snapshot, device)
