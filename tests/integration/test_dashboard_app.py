"""The dashboard's WSGI application, called through a real WSGI stack (httpx's
transport) on SQLite and PostgreSQL: what each page shows, that it only
reads, that whatever a job holds is shown as text, and its token."""

from __future__ import annotations

import base64
import re
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from jobflow import JobFlow, JobStatus, UploadPolicy
from jobflow.adapters.memory import InMemoryJobStore, InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.dashboard import Dashboard, search_terms
from jobflow.errors import ConfigurationError, UploadRejected
from jobflow.metrics import JobflowMetrics
from tests.conftest import QUIET_LOGGER, ManualClock
from tests.strategies import START

VIDEO = b"\x00\x00\x00\x18ftypmp42 video"
HOSTILE = '<script>document.title="owned"</script><img src=x onerror="alert(1)">'


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    """A migrated database holding no jobs: SQLite, then PostgreSQL."""
    return sql_engine


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def flow(engine: sa.Engine, clock: ManualClock) -> JobFlow:
    return JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(), clock=clock,
                   policy=UploadPolicy(max_attempts=2), logger=QUIET_LOGGER,
                   metrics=JobflowMetrics(None))


def queued(flow: JobFlow, owner: str = "alice", **params: object) -> str:
    ticket = flow.initiate_upload(owner, params, content_type="video/mp4")
    flow.objects.put(ticket.key, VIDEO, content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def state_counts(page: str) -> dict[str, int]:
    """The count in each state's box of the diagram."""
    return {state: int(count.replace(",", "")) for state, count in re.findall(
        r'id="state-(\w+)">.*?class="state-count">([\d,]+)</text>', page, re.S)}


def client(flow: JobFlow, *, token: str | None = None, script_name: str = "") -> httpx.Client:
    transport = httpx.WSGITransport(app=Dashboard(flow, token=token), script_name=script_name)
    return httpx.Client(transport=transport, base_url="http://dashboard")


def failed_twice(flow: JobFlow, clock: ManualClock) -> str:
    job_id = queued(flow)
    for attempt in (1, 2):
        clock.advance(60)
        [claim] = flow.claim("worker-1")
        assert claim.job.id == job_id
        flow.fail(claim, f"attempt {attempt} broke", retry_in=timedelta(0))
    return job_id


def test_the_front_page_counts_jobs_and_groups_failures(flow: JobFlow,
                                                        clock: ManualClock) -> None:
    flow.initiate_upload("bob", content_type="video/mp4")  # waiting for its upload
    broken = failed_twice(flow, clock)
    queued(flow)
    empty = flow.initiate_upload("carol", content_type="video/mp4")
    flow.objects.put(empty.key, b"", content_type="video/mp4")
    with pytest.raises(UploadRejected):
        flow.complete_upload(empty.job_id)
    clock.advance(600)

    with client(flow) as http:
        page = http.get("/")
        assert page.status_code == 200
        text = page.text
        assert state_counts(text) == {"awaiting_upload": 1, "queued": 1, "quick_running": 0,
                                      "done": 0, "failed": 2}
        assert 'href="/failures?code=handler_error"' in text
        assert 'href="/failures?code=upload_rejected"' in text
        assert "the oldest for 12 min" in text  # the waiting upload, created 12 min ago
        assert "queued --&gt; quick_running: claim" in text  # the Mermaid text, escaped
        group = http.get("/failures", params={"code": "handler_error"})
        assert group.status_code == 200
        assert f'href="/job/{broken}"' in group.text
        assert "attempt 2 broke" in group.text
        assert "upload_rejected" not in group.text.split("<table", 1)[1]
        job = http.get(f"/job/{broken}")
        assert job.status_code == 200
        assert re.findall(r'class="step event-(\w+)"', job.text) == [
            "created", "verify_upload", "claim", "retry", "claim", "fail"]
        listed = http.get("/jobs", params={"status": "failed"})
        assert listed.text.count('href="/job/') == 2
        assert http.get("/jobs", params={"status": "queued"}).text.count('href="/job/') == 1


def test_what_a_job_holds_is_shown_as_text(flow: JobFlow) -> None:
    job_id = queued(flow, owner=HOSTILE, note=HOSTILE)
    [claim] = flow.claim("worker-1")
    flow.fail(claim, HOSTILE, retryable=False, error_code="bad<code>&\"")
    with client(flow) as http:
        pages = [http.get(f"/job/{job_id}"), http.get("/"),
                 http.get("/failures", params={"code": 'bad<code>&"'}),
                 http.get("/jobs", params={"status": "failed"})]
        for page in pages:
            assert page.status_code == 200
            assert "<script" not in page.text and "<img" not in page.text
            assert "script-src" not in page.headers["content-security-policy"]
            assert page.headers["content-security-policy"].startswith("default-src 'none'")
        assert "&lt;script&gt;document.title=&quot;owned&quot;&lt;/script&gt;" in pages[0].text
        assert f'href="/job/{job_id}"' in pages[2].text  # the odd code's group finds it
        assert "bad&lt;code&gt;&amp;&quot;" in pages[1].text


@pytest.mark.parametrize("path", [
    "/job/00000000-0000-4000-8000-000000000000",  # well formed, unknown
    "/job/not-a-job-id", "/job/%3Cscript%3E", "/job/", "/nowhere", "/jobs?status=sleeping",
    "/search?q=xyz", "/search?q=ffffffff",
])
def test_unknown_or_malformed_is_a_404_page(flow: JobFlow, path: str) -> None:
    queued(flow)
    with client(flow) as http:
        page = http.get(path)
    assert page.status_code == 404
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>" in page.text and "<script" not in page.text


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_it_only_reads(flow: JobFlow, method: str) -> None:
    job_id = queued(flow)
    with client(flow) as http:
        for path in ("/", f"/job/{job_id}", "/search?q=" + job_id):
            answer = http.request(method, path, data={"action": "cancel"})
            assert answer.status_code == 405
            assert answer.headers["allow"] == "GET, HEAD"
        assert http.head(f"/job/{job_id}").status_code == 200
    assert flow.get(job_id).status is JobStatus.QUEUED
    assert len(flow.history(job_id)) == 2


def test_a_search_finds_a_job_by_its_id_or_a_unique_prefix(flow: JobFlow) -> None:
    ids = [queued(flow) for _ in range(3)]
    with client(flow) as http:
        for given in (ids[0], ids[0].upper(), ids[0].replace("-", ""), ids[0][:13]):
            found = http.get("/search", params={"q": f"  {given} "})
            assert found.status_code == 302, given
            assert found.headers["location"] == f"/job/{ids[0]}"
    assert search_terms("abc") is None and search_terms("abcd") == "abcd"


def test_an_ambiguous_prefix_lists_the_jobs_it_matches(engine: sa.Engine,
                                                       clock: ManualClock) -> None:
    shared = iter(["abcd1234-0000-4000-8000-000000000001",
                   "abcd1234-0000-4000-8000-000000000002"])
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(), clock=clock,
                   logger=QUIET_LOGGER, metrics=JobflowMetrics(None),
                   new_job_id=lambda: next(shared))
    first, second = (flow.initiate_upload("o", content_type="video/mp4").job_id
                     for _ in range(2))
    with client(flow) as http:
        listed = http.get("/search", params={"q": "abcd1234"})
        assert listed.status_code == 200
        assert f'href="/job/{first}"' in listed.text and f'href="/job/{second}"' in listed.text
        assert http.get("/search", params={"q": "abcd12340000400080000000000000"}
                        ).status_code == 200
        assert http.get("/search", params={"q": "abcd9"}).status_code == 404


