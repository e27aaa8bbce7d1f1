"""`jobstream schema`: the JSON Schema of each queue's payload and of the entry's fields."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobstream.schema import wire
from jobstream.schema.payloads import PAYLOADS
from jobstream.streams import ConfigError

__all__ = ["add_parser", "main", "run"]


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    s = sub.add_parser(
        "schema", help="JSON Schema of a queue's payload or of the entry's fields (envelope)"
    )
    s.add_argument("queue", nargs="?", help="a queue or `envelope` (default: list them all)")
    s.add_argument("--write", metavar="DIR", help="write every schema file into DIR")


def main(args: argparse.Namespace) -> int:
    """Run the command; errors are one line on stderr and a non-zero exit."""
    try:
        return run(args)
    except ConfigError as exc:
        print(f"jobstream: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --write into a directory we cannot write
        print(f"jobstream: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """Print one schema, list them all, or write them all."""
    if args.write is not None:
        for path in wire.write(args.write):
            print(path)
        return 0
    if args.queue is None:
        rows = [(wire.ENVELOPE, wire.file_name(wire.ENVELOPE), "the fields of every entry")]
        rows += [(q, wire.file_name(q), PAYLOADS[q].__name__) for q in sorted(PAYLOADS)]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        for name, file, what in rows:
            print(f"{name:<{widths[0]}}  {file:<{widths[1]}}  {what}")
        return 0
    if args.queue == wire.ENVELOPE:
        print(wire.render(wire.envelope_schema()), end="")
        return 0
    if args.queue not in PAYLOADS:
        known = ", ".join([wire.ENVELOPE, *sorted(PAYLOADS)])
        raise ConfigError(f"unknown queue {args.queue!r} (known: {known})")
    print(wire.render(wire.payload_schema(args.queue)), end="")
    return 0
