"""Native REST routes for fine-tuning jobs (`/v1/finetune/jobs...`): a thin adapter over a
`JobQueue` (`service.jobs`), which this router's lifespan opens beside the app's own.

The body of `POST /v1/finetune/jobs` is the fine-tuning spec (`models.finetune.FinetuneSpec`:
model, version, backend, dataset, optimiser and every hyper-parameter), validated here so a
bad value is a 422 naming the field before anything is queued. One thing differs from the
spec: a client never names a file on the server. An .npz dataset travels in the body as
`{"kind": "npz", "base64": "..."}` (bounded by `max_upload_bytes`); it is checked here and
handed to the worker beside the spec, which writes it to a scratch file of its own.
"""

from __future__ import annotations

import base64
import binascii
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.dataplane import DataPlane
from service.errors import (
    BadInputError,
    NeuroserveError,
    NotFoundError,
    RateLimitedError,
    describe_validation_errors,
)
from service.jobs import (
    FINISHED,
    JobNotFoundError,
    JobQueue,
    JobQueueUnavailableError,
    JobRecord,
    JobSubmission,
    TooManyJobsError,
    open_job_queue,
)
from service.routers import get_dataplane
from service.schemas import ErrorResponse, FinetuneJob

logger = logging.getLogger("neuroserve.finetune")


ZIP_MAGIC = b"PK\x03\x04"  # every .npz numpy writes is a zip archive that starts so


class JobQueueUnavailable(NeuroserveError):
    status_code = 503
    code = "job_queue_unavailable"


@asynccontextmanager
async def jobs_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the job queue the settings ask for (runs inside the app's own lifespan)."""
    settings = app.state.settings
    queue = await run_in_threadpool(open_job_queue, settings)
    app.state.jobs = queue
    logger.info("fine-tuning jobs: %s queue", queue.kind)
    try:
        yield
    finally:
        await run_in_threadpool(queue.close)


router = APIRouter(prefix="/v1/finetune", tags=["fine-tuning"], lifespan=jobs_lifespan)


def get_jobs(request: Request) -> JobQueue:
    """FastAPI dependency: the job queue the lifespan opened."""
    return request.app.state.jobs


JobsDependency = Annotated[JobQueue, Depends(get_jobs)]
DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]


