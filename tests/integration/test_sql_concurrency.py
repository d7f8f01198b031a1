"""Concurrency against a real database: separate claimer processes on one
PostgreSQL never share a job, racing completions verify a job once, and a purge
never deletes or waits for a job being requeued."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
import sqlalchemy as sa

from jobflow import Event, Job, JobFlow, JobStatus, ObjectInfo
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.schema import events, jobs
from jobflow.keys import upload_key
from tests.integration.conftest import flow_on
from tests.strategies import POLICY

ROOT = Path(__file__).resolve().parents[2]
CLAIMERS = 8
JOBS = 5_000


def verified_jobs(count: int, now: datetime) -> list[core.Change]:
    """``count`` jobs created and verified by the state machine itself, not yet stored."""
    changes = []
    for _ in range(count):
        job_id = str(uuid.uuid4())
        created = core.new_job(job_id=job_id, owner_id="bulk", params={}, bucket="videos",
                               key=upload_key(job_id), content_type="video/mp4",
                               expected_sha256=None, now=now, policy=POLICY)
        uploaded = ObjectInfo(key=created.after.key, size=10, content_type="video/mp4",
                              etag='"e"')
        changes += [created, core.apply(created.after, Event.VERIFY_UPLOAD,
                                        core.Evidence(now=now, policy=POLICY, obj=uploaded))]
    return changes


def job_row(job: Job, history_length: int) -> dict[str, object]:
    row = attrs.asdict(job, recurse=False)
    row["object_key"] = row.pop("key")
    return {**row, "history_length": history_length}


def bulk_insert_queued(engine: sa.Engine, count: int, now: datetime) -> None:
    """Insert ``count`` verified, queued jobs with their two history rows, in bulk."""
    changes = verified_jobs(count, now)
    verifications = changes[1::2]
    with engine.begin() as conn:
        conn.execute(sa.insert(jobs), [job_row(c.after, 2) for c in verifications])
        conn.execute(sa.insert(events), [
            {**attrs.asdict(c.record(seq), recurse=False)}
            for pair in zip(changes[0::2], verifications, strict=True)
            for seq, c in enumerate(pair, start=1)])


@pytest.mark.postgres
def test_claimer_processes_drain_the_queue_taking_each_job_once(pg_engine: sa.Engine) -> None:
    bulk_insert_queued(pg_engine, JOBS, datetime.now(UTC) - timedelta(minutes=1))
    url = pg_engine.url.render_as_string(hide_password=False)
    claimers = [subprocess.Popen(
        [sys.executable, "-m", "tests.integration.pg_claimer", url, f"claimer-{n}", "10"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for n in range(CLAIMERS)]
    try:
        for claimer in claimers:  # every process is connected before any starts
            assert claimer.stdout is not None
            assert claimer.stdout.readline().strip() == "ready"
        for claimer in claimers:
            assert claimer.stdin is not None
            claimer.stdin.write("go\n")
            claimer.stdin.flush()
        claimed = [claimer.communicate(timeout=300)[0].split() for claimer in claimers]
        assert [claimer.returncode for claimer in claimers] == [0] * CLAIMERS
    finally:
        for claimer in claimers:
            if claimer.poll() is None:
                claimer.kill()
                claimer.wait()

    every_claim = [job_id for ids in claimed for job_id in ids]
    assert len(every_claim) == len(set(every_claim)) == JOBS
    assert sum(1 for ids in claimed if ids) > 1, "the claimers did not run at the same time"
    with pg_engine.connect() as conn:
        claims_per_job = conn.execute(
            sa.select(events.c.job_id, sa.func.count())
            .where(events.c.event == Event.CLAIM).group_by(events.c.job_id)).all()
        assert len(claims_per_job) == JOBS
        assert {count for _, count in claims_per_job} == {1}, "a job was claimed twice"
        claimed_by = dict(conn.execute(
            sa.select(events.c.worker_id, sa.func.count())
            .where(events.c.event == Event.CLAIM).group_by(events.c.worker_id)).all())
        assert claimed_by == {f"claimer-{n}": len(ids) for n, ids in enumerate(claimed) if ids}
        assert conn.execute(sa.select(jobs.c.status, sa.func.count(sa.distinct(jobs.c.lease_token)))
                            .group_by(jobs.c.status)).all() == [(JobStatus.QUICK_RUNNING, JOBS)]


def test_racing_completions_verify_a_job_once(sql_flow: JobFlow,
                                              objects: InMemoryObjectStore) -> None:
    ticket = sql_flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    start = threading.Barrier(8)
    results: list[Job] = []
    errors: list[BaseException] = []

    def complete() -> None:
        try:
            start.wait()
            results.append(sql_flow.complete_upload(ticket.job_id, owner_id="alice"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=complete) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [job.status for job in results] == [JobStatus.QUEUED] * 8
    history = sql_flow.history(ticket.job_id)
    assert [row.event for row in history] == [Event.CREATED, Event.VERIFY_UPLOAD]


@pytest.mark.postgres
def test_a_purge_skips_a_job_being_requeued_and_never_waits_for_it(pg_engine: sa.Engine) -> None:
    """A requeue in flight holds its job's row: the purge's batch skips it (SKIP
    LOCKED) instead of waiting, and the requeued job is never deleted."""
    store = SqlAlchemyJobStore(pg_engine)
    objects = InMemoryObjectStore(bucket="videos")
    flow = flow_on(store, objects)
    failed = []
    for _ in range(3):
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        flow.complete_upload(ticket.job_id)
        failed.append(flow.cancel(ticket.job_id).id)
    later = datetime.now(UTC) + timedelta(days=1)
    with pg_engine.connect() as host:
        requeued = flow_on(store.bind(host), objects).requeue(failed[0])  # not committed yet
        purged = store.purge_finished(status=JobStatus.FAILED, finished_before=later, limit=10)
        assert sorted(job.id for job in purged.jobs) == sorted(failed[1:])
        host.commit()
    assert store.get(failed[0]) == requeued and requeued.status is JobStatus.QUEUED
    assert store.purge_finished(status=JobStatus.FAILED, finished_before=later,
                                limit=10).jobs == ()
