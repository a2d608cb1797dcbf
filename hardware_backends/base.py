"""The backend contract: usage accounting, the Runner and Backend protocols, shared helpers.

A backend turns a `StatefulModel` into a `Runner` for one kind of hardware. A runner steps
the model one time step at a time with an explicit state, and reports the work it did as a
`Usage`. Sampling backends return `samples` draws at once, with a leading [S] dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import pydantic
import torch
from torch import Tensor

if TYPE_CHECKING:
    from models.base import StatefulModel

State = dict[str, Tensor]


class BackendError(Exception):
    """Root of the errors raised by the backend layer."""


class UnknownBackendError(BackendError, LookupError):
    """No backend is registered under the requested name."""


class BackendUnavailableError(BackendError, RuntimeError):
    """The backend is registered but cannot run here (missing library, no device, ...)."""


@dataclass
class Usage:
    """Work done for one request, summed over samples and steps."""

    macs: int = 0  # multiply-accumulates executed (dense work)
    accumulates: int = 0  # additions driven by spikes (event-driven work)
    spikes: int = 0  # spikes emitted
    neuron_steps: int = 0  # neuron updates (sparsity = spikes / neuron_steps)
    energy_joules: float = 0.0  # estimate on this backend (event-driven where it applies)
    dense_equivalent_energy_joules: float = 0.0  # same work counted as dense MACs
    routed_macs: int = 0  # the part of macs spent in routers and the experts they chose
    skipped_macs: int = 0  # MACs of the experts not chosen: not run, not in macs

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def sparsity(self) -> float | None:
        """Fraction of neuron updates that emitted a spike; None for models without spikes."""
        return self.spikes / self.neuron_steps if self.neuron_steps else None

    @property
    def active_fraction(self) -> float | None:
        """Fraction of the model's work (every expert run) that ran: macs / (macs +
        skipped_macs); None for models without routed experts."""
        return active_fraction(self.macs, self.skipped_macs)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a number: a shallow copy is `asdict` without its recursion.
        return {**vars(self), "sparsity": self.sparsity, "active_fraction": self.active_fraction}


# Usage.to_dict() keys that are ratios of the counts: recomputed from sums, never added.
DERIVED_USAGE = ("sparsity", "active_fraction")


def active_fraction(macs: float, skipped_macs: float) -> float | None:
    """macs / (macs + skipped_macs), or None when nothing was skipped by routing."""
    return macs / (macs + skipped_macs) if skipped_macs else None


@runtime_checkable
class Runner(Protocol):
    """A model prepared for one backend."""

    backend: str
    samples: int  # 1, or S for sampling backends (logits then carry a leading [S] dim)

    def init_state(self, batch: int) -> State: ...

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State, Usage]:
        """One step: x_t [B, F] float or [B] long; logits [B, C] or [S, B, C]."""
        ...

    def run(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State, Usage]:
        """A sequence: x [B, T, F] float or [B, T] long; logits [B, T, C] or [S, B, T, C]."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str

    def availability(self) -> str | None:
        """None when usable here, else the reason it is not."""
        ...

    def prepare(
        self, model: StatefulModel, *, model_key: str, options: dict | None = None
    ) -> Runner:
        """Prepare `model` (cached by the caller under `model_key` = "<name>/<version>")."""
        ...


OptionsT = TypeVar("OptionsT", bound=pydantic.BaseModel)


class BackendOptions(pydantic.BaseModel):
    """Base for a backend's options: immutable, unknown keys rejected."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


def parse_options(backend: str, schema: type[OptionsT], options: Mapping | None) -> OptionsT:
    """Validate request/session options against a backend's schema; ValueError names the problem."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options for backend {backend!r} must be a mapping, got {type(options)}")
    try:
        return schema.model_validate(dict(options))
    except pydantic.ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<options>'}: {e['msg']}"
            for e in error.errors()
        )
        known = ", ".join(sorted(schema.model_fields)) or "none"
        raise ValueError(
            f"invalid options for backend {backend!r}: {problems} (known options: {known})"
        ) from None


def runner_notes(runner: object) -> dict[str, Any]:
    """What a runner says about how it computes, for answers to carry beside their usage
    (analog_imc: its weight mapping); {} from a runner that says nothing (`notes`)."""
    return dict(getattr(runner, "notes", None) or {})


def backend_defaults(backend: object) -> dict[str, Any]:
    """What a backend does where the options leave it open (`defaults`), for model info;
    {} from a backend that says nothing."""
    return dict(getattr(backend, "defaults", None) or {})


def check_batch(batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


def check_sequence_input(x: Tensor) -> None:
    """A sequence is float features [B, T, F] or long tokens [B, T]."""
    if not isinstance(x, Tensor):
        raise ValueError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
    if x.is_floating_point():
        if x.dim() != 3:
            raise ValueError(f"feature inputs must be [batch, time, features], got {list(x.shape)}")
    elif x.dtype == torch.long:
        if x.dim() != 2:
            raise ValueError(f"token inputs must be [batch, time], got {list(x.shape)}")
    else:
        raise ValueError(f"inputs must be float features or long tokens, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"inputs need at least one sequence and one step, got {list(x.shape)}")


def run_by_steps(
    step: Callable[[Tensor, State], tuple[Tensor, State, Usage]],
    init_state: Callable[[int], State],
    x: Tensor,
    state: State | None = None,
) -> tuple[Tensor, State, Usage]:
    """Run a sequence by repeated `step`: the reference path every `run` must agree with."""
    check_sequence_input(x)
    if state is None:
        state = init_state(x.shape[0])
    outputs: list[Tensor] = []
    usage = Usage()
    for t in range(x.shape[1]):
        logits_t, state, step_usage = step(x[:, t], state)  # [B, C] or [S, B, C]
        outputs.append(logits_t)
        usage = usage + step_usage
    return torch.stack(outputs, dim=-2), state, usage  # [B, T, C] or [S, B, T, C]
