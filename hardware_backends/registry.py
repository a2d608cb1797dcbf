"""Backend discovery through entry points, and a bounded cache of prepared runners.

Every backend, the built-in ones included, is registered in the entry-point group
`neuroserve.backends` ("name = package.module:BackendClass"), so a third party adds one by
installing a package. A backend whose import or construction fails is listed as
unavailable with the reason; it never takes the registry down.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from hardware_backends.base import (
    Backend,
    BackendUnavailableError,
    Runner,
    UnknownBackendError,
)

if TYPE_CHECKING:
    from models.base import StatefulModel

ENTRY_POINT_GROUP = "neuroserve.backends"
DEFAULT_RUNNER_CACHE_SIZE = 32


@dataclass(frozen=True)
class BackendStatus:
    name: str
    target: str  # "module:attr" the entry point names
    distribution: str | None  # the installed package that registered it
    reason: str | None  # None when usable here, else why not


def freeze_options(options: Any) -> Hashable:
    """A hashable, order-independent copy of backend options, for cache keys."""
    if isinstance(options, Mapping):
        return tuple(sorted((str(k), freeze_options(v)) for k, v in options.items()))
    if isinstance(options, list | tuple):
        return tuple(freeze_options(v) for v in options)
    if options is None or isinstance(options, str | int | float | bool):
        return options
    raise ValueError(f"backend option values must be JSON-like, got {type(options).__name__}")


class RunnerCache:
    """LRU of prepared runners keyed by (backend, model_key, frozen options) tuples; thread-safe.

    Preparing can be slow (an ONNX export), so two requests for the same key wait for one
    preparation instead of doing it twice, while other keys go ahead.
    """

    def __init__(self, maxsize: int = DEFAULT_RUNNER_CACHE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"runner cache size must be at least 1, got {maxsize}")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, Runner] = OrderedDict()
        self._preparing: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, key: Hashable) -> Runner | None:
        runner = self._entries.get(key)
        if runner is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return runner

    def get_or_prepare(self, key: Hashable, prepare: Callable[[], Runner]) -> Runner:
        with self._lock:
            runner = self._lookup(key)
            if runner is not None:
                return runner
            key_lock = self._preparing.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                runner = self._lookup(key)
                if runner is not None:
                    return runner
                self.misses += 1
            try:
                runner = prepare()
                with self._lock:
                    self._entries[key] = runner
                    while len(self._entries) > self.maxsize:
                        self._entries.popitem(last=False)
            finally:
                with self._lock:
                    self._preparing.pop(key, None)
        return runner

    def invalidate(self, model_key: str | None = None) -> int:
        """Drop the runners of one model_key (all when None); returns how many were dropped."""
        with self._lock:
            doomed = [k for k in self._entries if model_key is None or k[1] == model_key]
            for key in doomed:
                del self._entries[key]
        return len(doomed)


class BackendRegistry:
    """The backends registered in one entry-point group, loaded lazily on first use."""

    def __init__(
        self,
        group: str = ENTRY_POINT_GROUP,
        runner_cache_size: int = DEFAULT_RUNNER_CACHE_SIZE,
    ) -> None:
        self.group = group
        self.runners = RunnerCache(runner_cache_size)
        self._lock = threading.RLock()
        self._entry_points: dict[str, list[EntryPoint]] | None = None
        self._loaded: dict[str, Backend | BaseException] = {}

    def refresh(self) -> None:
        """Forget what was discovered, e.g. after installing a plugin into this process."""
        with self._lock:
            self._entry_points = None
            self._loaded.clear()

    def _discovered(self) -> dict[str, list[EntryPoint]]:
        with self._lock:
            if self._entry_points is None:
                found: dict[str, list[EntryPoint]] = {}
                for ep in entry_points(group=self.group):
                    same_name = found.setdefault(ep.name, [])
                    # An editable install can expose the same distribution twice.
                    if all(other.value != ep.value for other in same_name):
                        same_name.append(ep)
                self._entry_points = dict(sorted(found.items()))
            return self._entry_points

    def names(self) -> list[str]:
        """Every registered backend name, usable here or not."""
        return list(self._discovered())

    def _load(self, name: str) -> Backend | BaseException:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            registrations = self._discovered()[name]
            try:
                if len(registrations) > 1:
                    targets = ", ".join(ep.value for ep in registrations)
                    raise LookupError(
                        f"registered more than once, by conflicting targets {targets}"
                    )
                factory = registrations[0].load()
                backend = factory() if callable(factory) else factory
                if not isinstance(backend, Backend):
                    raise TypeError(
                        f"{registrations[0].value} does not implement the Backend protocol"
                        " (name, availability, prepare)"
                    )
                if backend.name != name:
                    raise ValueError(f"registered as {name!r} but calls itself {backend.name!r}")
                result: Backend | BaseException = backend
            except Exception as error:  # a broken plugin is reported, not fatal
                result = error
            self._loaded[name] = result
            return result

    def _usable(self, name: str) -> tuple[str | None, Backend | None]:
        """(why `name` cannot run here, or None; the backend when it can)."""
        if name not in self._discovered():
            raise self._unknown(name)
        loaded = self._load(name)
        if isinstance(loaded, BaseException):
            return f"failed to load: {type(loaded).__name__}: {loaded}", None
        try:
            reason = loaded.availability()
        except Exception as error:
            return f"availability check failed: {type(error).__name__}: {error}", None
        return reason, loaded if reason is None else None

    def status(self, name: str) -> BackendStatus:
        reason, _ = self._usable(name)
        ep = self._discovered()[name][0]
        # Reading the distribution's name parses its metadata: for status pages, not per call.
        distribution = ep.dist.name if ep.dist is not None else None
        return BackendStatus(name=name, target=ep.value, distribution=distribution, reason=reason)

    def statuses(self) -> dict[str, BackendStatus]:
        return {name: self.status(name) for name in self.names()}

    def available(self) -> list[str]:
        """Names of the backends that can run here."""
        return [name for name, status in self.statuses().items() if status.reason is None]

    def _unknown(self, name: str) -> UnknownBackendError:
        known = ", ".join(self.names()) or "none"
        return UnknownBackendError(f"unknown backend {name!r}; registered backends: {known}")

    def get(self, name: str) -> Backend:
        """The backend registered as `name`, if it can run here."""
        reason, backend = self._usable(name)
        if backend is None:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
        return backend

    def prepare(
        self,
        backend: str,
        model: StatefulModel,
        *,
        model_key: str,
        options: Mapping[str, Any] | None = None,
    ) -> Runner:
        """A runner for `model` on `backend`, prepared once per (backend, model_key, options).

        `model_key` ("<name>/<version>") must change whenever the weights do.
        """
        if not isinstance(model_key, str) or not model_key:
            raise ValueError(f"model_key must be a non-empty string, got {model_key!r}")
        options = dict(options or {})
        key = (backend, model_key, freeze_options(options))
        chosen = self.get(backend)
        return self.runners.get_or_prepare(
            key, lambda: chosen.prepare(model, model_key=model_key, options=options)
        )


_default_registry = BackendRegistry()


def default_registry() -> BackendRegistry:
    return _default_registry


def get_backend(name: str) -> Backend:
    """The usable backend `name`; UnknownBackendError / BackendUnavailableError otherwise."""
    return _default_registry.get(name)


def available_backends() -> list[str]:
    """Names of the registered backends that can run here."""
    return _default_registry.available()


def registered_backends() -> list[str]:
    """Names of every registered backend, usable here or not."""
    return _default_registry.names()


def backend_statuses() -> dict[str, BackendStatus]:
    return _default_registry.statuses()


def prepare_runner(
    backend: str,
    model: StatefulModel,
    *,
    model_key: str,
    options: Mapping[str, Any] | None = None,
) -> Runner:
    """A cached runner for `model` on `backend` (see BackendRegistry.prepare)."""
    return _default_registry.prepare(backend, model, model_key=model_key, options=options)
