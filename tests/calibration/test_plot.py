"""The reliability diagram: a real PNG, the numbers behind it (counts, sparse bins, Wilson
intervals, title with map, n and ECE), and matplotlib kept out of plain imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from calibration.metrics import expected_calibration_error
from calibration.plot import (
    SPARSE_BIN_COUNT,
    describe_map,
    plot_reliability_diagram,
    reliability_diagram_data,
    sparse_bins,
    wilson_interval,
)
from calibration.synthetic import sample_classifier_outputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_probs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = sample_classifier_outputs(n, 10, torch.Generator().manual_seed(seed))
    return logits.softmax(1), labels


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk."""
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_diagram_is_written_as_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    probs, labels = synthetic_probs(500)
    path = plot_reliability_diagram(probs, labels, tmp_path / "reliability.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert png_size(data) == (600, 750)  # 6 x 7.5 inches at 100 dpi


@pytest.mark.parametrize("n", [60, 5])  # some sparse bins; only sparse bins
def test_diagram_with_map_name_and_sparse_bins_is_written(tmp_path, n: int) -> None:
    pytest.importorskip("matplotlib")
    probs, labels = synthetic_probs(n, seed=1)
    assert reliability_diagram_data(probs, labels).sparse.any()
    path = plot_reliability_diagram(
        probs, labels, tmp_path / "r.png", title="digits v1 on torch", map_name="identity"
    )
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_bad_input_fails_before_drawing(tmp_path) -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        plot_reliability_diagram(torch.ones(3, 2), torch.zeros(3, dtype=torch.long), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_importing_the_package_does_not_import_matplotlib() -> None:
    code = "import sys, calibration, calibration.plot; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"


def test_sparse_bins_are_the_non_empty_ones_below_the_threshold() -> None:
    count = torch.tensor([0.0, 1.0, 9.0, 10.0, 500.0])
    assert sparse_bins(count).tolist() == [False, True, True, False, False]
    assert sparse_bins(count, min_count=2).tolist() == [False, True, False, False, False]
    assert SPARSE_BIN_COUNT == 10


def test_wilson_interval_known_values() -> None:
    successes = torch.tensor([5.0, 10.0, 0.0, 0.0])
    count = torch.tensor([10.0, 10.0, 10.0, 0.0])
    lower, upper = wilson_interval(successes, count)
    # 5/10: 0.2366..0.7634, 10/10: 0.7225..1, 0/10: 0..0.2775 (standard 95% Wilson values).
    assert lower.tolist() == pytest.approx([0.23659, 0.72247, 0.0, 0.0], abs=1e-5)
    assert upper.tolist() == pytest.approx([0.76341, 1.0, 0.27753, 1.0], abs=1e-5)
    assert float(lower[2]) == 0.0 and float(upper[1]) == 1.0  # exactly, not 1e-17 off
    assert float(upper[3]) == 1.0  # an empty bin says nothing


def test_wilson_interval_contains_the_proportion_and_narrows_with_n() -> None:
    count = torch.tensor([1.0, 9.0, 10.0, 100.0, 10_000.0])
    successes = torch.round(0.7 * count)
    lower, upper = wilson_interval(successes, count)
    p = successes / count
    assert bool(((lower <= p) & (p <= upper)).all())
    assert bool(((lower >= 0) & (upper <= 1)).all())
    width = upper - lower
    assert bool((width[1:] < width[:-1]).all())


def test_below_the_threshold_the_interval_is_too_wide_to_read_a_gap() -> None:
    # What the module docstring promises for bins with fewer than 10 points.
    for n in range(1, SPARSE_BIN_COUNT):
        successes = torch.arange(n + 1, dtype=torch.float64)
        count = torch.full_like(successes, n)
        lower, upper = wilson_interval(successes, count)
        width = upper - lower
        assert float(width.min()) >= 0.29
        middle = (successes / n >= 0.1) & (successes / n <= 0.9)
        if middle.any():
            assert float(width[middle].min()) >= 0.38


def test_diagram_data_counts_intervals_and_bin_kinds() -> None:
    probs, labels = synthetic_probs(300, seed=2)
    data = reliability_diagram_data(probs, labels, n_bins=15)
    assert data.n == 300 and int(data.count.sum()) == 300
    assert data.ece == expected_calibration_error(probs, labels, 15)
    filled = data.count > 0
    assert torch.equal(data.sparse | data.solid, filled)
    assert not bool((data.sparse & data.solid).any())
    assert torch.equal(data.solid, data.count >= SPARSE_BIN_COUNT)
    inside = (data.lower <= data.accuracy + 1e-12) & (data.accuracy <= data.upper + 1e-12)
    assert bool(inside[filled].all())


def test_diagram_data_on_a_hand_made_example() -> None:
    # 12 points at confidence 0.95 (9 right), 3 points at 0.55 (all right), 2 classes.
    probs = torch.tensor([[0.95, 0.05]] * 12 + [[0.55, 0.45]] * 3, dtype=torch.float64)
    labels = torch.tensor([0] * 9 + [1] * 3 + [0] * 3)
    data = reliability_diagram_data(probs, labels, n_bins=10)
    assert data.count[9] == 12 and data.count[5] == 3
    assert data.solid.nonzero().flatten().tolist() == [9]
    assert data.sparse.nonzero().flatten().tolist() == [5]
    assert float(data.accuracy[9]) == 0.75 and float(data.upper[5]) == 1.0
    lower, upper = wilson_interval(torch.tensor([9.0]), torch.tensor([12.0]))
    assert (float(data.lower[9]), float(data.upper[9])) == (float(lower), float(upper))


def test_title_names_the_map_n_and_ece() -> None:
    probs, labels = synthetic_probs(200, seed=3)
    ece = expected_calibration_error(probs, labels)
    data = reliability_diagram_data(
        probs, labels, title="digits v1 on torch, calibrated", map_name="temperature T=1.35"
    )
    first, last = data.title.split("\n")
    assert first == "digits v1 on torch, calibrated"
    assert last == f"map: temperature T=1.35; n=200, ECE {ece:.3f} (15 bins)"
    untitled = reliability_diagram_data(probs, labels).title
    assert untitled.endswith(f"n=200, ECE {ece:.3f} (15 bins)") and "map:" not in untitled


def test_describe_map_names_each_kind() -> None:
    assert describe_map({"kind": "temperature", "temperature": 1.3512}) == "temperature T=1.35"
    scaling = {"kind": "vector_scaling", "scale": [1.0, 2.0], "bias": [0.0, 0.1]}
    assert describe_map(scaling) == "vector scaling"
    assert describe_map({"kind": "identity"}) == "identity (raw softmax)"
    assert describe_map(None) == "no calibration map (raw softmax)"


def test_min_count_must_be_positive() -> None:
    probs, labels = synthetic_probs(20)
    with pytest.raises(ValueError, match="min_count"):
        reliability_diagram_data(probs, labels, min_count=0)
