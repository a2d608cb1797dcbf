"""Prepared runners for sessions: the unit of micro-batching.

Sessions whose model version, backend and backend options agree share one prepared runner
and one state signature, so their steps can be stacked into one batched step.
`SessionRunners` prepares each such runner once, in a worker thread (an ONNX export or an
analog chip programming can take seconds), shares one preparation between concurrent
callers, and keeps the most recently used ones.

The runner is prepared under the model key `<name>/<version>@<weights sha256 prefix>`: a
version number alone can name different weights (two repositories in one process, or a
version re-published), and the registry's runner cache must never mix them up.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from hardware_backends import base as backend_base
from hardware_backends.base import Runner
from hardware_backends.registry import freeze_options, prepare_runner
from models.repository import ArtifactError, ModelCard
from service.batching import state_rows
from service.dataplane.plane import DataPlane
from service.errors import BadInputError, ServiceUnavailableError
from service.sessions.inputs import ChunkSpec
from service.state.codec import StateSignature

DEFAULT_CACHE_SIZE = 64


@dataclass(frozen=True)
class SessionRunner:
    """A runner that sessions share, and what their states and chunks must look like."""

    key: Hashable  # (model, version, backend, frozen options)
    card: ModelCard
    runner: Runner
    signature: StateSignature  # what a stored state must match to be stepped here
    rows: int  # state rows per session (S chains for sampling backends)
    spec: ChunkSpec


class SessionRunners:
    """Prepared runners by (model, version, backend, options), least recently used dropped."""

    def __init__(self, dataplane: DataPlane, maxsize: int = DEFAULT_CACHE_SIZE) -> None:
        self.dataplane = dataplane
        self.maxsize = maxsize
        self._ready: OrderedDict[Hashable, SessionRunner] = OrderedDict()
        self._preparing: dict[Hashable, asyncio.Future[SessionRunner]] = {}

    async def get(
        self, model: str, version: str, backend: str, options: dict[str, Any]
    ) -> SessionRunner:
        """The runner for these settings; BadInputError for an unknown backend or bad
        options, ServiceUnavailableError when the backend cannot run here."""
        key = (model, version, backend, freeze_options(options))
        ready = self._ready.get(key)
        if ready is not None:
            self._ready.move_to_end(key)
            return ready
        preparing = self._preparing.get(key)
        if preparing is None:
            preparing = asyncio.ensure_future(
                run_in_threadpool(self._prepare, key, model, version, backend, options)
            )
            self._preparing[key] = preparing
        try:
            ready = await asyncio.shield(preparing)  # one caller giving up stops no one else
        finally:
            if preparing.done() and self._preparing.get(key) is preparing:
                del self._preparing[key]
        self._ready[key] = ready
        while len(self._ready) > self.maxsize:
            self._ready.popitem(last=False)
        return ready

    def _prepare(
        self, key: Hashable, model: str, version: str, backend: str, options: dict[str, Any]
    ) -> SessionRunner:
        card = self.dataplane.card(model, version)
        loaded = self.dataplane.repository.load(card.name, card.version)
        model_key = f"{card.name}/{card.version}@{card.config['weights_sha256'][:16]}"
        try:
            runner = prepare_runner(backend, loaded.model, model_key=model_key, options=options)
        except backend_base.UnknownBackendError as error:
            raise BadInputError(str(error)) from None
        except backend_base.BackendUnavailableError as error:
            raise ServiceUnavailableError(str(error)) from None
        except ArtifactError:
            raise  # a broken artifact is the server's problem (503), not bad options
        except ValueError as error:  # options that the backend's schema refuses
            raise BadInputError(str(error)) from None
        initial = runner.init_state(1)
        signature = StateSignature.of(
            initial, model=card.name, version=card.version, backend=backend
        )
        return SessionRunner(key, card, runner, signature, state_rows(initial), ChunkSpec.of(card))
