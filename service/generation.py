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
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from models.repository import ModelCard
from service.dataplane import ClassPrediction, DataPlane, encode_prompts, predictions_from_logits
from service.errors import BadInputError
from service.schemas import GenerateOptions

FinishReason = Literal["length", "stop", "abstain"]
DEFAULT_ALPHA = 0.1
DEFAULT_SCORE = "aps"


class SessionsLike(Protocol):
    """The part of `service.sessions.SessionManager` that generation uses."""

    async def create(self, *, model: str, **kwargs: Any) -> Any: ...
    async def step(self, session_id: str, inputs: Tensor, **kwargs: Any) -> Any: ...
    async def get(self, session_id: str, **kwargs: Any) -> Any: ...
    async def delete(self, session_id: str, **kwargs: Any) -> bool: ...


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


def step_predictor(
    dataplane: DataPlane, card: ModelCard, backend: str, *, alpha: float, score: str
) -> Callable[[Tensor], ClassPrediction]:
    """The prediction for one step's logits: [C], or [S, C] from a sampling backend, whose
    samples are summarised by the mean of their probabilities."""
    config = card.config
    labels = config["vocabulary"] if config["task"] == "language-model" else config["labels"]

    def predict(logits: Tensor) -> ClassPrediction:
        if logits.dim() == 2:  # [S, C]: log of the predictive mean is a valid logit vector
            logits = torch.softmax(logits.double(), dim=-1).mean(dim=0).log()  # [C]
        return predictions_from_logits(logits.unsqueeze(0), labels)[0]

    return predict


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
    """Usage of several steps: counts and energies add up; sparsity is recomputed."""
    total: dict[str, Any] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            if key != "sparsity" and isinstance(value, int | float) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    if "spikes" in total and "neuron_steps" in total:
        total["sparsity"] = (
            total["spikes"] / total["neuron_steps"] if total["neuron_steps"] else None
        )
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
    sessions: SessionsLike, options: GenerateOptions, card: ModelCard, owner: str | None
) -> Any:
    """The session to generate in: the given one (checked against the request) or a new one."""
    if options.session_id is None:
        return await sessions.create(
            model=card.name,
            version=card.version,
            backend=options.backend or "torch",
            alpha=options.alpha if options.alpha is not None else DEFAULT_ALPHA,
            score=options.score or DEFAULT_SCORE,
            owner=owner,
        )
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
    return info


async def generate(
    options: GenerateOptions,
    model: str,
    *,
    sessions: SessionsLike,
    dataplane: DataPlane,
    owner: str | None = None,
) -> AsyncIterator[GeneratedToken | GenerationDone]:
    """Feed `options.prompt` into a session, then generate up to `max_tokens` tokens.

    Everything a request can get wrong (unknown model, not a language model, prompt
    characters outside the vocabulary, limits) is checked before a session is created or
    stepped, so a refused request changes nothing.
    """
    card = language_model_card(dataplane, model, options.version)
    vocabulary: list[str] = card.config["vocabulary"]
    check_generation_limits(options, dataplane)
    (prompt_ids,) = encode_prompts([options.prompt], vocabulary, dataplane.limits)  # [T]
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)

    info = await _open_session(sessions, options, card, owner)
    if info.version != card.version:  # a resumed session keeps the version it started on
        card = language_model_card(dataplane, info.model, info.version)
    predict = step_predictor(
        dataplane,
        card,
        info.backend,
        alpha=options.alpha if options.alpha is not None else info.alpha,
        score=options.score or info.score,
    )
    outcome = await sessions.step(info.session_id, prompt_ids, owner=owner)
    usage = [outcome.usage]
    text = ""
    generated = 0
    finish: FinishReason = "length"
    for index in range(options.max_tokens):
        prediction = predict(outcome.logits)
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
