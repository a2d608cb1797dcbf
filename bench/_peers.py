"""The two peers that bench/session_throughput.py measures neuroserve against.

- `hello_app`: the ceiling. One FastAPI route that parses the same JSON body as a session step
  and answers a constant: what the HTTP stack alone costs.
- `naive_app`: a stateful endpoint written the plain way. Per request: Redis GET of the
  session's state (safetensors bytes), one `model.step(x, state)` of the same built-in model,
  Redis SET of the new state. No batching, no calibration, one torch thread, the step run on
  the event loop (a thread-pool hop would cost more than the step itself).

Both are served by `serve`, which calls uvicorn the way `neuroserve serve` does:
`uvicorn.run(app, host, port, log_level)` for one worker; for more, uvicorn needs an import
string, so the app is rebuilt in each worker from the factory below and the environment.
"""

from __future__ import annotations

import os
import secrets

import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

NAIVE_REDIS_URL = "BENCH_NAIVE_REDIS_URL"  # the environment the naive factory reads
NAIVE_MODEL = "BENCH_NAIVE_MODEL"
NAIVE_PREFIX = "BENCH_NAIVE_PREFIX"
STATE_TTL_SECONDS = 600


def hello_app() -> FastAPI:
    app = FastAPI()

    @app.post("/hello")
    async def hello(body: dict) -> dict:
        return {"hello": "world", "fields": len(body)}

    return app


class StepRequest(BaseModel):
    inputs: list[list[float]]  # time steps x features; the bench sends one row


def naive_app() -> FastAPI:
    import redis.asyncio as redis
    import safetensors.torch
    import torch

    from models.repository import ModelRepository, default_repository_root

    torch.set_num_threads(1)
    loaded = ModelRepository(default_repository_root()).load(os.environ[NAIVE_MODEL])
    model, labels = loaded.model, loaded.card.config["labels"]
    store = redis.Redis.from_url(os.environ[NAIVE_REDIS_URL])
    prefix = os.environ.get(NAIVE_PREFIX, "bench-naive")

    def save(state: dict[str, torch.Tensor]) -> bytes:
        return safetensors.torch.save({name: t.contiguous() for name, t in state.items()})

    app = FastAPI()

    @app.post("/sessions", status_code=201)
    async def create() -> dict:
        session_id = secrets.token_urlsafe(24)
        await store.set(f"{prefix}:{session_id}", save(model.init_state(1)), ex=STATE_TTL_SECONDS)
        return {"session_id": session_id}

    @app.post("/sessions/{session_id}/step")
    async def step(session_id: str, body: StepRequest) -> dict:
        if not body.inputs:
            raise HTTPException(422, "inputs is empty")
        key = f"{prefix}:{session_id}"
        blob = await store.get(key)
        if blob is None:
            raise HTTPException(404, f"no session {session_id}")
        state = safetensors.torch.load(blob)
        with torch.inference_mode():
            for row in body.inputs:
                logits, state = model.step(torch.tensor([row], dtype=torch.float32), state)
            probabilities = torch.softmax(logits[0].double(), dim=-1)
        await store.set(key, save(state), ex=STATE_TTL_SECONDS)
        return {
            "session_id": session_id,
            "label": labels[int(probabilities.argmax())],
            "probabilities": probabilities.tolist(),
        }

    return app


def serve(app_name: str, port: int, workers: int) -> None:
    """Serve `hello_app` or `naive_app` on loopback with `workers` uvicorn processes."""
    factories = {"hello_app": hello_app, "naive_app": naive_app}
    if workers == 1:
        app = factories[app_name]()
        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
    else:
        uvicorn.run(
            f"{__name__}:{app_name}",
            factory=True,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            workers=workers,
        )
