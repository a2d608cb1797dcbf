"""Reliability diagram: accuracy vs confidence per equal-width bin, with the confidence
histogram underneath, written to a PNG.

A bin's accuracy is only as trustworthy as its count, so the diagram shows both:

- every non-empty bin has a 95% Wilson interval on its accuracy (an error bar), and its count
  is written above its histogram bar;
- a bin with fewer than `SPARSE_BIN_COUNT` (10) points is *sparse*: it is drawn as a hollow,
  dotted bar with a marker at its accuracy instead of a solid bar (its histogram bar too).
  Below 10 points the 95% Wilson interval is at least 0.29 wide whatever the accuracy, and at
  least 0.38 wide for an accuracy between 0.1 and 0.9: wider than any calibration gap worth
  reading off a bar;
- the title names the calibration map that produced the probabilities (when the caller says
  which), the number of points and the ECE.

The numbers behind the picture come from `reliability_diagram_data`, a plain function that
tests can check without looking at pixels. matplotlib is imported inside
`plot_reliability_diagram` (Agg backend, no display needed), so importing the calibration
package never pulls it in; it is the optional `plot` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from calibration.checks import ArrayLike
from calibration.metrics import DEFAULT_BINS, expected_calibration_error, reliability_bins

SPARSE_BIN_COUNT = 10  # a non-empty bin with fewer points is drawn hollow, not as a full bar
WILSON_Z = 1.959963984540054  # two-sided 95%: the standard normal's 0.975 quantile
# Legend entries in reading order; "accuracy, bin with < 10 points" follows "accuracy".
_LEGEND_ORDER = ["perfect calibration", "accuracy", "gap to mean confidence", "95% Wilson interval"]


def _legend_rank(name: str) -> tuple[int, bool]:
    return _LEGEND_ORDER.index(name.split(",")[0]), "," in name


def wilson_interval(successes: Tensor, count: Tensor, z: float = WILSON_Z) -> tuple[Tensor, Tensor]:
    """Wilson score interval (lower [B], upper [B]) for successes out of count trials.

    Unlike the normal approximation p +- z sqrt(p(1-p)/n), it stays inside [0, 1] and does not
    collapse to a point when every trial (or none) succeeds. An empty bin says nothing:
    (0, 1).
    """
    successes = torch.as_tensor(successes, dtype=torch.float64)
    count = torch.as_tensor(count, dtype=torch.float64)
    n = count.clamp(min=1)
    p = successes / n
    shrink = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / shrink
    half_width = z / shrink * torch.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # All-wrong and all-right bins touch 0 and 1 exactly (center = half_width in exact
    # arithmetic); an empty bin spans both.
    lower = torch.where(successes <= 0, 0.0, (center - half_width).clamp(0.0, 1.0))
    upper = torch.where(successes >= count, 1.0, (center + half_width).clamp(0.0, 1.0))
    return lower, upper


def sparse_bins(count: Tensor, min_count: int = SPARSE_BIN_COUNT) -> Tensor:
    """Bool [B]: bins with at least one point but fewer than `min_count`."""
    count = torch.as_tensor(count)
    return (count > 0) & (count < min_count)


def describe_map(params: dict[str, Any] | None) -> str:
    """A short human name for a calibration map, from its `to_dict()` form.

    {"kind": "temperature", "temperature": 1.3512} -> "temperature T=1.35";
    {"kind": "vector_scaling", ...} -> "vector scaling"; {"kind": "identity"} -> "identity
    (raw softmax)"; None -> "no calibration map (raw softmax)".
    """
    if params is None:
        return "no calibration map (raw softmax)"
    kind = params.get("kind")
    if kind == "temperature":
        return f"temperature T={float(params['temperature']):.2f}"
    if kind == "vector_scaling":
        return "vector scaling"
    if kind == "identity":
        return "identity (raw softmax)"
    return str(kind).replace("_", " ")


@dataclass(frozen=True)
class ReliabilityDiagramData:
    """Everything the diagram draws, per equal-width bin [B], plus the totals in its title."""

    edges: Tensor  # [B + 1]
    count: Tensor  # [B] points per bin (float, as `reliability_bins` gives it)
    accuracy: Tensor  # [B] fraction correct (0 where empty)
    mean_confidence: Tensor  # [B] mean top-label probability (0 where empty)
    lower: Tensor  # [B] 95% Wilson interval on the accuracy ((0, 1) where empty)
    upper: Tensor  # [B]
    sparse: Tensor  # [B] bool: 0 < count < min_count, drawn hollow
    solid: Tensor  # [B] bool: count >= min_count, drawn as a full bar
    n: int
    ece: float
    title: str


def diagram_title(
    n: int, ece: float, n_bins: int, title: str | None = None, map_name: str | None = None
) -> str:
    """Caller's title (if any) on the first line; map, n and ECE always on the last."""
    facts = f"n={n}, ECE {ece:.3f} ({n_bins} bins)"
    if map_name:
        facts = f"map: {map_name}; {facts}"
    return f"{title}\n{facts}" if title else f"reliability diagram\n{facts}"


