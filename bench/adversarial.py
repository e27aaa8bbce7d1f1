"""Crafted mail: parse time per message as the crafted part doubles, for both mail parsers.

    python -m bench.adversarial            (or: python bench/adversarial.py)
    python -m bench.adversarial --kinds blank_lines,html_lt --repeat 5

Each kind is a message built to make a parser work hard: long runs that regular
expressions could rescan, deep nesting, long MIME parameters, many parts. For each, the
inbound parser (`email:processing`) and the bounce parser (`bounce`) read it at sizes 1x,
2x, 4x and 8x; the least CPU time of `--repeat` runs (CPU time, not wall time, so other
processes on the machine disturb the figures less) is shown with the growth of each
doubling (linear is about 2.0, quadratic about 4.0). Exits 1 if a parse raised, returned the wrong
type, or lost the message's headers. Pure CPU: no Redis or PostgreSQL needed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from typing import Any

from jobstream.consumers.mail.dsn import ParsedBounce, parse_bounce
from jobstream.consumers.mail.inbound import ParsedMessage, parse_message

SCALES = (1, 2, 4, 8)

NOTICE = (
    b"From: MAILER-DAEMON@mx.example.org (Mail Delivery System)\n"
    b"To: bounces@example.org\n"
    b"Subject: Undelivered Mail Returned to Sender\n"
    b"Message-ID: <notice.1@mx.example.org>\n"
)


def blank_lines(scale: int) -> bytes:
    """A bounce whose body is 30,000 blank lines and no returned Message-ID."""
    return NOTICE + b"\n" + b"\n" * (30_000 * scale) + b" > Message-ID: unknown\n"


def html_lt(scale: int) -> bytes:
    """A bounce whose only text is an HTML part of 150,000 `<` never closed."""
    html = b"<p>user@example.net: 550 5.1.1 user unknown<br>" + b"<" * (150_000 * scale)
    return NOTICE + b"Content-Type: text/html\n\n" + html


def multipart_nesting(scale: int) -> bytes:
    """1,000 levels of multipart/mixed, each inside the last."""
    levels = 1_000 * scale
    raw = [NOTICE + b"Content-Type: multipart/mixed; boundary=b0\n\n"]
    raw += [b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (i - 1, i)
            for i in range(1, levels)]  # fmt: skip
    raw.append(b"--b%d\nContent-Type: text/plain\n\nthe innermost text\n" % (levels - 1))
    return b"".join(raw)


def rfc822_nesting(scale: int) -> bytes:
    """1,000 levels of message/rfc822, each message enclosing the next."""
    level = b"Subject: enclosed\nContent-Type: message/rfc822\n\n"
    return NOTICE + b"Content-Type: message/rfc822\n\n" + level * (1_000 * scale) + b"text\n"


def at_sign_id(scale: int) -> bytes:
    """A bounce quoting a Message-ID of 100,000 `@` with no closing bracket."""
    return NOTICE + b"\nMessage-ID: <" + b"@" * (100_000 * scale) + b"\n"


def aol_sentences(scale: int) -> bytes:
    """AOL's 'not accepting mail from' sentence 25,000 times on one line."""
    head = b"From: postmaster@aol.com\nSubject: Undeliverable\n\n"
    return head + b"not accepting mail from " * (25_000 * scale) + b"\n"


def exceed_diagnostic(scale: int) -> bytes:
    """A delivery report whose Diagnostic-Code is 'exceed' 20,000 times in one word."""
    return NOTICE + (
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=r\n\n"
        b"--r\nContent-Type: message/delivery-status\n\n"
        b"Final-Recipient: rfc822; user@example.net\nDiagnostic-Code: smtp; "
        + b"exceed" * (20_000 * scale)
        + b"\n\n--r--\n"
    )


def long_mime_params(scale: int) -> bytes:
    """200 parts, each with 4,000 `;` inside an unclosed quoted Content-Type parameter."""
    part = b'--p\nContent-Type: text/plain; name="' + b";" * 4_000 + b"\n\nx\n"
    body = part * (200 * scale) + b"--p--\n"
    return NOTICE + b"Content-Type: multipart/mixed; boundary=p\n\n" + body


