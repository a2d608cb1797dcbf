"""Path and query parameters the routes share, each with its description and examples.

Examples are OpenAPI example objects (`{"name": {"summary": ..., "value": ...}}`, FastAPI's
`openapi_examples`): Swagger UI offers them in a list and fills "Try it out" with the first.
The first example of a route's parameters goes with the first example of its body
(`tests/service/test_openapi_docs.py` sends them together to the built-in models). Ids that a
server hands out (sessions, jobs) can only be shown by their form.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query

Examples = dict[str, Any]  # FastAPI's `openapi_examples`: name -> {"summary", "value"}


def examples(*values: tuple[str, Any]) -> Examples:
    """`(summary, value)` pairs as OpenAPI examples, named by their value."""
    return {str(value): {"summary": summary, "value": value} for summary, value in values}


_CLASSIFIER = ("The built-in digits classifier (8 rows of 8 pixels)", "digits-lru")
_SPIKING_CLASSIFIER = ("The built-in spiking digits classifier", "digits-snn")
_LANGUAGE_MODEL = ("The built-in character language model", "charlm-selective")

ModelName = Annotated[
    str,
    Path(
        description="A model's name, as `GET /v1/models` lists it.",
        openapi_examples=examples(_CLASSIFIER, _SPIKING_CLASSIFIER, _LANGUAGE_MODEL),
    ),
]
ClassifierName = Annotated[
    str,
    Path(
        description="A classifier's name, as `GET /v1/models` lists it.",
        openapi_examples=examples(_CLASSIFIER, _SPIKING_CLASSIFIER),
    ),
]
LanguageModelName = Annotated[
    str,
    Path(
        description="A language model's name, as `GET /v1/models` lists it.",
        openapi_examples=examples(_LANGUAGE_MODEL),
    ),
]
VersionPath = Annotated[
    str,
    Path(
        description="A model version (`versions` in the model's metadata).",
        openapi_examples=examples(("The first published version", "1")),
    ),
]
VersionQuery = Annotated[
    str | None,
    Query(
        description="A model version; the latest when omitted.",
        openapi_examples=examples(("The first published version", "1")),
    ),
]
BackendQuery = Annotated[
    str,
    Query(
        min_length=1,
        description="Hardware backend: torch, onnxruntime, analog_imc, stochastic or a plugin.",
        openapi_examples=examples(
            ("Plain PyTorch", "torch"), ("The simulated analog in-memory crossbar", "analog_imc")
        ),
    ),
]
SessionId = Annotated[
    str,
    Path(
        description="The `session_id` that `POST /v1/sessions` returned.",
        openapi_examples=examples(
            ("A session id (32 URL-safe characters)", "b3JkZXJseS1zZXNzaW9uLWlkLWZvcm0x")
        ),
    ),
]
JobId = Annotated[
    str,
    Path(
        description="The `job_id` that `POST /v1/finetune/jobs` returned.",
        openapi_examples=examples(("A job id (32 hex digits)", "4f2c9a7e1b3d4c5e8f9a0b1c2d3e4f50")),
    ),
]
