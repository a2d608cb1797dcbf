"""Registry of the built-in architectures and conversion between configs and JSON.

A model artifact stores its architecture name and its config as a JSON object;
`build_model(name, config_dict)` turns that back into a freshly initialised module (the
weights are loaded separately). Parameters are drawn from torch's global generator, so
seed it (`torch.manual_seed`) before building when the initial weights matter.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from models.base import StatefulModel
from models.lru import LRUConfig, LRUModel
from models.nir_graph import NIRGraphConfig, NIRGraphModel
from models.onnx_step import OnnxStepConfig, OnnxStepModel
from models.selective import SelectiveConfig, SelectiveModel
from models.snn import SNNConfig, SNNModel

# The built-in architectures: trainable with `neuroserve train`, buildable from defaults.
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "lru": (LRUConfig, LRUModel),
    "selective": (SelectiveConfig, SelectiveModel),
    "snn": (SNNConfig, SNNModel),
}
# Models made by `neuroserve import`: their config describes an imported graph.
IMPORTED_ARCHITECTURES: dict[str, tuple[type, type]] = {
    "nir": (NIRGraphConfig, NIRGraphModel),
    "onnx-step": (OnnxStepConfig, OnnxStepModel),
}
_ALL = {**ARCHITECTURES, **IMPORTED_ARCHITECTURES}


def _coerce(config_cls: type, name: str, value: Any, hint: Any) -> Any:
    """Check one JSON value against its field's type; ints are accepted for float fields."""
    where = f"{config_cls.__name__}.{name}"
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    if hint in (dict, list):  # structured JSON (an imported graph); the config checks it
        if not isinstance(value, hint):
            raise ValueError(f"{where} must be a JSON {hint.__name__}, got {type(value).__name__}")
        return value
    raise TypeError(f"{where} has unsupported field type {hint!r}")  # a bug in a config class


def build_config(architecture: str, model_config: Mapping[str, Any]) -> Any:
    """Validate a JSON-style dict into the architecture's config dataclass; missing keys take
    the defaults. Raises ValueError naming an unknown architecture, key or bad value."""
    if architecture not in _ALL:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(_ALL)}")
    if not isinstance(model_config, Mapping):
        raise ValueError(f"model_config must be a dict, got {type(model_config).__name__}")
    config_cls, _ = _ALL[architecture]
    hints = typing.get_type_hints(config_cls)
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(model_config) - set(fields))
    if unknown:
        raise ValueError(f"unknown {architecture} config keys {unknown}; valid keys: {fields}")
    kwargs = {k: _coerce(config_cls, k, v, hints[k]) for k, v in model_config.items()}
    return config_cls(**kwargs)  # __post_init__ range-checks the values


def build_model(architecture: str, model_config: Mapping[str, Any]) -> StatefulModel:
    """A freshly initialised model of `architecture` (built-in or imported)."""
    config = build_config(architecture, model_config)
    _, model_cls = _ALL[architecture]
    return model_cls(config)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-safe dict (every field, so defaults changing later cannot alter
    a stored model); `build_model(arch, config_to_dict(cfg))` rebuilds the same config."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ValueError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def architecture_of(model: StatefulModel) -> str:
    """The registry name of a built-in model instance."""
    for name, (_, model_cls) in _ALL.items():
        if type(model) is model_cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered architecture")
