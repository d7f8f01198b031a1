"""``jobflow dashboard``: a read-only web page about the queue and its jobs.

A WSGI application (:class:`Dashboard`) on the standard library alone:
pages rendered on the server, no JavaScript at all (its Content Security
Policy forbids scripts), every value from the database escaped. It shows the
jobs by state on the state diagram, the uploads waiting and for how long,
the queue's age, the recent failures grouped by error code (one click to
their jobs), each job with its parameters, its object and its whole history
as a timeline, and finds a job by its id or a unique prefix of it.

It only reads: it answers ``GET`` and ``HEAD`` and nothing else (405), and
each page is a few queries that each read an index (the snapshot of
:mod:`jobflow.monitoring`, a status's partial index, the primary key).
Requeue and cancel stay in the CLI.

``jobflow dashboard`` serves it on 127.0.0.1; bound to any other address it
requires a token (``--token``), checked on every request as HTTP Basic
authentication (any user name, the token as password: what a browser asks
for) or as ``Authorization: Bearer <token>``. A host application can mount
the same object under a path of its own (links follow ``SCRIPT_NAME``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import html
import ipaddress
import json
import math
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import attrs

from jobflow import states
from jobflow.errors import ConfigurationError, JobflowError, JobNotFound, StorageUnavailable
from jobflow.logconfig import library_logger
from jobflow.models import Job, JobEvent, JobStatus
from jobflow.monitoring import NO_ERROR_CODE, QueueSnapshot, take_snapshot
from jobflow.reporting import format_time

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from jobflow.flow import JobFlow

StartResponse = Callable[..., Any]

#: How far back the failures grouped on the front page go.
FAILURE_WINDOW = timedelta(hours=24)
#: How many jobs a list shows (the latest, or the oldest waiting).
LISTED = 50
#: How many waiting uploads the front page lists.
WAITING_LISTED = 10
#: How many ids a search by prefix lists.
SEARCH_LISTED = 20
#: The shortest prefix a search takes (as the CLI).
MIN_PREFIX = 4
#: Characters of an error message shown in a list.
MESSAGE_SHOWN = 160

_log = library_logger("jobflow.dashboard")


# -- HTML that is escaped unless it says otherwise ------------------------------------------


class Html(str):
    """Markup made here, never escaped again; anything else is text."""

    __slots__ = ()


def esc(value: object) -> Html:
    """``value`` as HTML: markup stays, anything else is escaped text."""
    if isinstance(value, Html):
        return value
    return Html(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[object], separator: str = "") -> Html:
    return Html(separator.join(esc(part) for part in parts))


def tag(element: str, /, *children: object, **attributes: object) -> Html:
    """``<name attr="value">children</name>``; attribute names lose a trailing
    ``_`` (``class_``) and turn ``_`` into ``-``; None leaves one out."""
    attrs_text = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{esc(value)}"'
        for key, value in attributes.items() if value is not None)
    return Html(f"<{element}{attrs_text}>{join(children)}</{element}>")


def _span(seconds: float) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3 h 20 min``, ``2 d 4 h``."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    if minutes < 120:
        return f"{minutes:.0f} min"
    hours, minutes = divmod(int(minutes), 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


# -- the state diagram, drawn on the server ------------------------------------------------

_BOX_W, _BOX_H = 160, 58
_BOXES = {  # the top-left corner of each state's box
    JobStatus.AWAITING_UPLOAD: (10, 60), JobStatus.QUEUED: (260, 60),
    JobStatus.QUICK_RUNNING: (510, 60), JobStatus.DONE: (760, 60),
    JobStatus.FAILED: (385, 250),
}
_DIAGRAM_W, _DIAGRAM_H = 930, 320


def _edges() -> dict[tuple[JobStatus, JobStatus], list[str]]:
    """The state machine's edges, their events grouped by (from, to)."""
    found: dict[tuple[JobStatus, JobStatus], list[str]] = {}
    for (event, source), edges in states.TABLE.items():
        for edge in edges:
            events = found.setdefault((source, edge.dest), [])
            if event.value not in events:
                events.append(event.value)
    return found


