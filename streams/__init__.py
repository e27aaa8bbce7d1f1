"""The generic engine: publish, read, dispatch, record, ack, reclaim, retry, dead-letter, trim.

It knows nothing of email; `consumers` gives it routes.
"""

from jobstream.streams.client import Client, JobState
from jobstream.streams.dead_letters import DeadLetter, list_dead, purge_dead, read_dead, replay_dead
from jobstream.streams.dispatch import Route
from jobstream.streams.errors import (
    ConfigError,
    JobError,
    JobstreamError,
    PermanentError,
    PublishError,
    RetryableError,
)
from jobstream.streams.job import Job, Result
from jobstream.streams.keys import Keys, check_queue_name
from jobstream.streams.observe import NullObserver, Observer
from jobstream.streams.partitions import (
    Partition,
    PartitionPolicy,
    PrunePlan,
    ensure_partitions,
    list_partitions,
    prune,
)
from jobstream.streams.policy import Policy, backoff_s
from jobstream.streams.publisher import Publisher, new_job_id
from jobstream.streams.status import TERMINAL, Outcome, Reason, Status
from jobstream.streams.trimmer import trim
from jobstream.streams.worker import Engine, EngineConfig

__all__ = [
    "TERMINAL",
    "Client",
    "ConfigError",
    "DeadLetter",
    "Engine",
    "EngineConfig",
    "Job",
    "JobError",
    "JobState",
    "JobstreamError",
    "Keys",
    "NullObserver",
    "Observer",
    "Outcome",
    "Partition",
    "PartitionPolicy",
    "PermanentError",
    "Policy",
    "PrunePlan",
    "PublishError",
    "Publisher",
    "Reason",
    "Result",
    "RetryableError",
    "Route",
    "Status",
    "backoff_s",
    "check_queue_name",
    "ensure_partitions",
    "list_dead",
    "list_partitions",
    "new_job_id",
    "prune",
    "purge_dead",
    "read_dead",
    "replay_dead",
    "trim",
]
