"""What the routers share: the data plane dependency and responses serialised once."""

from __future__ import annotations

from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel

from service.api.schemas.common import ErrorResponse, V2ErrorResponse
from service.dataplane.plane import DataPlane


async def get_dataplane(request: Request) -> DataPlane:
    """FastAPI dependency: the data plane the app's lifespan created (async: inline, no
    worker thread)."""
    return request.app.state.dataplane


def serialized(model: BaseModel, status_code: int = 200) -> Response:
    """`model` as a JSON response, serialised once by pydantic's core. A route that returns
    its model instead has FastAPI dump, re-validate and encode it against the route's
    `response_model` (which still documents the shape)."""
    return Response(
        model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        media_type="application/json",
    )


def error_doc(
    status: int, description: str, model: type[BaseModel] = ErrorResponse
) -> dict[int | str, dict[str, Any]]:
    """An entry of a route's `responses`: `status` answered with the error body (`/v1`'s by
    default; `V2ErrorResponse` on `/v2`). Document every 4xx/5xx a route really answers, in the
    shape `service.api.error_handlers` sends (tests/service/test_openapi_docs.py checks both)."""
    return {status: {"model": model, "description": description}}


UNAUTHORIZED_DESCRIPTION = (
    "API keys are configured (NEUROSERVE_API_KEYS) and the request sent none, or an unknown one "
    "(`Authorization: Bearer <key>` or `X-API-Key`)."
)
RATE_LIMITED_DESCRIPTION = (
    "Over the API key's request rate (NEUROSERVE_RATE_LIMIT_PER_SECOND); retry after the "
    "`Retry-After` seconds."
)
# What every route but the open ones (health probes, metrics, docs) may answer.
ACCESS_ERRORS = {
    **error_doc(401, UNAUTHORIZED_DESCRIPTION),
    **error_doc(429, RATE_LIMITED_DESCRIPTION),
}
V2_ACCESS_ERRORS = {
    **error_doc(401, UNAUTHORIZED_DESCRIPTION, V2ErrorResponse),
    **error_doc(429, RATE_LIMITED_DESCRIPTION, V2ErrorResponse),
}
TOO_LARGE_DESCRIPTION = "Request body over NEUROSERVE_MAX_REQUEST_BYTES."
TOO_LARGE = error_doc(413, TOO_LARGE_DESCRIPTION)
