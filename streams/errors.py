"""Exceptions the engine understands.

* JobstreamError
  + ConfigError        bad settings or registration; startup only
  + PublishError       a payload or queue refused before anything is written
  + JobError           raised by handlers to say what should happen next
    - RetryableError   transient: schedule attempt + 1 after backoff
    - PermanentError   retrying cannot help: fail now, dead-letter
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "JobError",
    "JobstreamError",
    "PermanentError",
    "PublishError",
    "RetryableError",
]


class JobstreamError(Exception):
    """Root: `except JobstreamError` catches every deliberate failure."""


class ConfigError(JobstreamError):
    """Invalid settings or registry; raised before any entry is read."""


class PublishError(JobstreamError):
    """A job refused at publish time: unknown queue or a payload that does not match."""


class JobError(JobstreamError):
    """Base for the exceptions a handler raises on purpose."""


class RetryableError(JobError):
    """Transient (SMTP 4xx, HTTP 429/5xx, timeouts): retry until max_attempts.

    `retry_after_s`, when given, is the earliest the next attempt may run (a rate-limit
    window, an HTTP `Retry-After`); the backoff is never shorter than it.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(JobError):
    """Bad input or a definitive refusal (SMTP 5xx, HTTP 4xx): fail and dead-letter."""
