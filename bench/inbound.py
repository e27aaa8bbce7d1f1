"""Inbound mail throughput: messages/s through `email:processing` next to a no-op queue.

    python -m bench.inbound --n 2000

Publishes N inbound messages (a realistic mix: plain text, multipart with an attachment,
a delivery-status bounce), drains them with one in-process worker engine, then does the
same with no-op jobs (at least 10,000, for a stable figure), and prints both rates from
one run. A scratch database and a unique key prefix are created and removed afterwards.
Exits non-zero when a side drained fewer jobs than were published.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/inbound.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import base64
import random
import time
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Any

import msgspec

from bench import common
from jobstream.consumers.worker.deps import Deps
from jobstream.consumers.worker.handler import HandlerSpec, handler
from jobstream.consumers.worker.registry import HANDLERS
from jobstream.consumers.worker.runtime import connect, make_engine
from jobstream.schema.payloads import ProcessEmail
from jobstream.streams import Job, NullObserver, Policy, Publisher

NOOP_QUEUE = "bench-inbound-noop"
QUEUE = "email:processing"
MIX = (("plain", 0.6), ("attachment", 0.3), ("bounce", 0.1))
PUBLISH_BATCH = 200

DSN_TEMPLATE = """\
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
To: bounces@example.org
Subject: Undelivered Mail Returned to Sender
Date: Fri, 6 Mar 2026 08:30:12 +0100
Message-Id: <dsn-{n}@mx.example.org>
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b-{n}"

--b-{n}
Content-Type: text/plain; charset=utf-8

This is the mail system at host mx.example.org.

<user{n}@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1
    <user{n}@example.net>: Recipient address rejected: User unknown

--b-{n}
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; user{n}@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; 550 5.1.1 <user{n}@example.net>: Recipient address rejected

--b-{n}
Content-Type: text/rfc822-headers

From: app@example.org
To: user{n}@example.net
Subject: Your receipt
Message-Id: <out-{n}@app.example.org>

--b-{n}--
"""


class Noop(msgspec.Struct, frozen=True):
    """Payload of the bench-only no-op queue."""

    n: int


@handler(NOOP_QUEUE, Noop, Policy(concurrency=64, timeout_s=30))
async def noop(payload: Noop, job: Job, deps: Deps) -> None:
    """Do nothing: what remains is the engine's own cost."""
    return None


class _Clock(NullObserver):
    """Observer noting when the first job started and the N-th finished."""

    def __init__(self, n: int) -> None:
        self.n, self.done, self.failed, self.first, self.last = n, 0, 0, 0.0, 0.0

    def job_started(self, queue: str) -> None:
        if not self.first:
            self.first = time.perf_counter()

    def job_finished(
        self, queue: str, outcome: str, duration_s: float, error_type: str | None = None
    ) -> None:
        self.done += 1
        self.failed += outcome != "completed"
        if self.done >= self.n:
            self.last = time.perf_counter()


def message(kind: str, n: int, rng: random.Random) -> bytes:
    """One inbound message of the given kind, with a unique Message-ID."""
    if kind == "bounce":
        return DSN_TEMPLATE.format(n=n).encode()
    msg = EmailMessage()
    msg["From"] = f"Sender {n} <sender{n}@example.org>"
    msg["To"] = "inbox@mailbox.example.com"
    msg["Subject"] = f"Question {n} about the offer"
    msg["Date"] = "Fri, 6 Mar 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<in-{n}@example.org>"
    words = ("hello", "thanks", "offer", "meeting", "price", "schedule", "call", "next")
    msg.set_content(" ".join(rng.choice(words) for _ in range(300)))
    if kind == "attachment":
        msg.add_alternative(f"<p>Message {n}</p>", subtype="html")
        data = rng.randbytes(24 * 1024)
        msg.add_attachment(data, maintype="application", subtype="pdf", filename=f"doc{n}.pdf")
    return msg.as_bytes()


def workload(n: int) -> tuple[list[ProcessEmail], int]:
    rng = random.Random(4)
    kinds = rng.choices([k for k, _ in MIX], weights=[w for _, w in MIX], k=n)
    raws = [message(kind, i, rng) for i, kind in enumerate(kinds)]
    payloads = [
        ProcessEmail(mailbox_id="mb-bench", raw_b64=base64.b64encode(raw).decode()) for raw in raws
    ]
    return payloads, sum(map(len, raws))


async def publish(publisher: Publisher, queue: str, payloads: Sequence[Any]) -> None:
    for i in range(0, len(payloads), PUBLISH_BATCH):
        await publisher.publish_many(queue, payloads[i : i + PUBLISH_BATCH])


async def drain(
    deps: Deps, n: int, queues: Sequence[str] | None, specs: Sequence[HandlerSpec[Any]]
) -> _Clock:
    """Run one engine in burst mode until the N published jobs are settled."""
    clock = _Clock(n)
    engine = make_engine(deps, queues, burst=True, handlers=specs)
    engine.observer = clock
    await engine.run()
    return clock


def rate(clock: _Clock) -> float:
    return clock.done / max(clock.last - clock.first, 1e-9)


async def main(n: int, noop_n: int) -> None:
    await common.check_servers()
    payloads, total_bytes = workload(n)
    async with (
        common.scratch_database() as db,
        common.scratch_prefix("bin") as prefix,
        connect(common.bench_settings(db, prefix)) as deps,
    ):
        await publish(deps.publisher, QUEUE, payloads)
        inbound = await drain(deps, n, [QUEUE], HANDLERS)
        stored = await deps.pool.fetchval("SELECT count(*) FROM inbound_messages")
        noop_publisher = Publisher(deps.redis, deps.keys, {NOOP_QUEUE: Noop})
        await publish(noop_publisher, NOOP_QUEUE, [Noop(n=i) for i in range(noop_n)])
        baseline = await drain(deps, noop_n, None, [noop])
    common.require_drained(QUEUE, n, inbound.done)
    common.require_drained("no-op queue", noop_n, baseline.done)
    mix = ", ".join(f"{int(w * 100)}% {k}" for k, w in MIX)
    seconds = inbound.last - inbound.first
    print(f"N={n} messages ({mix}), {total_bytes / n / 1024:.1f} KiB average, 1 worker; "
          f"{common.load_note()}")  # fmt: skip
    print(
        f"email:processing: {rate(inbound):>8,.0f} messages/s "
        f"({inbound.done} in {seconds:.2f}s, {total_bytes / seconds / 2**20:.1f} MiB/s, "
        f"{inbound.failed} failed, {stored} stored)"
    )
    print(
        f"no-op queue:      {rate(baseline):>8,.0f} jobs/s "
        f"({baseline.done} in {baseline.last - baseline.first:.2f}s)"
    )
    print(f"ratio processing / no-op: {rate(inbound) / rate(baseline):.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="inbound messages")
    parser.add_argument("--noop-n", type=int, default=None, help="no-op jobs (max(n, 10000))")
    args = parser.parse_args()
    common.run_main(lambda: main(args.n, args.noop_n or max(args.n, 10_000)))
