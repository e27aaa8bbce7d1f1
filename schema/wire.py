"""JSON Schema of the wire format, generated from the msgspec structs, for producers in any
language: one file per queue's payload and one for the entry's fields, shipped in
`schema/jsonschema/`. Regenerate them with `jobstream schema --write schema/jsonschema`.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec

from jobstream.schema import payloads
from jobstream.schema.envelope import EntryFields
from jobstream.schema.payloads import PAYLOADS, RESERVED_HEADER_PREFIXES, RESERVED_HEADERS

__all__ = [
    "DIALECT",
    "ENVELOPE",
    "envelope_schema",
    "file_name",
    "generated",
    "payload_schema",
    "render",
    "shipped",
    "write",
]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ENVELOPE = "envelope"
"""The name under which `jobstream schema` and the files know the entry's fields."""


def _anycase(text: str) -> str:
    """An ECMA-262 pattern for `text` in any letter case (JSON Schema has no `(?i)`)."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


_NO_CONTROL = "^[^\\u0000-\\u0008\\u000a-\\u001f\\u007f]*$"  # HTAB is allowed
_RESERVED = "^(" + "|".join(
    [*(_anycase(n) + "$" for n in sorted(RESERVED_HEADERS)),
     *(_anycase(p) for p in RESERVED_HEADER_PREFIXES)]
) + ")"  # fmt: skip

# What each struct's __post_init__ checks, said in JSON Schema (msgspec cannot see it).
# Not expressible: a header name given twice in different letter case is refused too.
_POST_INIT: dict[str, dict[str, Any]] = {
    "SendEmail": {
        "anyOf": [
            {"required": ["text"], "properties": {"text": {"type": "string"}}},
            {"required": ["html"], "properties": {"html": {"type": "string"}}},
        ],
        "properties": {
            "subject": {"pattern": _NO_CONTROL},
            "headers": {
                "propertyNames": {"pattern": "^[!-9;-~]+$", "not": {"pattern": _RESERVED}},
                "additionalProperties": {"type": "string", "pattern": _NO_CONTROL},
            },
        },
    },
    "ProcessBounce": {
        "anyOf": [
            {"required": ["raw_b64"], "properties": {"raw_b64": {"type": "string"}}},
            {
                "required": ["recipients"],
                "properties": {"recipients": {"type": "array", "minItems": 1}},
            },
        ]
    },
}

# Times: RFC 3339 with an offset (msgspec leaves a plain `datetime` without a format, as it
# also takes naive times; producers must say which instant they mean). The patterns hold
# where a validator does not assert `format`.
_TEMPORAL: dict[type[msgspec.inspect.Type], dict[str, str]] = {
    msgspec.inspect.DateTimeType: {
        "format": "date-time",
        "pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
        r"([Zz]|[+-][0-9]{2}:[0-9]{2})$",
    },
    msgspec.inspect.DateType: {"format": "date", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
}


def file_name(name: str) -> str:
    """The file of a queue (or of `envelope`): `email:processing` → `email_processing.json`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json"


def _field_docs(struct: type[msgspec.Struct]) -> dict[str, str]:
    """The docstring under each field of a struct's class body."""
    body = ast.parse(inspect.getsource(struct)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:], strict=False):
        doc = after.value if isinstance(after, ast.Expr) else None
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(doc, ast.Constant)
            and isinstance(doc.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(doc.value)
    return docs


def _temporal(struct: type[msgspec.Struct], definition: dict[str, Any]) -> None:
    """Give every date and time field of a struct's schema its format and pattern."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        union = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else ()
        for kind in (field.type, *union):
            rule = _TEMPORAL.get(type(kind))
            if rule is None:
                continue
            prop = definition["properties"][field.encode_name]
            branches = prop.get("anyOf", [prop])
            for branch in branches:
                if branch.get("type") == "string":
                    branch.update(rule)


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def payload_schema(
    queue: str, registry: Mapping[str, type[msgspec.Struct]] = PAYLOADS
) -> dict[str, Any]:
    """The JSON Schema of one queue's payload (a KeyError for an unknown queue)."""
    struct = registry[queue]
    generated = msgspec.json.schema(struct)
    structs = {
        name: cls
        for name, cls in vars(payloads).items()
        if isinstance(cls, type) and issubclass(cls, msgspec.Struct)
    } | {struct.__name__: struct}
    for name, definition in generated.get("$defs", {}).items():
        cls = structs.get(name)
        if cls is not None:
            for field, doc in _field_docs(cls).items():
                definition["properties"][field].setdefault("description", doc)
            _temporal(cls, definition)
        _merge(definition, _POST_INIT.get(name, {}))
        if name == "SendEmail":  # the string branch of an optional field
            for branch in definition["properties"]["message_id"].get("anyOf", []):
                if branch.get("type") == "string":
                    branch["pattern"] = _NO_CONTROL
    return {
        "$schema": DIALECT,
        "title": f"jobstream payload of queue {queue!r}",
        "x-jobstream-queue": queue,
        **generated,
    }


def envelope_schema() -> dict[str, Any]:
    """The JSON Schema of an entry's fields: stream entries and delayed-set members alike."""
    generated = msgspec.json.schema(EntryFields)
    definition = generated["$defs"][EntryFields.__name__]
    definition["additionalProperties"] = {"type": "string"}  # other fields: kept, ignored
    return {"$schema": DIALECT, "title": "jobstream stream entry", **generated}


def render(schema: Mapping[str, Any]) -> str:
    """A schema as its file holds it: indented JSON, one trailing newline."""
    return msgspec.json.format(msgspec.json.encode(schema), indent=2).decode() + "\n"


def generated(registry: Mapping[str, type[msgspec.Struct]] = PAYLOADS) -> dict[str, str]:
    """File name → content of every schema file: each queue's payload, then the envelope."""
    files = {file_name(q): render(payload_schema(q, registry)) for q in sorted(registry)}
    files[file_name(ENVELOPE)] = render(envelope_schema())
    if len(files) != len(registry) + 1:
        raise ValueError("two queues map to the same schema file name")
    return files


def shipped(name: str) -> str | None:
    """The content of a schema file as installed with the package, or None."""
    path = resources.files("jobstream.schema").joinpath("jsonschema", name)
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write(directory: str | Path) -> list[Path]:
    """Write every schema file into `directory`; return the paths written."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in generated().items():
        path = target / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths
