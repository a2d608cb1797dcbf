"""The gRPC endpoint's life: a `grpc.aio` server in the app's event loop, started and stopped
by the app's lifespan, so every server process (`neuroserve serve --workers N`) serves gRPC
with its own data plane and session plane, exactly as it serves HTTP.

With several workers each process listens on the same port with SO_REUSEPORT and the
kernel spreads connections over them (a gRPC channel is one connection: a client's calls
stay on one worker, and sessions live in Redis, so any worker continues any sequence). With
one worker the port is exclusive, so a port that is taken fails the start instead of being
silently shared.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api.auth import KeyRing
from service.api.limits import KeyRates
from service.api.v2_grpc.calls import CallGate
from service.api.v2_grpc.streaming import StreamingServicer
from service.api.v2_models import ServingLimits
from service.dataplane.plane import DataPlane
from service.sessions.plane import SessionManager
from service.settings import Settings

logger = logging.getLogger("neuroserve.grpc")

STOP_GRACE_SECONDS = 5.0  # calls in flight at shutdown get this long to finish


@dataclass
class GrpcEndpoint:
    server: grpc.aio.Server
    port: int  # the bound port (the chosen one when the setting is 0)

    async def stop(self) -> None:
        await self.server.stop(STOP_GRACE_SECONDS)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(
    settings: Settings,
    *,
    dataplane: DataPlane,
    sessions: SessionManager,
    keys: KeyRing,
    rates: KeyRates,
) -> GrpcEndpoint:
    """Listen on settings.host:settings.grpc_port; RuntimeError naming the settings when the
    port cannot be had."""
    server = grpc.aio.server(
        options=[
            # Bigger messages are refused (RESOURCE_EXHAUSTED) before they are parsed.
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ]
    )
    limits = ServingLimits(
        max_batch_size=settings.max_batch_size,
        session_ttl_seconds=settings.session_ttl_seconds,
        batch_window_ms=settings.batch_window_ms,
    )
    servicer = StreamingServicer(dataplane, sessions, CallGate(keys, rates), limits)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    address = _address(settings.host, settings.grpc_port)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise RuntimeError(
            f"cannot listen for gRPC on {address} (is the port taken?): choose another with "
            "NEUROSERVE_GRPC_PORT (--grpc-port) or turn gRPC off with "
            "NEUROSERVE_GRPC_ENABLED=false (--no-grpc)"
        )
    await server.start()
    logger.info(
        "gRPC (inference.GRPCInferenceService) listening on %s", _address(settings.host, port)
    )
    return GrpcEndpoint(server, port)