def _center(status: JobStatus) -> tuple[float, float]:
    x, y = _BOXES[status]
    return x + _BOX_W / 2, y + _BOX_H / 2


def _border(status: JobStatus, toward: tuple[float, float]) -> tuple[float, float]:
    """Where the line from the box's center toward a point leaves the box."""
    cx, cy = _center(status)
    dx, dy = toward[0] - cx, toward[1] - cy
    scale = min((_BOX_W / 2 + 4) / abs(dx) if dx else math.inf,
                (_BOX_H / 2 + 4) / abs(dy) if dy else math.inf)
    return cx + dx * scale, cy + dy * scale


def _edge_svg(source: JobStatus, dest: JobStatus, events: Sequence[str],
              bent: bool) -> Html:
    if source is dest:  # a loop above the box
        x, y = _BOXES[source]
        left, right, top = x + _BOX_W * 0.3, x + _BOX_W * 0.7, y - 2
        path = f"M {left:.0f} {top} C {left - 10:.0f} {top - 40} {right + 10:.0f} {top - 40} " \
               f"{right:.0f} {top}"
        label = tag("text", ", ".join(events), x=f"{x + _BOX_W / 2:.0f}", y=f"{top - 34}",
                    class_="edge-label")
        return Html(tag("path", d=path, class_="edge", marker_end="url(#arrow)") + label)
    (x1, y1), (x2, y2) = _center(source), _center(dest)
    length = math.hypot(x2 - x1, y2 - y1)
    bend = 34.0 if bent else 0.0
    control = ((x1 + x2) / 2 + (y2 - y1) / length * bend,
               (y1 + y2) / 2 - (x2 - x1) / length * bend)
    (sx, sy), (ex, ey) = _border(source, control), _border(dest, control)
    mx, my = (sx + 2 * control[0] + ex) / 4, (sy + 2 * control[1] + ey) / 4
    path = f"M {sx:.0f} {sy:.0f} Q {control[0]:.0f} {control[1]:.0f} {ex:.0f} {ey:.0f}"
    lines = [tag("tspan", event, x=f"{mx:.0f}", dy="0" if n == 0 else "1.15em")
             for n, event in enumerate(events)]
    label = tag("text", *lines, x=f"{mx:.0f}", y=f"{my - 6 * (len(events) - 1):.0f}",
                class_="edge-label")
    return Html(tag("path", d=path, class_="edge", marker_end="url(#arrow)") + label)


def diagram(counts: dict[JobStatus, int], link: Callable[[JobStatus], str]) -> Html:
    """The state machine (from :data:`jobflow.states.TABLE`) as SVG, each state
    a box with its count that links to its jobs."""
    edges = _edges()
    arrow = tag("marker", tag("path", d="M 0 0 L 10 5 L 0 10 z", class_="arrow-head"),
                id="arrow", viewBox="0 0 10 10", refX="9", refY="5", markerWidth="7",
                markerHeight="7", orient="auto-start-reverse")
    parts: list[object] = [tag("defs", arrow)]
    for (source, dest), events in edges.items():
        parts.append(_edge_svg(source, dest, events, bent=(dest, source) in edges))
    for status, (x, y) in _BOXES.items():
        box = join([
            tag("rect", x=x, y=y, width=_BOX_W, height=_BOX_H, rx="8",
                class_=f"state state-{status.value}"),
            tag("text", status.value, x=x + _BOX_W / 2, y=y + 22, class_="state-name"),
            tag("text", f"{counts.get(status, 0):,}", x=x + _BOX_W / 2, y=y + 46,
                class_="state-count"),
        ])
        parts.append(tag("a", box, href=link(status), class_="state-link",
                         id=f"state-{status.value}"))
    return tag("svg", *parts, xmlns="http://www.w3.org/2000/svg", class_="diagram",
               viewBox=f"0 0 {_DIAGRAM_W} {_DIAGRAM_H}", role="img",
               aria_label="the job state machine with the number of jobs in each state")


