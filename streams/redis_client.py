"""The one place Redis clients are built: a single server or a Redis Cluster.

On a cluster, redis-py's `RedisCluster` routes every command and splits every pipeline
by node; nothing here or elsewhere picks a node by hand. Scripts touch one slot only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster

__all__ = [
    "REDIS_ERRORS",
    "AnyRedis",
    "NotReplicated",
    "connect_redis",
    "is_cluster",
    "load_scripts",
    "send_many",
    "wait_replicas",
]

AnyRedis: TypeAlias = aioredis.Redis | RedisCluster

# What a dropped connection or a cluster in the middle of a failover looks like: wait and
# send again (every write the engine sends is idempotent or fenced).
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,  # includes MASTERDOWN
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,  # a demoted master, until the client sees the new map
    redis.exceptions.RedisClusterException,  # slots not covered, no node reachable
)


def connect_redis(
    url: str,
    *,
    cluster: bool = False,
    client_name: str | None = None,
    **options: Any,
) -> AnyRedis:
    """A client for `url`: a single server, or (`cluster`) the cluster `url`'s node is in.

    Replies are bytes. Connections are made when first needed, so this never blocks.
    """
    common: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "client_name": client_name,
        **options,
    }
    if cluster:
        # Blocking reads hold a connection each: allow plenty per node.
        return RedisCluster.from_url(url, max_connections=10_000, **common)
    return aioredis.Redis.from_url(url, max_connections=None, **common)


def is_cluster(r: AnyRedis) -> bool:
    return isinstance(r, RedisCluster)


class NotReplicated(redis.exceptions.RedisError):
    """Fewer replicas than asked confirmed a batch of writes (`WAIT`)."""


async def send_many(
    r: RedisCluster, cmds: Sequence[tuple[Any, ...]], keys: Sequence[str], wait: tuple[int, int]
) -> list[object]:
    """Send commands through the cluster client's pipeline (one round trip per node);
    a refused command's reply is its exception. A connection lost or a failover under
    way raises, so the caller sends everything again.

    `wait` = (replicas, timeout ms): when replicas > 0, each node the commands' `keys` go
    to then waits for that many replicas; fewer raises NotReplicated.
    """
    pipe = r.pipeline(transaction=False)
    for cmd in cmds:
        pipe.execute_command(*cmd)
    if wait[0] > 0:
        confirmed = await wait_replicas(r, pipe, keys, *wait, raise_on_error=False)
        replies: list[object] = confirmed[1]
        if confirmed[0] < wait[0]:
            raise NotReplicated(f"{confirmed[0]} of {wait[0]} replicas confirmed the writes")
    else:
        replies = await pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, REDIS_ERRORS):
            raise reply
    return replies


async def wait_replicas(
    r: AnyRedis,
    pipe: Any,
    keys: Sequence[str],
    replicas: int,
    timeout_ms: int,
    *,
    raise_on_error: bool = True,
) -> tuple[int, list[Any]]:
    """Queue `WAIT replicas timeout_ms` behind the writes to `keys` already in `pipe`, on
    each node they go to, and run the pipeline; return the fewest replicas any node
    confirmed (so every write is replicated at least that often) and the writes' replies.

    A node's WAIT travels on the same connection as its writes, which is what WAIT counts.
    """
    if not isinstance(r, RedisCluster):
        pipe.execute_command("WAIT", replicas, timeout_ms)
        replies = await pipe.execute(raise_on_error=raise_on_error)
        last = replies.pop()
        return (int(last) if isinstance(last, int) else 0), replies
    await r.initialize()  # the slot map (a no-op once known)
    nodes: dict[str, Any] = {}
    for k in keys:
        node = r.get_node_from_key(k)
        if node is not None:
            nodes[node.name] = node
    for node in nodes.values():
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
    replies = await pipe.execute(raise_on_error=raise_on_error)
    waits = replies[len(replies) - len(nodes) :]
    del replies[len(replies) - len(nodes) :]
    # A write redirected meanwhile (a failover) went on another connection: not counted.
    moved = any(getattr(r.get_node_from_key(k), "name", None) not in nodes for k in keys)
    counts = [w if isinstance(w, int) else 0 for w in waits]
    return (0 if moved or not counts else min(counts)), replies


async def load_scripts(r: AnyRedis, bodies: Sequence[bytes]) -> None:
    """Load scripts into every master's cache (after a restart, a failover or SCRIPT FLUSH)."""
    await asyncio.gather(*(r.script_load(body) for body in bodies))
