"""The fused-step bench: every built-in artifact measured on every path, fused and reference
agreeing on the real input streams."""

from __future__ import annotations

from bench.fused_step import KERNEL_MODELS, MODELS, format_table, measure


def test_measure_times_every_builtin_on_every_path_and_they_agree() -> None:
    rows, extra = measure([1, 3], steps=4, repeats=1, compile_too=False)
    assert [(row["model"], row["batch"]) for row in rows] == [
        (name, batch) for name in MODELS for batch in (1, 3)
    ]
    for row in rows:
        assert row["reference"] > 0 and row["fused"] > 0 and row["runner"] > 0
        assert row["difference"] < 1e-5, row
        if row["model"] in KERNEL_MODELS:  # timed through its kernel and as torch ops too
            assert row["kernel"] > 0 and row["torch"] > 0
    table = format_table(rows, extra, steps=4, repeats=1)
    # 4 rows of digits models in the main table, 2 of digits-lru in the kernel table
    assert table.count("\n| digits-") == 6 and "charlm-selective" in table
