"""The reliability diagram is a real PNG, and matplotlib stays out of plain imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from calibration.plot import plot_reliability_diagram
from calibration.synthetic import sample_classifier_outputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_diagram_is_written_as_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    logits, labels = sample_classifier_outputs(500, 10, torch.Generator().manual_seed(0))
    path = plot_reliability_diagram(logits.softmax(1), labels, tmp_path / "reliability.png")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    # Width and height from the IHDR chunk: 5 x 6 inches at 100 dpi.
    assert int.from_bytes(data[16:20], "big") == 500
    assert int.from_bytes(data[20:24], "big") == 600


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