def _error(status: int, description: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": description}}


_UNKNOWN_JOB = _error(404, "Unknown job id (or its record expired).")
_UNAVAILABLE = _error(503, "The job queue's Redis cannot be reached.")


SPEC_DESCRIPTION = (
    "The fine-tuning spec (`models.finetune.FinetuneSpec`): model, version (latest when "
    "omitted), backend, data (inline examples, a built-in shifted dataset, or an .npz sent "
    'as `{"kind": "npz", "base64": "..."}`), optimiser and hyper-parameters.'
)
SPEC_EXAMPLE: dict[str, Any] = {
    "model": "digits-lru",
    "backend": "torch",
    "data": {"kind": "builtin", "name": "digits-seq", "shift": "translated"},
    "parameters": "readout_and_norm",
    "steps": 300,
    "eval_every": 50,
}


# ---- the body -> a validated submission -----------------------------------------------------


def decode_upload(data: dict[str, Any], max_bytes: int) -> bytes:
    """The .npz bytes of a `{"kind": "npz", "base64": ...}` data entry, size-checked."""
    if "path" in data:
        raise BadInputError(
            "data.path: naming a file on the server is not allowed; send the .npz itself as "
            "data.base64"
        )
    encoded = data.get("base64")
    if not isinstance(encoded, str) or not encoded:
        raise BadInputError("data.base64: an .npz dataset needs its bytes, base64-encoded")
    if len(encoded) > (max_bytes + 2) // 3 * 4 + 4:  # base64 holds 3 bytes per 4 characters
        raise BadInputError(
            f"data.base64: the .npz exceeds the upload limit of {max_bytes} bytes "
            "(NEUROSERVE_MAX_UPLOAD_BYTES)"
        )
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadInputError(f"data.base64: not valid base64 ({error})") from None
    if len(decoded) > max_bytes:
        raise BadInputError(
            f"data.base64: the .npz has {len(decoded)} bytes, over the upload limit of "
            f"{max_bytes} (NEUROSERVE_MAX_UPLOAD_BYTES)"
        )
    if not decoded.startswith(ZIP_MAGIC):
        raise BadInputError(
            "data.base64: not an .npz file (an .npz is a zip archive, as numpy.savez writes it)"
        )
    return decoded


def _invalid(detail: str) -> BadInputError:
    return BadInputError(f"invalid fine-tuning job: {detail}")


def validate_job(body: dict[str, Any], upload: bytes | None, dataplane: DataPlane) -> Any:
    """The body as a `FinetuneSpec` whose data fits its model, or an error naming the
    problem: BadInputError (422) for a bad field or data, NotFoundError (404) for an
    unknown model or version. The data is loaded and split exactly as the job will."""
    from models.finetune import FinetuneSpec, load_finetune_data

    with tempfile.TemporaryDirectory(prefix="neuroserve-upload-") as scratch:
        path = Path(scratch) / "dataset.npz"
        if upload is not None:
            path.write_bytes(upload)
            body = {**body, "data": {"kind": "npz", "path": str(path)}}
        try:
            spec = FinetuneSpec.model_validate(body)
        except ValidationError as error:
            raise _invalid(describe_validation_errors(error.errors())) from None
        card = dataplane.card(spec.model, spec.version)
        if card.config["task"] != "classification":
            raise _invalid(
                f"model: {spec.model} is a {card.config['task']} model, not a classifier"
            )
        d_input = int(card.config["model_config"]["d_input"])
        try:
            load_finetune_data(spec, list(card.config["labels"]), d_input)
        except ValueError as error:
            raise _invalid("data: " + str(error).replace(str(path), "the uploaded .npz")) from None
    return spec


def build_submission(body: dict[str, Any], dataplane: DataPlane, max_upload: int) -> JobSubmission:
    """Validate the body and package what the worker needs (an upload travels beside the
    spec; the worker writes it to a path of its own)."""
    data = body.get("data")
    upload = None
    if isinstance(data, dict) and data.get("kind") == "npz":
        upload = decode_upload(data, max_upload)
    spec = validate_job(body, upload, dataplane)
    spec_json = spec.model_dump(mode="json")
    if upload is not None:
        spec_json["data"] = {"kind": "npz"}
    return JobSubmission(spec=spec_json, model=spec.model, upload=upload)


def _job_out(record: JobRecord) -> FinetuneJob:
    return FinetuneJob.model_validate(record, from_attributes=True)


async def _call(function: Any, *args: Any) -> JobRecord:
    """Run a blocking queue call in a thread; map the queue's errors onto HTTP errors."""
    try:
        return await run_in_threadpool(function, *args)
    except JobNotFoundError as error:
        raise NotFoundError(str(error)) from None
    except TooManyJobsError as error:
        raise RateLimitedError(str(error)) from None
    except JobQueueUnavailableError as error:
        raise JobQueueUnavailable(str(error)) from None


# ---- routes ---------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=202,
    response_model=FinetuneJob,
    responses={
        **_error(404, "Unknown model or version."),
        **_error(413, "Request body too large."),
        **_error(422, "An invalid spec; the message names the field."),
        **_error(429, "Too many jobs queued or running (NEUROSERVE_MAX_ACTIVE_JOBS)."),
        **_UNAVAILABLE,
    },
    summary="Submit a fine-tuning job",
)
async def submit_job(
    request: Request,
    response: Response,
    jobs: JobsDependency,
    dataplane: DataPlaneDependency,
    body: Annotated[dict[str, Any], Body(description=SPEC_DESCRIPTION, examples=[SPEC_EXAMPLE])],
) -> FinetuneJob:
    max_upload = request.app.state.settings.max_upload_bytes
    submission = await run_in_threadpool(build_submission, body, dataplane, max_upload)
    record = await _call(jobs.submit, submission)
    response.headers["Location"] = f"/v1/finetune/jobs/{record.job_id}"
    return _job_out(record)


@router.get(
    "/jobs/{job_id}",
    response_model=FinetuneJob,
    responses={**_UNKNOWN_JOB, **_UNAVAILABLE},
    summary="Status, progress and result of a job",
)
async def get_job(job_id: str, jobs: JobsDependency) -> FinetuneJob:
    return _job_out(await _call(jobs.get, job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=FinetuneJob,
    responses={
        202: {"model": FinetuneJob, "description": "Running: asked to stop at its next step."},
        **_UNKNOWN_JOB,
        **_UNAVAILABLE,
    },
    summary="Cancel a job",
)
async def cancel_job(job_id: str, response: Response, jobs: JobsDependency) -> FinetuneJob:
    """A queued job is removed at once (200, `cancelled`); a running one is asked to stop
    and ends `cancelled` without publishing (202, still `running`); a finished job is left
    as it was (200)."""
    record = await _call(jobs.cancel, job_id)
    response.status_code = 200 if record.status in FINISHED else 202
    return _job_out(record)
