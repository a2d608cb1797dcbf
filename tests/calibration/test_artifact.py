"""The calibration artifact: exact storage round trip, sets for any alpha at request time
with their coverage, Mondrian and online (ACI) sets, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from calibration.aci import AdaptiveConformal
from calibration.artifact import CalibrationArtifact, fit_calibration_artifact
from calibration.quantile import conformal_rank
from calibration.scores import SCORE_NAMES
from calibration.synthetic import sample_classifier_outputs

CREATED = "2024-01-01T00:00:00+00:00"


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    cal_logits, cal_labels = sample_classifier_outputs(800, 10, generator, overconfidence=2.0)
    test_logits, test_labels = sample_classifier_outputs(20_000, 10, generator, overconfidence=2.0)
    return {
        "cal_logits": cal_logits,
        "cal_labels": cal_labels,
        "test_logits": test_logits,
        "test_labels": test_labels,
    }


@pytest.fixture(scope="module")
def artifact(data) -> CalibrationArtifact:
    return fit_calibration_artifact(
        data["cal_logits"],
        data["cal_labels"],
        model="synthetic",
        version="3",
        backend="torch",
        seed=0,
        created=CREATED,
    )


def assert_same_artifact(a: CalibrationArtifact, b: CalibrationArtifact) -> None:
    assert a.to_json() == b.to_json()
    assert a.scores.keys() == b.scores.keys()
    for name in a.scores:
        assert torch.equal(a.scores[name], b.scores[name])
        assert a.scores[name].dtype == b.scores[name].dtype
    assert torch.equal(a.labels, b.labels)
    assert a.calibration_map == b.calibration_map


def test_fit_records_what_it_did(artifact: CalibrationArtifact, data) -> None:
    assert (artifact.model, artifact.version, artifact.backend) == ("synthetic", "3", "torch")
    assert artifact.n_tune == 400 and artifact.n == 400
    assert artifact.calibration_map.kind == "temperature"  # the data is only overconfident
    assert artifact.metrics["nll_after"] < artifact.metrics["nll_before"]
    assert set(artifact.map_cv_nll) == {"identity", "temperature", "vector_scaling"}
    assert artifact.created == CREATED
    assert len(artifact.data_hash) == 64
    assert artifact.raps_k_reg >= 1 and artifact.raps_lam >= 0
    json.loads(artifact.to_json())  # strict JSON: no NaN or infinities


def test_round_trip_through_json_and_safetensors_is_exact(artifact) -> None:
    restored = CalibrationArtifact.from_serialized(artifact.to_json(), artifact.to_safetensors())
    assert_same_artifact(artifact, restored)


def test_save_and_load_directory(artifact, data, tmp_path) -> None:
    json_path, tensor_path = artifact.save(tmp_path)
    assert json_path.name == "calibration.json" and tensor_path.name == "calibration.safetensors"
    restored = CalibrationArtifact.load(tmp_path)
    assert_same_artifact(artifact, restored)
    logits = data["test_logits"][:50]
    for score in SCORE_NAMES:
        before = artifact.predict(logits, 0.1, score, rng=torch.Generator().manual_seed(1))
        after = restored.predict(logits, 0.1, score, rng=torch.Generator().manual_seed(1))
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_fit_is_deterministic_and_the_hash_follows_the_data(artifact, data) -> None:
    again = fit_calibration_artifact(
        data["cal_logits"], data["cal_labels"], "synthetic", "3", "torch", created=CREATED
    )
    assert_same_artifact(artifact, again)
    changed_labels = data["cal_labels"].clone()
    changed_labels[0] = (changed_labels[0] + 1) % 10
    other = fit_calibration_artifact(
        data["cal_logits"], changed_labels, "synthetic", "3", "torch", created=CREATED
    )
    assert other.data_hash != artifact.data_hash


def beta_coverage_tolerance(n: int, alpha: float, m: int) -> tuple[float, float]:
    """Mean and 3-sigma tolerance of test coverage for ONE calibration set of n untied scores.

    Given the calibration set, coverage is Beta(k, n + 1 - k) with k = ceil((n + 1)(1 - alpha))
    (Vovk 2012); the m test points add binomial noise.
    """
    k = conformal_rank(n, alpha)
    mean = k / (n + 1)
    beta_variance = k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2))
    return mean, 3 * math.sqrt(beta_variance + mean * (1 - mean) / m)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_sets_for_any_alpha_cover_as_split_conformal_promises(artifact, data, alpha) -> None:
    labels = data["test_labels"]
    mean, tolerance = beta_coverage_tolerance(artifact.n, alpha, len(labels))
    for score in ("lac", "aps", "aps_randomized", "raps", "raps_randomized"):
        probs, sets = artifact.predict(
            data["test_logits"], alpha, score, rng=torch.Generator().manual_seed(2)
        )
        assert torch.allclose(probs.sum(dim=1), torch.ones(len(labels), dtype=torch.float64))
        coverage = float(sets[torch.arange(len(labels)), labels].to(torch.float64).mean())
        assert abs(coverage - mean) <= tolerance, f"{score} at alpha={alpha}: {coverage:.4f}"
    _, topk_sets = artifact.predict(data["test_logits"], alpha, "topk")
    topk_coverage = float(topk_sets[torch.arange(len(labels)), labels].to(torch.float64).mean())
    assert topk_coverage >= mean - tolerance  # tied integer scores: only the lower side


def test_smaller_alpha_gives_nested_larger_sets(artifact, data) -> None:
    logits = data["test_logits"][:2000]
    for score in ("lac", "aps", "raps", "topk"):
        _, loose = artifact.predict(logits, 0.3, score)
        _, strict = artifact.predict(logits, 0.05, score)
        assert bool((strict | loose).eq(strict).all()), score


def test_never_empty_and_class_conditional_options(artifact, data) -> None:
    logits, labels = data["test_logits"], data["test_labels"]
    rng = torch.Generator().manual_seed(3)
    _, plain = artifact.predict(logits, 0.2, "aps_randomized", rng=rng)
    rng = torch.Generator().manual_seed(3)
    _, filled = artifact.predict(logits, 0.2, "aps_randomized", never_empty=True, rng=rng)
    assert (~plain.any(dim=1)).any() and filled.any(dim=1).all()
    assert bool((filled | plain).eq(filled).all())
    # Mondrian: each class's coverage follows its own Beta law with n_c calibration points.
    alpha = 0.1
    probs, sets = artifact.predict(logits, alpha, "lac", class_conditional=True)
    per_class = artifact.quantile(alpha, "lac", class_conditional=True)  # [C]
    assert torch.equal(sets, (1.0 - probs) <= per_class)
    covered = sets[torch.arange(len(labels)), labels]
    for label in range(10):
        n_class = int((artifact.labels == label).sum())
        in_class = labels == label
        mean, tolerance = beta_coverage_tolerance(n_class, alpha, int(in_class.sum()))
        coverage = float(covered[in_class].to(torch.float64).mean())
        assert abs(coverage - mean) <= tolerance, f"class {label}: {coverage:.3f} vs {mean:.3f}"


def test_sets_at_any_level_follow_the_aci_level(artifact, data) -> None:
    logits = data["test_logits"][:100]
    probs = artifact.calibrate(logits)
    assert torch.equal(
        artifact.sets_at_level(probs, AdaptiveConformal(0.1).alpha_t, "lac"),
        artifact.predict(logits, 0.1, "lac")[1],
    )
    assert artifact.sets_at_level(probs, -0.05, "aps").all()
    assert not artifact.sets_at_level(probs, 1.05, "aps").any()


def test_given_uniform_draws_reproduce_a_randomized_set(artifact, data) -> None:
    logits = data["test_logits"][:100]
    uniform = torch.rand(100, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, from_draws = artifact.predict(logits, 0.1, "aps_randomized", uniform=uniform)
    _, from_rng = artifact.predict(
        logits, 0.1, "aps_randomized", rng=torch.Generator().manual_seed(3)
    )
    assert torch.equal(from_draws, from_rng)
    with pytest.raises(ValueError, match=r"uniform must have shape \(100,\)"):
        artifact.predict(logits, 0.1, "aps_randomized", uniform=uniform[:5])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\)"):
        artifact.predict(logits, 0.1, "aps_randomized", uniform=uniform + 1.0)


def test_bad_requests_are_rejected_with_a_clear_message(artifact, data) -> None:
    logits = data["test_logits"][:5]
    with pytest.raises(ValueError, match="unknown conformity score 'margin'"):
        artifact.predict(logits, 0.1, "margin")
    with pytest.raises(ValueError, match="needs rng"):
        artifact.predict(logits, 0.1, "aps_randomized")
    with pytest.raises(ValueError, match=r"alpha must be a number in the open interval \(0, 1\)"):
        artifact.predict(logits, 1.0)
    with pytest.raises(ValueError, match="artifact is for 10 classes"):
        artifact.predict(logits[:, :3], 0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tune_fraction": 0.0}, "tune_fraction"),
        ({"raps_alpha": 0.0}, r"\(0, 1\)"),
        ({"n": 5}, "too few"),
        ({"n": 0}, "too few"),
    ],
)
def test_bad_fits_are_rejected(data, kwargs, message) -> None:
    n = kwargs.pop("n", 100)
    with pytest.raises(ValueError, match=message):
        fit_calibration_artifact(
            data["cal_logits"][:n], data["cal_labels"][:n], "m", "1", "torch", **kwargs
        )


def test_corrupt_storage_is_rejected(artifact, tmp_path) -> None:
    meta = json.loads(artifact.to_json())
    meta["format"] = 99
    with pytest.raises(ValueError, match="unsupported calibration artifact format 99"):
        CalibrationArtifact.from_serialized(json.dumps(meta), artifact.to_safetensors())
    from safetensors.torch import save

    partial = save({"labels": artifact.labels})
    with pytest.raises(ValueError, match="missing"):
        CalibrationArtifact.from_serialized(artifact.to_json(), partial)
    with pytest.raises(FileNotFoundError, match="calibration.json"):
        CalibrationArtifact.load(tmp_path)


def test_inconsistent_contents_are_rejected(artifact) -> None:
    meta = json.loads(artifact.to_json())
    meta["num_classes"] = 3  # stored labels go up to 9
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        CalibrationArtifact.from_serialized(json.dumps(meta), artifact.to_safetensors())
    from safetensors.torch import save

    tensors = {f"scores.{name}": values for name, values in artifact.scores.items()}
    tensors["labels"] = artifact.labels.to(torch.int32)
    with pytest.raises(ValueError, match="int64 labels"):
        CalibrationArtifact.from_serialized(artifact.to_json(), save(tensors))
    tensors["labels"] = artifact.labels
    tensors["scores.lac"] = artifact.scores["lac"][:-1]
    with pytest.raises(ValueError, match="scores 'lac' must be float64"):
        CalibrationArtifact.from_serialized(artifact.to_json(), save(tensors))


@pytest.mark.slow
def test_fitting_vector_scaling_on_the_scored_points_undercovers() -> None:
    """Why the artifact keeps its map-fitting and conformal parts apart (the figures quoted
    in `calibration.artifact`): fitted on the very points whose scores set the quantile,
    vector scaling makes those labels look likelier than fresh ones, and coverage drops."""
    from calibration.quantile import conformal_quantile
    from calibration.scores import LAC
    from calibration.vector_scaling import VectorScaling

    generator = torch.Generator().manual_seed(0)
    bias = torch.linspace(-1, 1, 10, dtype=torch.float64)
    test_logits, test_labels = sample_classifier_outputs(
        20_000, 10, generator, overconfidence=1.5, class_bias=bias
    )
    rows = torch.arange(len(test_labels))
    coverage = {"same points": [], "other points": []}
    for _ in range(150):
        fit_logits, fit_labels = sample_classifier_outputs(
            400, 10, generator, overconfidence=1.5, class_bias=bias
        )
        other_logits, other_labels = sample_classifier_outputs(
            400, 10, generator, overconfidence=1.5, class_bias=bias
        )
        fitted = VectorScaling.fit(fit_logits, fit_labels)
        test_probs = fitted.apply(test_logits)
        for where, (logits, labels) in {
            "same points": (fit_logits, fit_labels),
            "other points": (other_logits, other_labels),
        }.items():
            qhat = conformal_quantile(LAC().score(fitted.apply(logits), labels), 0.1)
            sets = LAC().prediction_sets(test_probs, qhat)
            coverage[where].append(float(sets[rows, test_labels].to(torch.float64).mean()))
    same = torch.tensor(coverage["same points"])
    other = torch.tensor(coverage["other points"])
    se = math.sqrt(float(same.var() + other.var()) / len(same))
    assert float(other.mean()) >= 0.9 - 3 * float(other.std()) / math.sqrt(len(other))
    assert float(other.mean() - same.mean()) > 3 * se
