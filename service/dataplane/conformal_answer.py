"""From logits at positions to calibrated probabilities and conformal sets, row by row.

Every row is answered with the calibration of its own position (steps read, or context
length), backend and options. A row that no calibration covers (past the calibrated horizon,
or backend options the calibration was not fitted with) gets the raw softmax, `calibrated:
false`, no set, and a warning that says why: a set built from another position's scores
would claim a level it does not have.

Randomised scores take their U from the server's draw for the row's prediction id
(`service.dataplane.conformal_draws`), never from the request. Online rows are built at their ACI
level, given per row by the caller, and stay raw (never_empty is off for them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from calibration import AdaptiveConformal
from calibration.maps import CalibrationMap
from service.dataplane.calibration_store import StoredCalibration
from service.dataplane.conformal_draws import ConformalDraws
from service.dataplane.predictions import ConformalOptions


@dataclass
class ConformalAnswer:
    probs: Tensor  # [N, C] calibrated where `calibrated`, raw softmax elsewhere
    sets: Tensor  # [N, C] bool; rows that are not calibrated hold no set
    calibrated: list[bool]
    uniforms: list[float | None]
    aci_alphas: list[float | None]
    notes: list[str | None]  # why a row is not calibrated (None for calibrated rows)
    maps: list[CalibrationMap | None]  # the map that made each row's probs (None: raw softmax)


def uncovered_position_note(stored: StoredCalibration, position: int) -> str:
    horizon = stored.positional.horizon
    return (
        f"position {position} lies past the {horizon} steps (or tokens of context) that the "
        f"calibration of {stored.positional.model} version {stored.positional.version} on "
        f"{stored.positional.backend} covers: those answers carry the raw softmax, "
        "`calibrated: false` and no prediction set"
    )


def options_note(stored: StoredCalibration, backend_options: Mapping | None) -> str:
    backend = stored.positional.backend
    return (
        f"the calibration of {backend!r} was fitted with backend options "
        f"{stored.backend_options}, this request used {dict(backend_options or {})}: answers "
        "carry the raw softmax, `calibrated: false` and no prediction set (calibrate these "
        f"options with `neuroserve calibrate {stored.positional.model} --backend {backend} "
        "--backend-option KEY=VALUE`)"
    )


def conformal_answer(
    stored: StoredCalibration,
    logits: Tensor,
    positions: Sequence[int],
    conformal: ConformalOptions,
    *,
    ids: Sequence[str],
    draws: ConformalDraws,
    backend_options: Mapping[str, Any] | None,
    levels: Mapping[int, AdaptiveConformal] | None = None,
) -> ConformalAnswer:
    """Probabilities and sets for logits [N, C] (float64) whose rows sit at `positions`.

    `levels` maps a row to the online level its set is built at (required for every
    calibrated row when `conformal.online`).
    """
    n = logits.shape[0]
    probs = torch.softmax(logits, dim=-1)  # [N, C] raw; calibrated rows are replaced
    sets = torch.zeros_like(probs, dtype=torch.bool)  # [N, C]
    calibrated = [False] * n
    uniforms: list[float | None] = [None] * n
    aci_alphas: list[float | None] = [None] * n
    notes: list[str | None] = [None] * n
    maps: list[CalibrationMap | None] = [None] * n
    if not stored.fitted_with(backend_options):
        notes = [options_note(stored, backend_options)] * n
        return ConformalAnswer(probs, sets, calibrated, uniforms, aci_alphas, notes, maps)

    rows_at: dict[int, list[int]] = defaultdict(list)
    for row, position in enumerate(positions):
        rows_at[position].append(row)
    for position, rows in rows_at.items():
        artifact = stored.at(position)
        if artifact is None:
            for row in rows:
                notes[row] = uncovered_position_note(stored, position)
            continue
        index = torch.tensor(rows)  # [n]
        row_probs = artifact.calibrate(logits[index])  # [n, C]
        uniform = None
        if artifact.make_score(conformal.score).randomized:
            draws_here = draws.uniforms([ids[row] for row in rows])
            uniform = torch.tensor(draws_here, dtype=torch.float64)  # [n]
            for row, value in zip(rows, draws_here, strict=True):
                uniforms[row] = value
        if conformal.online:
            if levels is None or any(row not in levels for row in rows):
                raise ValueError("online sets need the ACI level of every calibrated row")
            row_sets = torch.stack(
                [
                    artifact.sets_at_level(
                        row_probs[j : j + 1],
                        levels[row].alpha_t,
                        conformal.score,
                        uniform=None if uniform is None else uniform[j : j + 1],
                    )[0]
                    for j, row in enumerate(rows)
                ]
            )  # [n, C]
            for row in rows:
                aci_alphas[row] = levels[row].alpha_t
        else:
            row_sets = artifact.sets(
                row_probs,
                conformal.alpha,
                conformal.score,
                conformal.class_conditional,
                conformal.fills_empty_sets,
                uniform=uniform,
            )
        probs[index] = row_probs
        sets[index] = row_sets
        for row in rows:
            calibrated[row] = True
            maps[row] = artifact.calibration_map
    return ConformalAnswer(probs, sets, calibrated, uniforms, aci_alphas, notes, maps)
