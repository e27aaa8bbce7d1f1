"""Binding a handler coroutine to its queue, payload struct and policy."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from jobstream.streams import Job, Policy, Route, check_queue_name

if TYPE_CHECKING:
    from jobstream.consumers.worker.deps import Deps

__all__ = ["DEFAULT_POLICY", "HandlerFn", "HandlerSpec", "handler"]

P = TypeVar("P", bound=msgspec.Struct)
HandlerFn = Callable[[P, Job, "Deps"], Awaitable[Any]]
DEFAULT_POLICY = Policy()


@dataclass(frozen=True, slots=True)
class HandlerSpec(Generic[P]):
    """A queue's handler, payload type and policy, before it is bound to dependencies."""

    queue: str
    payload: type[P]
    fn: HandlerFn[P]
    decoder: msgspec.json.Decoder[P]
    policy: Policy

    def route(self, deps: Deps, policy: Policy | None = None) -> Route:
        """The engine's view of this handler, bound to `deps`."""
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
