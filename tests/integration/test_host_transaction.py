"""``store.bind(session_or_connection)``: a job created inside the host app's own
transaction commits or rolls back with the host's rows, history included."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from jobflow import Event, JobStatus
from jobflow import states as core
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import NOTIFY_CHANNEL, SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.schema import events, jobs
from jobflow.errors import ConfigurationError, JobNotFound
from tests.integration.conftest import flow_on

host_metadata = sa.MetaData()
orders = sa.Table("host_orders", host_metadata,
                  sa.Column("id", sa.Integer, primary_key=True),
                  sa.Column("job_id", sa.String(36)))

HostTransaction = Callable[[sa.Engine], AbstractContextManager[Session | sa.Connection]]


@contextmanager
def session_on(engine: sa.Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session


@contextmanager
def connection_on(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn:
        yield conn


@pytest.fixture(params=[session_on, connection_on], ids=["session", "connection"])
def host_transaction(request: pytest.FixtureRequest) -> HostTransaction:
    opener: HostTransaction = request.param
    return opener


@pytest.fixture
def engine(sql_engine: sa.Engine) -> Iterator[sa.Engine]:
    host_metadata.create_all(sql_engine)
    yield sql_engine
    host_metadata.drop_all(sql_engine)


def stored(engine: sa.Engine, job_id: str) -> tuple[int, int, int]:
    """Jobs, history rows and host orders for ``job_id``, seen from outside."""
    with engine.connect() as conn:
        return (
            conn.execute(sa.select(sa.func.count()).where(jobs.c.id == job_id)).scalar_one(),
            conn.execute(sa.select(sa.func.count()).where(events.c.job_id == job_id))
            .scalar_one(),
            conn.execute(sa.select(sa.func.count()).where(orders.c.job_id == job_id))
            .scalar_one(),
        )


def order_and_job(host: Session | sa.Connection, objects: InMemoryObjectStore) -> str:
    """What a host request handler does: its own row and a job, in one transaction."""
    flow = flow_on(SqlAlchemyJobStore(host.get_bind() if isinstance(host, Session)
                                      else host.engine).bind(host), objects)
    ticket = flow.initiate_upload("alice", {"order": 1}, content_type="video/mp4")
    host.execute(sa.insert(orders).values(id=1, job_id=ticket.job_id))
    assert flow.get(ticket.job_id).status is JobStatus.AWAITING_UPLOAD  # visible inside
    return ticket.job_id


def test_a_host_rollback_leaves_no_job_and_no_event(
        engine: sa.Engine, host_transaction: HostTransaction,
        objects: InMemoryObjectStore) -> None:
    with host_transaction(engine) as host:
        job_id = order_and_job(host, objects)
        assert stored(engine, job_id) == (0, 0, 0), "the bound store committed by itself"
        host.rollback()
    assert stored(engine, job_id) == (0, 0, 0)
    with pytest.raises(JobNotFound):
        SqlAlchemyJobStore(engine).get(job_id)


def test_a_host_commit_keeps_the_job_its_event_and_the_host_rows(
        engine: sa.Engine, host_transaction: HostTransaction,
        objects: InMemoryObjectStore) -> None:
    with host_transaction(engine) as host:
        job_id = order_and_job(host, objects)
        host.commit()
    assert stored(engine, job_id) == (1, 1, 1)
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    assert [row.event for row in flow.history(job_id)] == [Event.CREATED]
    assert flow.get(job_id).params == {"order": 1}


def test_a_bound_store_joins_a_transaction_the_host_already_wrote_in(
        engine: sa.Engine, host_transaction: HostTransaction,
        objects: InMemoryObjectStore) -> None:
    with host_transaction(engine) as host:
        host.execute(sa.insert(orders).values(id=2, job_id=None))
        flow = flow_on(SqlAlchemyJobStore(engine).bind(host), objects)
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        assert flow.complete_upload(ticket.job_id).status is JobStatus.QUEUED
        host.rollback()
    assert stored(engine, ticket.job_id) == (0, 0, 0)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(orders)).scalar_one() == 0


def test_bind_refuses_what_is_not_a_connection_or_session(sql_store: SqlAlchemyJobStore) -> None:
    with pytest.raises(ConfigurationError, match="Connection or Session"):
        sql_store.bind("postgresql://somewhere")  # type: ignore[arg-type]


@pytest.fixture
def listener(pg_engine: sa.Engine) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    args, params = pg_engine.dialect.create_connect_args(pg_engine.url)
    conn = psycopg.connect(*args, **params, autocommit=True)
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    yield conn
    conn.close()


def notified(listener: psycopg.Connection[tuple[object, ...]], wait: float) -> list[str]:
    return [n.payload for n in listener.notifies(timeout=wait, stop_after=1)]


@pytest.mark.postgres
def test_queueing_a_job_notifies_listeners_when_the_transaction_commits(
        pg_engine: sa.Engine, listener: psycopg.Connection[tuple[object, ...]],
        objects: InMemoryObjectStore) -> None:
    flow = flow_on(SqlAlchemyJobStore(pg_engine), objects)
    ticket = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(ticket.key, b"0123456789", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    assert notified(listener, wait=10) == [ticket.job_id]

    second = flow.initiate_upload("alice", content_type="video/mp4")
    objects.put(second.key, b"0123456789", content_type="video/mp4")
    with Session(pg_engine) as session:
        flow_on(SqlAlchemyJobStore(pg_engine).bind(session), objects).complete_upload(
            second.job_id)
        # PostgreSQL holds a transaction's notifications until it commits.
        assert notified(listener, wait=0.2) == []
        session.commit()
    assert notified(listener, wait=10) == [second.job_id]


@pytest.mark.postgres
def test_a_batch_commit_rolls_back_or_notifies_with_the_host_transaction(
        pg_engine: sa.Engine, listener: psycopg.Connection[tuple[object, ...]],
        objects: InMemoryObjectStore) -> None:
    flow = flow_on(SqlAlchemyJobStore(pg_engine), objects)
    for _ in range(2):
        ticket = flow.initiate_upload("alice", content_type="video/mp4")
        objects.put(ticket.key, b"0123456789", content_type="video/mp4")
        flow.complete_upload(ticket.job_id)
    assert len(list(listener.notifies(timeout=10, stop_after=2))) == 2
    released, finished = flow.claim("w1", limit=2)
    changes = [
        core.apply(released.job, Event.RELEASE, core.Evidence(
            now=flow.now(), policy=flow.policy, token=released.token, error="shutting down")),
        core.apply(finished.job, Event.SUCCEED, core.Evidence(
            now=flow.now(), policy=flow.policy, token=finished.token, result={})),
    ]
    with Session(pg_engine) as session:
        bound = SqlAlchemyJobStore(pg_engine).bind(session)
        assert bound.commit_many(changes) == [change.after for change in changes]
        session.rollback()
    assert [flow.get(claim.job.id) for claim in (released, finished)] == [
        released.job, finished.job]
    with Session(pg_engine) as session:
        bound = SqlAlchemyJobStore(pg_engine).bind(session)
        assert bound.commit_many(changes) == [change.after for change in changes]
        assert notified(listener, wait=0.2) == []
        session.commit()
    assert notified(listener, wait=10) == [released.job.id], "only the job made queued"
    assert notified(listener, wait=0.2) == []
    assert [flow.get(change.after.id).status for change in changes] == [
        JobStatus.QUEUED, JobStatus.DONE]
