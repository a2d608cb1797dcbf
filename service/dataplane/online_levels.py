"""Online conformal (ACI) levels as the server keeps them: one per (model, version, backend,
calibration, score, alpha, position bucket, API key), and one per session that asks for
online sets.

Why so many: a level is a promise about one sequence of sets. Sharing one level between
scores, alphas or positions mixes sets whose errors mean different things; sharing it between
API keys lets one key's labels (honest or not) move everyone's sets. A request's `alpha` is the
level's target, and a new calibration starts new levels (its id is part of the key).

A level is two counters, labels seen and labels missed, from which alpha_t follows
(`AdaptiveConformal.from_counts`). The error of a label is the error of the set that was
*served* with its prediction, at the level of that moment, so Gibbs and Candès' bound holds
on the sets clients actually received, with the delay term for labels that arrive late
(`calibration.aci`). Both counters move in one atomic store operation (a Lua script on
Redis), so concurrent labels from many replicas are never lost or half-applied.

Storage: the levels of one (model, version, backend, calibration, key) are fields of one
record, so a key's levels can be listed; a session's level is a record of its own that
expires like the feedback it waits for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from calibration import AdaptiveConformal
from service.state.store import StateStore

KEY_LEVELS_NAMESPACE = "aci-level"
SESSION_LEVELS_NAMESPACE = "aci-session"
KEY_LEVEL_TTL_SECONDS = 30 * 24 * 3600.0  # restarted by every label
SESSION_SCOPE = "session"
_OPEN = "-"  # the owner part of keys in open mode (no API keys)


@dataclass(frozen=True)
class LevelKey:
    """Which online level a prediction is served at."""

    model: str
    version: str
    backend: str
    calibration_id: str
    score: str
    alpha: float  # the target miscoverage: the request's alpha
    scope: str  # the position bucket ("8", "4-7"), or "session"
    owner: str | None = None
    session_key: str | None = None  # the session's store key, for a session's own level

    def record(self) -> tuple[str, str]:
        """(namespace, record key) of the record holding this level."""
        if self.session_key is not None:
            return SESSION_LEVELS_NAMESPACE, self.session_key
        owner = self.owner or _OPEN
        return (
            KEY_LEVELS_NAMESPACE,
            f"{self.model}/{self.version}/{self.backend}/{self.calibration_id}/{owner}",
        )

    @property
    def field_prefix(self) -> str:
        return f"{self.calibration_id}|{self.score}|{self.alpha!r}|{self.scope}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LevelKey:
        return cls(**{**data, "alpha": float(data["alpha"])})


@dataclass(frozen=True)
class OnlineLevel:
    """The online level one prediction row is served at, and the key it is kept under."""

    key: LevelKey
    level: AdaptiveConformal


def _counts(fields: dict[str, int], prefix: str) -> tuple[int, int]:
    steps = fields.get(f"{prefix}:steps", 0)
    return steps, min(fields.get(f"{prefix}:missed", 0), steps)


class OnlineLevels:
    """Reads and advances ACI levels in a state store."""

    def __init__(self, store: StateStore, *, gamma: float, session_ttl_seconds: float) -> None:
        AdaptiveConformal(0.1, gamma=gamma)  # validates gamma
        self.store = store
        self.gamma = float(gamma)
        self.session_ttl_seconds = float(session_ttl_seconds)

    def _level(self, key: LevelKey, steps: int, missed: int) -> AdaptiveConformal:
        return AdaptiveConformal.from_counts(key.alpha, self.gamma, steps, missed)

    async def read(self, key: LevelKey) -> AdaptiveConformal:
        fields = await self.store.get_fields(*key.record())
        return self._level(key, *_counts(fields, key.field_prefix))

    async def record(self, key: LevelKey, covered: bool) -> AdaptiveConformal:
        """One label of a set served at this level: err = 1 when it missed the label."""
        namespace, record_key = key.record()
        ttl = self.session_ttl_seconds if key.session_key is not None else KEY_LEVEL_TTL_SECONDS
        prefix = key.field_prefix
        fields = await self.store.incr_fields(
            namespace,
            record_key,
            {f"{prefix}:steps": 1, f"{prefix}:missed": 0 if covered else 1},
            ttl=ttl,
        )
        return self._level(key, *_counts(fields, prefix))

    async def levels_of(
        self, model: str, version: str, backend: str, calibration_id: str, owner: str | None
    ) -> list[dict[str, Any]]:
        """Every level one key has for a calibration, with its miscoverage and bound."""
        probe = LevelKey(model, version, backend, calibration_id, "-", 0.5, "-", owner)
        fields = await self.store.get_fields(*probe.record())
        levels = []
        for name in sorted(fields):
            prefix, _, counter = name.rpartition(":")
            if counter != "steps":
                continue
            _, score, alpha, scope = prefix.split("|")
            key = LevelKey(model, version, backend, calibration_id, score, float(alpha), scope)
            level = self._level(key, *_counts(fields, prefix))
            levels.append(describe_level(key, level))
        return levels


def describe_level(key: LevelKey, level: AdaptiveConformal) -> dict[str, Any]:
    return {
        "score": key.score,
        "target_alpha": key.alpha,
        "position": key.scope,
        "alpha": level.alpha_t,
        "gamma": level.gamma,
        "steps": level.steps,
        "miscovered": level.miscovered,
        "miscoverage_rate": None if level.steps == 0 else level.miscoverage_rate,
        "miscoverage_bound": None if level.steps == 0 else level.miscoverage_bound(),
    }
