"""Parse raw mail into an `email` message tree whose nesting and MIME header sizes are bounded.

The standard parser recurses once per nesting level (a message nested a thousand levels
deep raises RecursionError, and every header is lost with it), and its MIME parameter
parsers cost tens of microseconds per character, quadratically more past a few kB. Here:

* a part nested deeper than `MAX_DEPTH` levels is read as one opaque
  `application/octet-stream` leaf: its text is kept, nothing inside it is parsed, and
  `BoundedMessage.too_deep` says so;
* the values of Content-Type, Content-Disposition and Content-Transfer-Encoding are cut at
  `MAX_MIME_HEADER_CHARS` (`BoundedMessage.cut_headers` names them), and each is parsed
  (value and parameters) once per part however often it is asked for.

The tree is for reading (`set_boundary` after parsing would leave a stale cached
Content-Type). Pure, no I/O.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
from typing import Any, cast

__all__ = [
    "MAX_DEPTH",
    "MAX_MIME_HEADER_CHARS",
    "BoundedEmailMessage",
    "BoundedMessage",
    "parse_bytes",
]

MAX_DEPTH = 32
"""Levels of multipart or message/* nesting parsed; deeper parts stay opaque."""

MAX_MIME_HEADER_CHARS = 2048
"""Longest Content-Type, Content-Disposition or Content-Transfer-Encoding value kept."""

_MIME_HEADERS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})
_OPAQUE_TYPE = "application/octet-stream"
_ABSENT = object()


class _Bounded(email.message.Message):
    """The bounds, as a mixin over the compat32 and the modern message class."""

    depth: int = 0
    cut_headers: tuple[str, ...] = ()

    @property
    def too_deep(self) -> bool:
        """Whether this part lies below `MAX_DEPTH` and was not parsed inside."""
        return self.depth > MAX_DEPTH

    def attach(self, payload: Any) -> None:
        # The parser attaches each part to its parent as soon as it starts, before reading
        # the part's headers: the one moment its depth is known.
        if isinstance(payload, _Bounded):
            payload.depth = self.depth + 1
        super().attach(payload)

    def get_content_type(self) -> str:
        # The parser descends into a part only if its type is multipart/* or message/*.
        return _OPAQUE_TYPE if self.too_deep else super().get_content_type()

    def set_raw(self, name: str, value: Any) -> None:
        self.__dict__.pop("_mime_cache", None)
        key = name.lower()
        if key in _MIME_HEADERS and isinstance(value, str) and len(value) > MAX_MIME_HEADER_CHARS:
            value = value[:MAX_MIME_HEADER_CHARS]
            self.cut_headers = (*self.cut_headers, key)
        super().set_raw(name, value)

    def get(self, name: str, failobj: Any = None) -> Any:
        key = name.lower()
        if key not in _MIME_HEADERS:
            return super().get(name, failobj)
        cache: dict[tuple[str, str], Any] = self.__dict__.setdefault("_mime_cache", {})
        if ("value", key) not in cache:
            cache["value", key] = super().get(name, _ABSENT)
        value = cache["value", key]
        return failobj if value is _ABSENT else value

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        # Behind get_param, get_params, get_content_charset, get_filename and get_boundary:
        # the parameter parser costs microseconds a character, so each header's once.
        key = header.lower()
        if key not in _MIME_HEADERS:
            return super()._get_params_preserve(failobj, header)  # type: ignore[misc]
        cache: dict[tuple[str, str], Any] = self.__dict__.setdefault("_mime_cache", {})
        if ("params", key) not in cache:
            cache["params", key] = super()._get_params_preserve(_ABSENT, header)  # type: ignore[misc]
        params = cache["params", key]
        return failobj if params is _ABSENT else list(params)

    def __setitem__(self, name: str, val: Any) -> None:
        self.__dict__.pop("_mime_cache", None)
        super().__setitem__(name, val)

    def __delitem__(self, name: str) -> None:
        self.__dict__.pop("_mime_cache", None)
        super().__delitem__(name)

    def replace_header(self, _name: str, _value: Any) -> None:
        self.__dict__.pop("_mime_cache", None)
        super().replace_header(_name, _value)


class BoundedMessage(_Bounded):
    """A bounded `email.message.Message`, as the compat32 policy builds."""


class BoundedEmailMessage(_Bounded, email.message.EmailMessage):
    """A bounded `email.message.EmailMessage`, as the modern policies build."""


def parse_bytes(raw: bytes, policy: email.policy.Policy = email.policy.compat32) -> _Bounded:
    """Parse `raw` into a bounded tree of the message class `policy` calls for."""
    cls = BoundedMessage if policy.message_factory is None else BoundedEmailMessage
    # the parser builds every part with `cls`
    return cast(_Bounded, email.parser.BytesParser(cls, policy=policy).parsebytes(raw))
