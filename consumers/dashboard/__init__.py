"""The operator's web dashboard: queues, jobs, dead letters and workers, with a JSON API.

It reads what the command line reads (`consumers.ops`, `streams`) and acts on dead letters
through the same functions; it never runs jobs.
"""

from consumers.dashboard.app import build_app
from consumers.dashboard.server import run_dashboard

__all__ = ["build_app", "run_dashboard"]
