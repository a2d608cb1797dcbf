"""Inference statistics per model version, as Triton's statistics extension reports them:
how many requests succeeded and failed and how long they took, how many inferences (rows)
were answered, and when the last one was. Counted by the Open Inference Protocol's infer
core (`service.api.v2_infer.run_infer`), so V2 over HTTP and over gRPC share one count; kept
in memory per replica since start-up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0  # summed wall time, nanoseconds


@dataclass
class VersionStatistics:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows answered (a request of N sequences counts N)
    execution_count: int = 0  # successful requests
    last_inference_ms: int = 0  # unix time of the last request, milliseconds; 0: never

    def copy(self) -> VersionStatistics:
        return VersionStatistics(
            Duration(self.success.count, self.success.ns),
            Duration(self.fail.count, self.fail.ns),
            self.inference_count,
            self.execution_count,
            self.last_inference_ms,
        )


class InferenceStatistics:
    """Counters per (model, version); safe to update from many threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_version: dict[tuple[str, str], VersionStatistics] = {}

    def record(
        self, model: str, version: str, *, ok: bool, nanoseconds: int, inferences: int = 0
    ) -> None:
        with self._lock:
            stats = self._by_version.get((model, version))
            if stats is None:
                stats = self._by_version[(model, version)] = VersionStatistics()
            duration = stats.success if ok else stats.fail
            duration.count += 1
            duration.ns += nanoseconds
            if ok:
                stats.inference_count += inferences
                stats.execution_count += 1
            stats.last_inference_ms = int(time.time() * 1000)

    def get(self, model: str, version: str) -> VersionStatistics:
        """A copy of the version's counters (zeros when it never served a request)."""
        with self._lock:
            stats = self._by_version.get((model, version))
            return stats.copy() if stats is not None else VersionStatistics()
