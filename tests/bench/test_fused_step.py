"""The fused-step bench: every built-in artifact measured on every path, fused and reference
agreeing on the real input streams."""

from __future__ import annotations

from bench.fused_step import MODELS, format_table, measure


def test_measure_times_every_builtin_on_every_path_and_they_agree() -> None:
    rows, extra = measure([1, 3], steps=4, repeats=1, compile_too=False)
    assert [(row["model"], row["batch"]) for row in rows] == [
        (name, batch) for name in MODELS for batch in (1, 3)
    ]
    for row in rows:
        assert row["reference"] > 0 and row["fused"] > 0 and row["runner"] > 0
        assert row["difference"] < 1e-5, row
    table = format_table(rows, extra, steps=4, repeats=1)
    assert table.count("\n| digits-") == 4 and "charlm-selective" in table
