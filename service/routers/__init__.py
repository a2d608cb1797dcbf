"""HTTP routers: thin adapters from each protocol onto the `DataPlane`."""

from __future__ import annotations

from fastapi import Request

from service.dataplane import DataPlane


def get_dataplane(request: Request) -> DataPlane:
    """FastAPI dependency: the data plane the app's lifespan created."""
    return request.app.state.dataplane
