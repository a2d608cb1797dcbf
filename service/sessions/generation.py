"""Token generation for language models, whatever protocol asks for it.

`generate(options, ...)` is an async iterator over one `GeneratedToken` per new token and a
final `GenerationDone`; the websocket route streams them, the REST twin collects them.

Each round: the prediction for the next token is built from the session's last logits by
the data plane's prediction builder, with the calibration of the current context length
(probabilities, conformal set, entropy); if the set holds more than `max_set_size` tokens the
model is too unsure to go on and generation stops with `abstain`; otherwise a token is
sampled and *stepped into the session* before it is handed out. So every token a client
receives has been committed through the session manager, and a client that leaves
mid-stream leaves a session whose state and step count cover exactly the prompt and the
tokens that were committed. Resuming the session with a new prompt therefore continues from
prompt + generated text + new prompt.

Honest sampling: the token is drawn from the very distribution whose probabilities and set
are reported (the calibrated one where the context length is calibrated, the raw softmax
where it is not), sharpened or flattened by `temperature` (p^(1/T), renormalised; 0 is
greedy), with a `torch.Generator` seeded per request (`sample_token` is the reference). Each
token message says the emitted token's probability, the top token and its probability, the
set and whether the emitted token is in it; at temperature 1 a calibrated stream's tokens fall
in their sets about 1 - alpha of the time.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from hardware_backends.base import Usage, active_fraction
from models.repository import ModelCard
from service.api.schemas.generate import GenerateOptions
from service.dataplane.inputs import encode_prompts
from service.dataplane.plane import TORCH_BACKEND, DataPlane
from service.dataplane.predictions import ClassPrediction
from service.errors import BadInputError
from service.sessions.plane import SessionManager
from service.sessions.types import SessionInfo

FinishReason = Literal["length", "stop", "abstain"]
ADDITIVE_USAGE = (*(f.name for f in fields(Usage)), "steps", "compute_seconds")


@dataclass(frozen=True)
class GeneratedToken:
    index: int  # position among the generated tokens, from 0
    token: str
    token_id: int
    sampling_probability: float  # of `token` under the distribution it was drawn from
    prediction: ClassPrediction  # the next-token answer the token was drawn against
    vocabulary: Sequence[str]

    @property
    def probability(self) -> float:
        """Of `token` under the reported (calibrated, where calibrated) distribution."""
        return self.prediction.probabilities[self.token_id]

    @property
    def in_set(self) -> bool | None:
        indices = self.prediction.set_indices
        return None if indices is None else self.token_id in indices

    def message(self) -> dict[str, Any]:
        prediction = self.prediction
        return {
            "type": "token",
            "index": self.index,
            "token": self.token,
            "token_id": self.token_id,
            "probability": self.probability,
            "sampling_probability": self.sampling_probability,
            "top_token": prediction.label,
            "top_probability": prediction.confidence,
            "prediction_set": prediction.prediction_set,
            "set_size": prediction.set_size,
            "in_set": self.in_set,
            "calibrated": prediction.calibrated,
            "position": prediction.position,
            "entropy": prediction.entropy,
            "id": prediction.id,
        }


@dataclass(frozen=True)
class GenerationDone:
    finish_reason: FinishReason
    session_id: str
    model: str
    version: str
    backend: str
    tokens: int
    text: str
    step: int  # the session's total steps after this generation
    seed: str  # decimal: seeds reach 2**63, beyond what JSON numbers carry exactly
    calibrated: bool  # every generated token's answer was calibrated
    uncalibrated_tokens: int
    warnings: list[str]
    usage: dict[str, Any]

    def message(self) -> dict[str, Any]:
        return {"type": "done", **self.__dict__}


# ---- pieces ---------------------------------------------------------------------------------


def sampling_probabilities(probabilities: Sequence[float], temperature: float) -> Tensor:
    """The distribution tokens are drawn from: the reported probabilities [C] raised to
    1 / temperature and renormalised ([C] float64; temperature > 0)."""
    probs = torch.tensor(probabilities, dtype=torch.float64)  # [C]
    if temperature == 1.0:
        return probs
    tempered = torch.special.xlogy(1.0 / temperature, probs)  # [C] log p / T, 0 log 0 = 0
    tempered = torch.where(probs > 0, tempered, torch.full_like(probs, -torch.inf))
    return torch.softmax(tempered, dim=-1)


def sample_token(
    probabilities: Sequence[float], temperature: float, generator: torch.Generator
) -> tuple[int, float]:
    """(token id, its probability under the sampling distribution): the most probable token
    when temperature is 0, else one draw from `sampling_probabilities`."""
    if temperature == 0.0:
        token = max(range(len(probabilities)), key=probabilities.__getitem__)
        return token, 1.0
    probs = sampling_probabilities(probabilities, temperature)  # [C]
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(probs[token])


def stop_reached(text: str, new_token: str, stops: Sequence[str]) -> bool:
    """True when a stop string ends inside the newly added token (earlier ones were checked)."""
    for stop in stops:
        window = text[max(0, len(text) - len(new_token) - len(stop) + 1) :]
        if stop in window:
            return True
    return False


def sum_usage(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Usage of several steps: the work counts, energies, steps and compute time add up;
    sparsity and the active fraction are recomputed; per-step facts such as the batch size
    are left out."""
    total: dict[str, Any] = {}
    for chunk in chunks:
        for key in ADDITIVE_USAGE:
            if isinstance(chunk.get(key), int | float):
                total[key] = total.get(key, 0) + chunk[key]
    if "spikes" in total and "neuron_steps" in total:
        neuron_steps = total["neuron_steps"]
        total["sparsity"] = total["spikes"] / neuron_steps if neuron_steps else None
    if "macs" in total and "skipped_macs" in total:
        total["active_fraction"] = active_fraction(total["macs"], total["skipped_macs"])
    return total


