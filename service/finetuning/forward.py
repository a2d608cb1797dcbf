"""The loss of a model's current weights through a hardware backend: what ZO tuning measures.

`models.zo` estimates gradients from any loss callable; here that loss is computed by running
the model through a backend runner (`BackendForward`), the torch backend in process or the
analog in-memory-computing chip in the loop, from a fresh state on every call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hardware_backends import registry
from hardware_backends.torch_backend import TorchRunner
from models.base import StatefulModel
from models.finetune import has_low_rank_adapters, merged_copy
from service.finetuning.chip_loop import ChipInTheLoop

OBJECTIVES = ("cross_entropy", "zero_one")
TUNING_BACKENDS = ("torch", "analog_imc")


def classification_loss(logits: Tensor, labels: Tensor, objective: str) -> float:
    """Mean cross-entropy (nats) or error rate of final-step logits [N, C] against labels [N].
    The 0-1 loss has no gradient at all, which a zeroth-order method does not need."""
    if objective == "cross_entropy":
        return float(torch.nn.functional.cross_entropy(logits.float(), labels))
    if objective == "zero_one":
        return float((logits.argmax(dim=-1) != labels).float().mean())
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


class BackendForward:
    """Final-step logits of the model's *current* weights through a backend runner.

    Every call starts from a fresh `init_state` and keeps its state local: tuning never
    reads or writes a session's state. "torch" wraps the live model itself (no copy), so an
    in-place perturbation is seen as is; `stream=True` feeds one `step` at a time keeping only
    the state (memory flat in the sequence length) instead of the parallel `forward`.

    "analog_imc" is chip-in-the-loop (`ChipInTheLoop`): one chip, picked by the job's
    options (the chip the server deploys to), programmed once from the live weights and
    reprogrammed only where weights inside the crossbars moved; the input adapter and the
    norms are digital. `noise_seed` names the run's output-noise streams: the two passes of
    a perturbation pair get the same seed, so their difference measures the perturbation, not
    two output-noise draws (common random numbers); without one every run draws afresh. Low-rank
    adapters compute their weights, so with them every call programs their merge onto a
    fresh chip of the same seed (`merged_copy`: the only copy alive, for that call).
    """

    def __init__(
        self,
        model: StatefulModel,
        backend: str = "torch",
        options: dict | None = None,
        stream: bool = False,
    ) -> None:
        if backend not in TUNING_BACKENDS:
            raise ValueError(f"ZO tuning runs on one of {TUNING_BACKENDS}, not {backend!r}")
        self.model, self.backend, self.stream = model, backend, stream
        self.options = dict(options or {})
        self._chips: ChipInTheLoop | None = None
        if backend == "torch":
            if self.options:
                raise ValueError(f"ZO tuning on torch takes no backend options, got {self.options}")
            self._torch_runner = TorchRunner(model, torch.device("cpu"))
        else:
            registry.get_backend(backend)  # refused here if the backend cannot run
            if not has_low_rank_adapters(model):
                self._chips = ChipInTheLoop(model, self.options)

    def _run(self, inputs: Tensor, noise_seed: int | None) -> Tensor:
        """inputs [b, T, F] -> logits [b, T, C] from a fresh state, on this backend."""
        if self.backend == "torch":
            return self._torch_runner.run(inputs)[0]
        if self._chips is not None:
            return self._chips.run(inputs, noise_seed)
        return ChipInTheLoop(merged_copy(self.model), self.options).run(inputs, noise_seed)

    @torch.no_grad()
    def final_logits(
        self, inputs: Tensor, noise_seed: int | None = None, batch_size: int = 512
    ) -> Tensor:
        """inputs [N, T, F] -> logits of each sequence's last step, [N, C]."""
        parts = []
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size]  # [b, T, F]
            if self.stream and self.backend == "torch":
                parts.append(self._streamed_final_logits(chunk))
            else:
                seed = None if noise_seed is None else noise_seed + start
                parts.append(self._run(chunk, seed)[:, -1])  # [b, C]
        return torch.cat(parts)  # [N, C]

    @torch.no_grad()
    def step_logits(
        self, inputs: Tensor, noise_seed: int | None = None, batch_size: int = 512
    ) -> Tensor:
        """inputs [N, T, F] -> the logits after every step, [N, T, C] (calibration per step)."""
        parts = []
        for start in range(0, inputs.shape[0], batch_size):
            seed = None if noise_seed is None else noise_seed + start
            parts.append(self._run(inputs[start : start + batch_size], seed))  # [b, T, C]
        return torch.cat(parts)  # [N, T, C]

    def _streamed_final_logits(self, inputs: Tensor) -> Tensor:
        state = self.model.init_state(inputs.shape[0])
        logits = None
        for t in range(inputs.shape[1]):
            logits, state = self.model.step(inputs[:, t], state)  # [b, C]
        return logits

    def loss(self, inputs: Tensor, labels: Tensor, objective: str, noise_seed: int | None = None):
        return classification_loss(self.final_logits(inputs, noise_seed), labels, objective)