def reliability_diagram_data(
    probs: ArrayLike,
    labels: ArrayLike,
    n_bins: int = DEFAULT_BINS,
    min_count: int = SPARSE_BIN_COUNT,
    title: str | None = None,
    map_name: str | None = None,
) -> ReliabilityDiagramData:
    """The per-bin numbers behind `plot_reliability_diagram` for probs [N, C], labels [N]."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    bins = reliability_bins(probs, labels, n_bins)
    successes = torch.round(bins.accuracy * bins.count)  # [B] exact counts, stored as means
    lower, upper = wilson_interval(successes, bins.count)
    n = int(bins.count.sum())
    ece = expected_calibration_error(probs, labels, n_bins)
    return ReliabilityDiagramData(
        edges=bins.edges,
        count=bins.count,
        accuracy=bins.accuracy,
        mean_confidence=bins.mean_confidence,
        lower=lower,
        upper=upper,
        sparse=sparse_bins(bins.count, min_count),
        solid=bins.count >= min_count,
        n=n,
        ece=ece,
        title=diagram_title(n, ece, n_bins, title, map_name),
    )


def plot_reliability_diagram(
    probs: ArrayLike,
    labels: ArrayLike,
    path: str | Path,
    n_bins: int = DEFAULT_BINS,
    title: str | None = None,
    map_name: str | None = None,
    min_count: int = SPARSE_BIN_COUNT,
) -> Path:
    """Draw the diagram for probs [N, C], labels [N] and save it as a PNG at `path`.

    `map_name` says which calibration map produced `probs` (e.g. "temperature T=1.35", or
    `describe_map(artifact.calibration_map.to_dict())`); it is printed in the title next to
    n and the ECE. Bins with fewer than `min_count` points are drawn hollow.
    """
    data = reliability_diagram_data(probs, labels, n_bins, min_count, title, map_name)
    try:
        import matplotlib  # lazy: an optional extra, neuroserve[plot]
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install 'neuroserve[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    edges = data.edges.numpy()
    lefts, width = edges[:-1], edges[1] - edges[0]
    centers = lefts + width / 2
    count = data.count.numpy()
    accuracy = data.accuracy.numpy()
    confidence = data.mean_confidence.numpy()
    solid, sparse, filled = data.solid.numpy(), data.sparse.numpy(), count > 0

    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    if solid.any():
        top.bar(
            lefts[solid],
            accuracy[solid],
            width=width,
            align="edge",
            color="tab:blue",
            edgecolor="black",
            label="accuracy",
        )
        top.bar(
            lefts[solid],
            (confidence - accuracy)[solid],
            bottom=accuracy[solid],
            width=width,
            align="edge",
            facecolor="none",
            edgecolor="tab:red",
            hatch="///",
            linewidth=0.8,
            label="gap to mean confidence",
        )
    if sparse.any():
        top.bar(
            lefts[sparse],
            accuracy[sparse],
            width=width,
            align="edge",
            fill=False,
            edgecolor="gray",
            linestyle=":",
        )
        top.plot(
            centers[sparse],
            accuracy[sparse],
            linestyle="none",
            marker="o",
            markerfacecolor="white",
            markeredgecolor="tab:blue",
            zorder=4,
            label=f"accuracy, bin with < {min_count} points",
        )
    top.errorbar(
        centers[filled],
        accuracy[filled],
        yerr=[
            (data.accuracy - data.lower).numpy()[filled],
            (data.upper - data.accuracy).numpy()[filled],
        ],
        linestyle="none",
        color="black",
        capsize=2,
        linewidth=1,
        label="95% Wilson interval",
    )
    top.set_ylabel("accuracy")
    top.set_ylim(-0.03, 1.03)  # markers at accuracy 0 or 1 stay whole
    top.set_title(data.title, fontsize="medium")

    bottom.bar(
        lefts[solid], count[solid], width=width, align="edge", color="tab:gray", edgecolor="black"
    )
    bottom.bar(lefts[sparse], count[sparse], width=width, align="edge", fill=False, linestyle=":")
    for x, c in zip(centers[filled], count[filled], strict=True):
        bottom.annotate(
            f"{int(c)}",
            (x, c),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=90 if n_bins > 20 else 0,
        )
    bottom.set_ylim(0, max(1.0, float(count.max())) * 1.3)  # room for the counts
    bottom.set_xlabel("confidence (top-label probability)")
    bottom.set_ylabel("points per bin")
    bottom.set_xlim(0, 1)

    # Below the panels, where it can never hide a bar (an underconfident model fills the
    # upper left that a legend inside the axes would take).
    handles, names = top.get_legend_handles_labels()
    order = sorted(range(len(names)), key=lambda i: _legend_rank(names[i]))
    figure.legend(
        [handles[i] for i in order],
        [names[i] for i in order],
        loc="lower center",
        ncol=2,
        fontsize="small",
        frameon=False,
    )
    figure.tight_layout(rect=(0, 0.09, 1, 1))
    path = Path(path)
    figure.savefig(path, format="png", dpi=100)
    plt.close(figure)
    return path