def exceeds(set_size: int | None, max_set_size: int | None) -> bool:
    """The abstain guard: a set larger than the limit (no set, or no limit, never abstains)."""
    return set_size is not None and max_set_size is not None and set_size > max_set_size


def language_model_card(dataplane: DataPlane, name: str, version: str | None) -> ModelCard:
    card = dataplane.card(name, version)
    if card.config["input"]["kind"] != "tokens":
        raise BadInputError(
            f"model {name!r} is a {card.config['task']} model over feature sequences; "
            "generation needs a language model"
        )
    return card


def check_generation_limits(options: GenerateOptions, dataplane: DataPlane) -> None:
    limit = dataplane.limits.max_sequence_length
    if options.max_tokens > limit:
        raise BadInputError(
            f"max_tokens is {options.max_tokens}; the limit is {limit} "
            "(NEUROSERVE_MAX_SEQUENCE_LENGTH); continue the session for more"
        )


# ---- the loop -------------------------------------------------------------------------------


async def _open_session(
    sessions: SessionManager,
    dataplane: DataPlane,
    options: GenerateOptions,
    card: ModelCard,
    owner: str | None,
) -> tuple[SessionInfo, ModelCard]:
    """The session to generate in, the given one (checked against the request) or a new
    one, and the model version it runs. An uncalibrated backend is refused (409) before the
    session is created or stepped."""
    if options.session_id is None:
        backend = options.backend or TORCH_BACKEND
        await run_in_threadpool(dataplane.calibration, card, backend)
        chosen = {"alpha": options.alpha, "score": options.score}
        info = await sessions.create(
            model=card.name,
            version=card.version,
            backend=backend,
            owner=owner,
            **{key: value for key, value in chosen.items() if value is not None},
        )
        return info, card
    info = await sessions.get(options.session_id, owner=owner)
    if info.model != card.name or (options.version is not None and info.version != card.version):
        raise BadInputError(
            f"session {options.session_id!r} runs model {info.model!r} version {info.version}, "
            f"not {card.name!r}" + (f" version {card.version}" if options.version else "")
        )
    if options.backend is not None and options.backend != info.backend:
        raise BadInputError(
            f"session {options.session_id!r} runs on backend {info.backend!r}; it cannot "
            f"switch to {options.backend!r}"
        )
    card = await run_in_threadpool(language_model_card, dataplane, info.model, info.version)
    await run_in_threadpool(dataplane.calibration, card, info.backend)
    return info, card


async def generate(
    options: GenerateOptions,
    model: str,
    *,
    sessions: SessionManager,
    dataplane: DataPlane,
    owner: str | None = None,
) -> AsyncIterator[GeneratedToken | GenerationDone]:
    """Feed `options.prompt` into a session, then generate up to `max_tokens` tokens.

    Everything a request can get wrong (unknown model or session, not a language model,
    prompt characters outside the vocabulary, limits, an uncalibrated backend) is checked
    before the session is created or stepped, so a refused request changes nothing.
    Generation abstains only when the request sets `max_set_size`; a set the data plane
    marks `abstain` under the server-wide limit does not stop it.
    """
    card = await run_in_threadpool(language_model_card, dataplane, model, options.version)
    vocabulary: list[str] = card.config["vocabulary"]
    check_generation_limits(options, dataplane)
    (prompt_ids,) = encode_prompts([options.prompt], vocabulary, dataplane.limits)  # [T]
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)  # token sampling only, never the sets

    info, card = await _open_session(sessions, dataplane, options, card, owner)
    vocabulary = card.config["vocabulary"]
    conformal = replace(
        info.conformal,  # the session's never_empty and online choices hold here too
        alpha=options.alpha if options.alpha is not None else info.alpha,
        score=options.score or info.score,
        max_set_size=options.max_set_size,
    )
    outcome = await sessions.step(info.session_id, prompt_ids, owner=owner, conformal=conformal)
    usage = [outcome.usage]
    text = ""
    generated = 0
    uncalibrated = 0
    warnings: list[str] = []
    finish: FinishReason = "length"
    for index in range(options.max_tokens):
        last, _ = outcome.answer  # the next token's distribution, answered at this position
        prediction = last.predictions[0]
        warnings = list(dict.fromkeys([*warnings, *last.warnings]))
        if exceeds(prediction.set_size, options.max_set_size):
            finish = "abstain"
            break
        token_id, sampling_probability = sample_token(
            prediction.probabilities, options.temperature, generator
        )
        outcome = await sessions.step(
            info.session_id,
            torch.tensor([token_id], dtype=torch.long),
            owner=owner,
            conformal=conformal,
        )  # committed (with the next token's answer) before the client sees this token
        usage.append(outcome.usage)
        token = vocabulary[token_id]
        text += token
        generated += 1
        uncalibrated += not prediction.calibrated
        yield GeneratedToken(
            index=index,
            token=token,
            token_id=token_id,
            sampling_probability=sampling_probability,
            prediction=prediction,
            vocabulary=vocabulary,
        )
        if stop_reached(text, token, options.stop):
            finish = "stop"
            break
    yield GenerationDone(
        finish_reason=finish,
        session_id=info.session_id,
        model=card.name,
        version=card.version,
        backend=outcome.info.backend,
        tokens=generated,
        text=text,
        step=outcome.info.step,
        seed=str(seed),
        calibrated=uncalibrated == 0,
        uncalibrated_tokens=uncalibrated,
        warnings=warnings,
        usage=sum_usage(usage),
    )
