"""Span and metric attribute keys: the OpenTelemetry messaging conventions' and our own.

Ours live outside `messaging.*` (that namespace belongs to the conventions).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BATCH_MESSAGE_COUNT",
    "CLIENT_ID",
    "CONSUMER_GROUP",
    "CONVERSATION_ID",
    "DELIVERY_COUNT",
    "DESTINATION",
    "ERROR_TYPE",
    "JOB_ATTEMPT",
    "MESSAGE_ID",
    "OPERATION_NAME",
    "OPERATION_TYPE",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "SYSTEM",
    "server_attributes",
]

SYSTEM = "messaging.system"
OPERATION_NAME = "messaging.operation.name"
OPERATION_TYPE = "messaging.operation.type"
DESTINATION = "messaging.destination.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
CLIENT_ID = "messaging.client.id"
MESSAGE_ID = "messaging.message.id"  # the stream entry ID
CONVERSATION_ID = "messaging.message.conversation_id"  # the job id, the same on every attempt
BATCH_MESSAGE_COUNT = "messaging.batch.message_count"  # batch operations only
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
JOB_ATTEMPT = "jobstream.job.attempt"
DELIVERY_COUNT = "jobstream.delivery_count"  # times the group delivered this entry


def server_attributes(redis: Any) -> dict[str, str | int]:
    """`server.address` and `server.port` of a redis-py client (a socket path has no port).

    A cluster client names the node it was given first: commands go to many.
    """
    kwargs: dict[str, Any] = {}
    pool = getattr(redis, "connection_pool", None)
    if pool is not None:
        kwargs = dict(getattr(pool, "connection_kwargs", {}))
    elif hasattr(redis, "get_default_node"):  # redis.asyncio.cluster.RedisCluster
        nodes = [redis.get_default_node(), *getattr(redis, "startup_nodes", [None])]
        node = next((n for n in nodes if n is not None), None)
        kwargs = {"host": getattr(node, "host", None), "port": getattr(node, "port", None)}
    attrs: dict[str, str | int] = {}
    if kwargs.get("path"):
        attrs[SERVER_ADDRESS] = str(kwargs["path"])
    elif kwargs.get("host"):
        attrs[SERVER_ADDRESS] = str(kwargs["host"])
        if kwargs.get("port"):
            attrs[SERVER_PORT] = int(kwargs["port"])
    return attrs
