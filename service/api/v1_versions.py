"""Admin routes over a model's versions: promote one to `latest`, roll `latest` back, delete
one (`/v1/models/{name}/...`).

A thin adapter over `models.repository.ModelRepository.promote / rollback / delete_version`,
which change a model's `latest.json` pointer under the model's file lock (atomic across
threads, replicas and job workers sharing the repository). Each answers the model's pointer
after the change. Refusals are 409 with what to do instead: deleting the latest or a version
that serves live sessions, rolling back with no earlier latest.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from models.latest_pointer import LatestPointer
from models.repository import VersionConflictError
from service.api.auth import PrincipalDependency, require_admin
from service.api.route_helpers import ACCESS_ERRORS, error_doc, get_dataplane
from service.api.schemas.parameters import ModelName, VersionPath
from service.dataplane.plane import DataPlane
from service.errors import ConflictError, NotFoundError

router = APIRouter(prefix="/v1/models", tags=["model versions"], responses=ACCESS_ERRORS)

DataPlaneDependency = Annotated[DataPlane, Depends(get_dataplane)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    **error_doc(403, "The API key is not an admin key (NEUROSERVE_ADMIN_API_KEYS)."),
    **error_doc(404, "Unknown model or version."),
}


class VersionPointer(BaseModel):
    """Which version of a model serves requests that name none."""

    model: str
    latest: str | None = Field(description="The version a request without one gets.")
    history: list[str] = Field(
        description="Versions in the order they became latest (rollback steps back)."
    )
    versions: list[str] = Field(description="Published versions.")
    deleted: list[str] = Field(description="Deleted version numbers (never reused).")


def _pointer_out(dataplane: DataPlane, name: str, pointer: LatestPointer) -> VersionPointer:
    return VersionPointer(
        model=name,
        latest=pointer.latest,
        history=pointer.history,
        versions=dataplane.versions(name),
        deleted=pointer.deleted,
    )


async def _change(dataplane: DataPlane, name: str, function: Any, *args: Any) -> VersionPointer:
    """Run a repository change in a thread (it waits for the model's lock) and answer the
    pointer after it; a refusal is a 409 saying why."""
    dataplane.card(name)  # 404 for an unknown or malformed name
    try:
        pointer = await run_in_threadpool(function, name, *args)
    except VersionConflictError as error:
        raise ConflictError(str(error)) from None
    return _pointer_out(dataplane, name, pointer)


@router.get(
    "/{name}/latest",
    response_model=VersionPointer,
    responses=error_doc(404, "Unknown model."),
    summary="Which version is latest, and the promotion history",
)
async def get_latest(name: ModelName, dataplane: DataPlaneDependency) -> VersionPointer:
    """The version that requests naming none get, the order versions became latest, and the
    published and deleted versions."""
    dataplane.card(name)
    pointer = await run_in_threadpool(dataplane.repository.pointer, name)
    return _pointer_out(dataplane, name, pointer)


@router.post(
    "/{name}/versions/{version}/promote",
    response_model=VersionPointer,
    responses=_ERRORS,
    summary="Make a version latest (admin)",
)
async def promote_version(
    name: ModelName,
    version: VersionPath,
    dataplane: DataPlaneDependency,
    principal: PrincipalDependency,
) -> VersionPointer:
    """Requests that name no version get this one from now on (on every replica sharing the
    repository); promoting the latest version changes nothing."""
    require_admin(principal)
    return await _change(dataplane, name, dataplane.repository.promote, version)


@router.post(
    "/{name}/rollback",
    response_model=VersionPointer,
    responses={**_ERRORS, **error_doc(409, "No earlier latest version to roll back to.")},
    summary="Make the previous latest version latest again (admin)",
)
async def rollback_latest(
    name: ModelName, dataplane: DataPlaneDependency, principal: PrincipalDependency
) -> VersionPointer:
    """The version that was latest before the current one becomes latest again (one step back
    in the history); 409 when there is none."""
    require_admin(principal)
    return await _change(dataplane, name, dataplane.repository.rollback)


@router.delete(
    "/{name}/versions/{version}",
    response_model=VersionPointer,
    responses={
        **_ERRORS,
        **error_doc(409, "The version is latest, or serves live sessions on this server."),
    },
    summary="Delete a version that is not latest and serves no live session (admin)",
)
async def delete_version(
    name: ModelName,
    version: VersionPath,
    request: Request,
    dataplane: DataPlaneDependency,
    principal: PrincipalDependency,
) -> VersionPointer:
    """Refused (409) for the latest version and for a version with live sessions on this
    replica (sessions it created or served and whose TTL has not run out); the count is in
    the message. Its files are removed and its number is never given to another version."""
    require_admin(principal)
    sessions = request.app.state.sessions

    def no_live_sessions() -> None:
        live = sessions.live_sessions_on(name, str(version))
        if live:
            raise VersionConflictError(
                f"version {version} of {name!r} serves {live} live session(s); delete them or "
                "wait for them to expire (their TTL), then delete the version"
            )

    if not version.isdigit():
        raise NotFoundError(f"model {name!r} has no version {version!r}")
    return await _change(
        dataplane, name, dataplane.repository.delete_version, version, no_live_sessions
    )
