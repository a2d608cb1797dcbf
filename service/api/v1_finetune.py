"""Native REST routes for fine-tuning jobs (`/v1/finetune/jobs...`): a thin adapter over a
`JobQueue` (`service.jobs.types`; `service.jobs.factory.open_job_queue`), which this
router's lifespan opens beside the app's own.

The body of `POST /v1/finetune/jobs` is the fine-tuning spec
(`service.finetuning.spec.FinetuneSpec`: model, version, backend, data, optimiser and every
hyper-parameter; `FinetuneJobRequest` in the schemas), validated so that a bad value is a
422 naming the field, and its data loaded and checked against the model, before anything is
queued. One thing differs from the spec: a client never names a file on the server. An .npz
dataset travels in the body as `{"kind": "npz", "base64": "..."}` (bounded by
`max_upload_bytes`); it is checked here and handed to the worker beside the spec, which
writes it to a scratch file of its own.
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
from starlette.concurrency import run_in_threadpool

from models.repository import VersionConflictError
from service.api.auth import Principal, PrincipalDependency, require_admin
from service.api.route_helpers import ACCESS_ERRORS, TOO_LARGE, error_doc, get_dataplane
from service.api.schemas.finetune import (
    FINETUNE_JOB_EXAMPLES,
    FinetuneJob,
    FinetuneJobRequest,
    NpzUpload,
)
from service.api.schemas.parameters import JobId
from service.dataplane.plane import DataPlane
from service.errors import (
    BadInputError,
    ConflictError,
    NeuroserveError,
    NotFoundError,
    RateLimitedError,
)
from service.finetuning.job import load_finetune_data
from service.finetuning.promotion import check_output_name
from service.finetuning.spec import FinetuneSpec, NpzData
from service.jobs.factory import open_job_queue
from service.jobs.types import (
    FINISHED,
    JobNotFoundError,
    JobQueue,
    JobQueueUnavailableError,
    JobRecord,
    JobSubmission,
    TooManyJobsError,
)

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


router = APIRouter(
    prefix="/v1/finetune", tags=["fine-tuning"], lifespan=jobs_lifespan, responses=ACCESS_ERRORS
)


async def get_jobs(request: Request) -> JobQueue:
    """FastAPI dependency: the job queue the lifespan opened."""
    return request.app.state.jobs


JobsDependency = Annotated[JobQueue, Depends(get_jobs)]
DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]
JOB_OWNERS = "job-owner"  # state store namespace: job id -> the key that submitted it


_UNKNOWN_JOB = error_doc(404, "Unknown job id (or its record expired, or another key's job).")
_ADMIN_ONLY = error_doc(403, "The API key is not an admin key (NEUROSERVE_ADMIN_API_KEYS).")
_UNAVAILABLE = error_doc(503, "The job queue's Redis cannot be reached.")


# ---- the body -> a validated submission -----------------------------------------------------


def decode_upload(encoded: str, max_bytes: int) -> bytes:
    """The bytes of an .npz sent as base64, checked against the upload limit."""
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


def validate_job(
    request: FinetuneJobRequest, upload: bytes | None, dataplane: DataPlane
) -> FinetuneSpec:
    """The request as the `FinetuneSpec` the worker will run, once its data is known to fit
    its model: BadInputError (422) naming the problem, NotFoundError (404) for an unknown
    model or version. The data is loaded and split exactly as the job will do it."""
    with tempfile.TemporaryDirectory(prefix="neuroserve-upload-") as scratch:
        path = Path(scratch) / "dataset.npz"
        fields = request.model_dump(exclude={"data"})
        if upload is None:
            spec = FinetuneSpec(**fields, data=request.data)
        else:
            path.write_bytes(upload)
            spec = FinetuneSpec(**fields, data=NpzData(kind="npz", path=str(path)))
        card = dataplane.card(spec.model, spec.version)
        if card.config["task"] != "classification":
            task = card.config["task"]
            raise _invalid(f"model: {spec.model} is a {task} model; only classifiers are tuned")
        try:
            check_output_name(dataplane.repository, spec.target_name, card)
        except VersionConflictError as error:
            raise ConflictError(str(error)) from None
        d_input = int(card.config["model_config"]["d_input"])
        try:
            load_finetune_data(spec, list(card.config["labels"]), d_input)
        except ValueError as error:
            raise _invalid("data: " + str(error).replace(str(path), "the uploaded .npz")) from None
    return spec


def build_submission(
    request: FinetuneJobRequest, dataplane: DataPlane, max_upload: int
) -> JobSubmission:
    """Validate the job and package what the worker needs: the spec as JSON and an upload
    beside it (the worker writes it to a path of its own and points `data` there)."""
    upload = None
    if isinstance(request.data, NpzUpload):
        upload = decode_upload(request.data.base64, max_upload)
    spec = validate_job(request, upload, dataplane)
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


# ---- ownership ------------------------------------------------------------------------------


async def _check_owner(request: Request, principal: Principal, job_id: str) -> None:
    """NotFoundError unless `principal` submitted the job: another key's job is answered
    exactly like a missing one, so ids reveal nothing. Open mode shares every job."""
    if principal.owner is None:
        return
    store = request.app.state.state_store
    owner = await store.get_record(JOB_OWNERS, job_id)
    if owner is None or owner.decode() != principal.owner:
        raise NotFoundError(f"no fine-tuning job with id {job_id!r}")


async def _reserve_job(request: Request, principal: Principal, jobs: JobQueue) -> str | None:
    """A place for one more job of the key, or RateLimitedError at its limit of queued or
    running jobs (counted across replicas with Redis: `service.api.limits`). Open mode has
    only the server-wide limit, NEUROSERVE_MAX_ACTIVE_JOBS: None."""
    if principal.owner is None:
        return None
    held = request.app.state.jobs_per_key
    for job_id in await held.keys(principal.owner):
        try:
            record = await run_in_threadpool(jobs.get, job_id)
        except JobNotFoundError:
            record = None
        if record is None or record.status in FINISHED:
            await held.gone(principal.owner, job_id)
    limit = request.app.state.settings.max_jobs_per_key
    return await held.reserve(
        principal.owner, limit, "queued or running jobs", "NEUROSERVE_MAX_JOBS_PER_KEY"
    )


# ---- routes ---------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=202,
    response_model=FinetuneJob,
    responses={
        **error_doc(404, "Unknown model or version."),
        **error_doc(409, "`output_name` names an existing model of another lineage."),
        **TOO_LARGE,
        **_ADMIN_ONLY,
        **error_doc(422, "An invalid spec; the message names the field."),
        **error_doc(
            429,
            "Too many jobs queued or running (NEUROSERVE_MAX_ACTIVE_JOBS, "
            "NEUROSERVE_MAX_JOBS_PER_KEY), or over the key's request rate.",
        ),
        **_UNAVAILABLE,
    },
    summary="Submit a fine-tuning job",
)
async def submit_job(
    request: Request,
    response: Response,
    jobs: JobsDependency,
    dataplane: DataPlaneDependency,
    principal: PrincipalDependency,
    body: Annotated[FinetuneJobRequest, Body(openapi_examples=FINETUNE_JOB_EXAMPLES)],
) -> FinetuneJob:
    """Queue a zeroth-order (forward-only) fine-tuning job; its data is checked against the
    model first. The tuned model is published as a new version when the job succeeds."""
    require_admin(principal)
    reservation = await _reserve_job(request, principal, jobs)
    try:
        max_upload = request.app.state.settings.max_upload_bytes
        submission = await run_in_threadpool(build_submission, body, dataplane, max_upload)
        record = await _call(jobs.submit, submission)
        if principal.owner is not None:
            await request.app.state.jobs_per_key.seen(principal.owner, record.job_id)
    finally:
        if reservation is not None:
            await request.app.state.jobs_per_key.gone(principal.owner, reservation)
    if principal.owner is not None:
        ttl = request.app.state.settings.job_record_ttl_seconds
        store = request.app.state.state_store
        await store.put_record(JOB_OWNERS, record.job_id, principal.owner.encode(), ttl)
    response.headers["Location"] = f"/v1/finetune/jobs/{record.job_id}"
    return _job_out(record)


@router.get(
    "/jobs/{job_id}",
    response_model=FinetuneJob,
    responses={**_UNKNOWN_JOB, **_UNAVAILABLE},
    summary="Status, progress and result of a job",
)
async def get_job(
    job_id: JobId, request: Request, jobs: JobsDependency, principal: PrincipalDependency
) -> FinetuneJob:
    """Where the job stands: status, progress (step, loss, validation accuracy), result."""
    await _check_owner(request, principal, job_id)
    return _job_out(await _call(jobs.get, job_id))


@router.delete(
    "/jobs/{job_id}",
    response_model=FinetuneJob,
    responses={
        202: {"model": FinetuneJob, "description": "Running: asked to stop at its next step."},
        **_ADMIN_ONLY,
        **_UNKNOWN_JOB,
        **_UNAVAILABLE,
    },
    summary="Cancel a job",
)
async def cancel_job(
    job_id: JobId,
    request: Request,
    response: Response,
    jobs: JobsDependency,
    principal: PrincipalDependency,
) -> FinetuneJob:
    """A queued job is removed at once (200, `cancelled`); a running one is asked to stop
    and ends `cancelled` without publishing (202, still `running`); a finished job is left
    as it was (200)."""
    require_admin(principal)
    await _check_owner(request, principal, job_id)
    record = await _call(jobs.cancel, job_id)
    response.status_code = 200 if record.status in FINISHED else 202
    return _job_out(record)
