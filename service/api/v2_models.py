"""What the Open Inference Protocol says about models, whatever the protocol: Triton's model
configuration, repository index and inference statistics, built from model cards, the
repository and the data plane's counters.

Each document is a plain dict in Triton's JSON form, which is the protobuf JSON mapping of
`inference.ModelConfig`, `RepositoryIndexResponse.ModelIndex` and
`inference.ModelStatistics` (so gRPC turns one into its message with
`google.protobuf.json_format.ParseDict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.repository import ArtifactError, ModelCard
from service.api.v2_infer import OUTPUT_TYPES
from service.api.v2_inputs import FEATURES_INPUT, PROMPT_INPUT
from service.dataplane.inference_stats import Duration, VersionStatistics
from service.dataplane.plane import DataPlane
from service.dataplane.predictions import default_score

# V2 datatype -> Triton's model-configuration data type.
CONFIG_TYPES = {
    "FP32": "TYPE_FP32",
    "BOOL": "TYPE_BOOL",
    "INT32": "TYPE_INT32",
    "BYTES": "TYPE_STRING",
}
# Measured per request by `InferenceStatistics`; Triton's finer phases are not (count 0).
UNMEASURED_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@dataclass(frozen=True)
class ServingLimits:
    """The server settings a model configuration reports."""

    max_batch_size: int  # most sequences in one request
    session_ttl_seconds: float  # a sequence idle this long expires
    batch_window_ms: float  # how long a micro-batch waits for more work


def class_count(card: ModelCard) -> int:
    config = card.config
    return len(config["labels"] if config["task"] == "classification" else config["vocabulary"])


def output_metadata(card: ModelCard) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape) of every output, -1 for the batch dimension."""
    n = class_count(card)
    return [
        (name, datatype, [-1, n] if per_label else [-1])
        for name, (datatype, per_label) in OUTPUT_TYPES.items()
    ]


def model_config(card: ModelCard, limits: ServingLimits) -> dict[str, Any]:
    """Triton's model configuration of a model version. The first dimension of every tensor
    is the batch (`max_batch_size`), so `dims` leave it out; a per-sequence scalar is dims
    [1] reshaped to []. Every model is stateful: a sequence (Triton's `sequence_id`) keeps
    its recurrent state between requests, hence `sequence_batching`."""
    config = card.config
    if config["input"]["kind"] == "tokens":
        model_input = {"name": PROMPT_INPUT, "data_type": "TYPE_STRING", "dims": [1],
                       "reshape": {"shape": []}}  # fmt: skip
    else:
        features = int(config["input"]["features"])
        model_input = {"name": FEATURES_INPUT, "data_type": "TYPE_FP32", "dims": [-1, features]}
    outputs = []
    for name, datatype, shape in output_metadata(card):
        output: dict[str, Any] = {"name": name, "data_type": CONFIG_TYPES[datatype]}
        if len(shape) == 1:
            output.update(dims=[1], reshape={"shape": []})
        else:
            output["dims"] = shape[1:]
        outputs.append(output)
    return {
        "name": card.name,
        "platform": f"neuroserve_{config['architecture']}",
        "backend": "neuroserve",
        "version_policy": {"all": {}},
        "max_batch_size": limits.max_batch_size,
        "input": [model_input],
        "output": outputs,
        "sequence_batching": {
            "max_sequence_idle_microseconds": int(limits.session_ttl_seconds * 1e6),
            "oldest": {
                "max_candidate_sequences": limits.max_batch_size,
                "max_queue_delay_microseconds": int(limits.batch_window_ms * 1000),
            },
        },
        "parameters": {
            "task": {"string_value": config["task"]},
            "architecture": {"string_value": config["architecture"]},
            "version": {"string_value": card.version},
            "default_score": {"string_value": default_score(card)},
        },
    }


def repository_index(dataplane: DataPlane, ready_only: bool = False) -> list[dict[str, Any]]:
    """Every version of every model: READY when it loads, else UNAVAILABLE and why.
    Blocking (loads models): call it in a worker thread."""
    index = []
    for name in dataplane.repository.list_models():
        for version in dataplane.repository.versions(name):
            entry = {"name": name, "version": version, "state": "READY", "reason": ""}
            try:
                dataplane.repository.load(name, version)
            except (ArtifactError, ValueError) as error:
                entry.update(state="UNAVAILABLE", reason=str(error))
            if entry["state"] == "READY" or not ready_only:
                index.append(entry)
    return index


def _duration(duration: Duration) -> dict[str, Any]:
    return {"count": duration.count, "ns": duration.ns}


def version_statistics(name: str, version: str, stats: VersionStatistics) -> dict[str, Any]:
    """Triton's statistics of one model version from the server's counters."""
    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {
            "success": _duration(stats.success),
            "fail": _duration(stats.fail),
            **{phase: _duration(Duration()) for phase in UNMEASURED_PHASES},
            "cache_hit": _duration(Duration()),
            "cache_miss": _duration(Duration()),
        },
        "batch_stats": [],
        "memory_usage": [],
    }


def model_statistics(
    dataplane: DataPlane, name: str | None = None, version: str | None = None
) -> dict[str, Any]:
    """`{"model_stats": [...]}` for one version, every version of one model (`version`
    None), or every version of every model (`name` None). Unknown model -> NotFoundError."""
    if name is None:
        names = dataplane.repository.list_models()
    else:
        names = [dataplane.card(name, version).name]
    stats = []
    for model in names:
        versions = [version] if version is not None else dataplane.versions(model)
        stats += [
            version_statistics(model, v, dataplane.statistics.get(model, v)) for v in versions
        ]
    return {"model_stats": stats}