STYLE = """
:root { --ink: #1f2937; --muted: #6b7280; --line: #d1d5db; --accent: #1d4ed8; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       margin: 0; background: #f9fafb; }
header { background: #111827; color: #fff; padding: 10px 24px; display: flex; gap: 24px;
         align-items: center; }
header a { color: #fff; text-decoration: none; font-weight: 600; }
header form { margin-left: auto; }
header input { font: inherit; padding: 4px 8px; width: 22em; }
main { padding: 16px 24px 40px; max-width: 1180px; }
h1 { font-size: 1.45em; margin: 8px 0 12px; } h2 { font-size: 1.15em; margin: 28px 0 8px; }
a { color: var(--accent); }
.muted, footer { color: var(--muted); }
footer { padding: 0 24px 24px; font-size: 0.9em; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; background: #f3f4f6; }
code, pre, .id { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace;
                 font-size: 0.92em; }
pre { background: #fff; border: 1px solid var(--line); padding: 10px; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; margin: 0; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr));
           gap: 12px; margin: 8px 0; }
.figures a { color: inherit; text-decoration: none; }
.figure { background: #fff; border: 1px solid var(--line); border-radius: 8px;
          padding: 10px 14px; }
.figure .value { font-size: 1.7em; font-weight: 650; }
.figures a:hover .figure { border-color: var(--accent); }
.figure.alert { border-color: #dc2626; background: #fef2f2; }
.diagram { width: 100%; max-width: 930px; background: #fff; border: 1px solid var(--line);
           border-radius: 8px; }
.state { stroke: #4b5563; stroke-width: 1.2; }
.state-awaiting_upload { fill: #fef3c7; } .state-queued { fill: #dbeafe; }
.state-quick_running { fill: #e0e7ff; } .state-done { fill: #dcfce7; }
.state-failed { fill: #fee2e2; }
.state-name { font-size: 14px; font-weight: 600; text-anchor: middle; fill: #111827; }
.state-count { font-size: 19px; text-anchor: middle; fill: #111827; }
.state-link:hover rect { stroke-width: 2.5; }
.edge { fill: none; stroke: #6b7280; stroke-width: 1.3; }
.arrow-head { fill: #6b7280; }
.edge-label { font-size: 11px; fill: #374151; text-anchor: middle; paint-order: stroke;
              stroke: #fff; stroke-width: 3px; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.9em; }
.status-awaiting_upload { background: #fef3c7; } .status-queued { background: #dbeafe; }
.status-quick_running { background: #e0e7ff; } .status-done { background: #dcfce7; }
.status-failed { background: #fee2e2; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px;
           background: #fff; border: 1px solid var(--line); padding: 12px 16px; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
ol.timeline { list-style: none; padding: 0 0 0 18px; border-left: 3px solid var(--line);
              margin: 8px 0 0 8px; }
ol.timeline li { position: relative; margin: 0 0 14px; padding-left: 12px; }
ol.timeline li::before { content: ""; position: absolute; left: -27px; top: 4px;
                         width: 14px; height: 14px; border-radius: 50%;
                         background: #fff; border: 3px solid var(--accent); }
ol.timeline .when { color: var(--muted); font-size: 0.9em; }
ol.timeline .event { font-weight: 650; }
ol.timeline pre { margin-top: 4px; }
details { margin-top: 8px; }
.columns { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }
@media (max-width: 900px) { .columns { grid-template-columns: 1fr; } }
"""

#: Every page: no script may run, nothing is framed, fetched or remembered elsewhere.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'; "
                                "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


@attrs.frozen
class Response:
    status: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


