"""Writing a benchmark's table into docs/BENCHMARKS.md: shared by the bench scripts."""

from __future__ import annotations

from pathlib import Path


def append_section(path: Path, heading: str, table: str, command: str) -> None:
    """Append the table under `heading` with the command that printed it (the file is
    created if missing; what it already holds is never rewritten)."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    separator = "" if not existing else ("\n" if existing.endswith("\n") else "\n\n")
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"{separator}{heading}\n\n`{command}`\n\n{table}\n")
