"""neuroserve: calibration.

Tensors in, tensors out; nothing else of ours is imported. Calibration maps (temperature,
vector scaling), calibration metrics, conformity scores (LAC, APS, RAPS, Top-K), split and
class-conditional conformal prediction, online conformal (ACI), early decisions for
sequence models, the per-(model, version, backend) `CalibrationArtifact` and the calibration
per position of a sequence (`PositionalCalibration`).
"""

from calibration.aci import AdaptiveConformal
from calibration.artifact import CalibrationArtifact, fit_calibration_artifact
from calibration.conformal import SplitConformal, include_top_label_if_empty
from calibration.early_decision import EarlyDecisionReport, EarlyDecisionRule
from calibration.maps import (
    CalibrationMap,
    IdentityMap,
    MapSelection,
    fit_best_map,
    map_from_dict,
)
from calibration.metrics import (
    adaptive_calibration_error,
    brier_score,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from calibration.positional import (
    PositionalCalibration,
    PositionBuckets,
    fit_positional_calibration,
    fit_stepwise_calibration,
)
from calibration.quantile import class_conditional_quantiles, conformal_quantile
from calibration.scores import SCORE_NAMES, ConformityScore, make_score, tune_raps
from calibration.temperature import TemperatureScaling
from calibration.vector_scaling import VectorScaling

__all__ = [
    "SCORE_NAMES",
    "AdaptiveConformal",
    "CalibrationArtifact",
    "CalibrationMap",
    "ConformityScore",
    "EarlyDecisionReport",
    "EarlyDecisionRule",
    "IdentityMap",
    "MapSelection",
    "PositionBuckets",
    "PositionalCalibration",
    "SplitConformal",
    "TemperatureScaling",
    "VectorScaling",
    "adaptive_calibration_error",
    "brier_score",
    "calibration_report",
    "class_conditional_quantiles",
    "conformal_quantile",
    "expected_calibration_error",
    "fit_best_map",
    "fit_calibration_artifact",
    "fit_positional_calibration",
    "fit_stepwise_calibration",
    "include_top_label_if_empty",
    "make_score",
    "map_from_dict",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_bins",
    "tune_raps",
]
