"""The API's documentation as served: `/docs` (Swagger UI), `/redoc` (ReDoc) and the OpenAPI
schema behind them (`/openapi.json`).

- The pages load their JavaScript and CSS from this server (`/docs/assets/...`), files shipped by
  the installed `fastapi-offline` package (Swagger UI 5 and ReDoc 2 builds), so they work on a
  machine with no internet: no CDN, no web fonts, no online validator badge.
- FastAPI documents a 422 `HTTPValidationError` (`{"detail": [...]}`) on every route with
  parameters; this server never answers that shape (`service.api.error_handlers`: 422
  `ErrorResponse` on `/v1`, 400 `V2ErrorResponse` on `/v2`). The schema drops that default; a
  route that can answer 422 documents it itself with `route_helpers.error_doc`.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    swagger_ui_default_parameters,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = DOCS_URL + "/assets"  # under /docs: open without an API key, like the pages
ASSETS_DIRECTORY = files("fastapi_offline") / "static"

# Swagger UI's default `validatorUrl` is an online service (a badge fetched from the internet).
SWAGGER_UI_PARAMETERS: dict[str, Any] = {
    **swagger_ui_default_parameters,
    "validatorUrl": None,
}

_FASTAPI_VALIDATION_ERROR = "#/components/schemas/HTTPValidationError"
_FASTAPI_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError")


def without_fastapi_validation_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without FastAPI's default 422 `HTTPValidationError` responses (and their
    component schemas, once nothing refers to them)."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            documented = responses.get("422", {}).get("content", {}).get("application/json", {})
            if documented.get("schema", {}).get("$ref") == _FASTAPI_VALIDATION_ERROR:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    text = repr(schema.get("paths", {}))
    for name in _FASTAPI_ERROR_SCHEMAS:
        if f"#/components/schemas/{name}" not in text:
            components.pop(name, None)
    return schema


def install_api_docs(app: FastAPI) -> None:
    """Serve `/docs`, `/redoc` and their assets on `app` (built with `docs_url=None,
    redoc_url=None`), and generate its schema without FastAPI's default 422 documentation."""

    build_schema = app.openapi  # FastAPI's: builds the schema once and caches it on the app

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = without_fastapi_validation_errors(build_schema())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.mount(ASSETS_URL, StaticFiles(directory=str(ASSETS_DIRECTORY)), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
