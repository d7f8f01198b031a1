"""``/metrics`` scraped over HTTP, as Prometheus scrapes it, after a scripted run
on SQLite and PostgreSQL: every value is checked against what happened. And
a scrape while the database is stopped, or hangs, answers at once with
``jobflow_up 0`` and the process metrics."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

import jobflow.migrations
from jobflow import JobFlow, UploadPolicy
from jobflow.adapters.localfs import LocalObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.metrics import JobflowMetrics, metrics_registry, serve
from tests.conftest import QUIET_LOGGER
from tests.metrics_scenario import Samples, run_scenario, samples
from tests.pgcluster import PostgresCluster, PostgresUnavailable
from tests.sqlstores import migrated_sqlite_file

FAST_RETRIES = UploadPolicy(backoff_seconds=0.01, backoff_max_seconds=0.01)


@pytest.fixture
def engine(sql_engine: sa.Engine) -> sa.Engine:
    """A migrated database holding no jobs: SQLite, then PostgreSQL."""
    return sql_engine


def scrape(port: int) -> Samples:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return samples(response.text)


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def test_a_scrape_after_a_scripted_run_counts_what_happened(engine: sa.Engine,
                                                             tmp_path: Path) -> None:
    registry = CollectorRegistry()
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path / "o"),
                   policy=FAST_RETRIES, metrics=JobflowMetrics(registry),
                   logger=QUIET_LOGGER)  # INFO off: the batch paths log nothing, count all
    happened = run_scenario(flow)
    server = serve(metrics_registry(flow, registry=registry, cache_seconds=0), host="127.0.0.1",
                   port=0)
    try:
        found = scrape(server.server_port)
    finally:
        server.shutdown()
        server.server_close()

    def v(name: str, **labels: str) -> float:
        return value(found, name, **labels)

    verifications = "jobflow_upload_verifications_total"
    assert v("jobflow_uploads_initiated_total") == happened.initiated
    assert v(verifications, outcome="verified") == happened.verified
    assert v(verifications, outcome="missing") == happened.missing
    assert v(verifications, outcome="rejected") == happened.rejected
    assert v(verifications, outcome="storage_unavailable") == 0
    assert v("jobflow_upload_rejections_total", reason="empty") == happened.rejected
    assert v("jobflow_claims_total") == happened.claims
    finished = "jobflow_attempts_finished_total"
    assert v(finished, outcome="succeeded") == happened.succeeded
    assert v(finished, outcome="retried") == happened.retried
    assert v(finished, outcome="failed") == happened.failed
    assert v(finished, outcome="released") == 0
    durations = "jobflow_job_duration_seconds_count"
    assert v(durations, outcome="succeeded") == happened.succeeded
    assert v(durations, outcome="retried") == happened.retried
    assert v("jobflow_queue_wait_seconds_count") == happened.claims
    assert v("jobflow_job_duration_seconds_sum", outcome="succeeded") > 0
    assert v("jobflow_lease_rescues_total", outcome="requeued") == happened.rescued
    assert v("jobflow_lease_rescues_total", outcome="failed") == 0
    assert v("jobflow_leases_lost_total", event="succeed") == happened.leases_lost
    store_calls = "jobflow_object_store_duration_seconds_count"
    assert v(store_calls, operation="presign_upload", error="none") == happened.initiated
    assert v(store_calls, operation="put", error="none") == happened.puts
    assert v(store_calls, operation="head", error="none") == happened.heads
    assert v(store_calls, operation="open", error="none") == happened.opens
    assert not [key for key in found if key[0] == store_calls
                and dict(key[1])["error"] != "none"]
    # The database gauges, from the same endpoint.
    assert v("jobflow_up") == 1
    assert v("jobflow_jobs", status="done") == happened.done
    assert v("jobflow_jobs", status="failed") == sum(happened.failed_jobs.values())
    for status in ("awaiting_upload", "queued", "quick_running"):
        assert v("jobflow_jobs", status=status) == 0
    for code, jobs in happened.failed_jobs.items():
        assert v("jobflow_failed_jobs_last_hour", error_code=code) == jobs
    assert v("jobflow_stuck_uploads") == v("jobflow_expired_leases") == 0
    assert v("jobflow_oldest_job_age_seconds", status="queued") == 0


def test_scrapes_within_the_cache_time_share_one_query(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{migrated_sqlite_file(tmp_path / 'jobs.sqlite3')}")
    snapshots: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: snapshots.append(statement)
                    if "UNION ALL" in statement else None)
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path / "o"),
                   metrics=JobflowMetrics(None))
    server = serve(metrics_registry(flow, registry=None, cache_seconds=60), host="127.0.0.1",
                   port=0)
    try:
        scrapers = [threading.Thread(target=scrape, args=(server.server_port,))
                    for _ in range(10)]
        for scraper in scrapers:
            scraper.start()
        for scraper in scrapers:
            scraper.join()
        assert value(scrape(server.server_port), "jobflow_up") == 1
    finally:
        server.shutdown()
        server.server_close()
        engine.dispose()
    assert len(snapshots) == 1


# -- the database down -------------------------------------------------------------------------


#: A scrape must answer within the query timeout and a generous margin.
TIMEOUT = 1.0
PROMPT = TIMEOUT + 4.0


def scrape_down(flow: JobFlow, registry: CollectorRegistry) -> tuple[float, Samples]:
    """Two scrapes of a database that does not answer: (the longest took, the last's samples)."""
    server = serve(metrics_registry(flow, registry=registry, cache_seconds=0,
                                    timeout_seconds=TIMEOUT), host="127.0.0.1", port=0)
    try:
        longest, found = 0.0, Samples()
        for _ in range(2):
            started = time.monotonic()
            found = scrape(server.server_port)
            longest = max(longest, time.monotonic() - started)
        return longest, found
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.postgres
def test_a_scrape_while_postgresql_is_stopped_answers_with_jobflow_up_0(tmp_path: Path) -> None:
    try:
        cluster = PostgresCluster().start()
    except PostgresUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    registry = CollectorRegistry()
    try:
        engine = sa.create_engine(cluster.url())
        jobflow.migrations.upgrade(engine)
        flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path),
                       metrics=JobflowMetrics(registry))
        flow.initiate_upload("o", content_type="video/mp4")
        _, before = scrape_down(flow, registry)
        assert value(before, "jobflow_up") == 1
        assert value(before, "jobflow_jobs", status="awaiting_upload") == 1
    finally:
        cluster.stop()
    took, found = scrape_down(flow, registry)
    engine.dispose()
    assert took < PROMPT
    assert value(found, "jobflow_up") == 0
    assert not [key for key in found if key[0] == "jobflow_jobs"], "no stale gauges"
    assert value(found, "jobflow_uploads_initiated_total") == 1  # the process metrics stay


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a database that hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_scrape_while_the_database_hangs_answers_in_time(silent_server: int,
                                                           tmp_path: Path) -> None:
    engine = sa.create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{silent_server}/jobs")
    registry = CollectorRegistry()
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path),
                   metrics=JobflowMetrics(registry))
    took, found = scrape_down(flow, registry)
    assert took < PROMPT
    assert value(found, "jobflow_up") == 0
    assert ("jobflow_uploads_initiated_total", frozenset()) in found


