"""Token generation for language models, whatever protocol asks for it.

`generate(options, ...)` is an async iterator over one `GeneratedToken` per new token and a
final `GenerationDone`; the websocket route streams them, the REST twin collects them.

Each round: the prediction for the next token is built from the session's last logits by
the data plane's prediction builder (probabilities, confidence, conformal set, entropy); if
the set holds more than `max_set_size` tokens the model is too unsure to go on and
generation stops with `abstain`; otherwise a token is sampled and *stepped into the session*
before it is handed out. So every token a client receives has been committed through the
session manager, and a client that leaves mid-stream leaves a session whose state and step
count cover exactly the prompt and the tokens that were committed. Resuming the session with
a new prompt therefore continues from prompt + generated text + new prompt.

Sampling uses the model's raw logits divided by `temperature` (the predictive mean of the
softmax for sampling backends), with a `torch.Generator` seeded per request, exactly as
`models.evaluate.generate` does: a seeded request reproduces that reference loop token for
token. `temperature == 0` is greedy. The reported `probability`, `confidence` and set come
from the prediction builder, i.e. they are calibrated when the model is.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import torch
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from hardware_backends.base import Usage
from models.repository import ModelCard
from service.dataplane import (
    TORCH_BACKEND,
    ClassPrediction,
    ConformalOptions,
    DataPlane,
    encode_prompts,
)
from service.errors import BadInputError
from service.schemas import GenerateOptions
from service.sessions import SessionInfo, SessionManager, StepOutcome

FinishReason = Literal["length", "stop", "abstain"]
ADDITIVE_USAGE = (*(f.name for f in fields(Usage)), "steps", "compute_seconds")


@dataclass(frozen=True)
class GeneratedToken:
    index: int  # position among the generated tokens, from 0
    token: str
    token_id: int
    probability: float  # of `token` under `prediction.probabilities`
    prediction: ClassPrediction  # the next-token answer the token was drawn against

    def message(self) -> dict[str, Any]:
        return {
            "type": "token",
            "index": self.index,
            "token": self.token,
            "token_id": self.token_id,
            "probability": self.probability,
            "confidence": self.prediction.confidence,
            "prediction_set": self.prediction.prediction_set,
            "set_size": self.prediction.set_size,
            "entropy": self.prediction.entropy,
            "id": self.prediction.id,
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
    seed: int
    usage: dict[str, Any]

    def message(self) -> dict[str, Any]:
        return {"type": "done", **self.__dict__}


# ---- pieces ---------------------------------------------------------------------------------


async def session_prediction(
    dataplane: DataPlane,
    outcome: StepOutcome,
    conformal: ConformalOptions,
    *,
    usage: dict[str, Any] | None = None,
    owner: str | None = None,
) -> ClassPrediction:
    """The answer for a session step's last logits ([C], or [S, C] from a sampling backend),
    built by the data plane (calibration, conformal set) and published (metrics, feedback)."""
    info = outcome.info
    batch = await run_in_threadpool(
        dataplane.build_predictions,
        outcome.card,
        info.backend,
        outcome.logits.unsqueeze(-2),  # [1, C] or [S, 1, C]
        usage,
        conformal=conformal,
        backend_options=info.options,
    )
    await dataplane.publish(batch, session_id=info.session_id, owner=owner)
    return batch.predictions[0]


def sampling_probabilities(logits: Tensor, temperature: float) -> Tensor:
    """The distribution tokens are drawn from: logits [C] or [S, C] -> probs [1, C] float32."""
    samples = logits.unsqueeze(0) if logits.dim() == 1 else logits  # [S, C]
    return torch.softmax(samples.float() / temperature, dim=-1).mean(dim=0, keepdim=True)  # [1, C]


def sample_token(logits: Tensor, temperature: float, generator: torch.Generator) -> int:
    """Greedy when temperature is 0, else one draw from `sampling_probabilities`."""
    if temperature == 0.0:
        samples = logits.unsqueeze(0) if logits.dim() == 1 else logits  # [S, C]
        return int(torch.softmax(samples.double(), dim=-1).mean(dim=0).argmax())
    probs = sampling_probabilities(logits, temperature)  # [1, C]
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_reached(text: str, new_token: str, stops: Sequence[str]) -> bool:
    """True when a stop string ends inside the newly added token (earlier ones were checked)."""
    for stop in stops:
        window = text[max(0, len(text) - len(new_token) - len(stop) + 1) :]
        if stop in window:
            return True
    return False


def sum_usage(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Usage of several steps: the work counts, energies, steps and compute time add up;
    sparsity is recomputed; per-step facts such as the batch size are left out."""
    total: dict[str, Any] = {}
    for chunk in chunks:
        for key in ADDITIVE_USAGE:
            if isinstance(chunk.get(key), int | float):
                total[key] = total.get(key, 0) + chunk[key]
    if "spikes" in total and "neuron_steps" in total:
        neuron_steps = total["neuron_steps"]
        total["sparsity"] = total["spikes"] / neuron_steps if neuron_steps else None
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
    generator = torch.Generator().manual_seed(seed)

    info, card = await _open_session(sessions, dataplane, options, card, owner)
    vocabulary = card.config["vocabulary"]
    conformal = ConformalOptions(
        alpha=options.alpha if options.alpha is not None else info.alpha,
        score=options.score or info.score,
        max_set_size=options.max_set_size,
    )
    outcome = await sessions.step(info.session_id, prompt_ids, owner=owner)
    usage = [outcome.usage]
    text = ""
    generated = 0
    finish: FinishReason = "length"
    for index in range(options.max_tokens):
        # A randomised score draws from its own seed per token, so a seeded request is
        # reproducible in its sets as well as its tokens.
        token_conformal = replace(conformal, seed=(seed + 1 + index) % 2**63)
        prediction = await session_prediction(
            dataplane, outcome, token_conformal, usage=outcome.usage, owner=owner
        )
        if exceeds(prediction.set_size, options.max_set_size):
            finish = "abstain"
            break
        token_id = sample_token(outcome.logits, options.temperature, generator)
        outcome = await sessions.step(
            info.session_id, torch.tensor([token_id], dtype=torch.long), owner=owner
        )  # committed before the client sees the token
        usage.append(outcome.usage)
        token = vocabulary[token_id]
        text += token
        generated += 1
        yield GeneratedToken(
            index=index,
            token=token,
            token_id=token_id,
            probability=prediction.probabilities[token_id],
            prediction=prediction,
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
        seed=seed,
        usage=sum_usage(usage),
    )
