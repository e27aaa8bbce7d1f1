"""The operator's web dashboard and its JSON API: what the CLI shows, and dead-letter actions."""

from jobstream.consumers.dashboard.app import build_app
from jobstream.consumers.dashboard.server import run_dashboard

__all__ = ["build_app", "run_dashboard"]
