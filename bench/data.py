"""The evaluation data a benchmark reads from $ROMPATCH_DATA (never needed by the product)."""

from __future__ import annotations

from pathlib import Path

from rompatch.constants import data_dir


def missing_data(*files: str) -> str | None:
    """Why the benchmark cannot run here (files missing under $ROMPATCH_DATA), or None."""
    d = data_dir()
    if d is None:
        return "needs the evaluation data: set ROMPATCH_DATA (make bench finds ../shared/data itself)"
    lacking = [f for f in files if not (d / f).is_file()]
    return f"$ROMPATCH_DATA={d} lacks {', '.join(lacking)}" if lacking else None


def data_file(rel: str) -> Path:
    why = missing_data(rel)
    if why:
        raise SystemExit(why)
    return data_dir() / rel  # type: ignore[operator]