# -- mounted in a host application -------------------------------------------------------------


def test_a_fastapi_app_mounts_the_metrics_with_the_database_gauges(tmp_path: Path) -> None:
    import asyncio

    from fastapi import FastAPI

    from jobflow.metrics import make_asgi_app

    engine = sa.create_engine(f"sqlite:///{migrated_sqlite_file(tmp_path / 'jobs.sqlite3')}")
    registry = CollectorRegistry()
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path / "o"),
                   metrics=JobflowMetrics(registry))
    app = FastAPI()
    app.mount("/metrics", make_asgi_app(flow, registry=registry))

    @app.post("/uploads")
    def create_upload() -> dict[str, str]:
        return {"job_id": flow.initiate_upload("web", content_type="video/mp4").job_id}

    async def use() -> Samples:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            assert (await http.post("/uploads")).status_code == 200
            scraped = await http.get("/metrics/")
            assert scraped.status_code == 200
            compressed = await http.get("/metrics/", headers={"Accept-Encoding": "gzip"})
            assert compressed.headers.get("content-encoding") == "gzip"
            return samples(scraped.text)

    found = asyncio.run(use())
    engine.dispose()
    assert value(found, "jobflow_uploads_initiated_total") == 1
    assert value(found, "jobflow_up") == 1
    assert value(found, "jobflow_jobs", status="awaiting_upload") == 1


def test_a_wsgi_app_mounts_the_process_metrics(tmp_path: Path) -> None:
    from jobflow.metrics import make_wsgi_app

    registry = CollectorRegistry()
    engine = sa.create_engine(f"sqlite:///{migrated_sqlite_file(tmp_path / 'jobs.sqlite3')}")
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path / "o"),
                   metrics=JobflowMetrics(registry))
    flow.initiate_upload("web", content_type="video/mp4")
    transport = httpx.WSGITransport(app=make_wsgi_app(registry=registry))  # no flow: no gauges
    with httpx.Client(transport=transport, base_url="http://app") as http:
        found = samples(http.get("/").text)
    engine.dispose()
    assert value(found, "jobflow_uploads_initiated_total") == 1
    assert ("jobflow_up", frozenset()) not in found


def test_an_asgi_scrape_waits_for_a_hanging_database_off_the_event_loop(
        silent_server: int, tmp_path: Path) -> None:
    import asyncio

    from jobflow.metrics import make_asgi_app

    engine = sa.create_engine(f"postgresql+psycopg://nobody@127.0.0.1:{silent_server}/jobs")
    flow = JobFlow(store=SqlAlchemyJobStore(engine), objects=LocalObjectStore(tmp_path),
                   metrics=JobflowMetrics(None))
    app = make_asgi_app(flow, registry=None, timeout_seconds=TIMEOUT)

    async def scrape_while_ticking() -> tuple[Samples, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticking = asyncio.create_task(tick())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            scraped = await http.get("/")
        ticking.cancel()
        return samples(scraped.text), ticks

    found, ticks = asyncio.run(scrape_while_ticking())
    assert value(found, "jobflow_up") == 0
    assert ticks >= 5  # the loop kept running while the scrape waited TIMEOUT seconds
