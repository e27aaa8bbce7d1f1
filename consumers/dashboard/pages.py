"""The HTML pages: queues, jobs, one job, dead letters (with their actions), workers.

Server-rendered from `templates/` with what the API answers (`queries`); the only script
(`static/app.js`) selects letters and asks before a purge.
"""

from __future__ import annotations

import json
import urllib.parse
from importlib import resources
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from jobstream.consumers.cli.commands import parse_duration_ms
from jobstream.consumers.dashboard import queries as q
from jobstream.consumers.dashboard.auth import Auth
from jobstream.consumers.dashboard.workers import workers_page
from jobstream.consumers.worker.deps import Deps
from jobstream.streams import ConfigError, Status

__all__ = ["ROUTES", "TEMPLATES", "render"]

TEMPLATES = Jinja2Templates(
    directory=str(resources.files("jobstream.consumers.dashboard").joinpath("templates"))
)
TEMPLATES.env.filters["quote"] = lambda s: urllib.parse.quote(str(s), safe="")
TEMPLATES.env.filters["pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, default=str)


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    auth: Auth = request.app.state.auth
    context.setdefault("csrf", auth.csrf)
    context.setdefault("page", name.removesuffix(".html"))
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)


def _deps(request: Request) -> Deps:
    deps: Deps = request.app.state.deps
    return deps


def _chart(points: list[Any], width: int = 240, height: int = 48) -> dict[str, Any]:
    """Bars of one queue's last hour, one per minute: completed up, failures stacked."""
    peak = max([p.completed + p.retried + p.failed for p in points] or [0]) or 1
    bars = []
    for p in points:
        age_min = 59 - min(59, int((points[-1].minute - p.minute).total_seconds() // 60))
        x = age_min * width / 60
        ok_h = p.completed * height / peak
        bad_h = (p.retried + p.failed) * height / peak
        bars.append({"x": round(x, 1), "ok": round(ok_h, 1), "bad": round(bad_h, 1),
                     "title": f"{p.minute:%H:%M} completed {p.completed}, retried {p.retried}, "
                              f"failed {p.failed}"})  # fmt: skip
    return {"width": width, "height": height, "bar": round(width / 60 - 0.5, 1), "bars": bars}


async def queues(request: Request) -> Response:
    page = await q.queues_page(_deps(request))
    charts = {info.queue: _chart(info.chart) for info in page.queues}
    return render(request, "queues.html", data=page, charts=charts)


async def jobs(request: Request) -> Response:
    p = request.query_params
    filters = {k: p.get(k) or None for k in ("queue", "status", "id", "before")}
    try:
        data = await q.jobs_page(
            _deps(request),
            queue=filters["queue"],
            status=filters["status"],
            job_id=filters["id"],
            before=filters["before"],
        )
    except q.ListError as exc:
        return render(request, "error.html", 400, message=str(exc))
    nxt = {k: v for k, v in filters.items() if v and k != "before"}
    if data.next:
        nxt["before"] = data.next
    return render(
        request,
        "jobs.html",
        data=data,
        filters=filters,
        queues=await q.all_queues(_deps(request)),
        statuses=[s.value for s in Status],
        next_url=f"/jobs?{urllib.parse.urlencode(nxt)}" if data.next else None,
    )


async def job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    try:
        detail = await q.job_detail(_deps(request), job_id)
    except q.ListError as exc:
        return render(request, "error.html", 400, message=str(exc))
    if detail is None:
        text = f"No job {job_id!r} in PostgreSQL, Redis or the queues."
        return render(request, "error.html", 404, message=text)
    return render(request, "job.html", job_id=job_id, d=detail)


async def dead(request: Request) -> Response:
    p = request.query_params
    try:
        data = await q.dead_page(_deps(request), p.get("queue") or None, p.get("before") or None)
    except q.ListError as exc:
        return render(request, "error.html", 400, message=str(exc))
    done = {k: p[k] for k in ("replayed", "gone", "refused", "purged") if p.get(k, "").isdigit()}
    nxt = None
    if data.next and data.queue:
        nxt = f"/dead?{urllib.parse.urlencode({'queue': data.queue, 'before': data.next})}"
    return render(request, "dead.html", data=data, done=done, next_url=nxt)


def _back(queue: str, **counts: int) -> Response:
    query = urllib.parse.urlencode({"queue": queue, **counts})
    return RedirectResponse(f"/dead?{query}", status_code=303)


async def replay(request: Request) -> Response:
    form = await request.form()
    queue = str(form.get("queue", ""))
    ids = [str(v) for v in form.getlist("ids")]
    try:
        done = await q.replay(_deps(request), queue, ids)
    except q.ListError as exc:
        return render(request, "error.html", 400, message=str(exc))
    return _back(queue, replayed=len(done.replayed), gone=len(done.gone), refused=len(done.refused))


async def purge_confirm(request: Request) -> Response:
    """The confirmation: how many letters would go, and a form that really purges."""
    queue = request.query_params.get("queue", "")
    older_than = request.query_params.get("older_than") or None
    deps = _deps(request)
    try:
        older = parse_duration_ms(older_than) if older_than else None
        page = await q.dead_page(deps, queue)
        count = await q.count_dead(deps, queue, older)
    except ConfigError as exc:
        return render(request, "error.html", 400, message=str(exc))
    return render(request, "purge.html", queue=page.queue, older_than=older_than, count=count)


async def purge(request: Request) -> Response:
    form = await request.form()
    queue = str(form.get("queue", ""))
    older_than = str(form.get("older_than", "")) or None
    if form.get("confirm") != "yes":
        return render(request, "error.html", 400, message="Nothing purged: not confirmed.")
    try:
        older = parse_duration_ms(older_than) if older_than else None
        done = await q.purge(_deps(request), queue, older)
    except ConfigError as exc:
        return render(request, "error.html", 400, message=str(exc))
    return _back(queue, purged=done.purged)


async def workers(request: Request) -> Response:
    return render(request, "workers.html", data=await workers_page(_deps(request)))


ROUTES = [
    Route("/", queues),
    Route("/jobs", jobs),
    Route("/jobs/{job_id:path}", job),
    Route("/dead", dead),
    Route("/dead/replay", replay, methods=["POST"]),
    Route("/dead/purge", purge_confirm, methods=["GET"]),
    Route("/dead/purge", purge, methods=["POST"]),
    Route("/workers", workers),
]
