"""The JSON API under `/api/`: what every page shows, and the dead-letter actions.

Responses are encoded from the structs of `models`, and `openapi()` describes them from
the same structs, so the description cannot drift from the answers.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from jobstream.consumers.cli.commands import parse_duration_ms
from jobstream.consumers.dashboard import models as m
from jobstream.consumers.dashboard import queries as q
from jobstream.consumers.dashboard.workers import workers_page
from jobstream.consumers.worker.deps import Deps
from jobstream.streams import Status

__all__ = ["ROUTES", "error", "json", "openapi"]

_REF = "#/components/schemas/{name}"


def json(value: Any, status_code: int = 200) -> Response:
    return Response(msgspec.json.encode(value), status_code, media_type="application/json")


def error(text: str, status_code: int) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status_code == 401 else None
    response = json(m.Error(error=text), status_code)
    if headers:
        response.headers.update(headers)
    return response


def _deps(request: Request) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(q.PAGE_SIZE))
    if not raw.isdigit() or len(raw) > 4:
        raise q.ListError("limit must be a whole number from 1 to 500")
    return int(raw)


async def queues(request: Request) -> Response:
    return json(await q.queues_page(_deps(request)))


async def jobs(request: Request) -> Response:
    p = request.query_params
    page = await q.jobs_page(  # an empty value is a value: "" is no cursor, no status
        _deps(request),
        queue=p.get("queue"),
        status=p.get("status"),
        job_id=p.get("id"),
        before=p.get("before"),
        limit=_limit(request),
    )
    return json(page)


async def job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    detail = await q.job_detail(_deps(request), job_id)
    if detail is None:
        return error(f"no job {job_id!r} in PostgreSQL, Redis or the queues", 404)
    return json(detail)


async def dead(request: Request) -> Response:
    p = request.query_params
    page = await q.dead_page(_deps(request), p.get("queue"), p.get("before"), _limit(request))
    return json(page)


async def dead_letter(request: Request) -> Response:
    queue, dead_id = request.path_params["queue"], request.path_params["dead_id"]
    letter = await q.dead_letter(_deps(request), queue, dead_id)
    if letter is None:
        return error(f"no dead letter {dead_id} in {queue}", 404)
    return json(letter)


async def _body(request: Request, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.DecodeError as exc:
        raise q.ListError(f"invalid request body: {exc}") from None


async def replay(request: Request) -> Response:
    body: m.ReplayRequest = await _body(request, m.ReplayRequest)
    return json(await q.replay(_deps(request), request.path_params["queue"], body.ids))


async def purge(request: Request) -> Response:
    body: m.PurgeRequest = await _body(request, m.PurgeRequest)  # confirm: true, or refused
    older = parse_duration_ms(body.older_than) if body.older_than else None
    return json(await q.purge(_deps(request), request.path_params["queue"], older))


async def workers(request: Request) -> Response:
    return json(await workers_page(_deps(request)))


async def openapi_json(request: Request) -> Response:
    return json(openapi())


class _DeadIdConvertor(Convertor[str]):
    """A dead-letter id in a path, so that `/api/dead/<queue>/replay` is never taken for one."""

    regex = m.DEAD_ID_PATTERN.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("dead_id", _DeadIdConvertor())

ROUTES = [
    Route("/api/openapi.json", openapi_json),
    Route("/api/queues", queues),
    Route("/api/jobs", jobs),
    Route("/api/jobs/{job_id:path}", job),
    Route("/api/dead", dead),
    Route("/api/dead/{queue}/replay", replay, methods=["POST"]),
    Route("/api/dead/{queue}/purge", purge, methods=["POST"]),
    Route("/api/dead/{queue}/{dead_id:dead_id}", dead_letter),
    Route("/api/workers", workers),
]


def _ref(model: type[Any]) -> dict[str, Any]:
    return {"$ref": _REF.format(name=model.__name__)}


def _answer(model: type[Any], *errors: int) -> dict[str, Any]:
    reasons = {400: "refused as asked", 401: "no valid token", 403: "a cross-site action",
               404: "not found"}  # fmt: skip
    out: dict[str, Any] = {
        "200": {"description": "OK", "content": {"application/json": {"schema": _ref(model)}}}
    }
    for code in (401, *errors):
        out[str(code)] = {
            "description": reasons[code],
            "content": {"application/json": {"schema": _ref(m.Error)}},
        }
    return out


def _param(name: str, where: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": text,
    }


_LIMIT = _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}, "page size")
_QUEUE = _param("queue", "path", {"type": "string", "pattern": m.QUEUE_PATTERN}, "the queue")
_DEAD_ID = {"type": "string", "pattern": m.DEAD_ID_PATTERN}


def _post(model: type[Any], body: type[Any], summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [_QUEUE],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(body)}},
            },
            "responses": _answer(model, 400, 403, 404),
        }
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API, its schemas generated from `models`."""
    _, components = msgspec.json.schema_components(m.MODELS, ref_template=_REF)
    statuses = {"type": "string", "enum": [s.value for s in Status]}
    job_id = _param("job_id", "path", {"type": "string", "minLength": 1}, "the job id")
    paths: dict[str, Any] = {
        "/api/queues": {"get": {"summary": "per queue: streams, counts, throughput",
                                "responses": _answer(m.QueuesPage)}},
        "/api/jobs": {"get": {
            "summary": "jobs newest first, keyset-paged",
            "parameters": [
                _param("queue", "query", {"type": "string"}, "only this queue"),
                _param("status", "query", statuses, "only this status"),
                _param("id", "query", {"type": "string"}, "only the job with this id"),
                _param("before", "query", {"type": "string", "pattern": m.CURSOR_PATTERN},
                       "`next` of the previous page"),
                _LIMIT,
            ],
            "responses": _answer(m.JobsPage, 400),
        }},
        "/api/jobs/{job_id}": {"get": {"summary": "one job: row, executions, hash, trace",
                                       "parameters": [job_id],
                                       "responses": _answer(m.JobDetail, 404)}},
        "/api/dead": {"get": {
            "summary": "dead letters per queue, newest first",
            "parameters": [
                _param("queue", "query", {"type": "string", "pattern": m.QUEUE_PATTERN},
                       "default: the first with letters"),
                _param("before", "query", _DEAD_ID, "`next` of the previous page"),
                _LIMIT,
            ],
            "responses": _answer(m.DeadPage, 400),
        }},
        "/api/dead/{queue}/{dead_id}": {"get": {
            "summary": "one dead letter, all fields",
            "parameters": [_QUEUE, _param("dead_id", "path", _DEAD_ID, "its id")],
            "responses": _answer(m.DeadLetterDetail, 400, 404),
        }},
        "/api/dead/{queue}/replay": _post(m.ReplayResult, m.ReplayRequest, "replay dead letters"),
        "/api/dead/{queue}/purge": _post(m.PurgeResult, m.PurgeRequest, "purge dead letters"),
        "/api/workers": {"get": {"summary": "consumers: heartbeat, entries held",
                                 "responses": _answer(m.WorkersPage)}},
    }  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobstream dashboard API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "jobstream_session"},
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