def test_mounted_under_a_path_its_links_stay_under_it(flow: JobFlow) -> None:
    job_id = queued(flow)
    # As a mount point calls it: SCRIPT_NAME the mount, PATH_INFO the rest.
    with client(flow, script_name="/ops/jobs") as http:
        page = http.get("/")
        assert 'href="/ops/jobs/style.css"' in page.text
        assert 'href="/ops/jobs/jobs?status=queued"' in page.text
        found = http.get("/search", params={"q": job_id[:8]})
        assert found.headers["location"] == f"/ops/jobs/job/{job_id}"


def test_with_a_token_every_request_must_carry_it(flow: JobFlow) -> None:
    job_id = queued(flow)
    with client(flow, token="s3cret") as http:
        for path in ("/", f"/job/{job_id}", "/style.css"):
            refused = http.get(path)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Basic ")
            assert job_id not in refused.text
        assert http.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/", auth=("anyone", "s3cre")).status_code == 401
        assert http.get("/", headers={"Authorization": "Basic !!!"}).status_code == 401
        assert http.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        basic = base64.b64encode(b"me:s3cret").decode()
        assert http.get(f"/job/{job_id}",
                        headers={"Authorization": f"Basic {basic}"}).status_code == 200
        # A refused method is refused after the token, not instead of it.
        assert http.post("/").status_code == 401


def test_a_database_that_is_down_is_a_503_page(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'missing' / 'jobs.sqlite3'}")
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=InMemoryObjectStore(),
                   logger=QUIET_LOGGER, metrics=JobflowMetrics(None))
    with client(flow) as http:
        page = http.get("/")
    assert page.status_code == 503
    assert "Database unavailable" in page.text


def test_a_store_without_sql_is_refused() -> None:
    flow = JobFlow(store=InMemoryJobStore(), objects=InMemoryObjectStore(),
                   metrics=JobflowMetrics(None))
    with pytest.raises(ConfigurationError):
        Dashboard(flow)


def test_times_are_the_flows_clock(flow: JobFlow, clock: ManualClock) -> None:
    clock.now = START + timedelta(days=3)
    with client(flow) as http:
        assert "As of 2026-01-04 00:00:00.000Z" in http.get("/").text
