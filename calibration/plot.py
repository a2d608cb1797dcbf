"""Reliability diagram: accuracy vs confidence per equal-width bin, with the confidence
histogram underneath, written to a PNG.

matplotlib is imported inside the function (Agg backend, no display needed), so importing
the calibration package never pulls it in; it is the optional `plot` extra.
"""

from __future__ import annotations

from pathlib import Path

from calibration.checks import ArrayLike
from calibration.metrics import DEFAULT_BINS, expected_calibration_error, reliability_bins


def plot_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    path: str | Path,
    n_bins: int = DEFAULT_BINS,
    title: str | None = None,
) -> Path:
    """Draw the diagram for probs [N, C], labels [N] and save it as a PNG at `path`."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install 'neuroserve[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = reliability_bins(probs, labels, n_bins)
    ece = expected_calibration_error(probs, labels, n_bins)
    edges = bins.edges.numpy()
    lefts, width = edges[:-1], edges[1] - edges[0]
    filled = (bins.count > 0).numpy()

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.bar(
        lefts[filled],
        bins.accuracy.numpy()[filled],
        width=width,
        align="edge",
        edgecolor="black",
        label="accuracy",
    )
    top.bar(
        lefts[filled],
        (bins.mean_confidence - bins.accuracy).numpy()[filled],
        bottom=bins.accuracy.numpy()[filled],
        width=width,
        align="edge",
        color="red",
        alpha=0.3,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(title or f"reliability (ECE {ece:.3f}, {n_bins} bins)")

    bottom.bar(lefts, bins.count.numpy(), width=width, align="edge", edgecolor="black")
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("count")
    bottom.set_xlim(0, 1)

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path