class _Page(Exception):
    """Answer with this page instead (404, 503...)."""

    def __init__(self, status: str, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def search_terms(text: str) -> str | None:
    """A job id (canonical) or a prefix of its hex digits (at least
    :data:`MIN_PREFIX`, hyphens ignored) from a search box; None if neither."""
    text = text.strip().lower()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    digits = text.replace("-", "")
    if MIN_PREFIX <= len(digits) < 32 and all(c in "0123456789abcdef" for c in digits):
        return digits
    return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``): any other name
    may resolve to a public address, so it does not count."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The dashboard as a WSGI application on ``flow``'s SQL job store.

    ``token``: when given, every request must carry it (HTTP Basic password
    or Bearer token). ``failure_window``: how far back the front page groups
    failures. ``clock`` is the flow's.
    """

    def __init__(self, flow: JobFlow, *, token: str | None = None,
                 failure_window: timedelta = FAILURE_WINDOW) -> None:
        engine: Engine | None = getattr(flow.store, "engine", None)
        if engine is None:
            raise ConfigurationError("the dashboard needs a SQL job store (PostgreSQL or "
                                     "SQLite)")
        if token is not None and not token:
            raise ConfigurationError("the dashboard token must not be empty")
        self.flow = flow
        self.engine = engine
        self.failure_window = failure_window
        self._token = token.encode("utf-8") if token else None

    @property
    def protected(self) -> bool:
        """Whether every request must carry the token."""
        return self._token is not None

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        response = self._respond(environ)
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))),
                   *SECURITY_HEADERS, *response.headers]
        start_response(response.status, headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [response.body]

    def _respond(self, environ: dict[str, Any]) -> Response:
        base = environ.get("SCRIPT_NAME", "").rstrip("/")
        try:
            if self._token is not None and not self._authorized(environ):
                raise _Page("401 Unauthorized", "Token required",
                            "This dashboard needs its token: give it as the password.")
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                raise _Page("405 Method Not Allowed", "Read-only",
                            "The dashboard only reads: requeue and cancel jobs with the "
                            "jobflow command.")
            return self._route(environ, base)
        except _Page as page:
            extra: tuple[tuple[str, str], ...] = ()
            if page.status.startswith("401"):
                extra = (("WWW-Authenticate", 'Basic realm="jobflow dashboard", '
                                              'charset="UTF-8"'),)
            elif page.status.startswith("405"):
                extra = (("Allow", "GET, HEAD"),)
            return self._page(page.status, base, page.title,
                              tag("p", page.message), headers=extra)
        except JobNotFound:
            return self._page("404 Not Found", base, "No such job",
                              tag("p", "There is no such job."))
        except StorageUnavailable as exc:
            _log.warning("dashboard.storage_unavailable", error=str(exc))
            return self._page("503 Service Unavailable", base, "Database unavailable",
                              tag("p", "The job database did not answer; try again soon."),
                              headers=(("Retry-After", "5"),))
        except Exception as exc:
            _log.error("dashboard.failed", error=f"{type(exc).__name__}: {exc}",
                       exc_info=not isinstance(exc, JobflowError))
            return self._page("500 Internal Server Error", base, "Something went wrong",
                              tag("p", "The dashboard could not show this page; the error "
                                       "is in its log."))

    def _authorized(self, environ: dict[str, Any]) -> bool:
        assert self._token is not None
        given = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = given.partition(" ")
        secret = b""
        if scheme.lower() == "bearer":
            secret = value.strip().encode("utf-8", "replace")
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            secret = decoded.partition(b":")[2]
        return hmac.compare_digest(secret, self._token)

    def _route(self, environ: dict[str, Any], base: str) -> Response:
        path: str = environ.get("PATH_INFO", "") or "/"
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)

        def arg(name: str) -> str:
            return str(query.get(name, [""])[0])

        if path == "/":
            return self._overview(base)
        if path == "/style.css":
            return Response("200 OK", STYLE.encode("utf-8"), "text/css; charset=utf-8")
        if path == "/jobs":
            return self._status_list(base, arg("status"))
        if path == "/failures":
            return self._failure_list(base, arg("code"))
        if path.startswith("/job/"):
            return self._job(base, path[len("/job/"):])
        if path == "/search":
            return self._search(base, arg("q"))
        raise _Page("404 Not Found", "Not found", "There is no such page.")

    # -- links -----------------------------------------------------------------------------

    @staticmethod
    def _link(base: str, path: str, **query: str) -> str:
        return base + path + (("?" + urlencode(query)) if query else "")

    def _job_link(self, base: str, job_id: str, text: str | None = None) -> Html:
        return tag("a", text or job_id, href=self._link(base, f"/job/{job_id}"),
                   class_="id", title=job_id)

    # -- pages -----------------------------------------------------------------------------

    def _page(self, status: str, base: str, title: str, body: Html, *,
              headers: tuple[tuple[str, str], ...] = ()) -> Response:
        search = tag("form", tag("input", type="search", name="q", id="search",
                                 placeholder="job id or its first 4+ hex digits",
                                 aria_label="find a job by id"),
                     action=self._link(base, "/search"), method="get", role="search")
        document = join([
            Html("<!doctype html>"),
            tag("html", tag("head", Html('<meta charset="utf-8">'),
                            tag("title", f"{title} · jobflow"),
                            Html('<meta name="viewport" content="width=device-width">'),
                            Html(f'<link rel="stylesheet" href="{esc(base)}/style.css">')),
                tag("body",
                    tag("header", tag("a", "jobflow", href=self._link(base, "/")),
                        tag("span", "read-only dashboard", class_="muted"), search),
                    tag("main", tag("h1", title), body),
                    tag("footer", f"As of {format_time(self.flow.now())}. This page only "
                                  "reads; requeue and cancel jobs with the jobflow command.")),
                lang="en"),
        ])
        return Response(status, document.encode("utf-8"), headers=headers)

    def _overview(self, base: str) -> Response:
        snapshot = take_snapshot(self.flow, failure_window=self.failure_window)
        waiting = self.flow.store.awaiting_uploads(limit=WAITING_LISTED)
        body = join([
            diagram(snapshot.counts, lambda status: self._link(base, "/jobs",
                                                               status=status.value)),
            tag("details", tag("summary", "The state machine as Mermaid text"),
                tag("pre", states.mermaid())),
            tag("h2", "Now"),
            self._figures(base, snapshot),
            tag("div", tag("section", *self._failure_groups(base, snapshot)),
                tag("section", *self._waiting(base, snapshot, waiting)), class_="columns"),
        ])
        return self._page("200 OK", base, "Jobs", body)

    def _figures(self, base: str, snapshot: QueueSnapshot) -> Html:
        counts = snapshot.counts

        def figure(label: str, value: object, note: str, href: str, alert: bool = False,
                   name: str = "") -> Html:
            return tag("a", tag("div", tag("div", label, class_="muted"),
                                tag("div", value, class_="value", id=f"figure-{name}"),
                                tag("div", note, class_="muted"),
                                class_="figure alert" if alert else "figure"),
                       href=href)

        queue_note = (f"the one due first has waited {_span(snapshot.queue_age_seconds)}"
                      if counts[JobStatus.QUEUED] else "nothing queued")
        return tag("div", *[
            figure("Waiting for their upload", counts[JobStatus.AWAITING_UPLOAD],
                   f"the oldest for {_span(snapshot.upload_wait_seconds)}"
                   if counts[JobStatus.AWAITING_UPLOAD] else "none",
                   self._link(base, "/jobs", status="awaiting_upload"), name="waiting"),
            figure("Past their upload deadline", snapshot.stuck_uploads,
                   "reconcile expires them", self._link(base, "/jobs", status="awaiting_upload"),
                   alert=snapshot.stuck_uploads > 0, name="stuck"),
            figure("Queued", counts[JobStatus.QUEUED], queue_note,
                   self._link(base, "/jobs", status="queued"), name="queued"),
            figure("Running", counts[JobStatus.QUICK_RUNNING],
                   f"{snapshot.expired_leases} with an expired lease",
                   self._link(base, "/jobs", status="quick_running"),
                   alert=snapshot.expired_leases > 0, name="running"),
            figure(f"Failed in the last {_span(snapshot.failure_window.total_seconds())}",
                   snapshot.failed_recently, f"{len(snapshot.failures)} error codes",
                   self._link(base, "/jobs", status="failed"), name="failed"),
        ], class_="figures")

    def _failure_groups(self, base: str, snapshot: QueueSnapshot) -> list[Html]:
        title = tag("h2", f"Failures of the last {_span(snapshot.failure_window.total_seconds())}"
                          ", by error code")
        if not snapshot.failures:
            return [title, tag("p", "None.", class_="muted")]
        rows = [tag("tr", tag("td", tag("a", group.error_code, class_="failure-group",
                                         href=self._link(base, "/failures",
                                                         code=group.error_code))),
                    tag("td", group.jobs), tag("td", format_time(group.latest)))
                for group in snapshot.failures]
        return [title, tag("table", tag("tr", tag("th", "error code"), tag("th", "jobs"),
                                        tag("th", "latest")), *rows, id="failure-groups")]

    def _waiting(self, base: str, snapshot: QueueSnapshot, waiting: list[Job]) -> list[Html]:
        title = tag("h2", "Uploads waiting, nearest deadline first")
        if not waiting:
            return [title, tag("p", "None.", class_="muted")]
        now = snapshot.at
        rows = [tag("tr", tag("td", self._job_link(base, job.id, job.id[:8])),
                    tag("td", job.owner_id),
                    tag("td", _span((now - job.created_at).total_seconds())),
                    tag("td", "passed " + _span((now - job.upload_expires_at).total_seconds())
                        + " ago" if job.upload_expires_at <= now
                        else "in " + _span((job.upload_expires_at - now).total_seconds())))
                for job in waiting]
        return [title, tag("table", tag("tr", tag("th", "job"), tag("th", "owner"),
                                        tag("th", "waiting for"), tag("th", "deadline")),
                           *rows, id="waiting-uploads")]

    def _job_table(self, base: str, found: list[Job]) -> Html:
        if not found:
            return tag("p", "No jobs.", class_="muted")
        rows = []
        for job in found:
            message = job.error_message or ""
            if len(message) > MESSAGE_SHOWN:
                message = message[: MESSAGE_SHOWN - 1] + "…"
            rows.append(tag(
                "tr", tag("td", self._job_link(base, job.id)),
                tag("td", tag("span", job.status.value, class_=f"status status-{job.status}")),
                tag("td", job.owner_id), tag("td", format_time(job.created_at)),
                tag("td", f"{job.attempts}/{job.max_attempts}"),
                tag("td", format_time(job.finished_at)),
                tag("td", job.error_code or ""), tag("td", message)))
        header = tag("tr", *(tag("th", name) for name in (
            "job", "status", "owner", "created", "attempts", "finished", "error code",
            "message")))
        return tag("table", header, *rows, id="jobs")

    def _status_list(self, base: str, status_text: str) -> Response:
        try:
            status = JobStatus(status_text)
        except ValueError:
            raise _Page("404 Not Found", "No such status",
                        f"{status_text!r} is not a job status.") from None
        found = jobs_in_status(self.engine, status, limit=LISTED)
        order = {JobStatus.AWAITING_UPLOAD: "nearest upload deadline first",
                 JobStatus.QUEUED: "due first first", JobStatus.QUICK_RUNNING:
                 "nearest lease expiry first"}.get(status, "latest finished first")
        body = join([tag("p", f"At most {LISTED} jobs, {order}.", class_="muted"),
                     self._job_table(base, found)])
        return self._page("200 OK", base, f"Jobs in {status.value}", body)

    def _failure_list(self, base: str, code: str) -> Response:
        since = self.flow.now() - self.failure_window
        found = failed_with_code(self.engine, code, since=since, limit=LISTED)
        window = _span(self.failure_window.total_seconds())
        body = join([tag("p", f"Jobs that failed with this error code in the last {window}, "
                              f"latest first (at most {LISTED}).", class_="muted"),
                     self._job_table(base, found)])
        return self._page("200 OK", base, f"Failed with {code or NO_ERROR_CODE}", body)

    def _search(self, base: str, text: str) -> Response:
        terms = search_terms(text)
        if terms is None:
            raise _Page("404 Not Found", "Not a job id",
                        f"{text[:80]!r} is neither a job id nor {MIN_PREFIX} or more of its "
                        "first hex digits.")
        if len(terms) == 36:
            found = [terms]
        else:
            from jobflow.reporting import job_ids_starting_with

            found = job_ids_starting_with(self.engine, terms, limit=SEARCH_LISTED + 1)
        if len(found) == 1:
            self.flow.get(found[0])  # 404 if there is no such job
            return Response("302 Found", b"", headers=(
                ("Location", self._link(base, f"/job/{found[0]}")),))
        if not found:
            raise _Page("404 Not Found", "No such job", f"No job id starts with {terms!r}.")
        more = " (and more)" if len(found) > SEARCH_LISTED else ""
        items = [tag("li", self._job_link(base, job_id)) for job_id in found[:SEARCH_LISTED]]
        body = join([tag("p", f"Several jobs start with {terms!r}{more}:"),
                     tag("ul", *items, id="matches")])
        return self._page("200 OK", base, "Several jobs match", body)

    def _job(self, base: str, job_id: str) -> Response:
        try:
            job = self.flow.get(job_id)
            history = self.flow.history(job.id)
        except JobNotFound:
            raise _Page("404 Not Found", "No such job",
                        f"There is no job {job_id[:80]!r}.") from None
        facts = [
            ("status", tag("span", job.status.value, class_=f"status status-{job.status}",
                           id="job-status")),
            ("owner", job.owner_id),
            ("attempts", f"{job.attempts} of {job.max_attempts}"),
            ("created", format_time(job.created_at)),
            ("upload deadline", format_time(job.upload_expires_at)),
            ("upload verified", format_time(job.upload_verified_at)),
            ("run at", format_time(job.run_at)),
            ("started", format_time(job.started_at)),
            ("finished", format_time(job.finished_at)),
        ]
        if job.lease_owner is not None:
            facts.append(("lease", f"{job.lease_owner} until {format_time(job.lease_expires_at)}"))
        if job.error_code is not None or job.error_message is not None:
            facts.append(("error code", job.error_code or ""))
            facts.append(("error", tag("pre", job.error_message or "", id="job-error")))
        if job.result is not None:
            facts.append(("result", tag("pre", _json(job.result))))
        size = f"{job.object_size:,} bytes" if job.object_size is not None else "-"
        allowed = (f"{job.min_bytes:,} to {job.max_bytes:,} bytes"
                   if job.min_bytes is not None and job.max_bytes is not None else "-")
        obj = [("bucket", job.bucket), ("key", tag("code", job.key)),
               ("content type", job.content_type), ("size", size), ("sizes allowed", allowed),
               ("etag", job.object_etag or "-"), ("version", job.object_version_id or "-"),
               ("SHA-256", job.object_sha256 or "-"),
               ("SHA-256 declared", job.expected_sha256 or "-")]
        body = join([
            tag("p", tag("code", job.id, id="job-id")),
            tag("div", tag("section", tag("h2", "Job"), _facts(facts)),
                tag("section", tag("h2", "Object"), _facts(obj),
                    tag("h2", "Parameters"), tag("pre", _json(job.params), id="job-params")),
                class_="columns"),
            tag("h2", "History"),
            _timeline(history),
        ])
        return self._page("200 OK", base, f"Job {job.id[:8]}", body)


def _facts(rows: Sequence[tuple[str, object]]) -> Html:
    return tag("dl", *(join([tag("dt", name), tag("dd", value)]) for name, value in rows),
               class_="facts")


def _timeline(history: list[JobEvent]) -> Html:
    """The history, oldest first, each step with its time since the previous one."""
    items = []
    previous: datetime | None = None
    for row in history:
        after = (f" (+{_span((row.at - previous).total_seconds())})"
                 if previous is not None else "")
        previous = row.at
        moved = (f"{row.from_status.value} → {row.to_status.value}"
                 if row.from_status is not None else row.to_status.value)
        who = [f"attempt {row.attempt}"] if row.attempt else []
        if row.worker_id:
            who.append(f"by {row.worker_id}")
        items.append(tag(
            "li", tag("div", format_time(row.at) + after, class_="when"),
            tag("div", tag("span", row.event.value, class_="event"), " ", moved,
                (" · " + ", ".join(who)) if who else ""),
            tag("pre", json.dumps(row.detail, sort_keys=True, ensure_ascii=False),
                class_="detail") if row.detail else "",
            class_=f"step event-{row.event.value}"))
    return tag("ol", *items, class_="timeline", id="timeline")


# -- the queries of the lists (each reads one index) ---------------------------------------

#: The order each status's partial index gives (and the list uses).
_ORDER: dict[JobStatus, tuple[str, bool]] = {
    JobStatus.AWAITING_UPLOAD: ("upload_expires_at", False),
    JobStatus.QUEUED: ("run_at", False),
    JobStatus.QUICK_RUNNING: ("lease_expires_at", False),
    JobStatus.DONE: ("finished_at", True),
    JobStatus.FAILED: ("finished_at", True),
}


def _jobs(engine: Engine, statement: Any) -> list[Job]:
    from jobflow.adapters.sqlalchemy.errors import driver_errors
    from jobflow.adapters.sqlalchemy.rows import job_from_row

    with driver_errors("list jobs"), engine.connect() as conn:
        return [job_from_row(row) for row in conn.execute(statement).mappings()]


def jobs_in_status(engine: Engine, status: JobStatus, *, limit: int) -> list[Job]:
    """Up to ``limit`` jobs in ``status``, in the order of its partial index:
    ``SELECT * FROM jobflow_jobs WHERE status = '<status>' ORDER BY <column>
    [DESC], id [DESC] LIMIT <limit>``."""
    import sqlalchemy as sa

    from jobflow.adapters.sqlalchemy.schema import jobs, status_is

    column, descending = _ORDER[status]
    order = [jobs.c[column], jobs.c.id]
    statement = (sa.select(jobs).where(status_is(status))
                 .order_by(*(c.desc() if descending else c for c in order)).limit(limit))
    return _jobs(engine, statement)


def failed_with_code(engine: Engine, error_code: str, *, since: datetime,
                     limit: int) -> list[Job]:
    """Up to ``limit`` jobs that failed with ``error_code`` (:data:`NO_ERROR_CODE`:
    none) since ``since``, latest first: ``SELECT * FROM jobflow_jobs WHERE status
    = 'failed' AND finished_at >= :since AND error_code = :code ORDER BY
    finished_at DESC, id DESC LIMIT <limit>``, a range of the failed jobs' index."""
    import sqlalchemy as sa

    from jobflow.adapters.sqlalchemy.schema import jobs, status_is

    code = (jobs.c.error_code.is_(None) if error_code == NO_ERROR_CODE
            else jobs.c.error_code == error_code)
    statement = (sa.select(jobs)
                 .where(status_is(JobStatus.FAILED), jobs.c.finished_at >= since, code)
                 .order_by(jobs.c.finished_at.desc(), jobs.c.id.desc()).limit(limit))
    return _jobs(engine, statement)


