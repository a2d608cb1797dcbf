"""Wire schemas of fine-tuning jobs (`/v1/finetune/jobs`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field

from service.api.schemas.common import StrictRequest
from service.finetuning.spec import BuiltinData, FinetuneSpec, InlineData


def _refuse_server_paths(value: object) -> object:
    if isinstance(value, dict) and "path" in value:
        raise ValueError(
            "naming a file on the server (`path`) is not allowed; send the .npz itself as `base64`"
        )
    return value


class NpzUpload(StrictRequest):
    """An `.npz` dataset sent with the job (its format: `models/userdata.py`)."""

    kind: Literal["npz"]
    base64: str = Field(
        min_length=1,
        description="The file's bytes, base64-encoded (NEUROSERVE_MAX_UPLOAD_BYTES decoded).",
    )


JobData = Annotated[
    InlineData | BuiltinData | Annotated[NpzUpload, BeforeValidator(_refuse_server_paths)],
    Field(discriminator="kind"),
]


class FinetuneJobRequest(FinetuneSpec):
    """A fine-tuning job: the fine-tuning spec (`service.finetuning.spec.FinetuneSpec`), with an
    `.npz` dataset sent in the body instead of named by path."""

    data: JobData = Field(
        description=(
            "Examples inline, a built-in dataset under a named shift, or an .npz (base64)."
        ),
        examples=[{"kind": "builtin", "name": "digits-seq", "shift": "translated"}],
    )


# Bodies of `POST /v1/finetune/jobs`.
FINETUNE_JOB_EXAMPLES: dict[str, Any] = {
    "translated-digits": {
        "summary": "Adapt the digits classifier to shifted digits (read-out and norms, 300 steps)",
        "value": {
            "model": "digits-lru",
            "backend": "torch",
            "data": {"kind": "builtin", "name": "digits-seq", "shift": "translated"},
            "parameters": "readout_and_norm",
            "steps": 300,
            "eval_every": 50,
        },
    },
    "inverted-digits-early-stop": {
        "summary": "Inverted digits, every parameter, stop after 5 evaluations without gain",
        "value": {
            "model": "digits-lru",
            "data": {"kind": "builtin", "name": "digits-seq", "shift": "inverted"},
            "steps": 2000,
            "lr": 0.001,
            "eval_every": 100,
            "patience": 5,
        },
    },
}


FinetuneJobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class FinetuneJobProgress(BaseModel):
    stage: str | None = Field(
        None, description="loading, tuning, calibrating, publishing, done or cancelled."
    )
    step: int = Field(description="Optimisation steps done.")
    total_steps: int = Field(description="Steps the job will run at most.")
    loss: float | None = Field(None, description="Training loss at the latest step.")
    validation_accuracy: float | None = Field(
        None, description="Accuracy on the held-out validation split at the latest evaluation."
    )
    best_step: int | None = Field(
        None, description="Step of the best validation so far: the checkpoint to publish."
    )
    eta_seconds: float | None = Field(
        None, description="Estimated seconds until the last step, from the pace so far."
    )


class FinetuneJob(BaseModel):
    """A fine-tuning job: where it stands, and how it ended."""

    job_id: str
    status: FinetuneJobStatus = Field(
        description="queued -> running -> succeeded | failed | cancelled."
    )
    model: str = Field(description="The model being tuned.")
    created_at: str | None = Field(None, description="ISO 8601 time of submission (UTC).")
    started_at: str | None = Field(None, description="When the current (or last) run began.")
    ended_at: str | None = Field(None, description="When the job ended.")
    progress: FinetuneJobProgress | None = None
    result: dict[str, Any] | None = Field(
        None,
        description=(
            "When succeeded: the new version and the metrics before and after tuning "
            "(the fine-tuning module's result, as JSON)."
        ),
    )
    error: str | None = Field(None, description="When failed: what went wrong.")
    cancel_requested: bool = Field(
        False, description="A cancel was asked for; a running job stops at its next step."
    )
    attempts: int = Field(0, description="Runs started (more than one after a retry).")
    workers_alive: int | None = Field(
        None,
        description="While queued on Redis: live `neuroserve worker` processes listening on "
        "the job's queue (RQ's worker registry). Null on the embedded queue, where the server "
        "runs jobs itself.",
    )
    waiting_reason: str | None = Field(
        None, description="Why a queued job is not starting, e.g. no worker is running."
    )
