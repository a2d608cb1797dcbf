"""Registry: entry-point discovery (built-ins and a third-party package), errors, runner cache."""

from __future__ import annotations

import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hardware_backends.base import BackendUnavailableError, UnknownBackendError
from hardware_backends.registry import (
    ENTRY_POINT_GROUP,
    BackendRegistry,
    RunnerCache,
    freeze_options,
)

BUILT_INS = {"torch", "onnxruntime", "analog_imc", "stochastic"}

PLUGIN_MODULE = textwrap.dedent(
    '''
    """A third-party backend package, as someone outside the project would ship it."""


    class EchoRunner:
        backend = "echo"
        samples = 1

        def __init__(self, model_key, options):
            self.model_key = model_key
            self.options = options


    class EchoBackend:
        name = "echo"

        def __init__(self):
            self.prepared = 0

        def availability(self):
            return None

        def prepare(self, model, *, model_key, options=None):
            options = dict(options or {})
            unknown = set(options) - {"gain", "layers"}
            if unknown:
                raise ValueError(f"unknown echo options: {sorted(unknown)}")
            self.prepared += 1
            return EchoRunner(model_key, options)


    class OfflineBackend(EchoBackend):
        name = "offline"

        def availability(self):
            return "no accelerator attached"


    class MisnamedBackend(EchoBackend):
        name = "something_else"


    class NotABackend:
        pass
    '''
)

ENTRY_POINTS = textwrap.dedent(
    f"""
    [{ENTRY_POINT_GROUP}]
    echo = ns_test_plugin:EchoBackend
    offline = ns_test_plugin:OfflineBackend
    misnamed = ns_test_plugin:MisnamedBackend
    not_a_backend = ns_test_plugin:NotABackend
    broken = ns_test_plugin_broken:Backend
    """
)


@pytest.fixture()
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install a third-party distribution with backends by putting it on sys.path."""
    (tmp_path / "ns_test_plugin.py").write_text(PLUGIN_MODULE)
    (tmp_path / "ns_test_plugin_broken.py").write_text(
        'raise ImportError("libfrobnicate.so: cannot open shared object file")\n'
    )
    dist_info = tmp_path / "ns_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ns-test-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    for module in ("ns_test_plugin", "ns_test_plugin_broken"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return tmp_path


def test_built_ins_are_registered_through_the_entry_point_group() -> None:
    registry = BackendRegistry()
    assert set(registry.names()) >= BUILT_INS
    for name in BUILT_INS:
        status = registry.status(name)
        assert status.distribution == "neuroserve"
        assert status.target.startswith("hardware_backends.")


def test_torch_backend_is_always_available() -> None:
    registry = BackendRegistry()
    assert "torch" in registry.available()
    assert registry.get("torch").name == "torch"


def test_unknown_backend_error_lists_the_known_ones() -> None:
    registry = BackendRegistry()
    with pytest.raises(UnknownBackendError) as caught:
        registry.get("tpu_v9")
    message = str(caught.value)
    assert "'tpu_v9'" in message
    for name in registry.names():
        assert name in message


def test_third_party_package_adds_a_backend(plugin_path: Path) -> None:
    registry = BackendRegistry()
    assert {"echo", "offline", "broken"} <= set(registry.names())
    assert set(registry.names()) >= BUILT_INS
    echo = registry.get("echo")
    assert echo.name == "echo"
    assert registry.status("echo").distribution == "ns-test-plugin"
    assert "echo" in registry.available()


def test_broken_plugins_are_unavailable_with_the_reason(plugin_path: Path) -> None:
    registry = BackendRegistry()
    statuses = registry.statuses()  # must not raise although some plugins are broken
    assert "libfrobnicate.so" in statuses["broken"].reason
    assert "ImportError" in statuses["broken"].reason
    assert statuses["offline"].reason == "no accelerator attached"
    assert "calls itself 'something_else'" in statuses["misnamed"].reason
    assert "Backend protocol" in statuses["not_a_backend"].reason
    unavailable = {"broken", "offline", "misnamed", "not_a_backend"}
    assert not unavailable & set(registry.available())
    for name in unavailable:
        with pytest.raises(BackendUnavailableError, match=name):
            registry.get(name)
    assert registry.get("echo").availability() is None


def test_prepared_runners_are_cached_per_backend_model_and_options(plugin_path: Path) -> None:
    registry = BackendRegistry(runner_cache_size=2)
    echo = registry.get("echo")
    model = object()
    first = registry.prepare("echo", model, model_key="digits/1", options={"gain": 1})
    again = registry.prepare("echo", model, model_key="digits/1", options={"gain": 1})
    assert again is first and echo.prepared == 1
    other_options = registry.prepare("echo", model, model_key="digits/1", options={"gain": 2})
    assert other_options is not first and echo.prepared == 2
    other_version = registry.prepare("echo", model, model_key="digits/2", options={"gain": 1})
    assert other_version.model_key == "digits/2" and echo.prepared == 3
    # Bounded: the least recently used entry ({"gain": 1} for digits/1) was evicted.
    assert len(registry.runners) == 2
    registry.prepare("echo", model, model_key="digits/1", options={"gain": 1})
    assert echo.prepared == 4


def test_bad_options_raise_and_are_not_cached(plugin_path: Path) -> None:
    registry = BackendRegistry()
    with pytest.raises(ValueError, match="unknown echo options"):
        registry.prepare("echo", object(), model_key="digits/1", options={"gian": 1})
    assert len(registry.runners) == 0
    with pytest.raises(ValueError, match="JSON-like"):
        registry.prepare("echo", object(), model_key="digits/1", options={"gain": object()})
    with pytest.raises(ValueError, match="model_key"):
        registry.prepare("echo", object(), model_key="", options=None)


def test_option_order_does_not_change_the_cache_key() -> None:
    a = freeze_options({"gain": 1, "layers": [1, {"x": 2, "y": 3}]})
    b = freeze_options({"layers": (1, {"y": 3, "x": 2}), "gain": 1})
    assert a == b and hash(a) == hash(b)
    assert freeze_options({"gain": 1}) != freeze_options({"gain": 2})


def test_concurrent_requests_for_one_key_prepare_once() -> None:
    cache = RunnerCache(maxsize=4)
    calls = []

    def slow_prepare() -> object:
        calls.append(1)
        time.sleep(0.05)
        return object()

    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get_or_prepare("k", slow_prepare)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert cache.misses == 1 and cache.hits == 7


def test_failed_preparation_can_be_retried() -> None:
    cache = RunnerCache(maxsize=4)

    def failing() -> object:
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError, match="export failed"):
        cache.get_or_prepare("k", failing)
    runner = cache.get_or_prepare("k", object)
    assert cache.get_or_prepare("k", failing) is runner


def test_invalidate_drops_one_model() -> None:
    cache = RunnerCache(maxsize=8)
    for key in [("torch", "a/1", ()), ("onnxruntime", "a/1", ()), ("torch", "b/1", ())]:
        cache.get_or_prepare(key, object)
    assert cache.invalidate("a/1") == 2
    assert len(cache) == 1
    with pytest.raises(ValueError, match="at least 1"):
        RunnerCache(maxsize=0)