def encoded_words(scale: int) -> bytes:
    """A To: header of 30,000 RFC 2047 openings `=?a?q?` that never close."""
    return NOTICE.replace(b"To: bounces", b"To: " + b"=?a?q?" * (30_000 * scale) + b" b") + b"\nx\n"


def address_comments(scale: int) -> bytes:
    """A To: header of 30,000 comments `(a)`."""
    return NOTICE.replace(b"To: bounces", b"To: " + b"(a)" * (30_000 * scale) + b" b") + b"\nx\n"


def sibling_parts(scale: int) -> bytes:
    """A multipart of 5,000 empty parts."""
    body = b"--s\n\nx\n" * (5_000 * scale) + b"--s--\n"
    return NOTICE + b"Content-Type: multipart/mixed; boundary=s\n\n" + body


def many_addresses(scale: int) -> bytes:
    """A bounce naming 5,000 recipients, one a line."""
    lines = b"".join(b"user%d@example.net: 550 5.1.1 unknown\n" % i for i in range(5_000 * scale))
    return NOTICE + b"\n" + lines


CRAFTED: dict[str, Callable[[int], bytes]] = {
    f.__name__: f
    for f in (
        blank_lines,
        html_lt,
        multipart_nesting,
        rfc822_nesting,
        at_sign_id,
        aol_sentences,
        exceed_diagnostic,
        long_mime_params,
        encoded_words,
        address_comments,
        sibling_parts,
        many_addresses,
    )
}
"""Kind name -> builder of the crafted message at a scale (1 is the size named above)."""

PARSERS: dict[str, tuple[Callable[[bytes], Any], type]] = {
    "inbound": (parse_message, ParsedMessage),
    "bounce": (parse_bounce, ParsedBounce),
}


def _problem(name: str, result: Any) -> str | None:
    """Why a result shows the parse did not do its work, or None."""
    expected = PARSERS[name][1]
    if not isinstance(result, expected):
        return f"returned {type(result).__name__}, not {expected.__name__}"
    if isinstance(result, ParsedMessage) and result.subject is None:
        return "lost the message's headers"
    return None


def measure(kind: str, parser: str, repeat: int) -> tuple[list[float], str | None]:
    """Best time of `repeat` parses at each scale; stops at the first failing parse."""
    fn = PARSERS[parser][0]
    times: list[float] = []
    for scale in SCALES:
        raw = CRAFTED[kind](scale)
        best = float("inf")
        for _ in range(repeat):
            started = time.process_time()
            try:
                result = fn(raw)
            except Exception as exc:  # reported as the benchmark's failure, not raised
                return times, f"raised {type(exc).__name__}: {exc}"
            best = min(best, time.process_time() - started)
            problem = _problem(parser, result)
            if problem is not None:
                return times, problem
        times.append(best)
    return times, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(CRAFTED), help="comma-separated kinds")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the best counts")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in CRAFTED]
    if unknown:
        print(f"unknown kind {', '.join(unknown)} (known: {', '.join(CRAFTED)})", file=sys.stderr)
        return 2
    failures = 0
    sizes = "".join(f"{f'{s}x':>10}" for s in SCALES)
    print(f"{'kind':<18} {'parser':<8} {'1x bytes':>10}{sizes}   growth per doubling")
    for kind in kinds:
        for name in PARSERS:
            times, problem = measure(kind, name, max(1, args.repeat))
            shown = "".join(f"{t * 1000:>8.1f}ms" for t in times)
            growth = " ".join(f"{b / max(a, 1e-9):.2f}" for a, b in itertools.pairwise(times))
            line = f"{kind:<18} {name:<8} {len(CRAFTED[kind](1)):>10,}{shown}   {growth}"
            if problem is not None:
                failures += 1
                line += f"   FAILED: {problem}"
            print(line, flush=True)
    print(f"{failures} failed parse(s)" if failures else "every parse ran")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
