"""The CLI's one renderer: fixed-width tables and indented JSON for the terminal."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import msgspec

__all__ = ["Progress", "render_json", "render_json_line", "render_rows", "render_table"]


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


def render_json_line(value: Any) -> str:
    """JSON on one line (for `status --watch --json`: a document per line)."""
    return msgspec.json.encode(value, enc_hook=str).decode()


def render_json(value: Any) -> str:
    """Indented JSON; values JSON cannot hold (times, decimals) as their strings."""
    return msgspec.json.format(msgspec.json.encode(value, enc_hook=str)).decode()


class Progress:
    """Progress of a long command on stderr, as `label: done/total`: rewritten in place at a
    terminal (and left on its last value when done); elsewhere (a log) one line every
    `log_every_s` while it runs, so a quick command adds nothing to its output there."""

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: IO[str] | None = None,
        *,
        every_s: float = 0.2,
        log_every_s: float = 10.0,
    ) -> None:
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else log_every_s
        self.shown_at = time.monotonic()
        self.done = 0

    def _line(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.label}: {self.done}{of}"

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self.shown_at >= self.every_s:
            self.shown_at = now
            self.stream.write(f"\r{self._line()}" if self.tty else f"{self._line()}\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write(f"\r{self._line()}\n")
            self.stream.flush()
