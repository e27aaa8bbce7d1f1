"""Binding a handler coroutine to its queue, payload struct and policy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from jobstream.streams import Job, Policy, Route, check_queue_name
from jobstream.streams.batch import single

if TYPE_CHECKING:
    from jobstream.consumers.worker.deps import Deps

__all__ = [
    "DEFAULT_POLICY",
    "BatchHandlerFn",
    "HandlerFn",
    "HandlerSpec",
    "batch_handler",
    "handler",
]

P = TypeVar("P", bound=msgspec.Struct)
HandlerFn = Callable[[P, Job, "Deps"], Awaitable[Any]]
BatchHandlerFn = Callable[[Sequence[tuple[P, Job]], "Deps"], Awaitable[Sequence[Any]]]
DEFAULT_POLICY = Policy()


@dataclass(frozen=True, slots=True)
class HandlerSpec(Generic[P]):
    """A queue's handler, payload type and policy, before it is bound to dependencies."""

    queue: str
    payload: type[P]
    fn: HandlerFn[P]
    decoder: msgspec.json.Decoder[P]
    policy: Policy
    batch_fn: BatchHandlerFn[P] | None = None

    def route(self, deps: Deps, policy: Policy | None = None) -> Route:
        """The engine's view of this handler, bound to `deps`."""
        if self.batch_fn is not None:
            batch_fn = self.batch_fn

            async def handle_batch(jobs: Sequence[tuple[P, Job]]) -> Sequence[Any]:
                return await batch_fn(jobs, deps)

            policy = policy or self.policy
            return Route(self.queue, self.decoder.decode, single(handle_batch), policy,
                         handle_batch)  # fmt: skip
        fn = self.fn

        async def handle(payload: P, job: Job) -> Any:
            return await fn(payload, job, deps)

        return Route(self.queue, self.decoder.decode, handle, policy or self.policy)


def handler(
    queue: str, payload: type[P], policy: Policy = DEFAULT_POLICY
) -> Callable[[HandlerFn[P]], HandlerSpec[P]]:
    """Bind a coroutine to its queue, payload type and policy; build the decoder once."""
    check_queue_name(queue)

    def bind(fn: HandlerFn[P]) -> HandlerSpec[P]:
        return HandlerSpec(queue, payload, fn, msgspec.json.Decoder(payload), policy)

    return bind


def batch_handler(
    queue: str, payload: type[P], policy: Policy = DEFAULT_POLICY
) -> Callable[[BatchHandlerFn[P]], HandlerSpec[P]]:
    """Bind a coroutine that runs a batch of jobs to its queue, payload type and policy.

    The coroutine gets `[(payload, job), ...]` (at most `policy.batch_size`) and returns
    one outcome per job, in order: the job's result, or the exception that fails it.
    """
    check_queue_name(queue)

    def bind(fn: BatchHandlerFn[P]) -> HandlerSpec[P]:
        async def one(payload: P, job: Job, deps: Deps) -> Any:
            return await single(lambda jobs: fn(jobs, deps))(payload, job)

        return HandlerSpec(queue, payload, one, msgspec.json.Decoder(payload), policy, fn)

    return bind
