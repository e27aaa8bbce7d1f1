"""The CLI's one renderer: fixed-width tables and indented JSON for the terminal."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["render_json", "render_rows", "render_table"]


def render_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width table."""
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join([line, *body])


def render_rows(rows: list[dict[str, Any]]) -> str:
    """Rows as a table with the first row's keys as columns; `(none)` when there are none."""
    return render_table(rows, list(rows[0])) if rows else "(none)"


def render_json(value: Any) -> str:
    """Indented JSON; values JSON cannot hold (times, decimals) as their strings."""
    return msgspec.json.format(msgspec.json.encode(value, enc_hook=str)).decode()
