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
from models.finetune import is_adapted, merged_copy
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

    "analog_imc" is chip-in-the-loop: every call programs a chip from the current weights
    (`ChipInTheLoop`: the live weights, no copy of the model, no cache of chips, the server's
    chip cache untouched). `chip_seed` picks the chip's noise draws (programming noise,
    drift exponents, read noise, output-noise stream); the two passes of one perturbation get
    the same seed, so in this simulator their difference measures the perturbation rather than
    two independent noise draws (common random numbers). A physical chip cannot replay its
    noise: there the pair would differ by fresh programming, read and output noise too.
    Without a chip_seed the job's own options pick the chip, i.e. the one the server will
    deploy to.
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
        self._calls = 0
        if backend == "torch":
            if self.options:
                raise ValueError(f"ZO tuning on torch takes no backend options, got {self.options}")
            self._torch_runner = TorchRunner(model, torch.device("cpu"))
        else:
            registry.get_backend(backend)  # refused here if the backend cannot run
            self._chips = ChipInTheLoop(model, self.options)

    def runner(self, chip_seed: int | None = None):
        """A runner over the current weights (off torch: the live weights programmed onto
        one chip per call, `service.finetuning.chip_loop`; no copy, no cache)."""
        if self.backend == "torch":
            return self._torch_runner
        self._calls += 1
        if is_adapted(self.model):
            # Adapted weights are computed, not parameters the chip can program: fold the
            # adapters into a plain copy (the only copy alive, for this call's chip).
            return ChipInTheLoop(merged_copy(self.model), self.options).runner(chip_seed)
        return self._chips.runner(chip_seed)

    @torch.no_grad()
    def final_logits(
        self, inputs: Tensor, chip_seed: int | None = None, batch_size: int = 512
    ) -> Tensor:
        """inputs [N, T, F] -> logits of each sequence's last step, [N, C]."""
        runner = self.runner(chip_seed)
        parts = []
        for start in range(0, inputs.shape[0], batch_size):
            chunk = inputs[start : start + batch_size]  # [b, T, F]
            if self.stream and self.backend == "torch":
                parts.append(self._streamed_final_logits(chunk))
            else:
                logits, _, _ = runner.run(chunk)  # [b, T, C], from a fresh init_state
                parts.append(logits[:, -1])
        return torch.cat(parts)  # [N, C]

    @torch.no_grad()
    def step_logits(
        self, inputs: Tensor, chip_seed: int | None = None, batch_size: int = 512
    ) -> Tensor:
        """inputs [N, T, F] -> the logits after every step, [N, T, C] (calibration per step)."""
        runner = self.runner(chip_seed)
        parts = [
            runner.run(inputs[start : start + batch_size])[0]  # [b, T, C]
            for start in range(0, inputs.shape[0], batch_size)
        ]
        return torch.cat(parts)  # [N, T, C]

    def _streamed_final_logits(self, inputs: Tensor) -> Tensor:
        state = self.model.init_state(inputs.shape[0])
        logits = None
        for t in range(inputs.shape[1]):
            logits, state = self.model.step(inputs[:, t], state)  # [b, C]
        return logits

    def loss(self, inputs: Tensor, labels: Tensor, objective: str, chip_seed: int | None = None):
        return classification_loss(self.final_logits(inputs, chip_seed), labels, objective)