# -- serving it ------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request; the threads do not keep the process alive."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    """Requests logged through structlog at debug level, not printed to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("dashboard.request", line=format % args)


def check_address(host: str, *, protected: bool) -> None:
    """Refuse (:class:`ConfigurationError`) to serve on an address other than
    a loopback one without a token: the pages show owners, parameters and
    error messages."""
    if not protected and not is_loopback(host):
        raise ConfigurationError(
            f"the dashboard shows job details: bound to {host}, which is not a loopback "
            "address, it needs a token (--token or JOBFLOW_DASHBOARD_TOKEN)")


def serve(dashboard: Dashboard, *, host: str, port: int) -> WSGIServer:
    """Serve ``dashboard`` on ``host:port`` (0: a free port; ``server.server_port``
    tells which) from a daemon thread; stop it with ``server.shutdown()``.
    Without a token, only on a loopback address (:func:`check_address`)."""
    check_address(host, protected=dashboard.protected)

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = make_server(host.strip("[]"), port, dashboard, server_class=Server,
                             handler_class=_Quiet)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                                 ) from exc
    threading.Thread(target=server.serve_forever, name="jobflow-dashboard",
                     daemon=True).start()
    return server


__all__ = ["Dashboard", "check_address", "failed_with_code", "is_loopback", "jobs_in_status",
           "search_terms", "serve"]
