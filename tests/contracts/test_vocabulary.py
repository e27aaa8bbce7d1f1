"""A job's life has one vocabulary (streams/status.py), and an attempt's Result is a value:
immutable, built by named constructors that say which outcome it is."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

from jobstream.streams import TERMINAL, Outcome, Reason, Result, Status
from jobstream.streams.dispatch import invalid_result
from jobstream.streams.job import Delivery, Job

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORDS = {str(v) for enum in (Status, Outcome, Reason) for v in enum}


def _constants(node: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_python_code_compares_against_the_vocabulary_not_string_literals():
    """SQL and Lua spell the values; Python compares against Status, Outcome and Reason."""
    found = []
    for package in ("streams", "consumers"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    words = _constants(node) & WORDS
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "get":
                    words = _constants(node.args[0]) & WORDS if node.args else set()
                else:
                    continue
                if words:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(words)}")
    assert found == []


def _delivery() -> Delivery:
    return Delivery("q", "1-0", {b"id": b"j", b"payload": b"{}"})


def _job() -> Job:
    return Job("j", "q", 2, "1-0", 1)


def test_a_result_is_immutable():
    res = Result.completed(
        _delivery(), _job(), payload=b"{}", result_json="1", started_at=1, finished_at=2,
        duration_ms=5,
    )  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.outcome = Outcome.FAILED  # type: ignore[misc]


def test_each_constructor_builds_its_outcome():
    d, job = _delivery(), _job()
    done = Result.completed(
        d, job, payload=b"{}", result_json="1", started_at=1, finished_at=2, duration_ms=5
    )
    assert (done.outcome, done.job_id, done.attempt, done.reason, done.executed) == (
        Outcome.COMPLETED, "j", 2, None, True,
    )  # fmt: skip
    again = Result.retry(
        d, job, payload=b"{}", error="E: x", exception=ValueError("x"), started_at=1,
        finished_at=2, duration_ms=5, retry_at=9, retry_fields={"attempt": "3"},
    )  # fmt: skip
    assert (again.outcome, again.retry_at, again.reason) == (Outcome.RETRYING, 9, None)
    dead = Result.failed(
        d, "j", 2, reason=Reason.EXHAUSTED, error="E: x", started_at=1, finished_at=2
    )
    assert (dead.outcome, dead.reason, dead.retry_at) == (Outcome.FAILED, Reason.EXHAUSTED, None)
    skip = Result.skipped(d, "j", {"status": "completed"}, 3.0)
    assert (skip.outcome, skip.executed, skip.view) == (
        Outcome.SKIPPED, False, {"status": "completed"},
    )  # fmt: skip
    bad = invalid_result(d, "invalid entry: no payload")
    assert (bad.outcome, bad.reason, bad.executed) == (Outcome.FAILED, Reason.INVALID, False)
    assert invalid_result(d, "x", reason=Reason.DELIVERIES).reason is Reason.DELIVERIES


def test_the_vocabulary_is_the_text_stored():
    assert [str(s) for s in Status] == [
        "queued", "running", "retrying", "completed", "failed", "cancelled",
    ]  # fmt: skip
    assert {Status.COMPLETED, Status.FAILED, Status.CANCELLED} == TERMINAL
    assert {str(o) for o in Outcome} - {str(s) for s in Status} == {"skipped"}
