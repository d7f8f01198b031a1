"""jobflow's migrations on SQLite and PostgreSQL: up, down, up again; no drift from
the models; their own version table; the database-enforced invariants; and the
documented recipe for adding a status label."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import jobflow.migrations
from jobflow import Event, JobFlow, JobStatus
from jobflow.adapters.memory import InMemoryObjectStore
from jobflow.adapters.sqlalchemy import SqlAlchemyJobStore
from jobflow.adapters.sqlalchemy.schema import jobs, metadata
from tests.integration.conftest import flow_on

JOBFLOW_TABLES = {"jobflow_jobs", "jobflow_job_events", "jobflow_alembic_version"}


@pytest.fixture
def engine(empty_database: sa.URL) -> Iterator[sa.Engine]:
    engine = sa.create_engine(empty_database)
    yield engine
    engine.dispose()


def table_names(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def schema_drift(engine: sa.Engine) -> list[object]:
    """What alembic's autogenerate would change to make the database match the models."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={
            "compare_type": True, "compare_server_default": True,
            "include_name": lambda name, type_, parents: (
                type_ != "table" or name in {"jobflow_jobs", "jobflow_job_events"}),
        })
        return list(compare_metadata(context, metadata))


def status_labels(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(
            "SELECT enumlabel FROM pg_enum "
            "WHERE enumtypid = 'jobflow_job_status'::regtype ORDER BY enumsortorder")).scalars())


def unverified_job(engine: sa.Engine) -> str:
    flow = flow_on(SqlAlchemyJobStore(engine), InMemoryObjectStore())
    return flow.initiate_upload("alice", content_type="video/mp4").job_id


def test_upgrade_downgrade_upgrade(engine: sa.Engine) -> None:
    assert jobflow.migrations.current(engine) is None
    jobflow.migrations.upgrade(engine)
    assert jobflow.migrations.current(engine) == jobflow.migrations.head() == "0005"
    assert table_names(engine) >= JOBFLOW_TABLES
    unverified_job(engine)  # the schema takes a job

    jobflow.migrations.downgrade(engine, "base")
    assert jobflow.migrations.current(engine) is None
    assert table_names(engine) & JOBFLOW_TABLES <= {"jobflow_alembic_version"}
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            assert conn.execute(sa.text(
                "SELECT count(*) FROM pg_type WHERE typname = 'jobflow_job_status'")).scalar() == 0

    jobflow.migrations.upgrade(engine)
    assert jobflow.migrations.current(engine) == "0005"
    assert schema_drift(engine) == []


def test_upgrade_takes_a_url_too(empty_database: sa.URL) -> None:
    jobflow.migrations.upgrade(empty_database.render_as_string(hide_password=False))
    assert jobflow.migrations.current(empty_database) == "0005"


def test_the_migrations_build_exactly_the_models(engine: sa.Engine) -> None:
    jobflow.migrations.upgrade(engine)
    assert schema_drift(engine) == []


@pytest.mark.postgres
def test_status_enum_labels_are_in_state_machine_order(pg_engine: sa.Engine) -> None:
    labels = status_labels(pg_engine)
    assert labels == [status.value for status in JobStatus]
    assert labels.index("awaiting_upload") < labels.index("queued")


def test_the_database_refuses_to_queue_an_unverified_job(sql_engine: sa.Engine) -> None:
    job_id = unverified_job(sql_engine)
    with sql_engine.connect() as conn, pytest.raises(sa.exc.IntegrityError,
                                                      match="upload_verified_unless"):
        conn.execute(sa.text(
            "UPDATE jobflow_jobs SET status = 'queued' WHERE status = 'awaiting_upload'"))
    with sql_engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(sa.text(
            "UPDATE jobflow_jobs SET status = 'done' WHERE status = 'awaiting_upload'"))
    assert SqlAlchemyJobStore(sql_engine).get(job_id).status is JobStatus.AWAITING_UPLOAD


@pytest.mark.parametrize("assignment", [
    "attempts = max_attempts + 1", "attempts = -1", "max_attempts = 0",
    "status = 'not_a_status'",
])
def test_the_database_refuses_impossible_rows(sql_engine: sa.Engine, assignment: str) -> None:
    unverified_job(sql_engine)
    with sql_engine.connect() as conn, pytest.raises(sa.exc.DBAPIError):
        conn.execute(sa.text(f"UPDATE jobflow_jobs SET {assignment}"))


def test_the_history_accepts_every_event_and_nothing_else(sql_engine: sa.Engine) -> None:
    """The migration's list of event names is the state machine's."""
    job_id = unverified_job(sql_engine)
    insert = sa.text(
        "INSERT INTO jobflow_job_events (job_id, seq, event, to_status, at, attempt, detail) "
        "SELECT id, :seq, :event, status, created_at, 0, params FROM jobflow_jobs")
    with sql_engine.begin() as conn:
        for seq, event in enumerate(Event, start=2):
            conn.execute(insert, {"seq": seq, "event": event.value})
    with sql_engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.execute(insert, {"seq": 99, "event": "teleport"})
    assert len(SqlAlchemyJobStore(sql_engine).history(job_id)) == 1 + len(Event)


def test_jobflow_keeps_its_own_version_table(engine: sa.Engine) -> None:
    """A host app's alembic history is never touched, and its autogenerate can skip
    jobflow's tables with the documented hook."""
    host = sa.MetaData()
    sa.Table("orders", host, sa.Column("id", sa.Integer, primary_key=True))
    with engine.begin() as conn:
        host.create_all(conn)
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('hostrev1')"))
    jobflow.migrations.upgrade(engine)
    jobflow.migrations.downgrade(engine, "base")
    jobflow.migrations.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).all() == [
            ("hostrev1",)]
        host_context = MigrationContext.configure(conn)
        assert host_context.get_current_revision() == "hostrev1"
        hooked = MigrationContext.configure(conn, opts={
            "include_name": jobflow.migrations.skip_jobflow_tables})
        assert compare_metadata(hooked, host) == []
        unhooked = MigrationContext.configure(conn)
        assert {diff[1].name for diff in compare_metadata(unhooked, host)
                if diff[0] == "remove_table"} >= {"jobflow_jobs", "jobflow_job_events"}


NEW_LABEL_MIGRATION = '''
    """Example from docs/migrations.md: add the status 'slow_running'."""
    from __future__ import annotations

    from alembic import op

    revision = "0003_example"
    down_revision = "0005"
    branch_labels = None
    depends_on = None

    NEW = ("awaiting_upload", "queued", "quick_running", "slow_running", "done", "failed")
    OLD = ("awaiting_upload", "queued", "quick_running", "done", "failed")
    CHECK = "ck_jobflow_jobs_jobflow_job_status"


    def _labels(labels):
        return "status IN (" + ", ".join(f"'{label}'" for label in labels) + ")"


    def upgrade() -> None:
        if op.get_bind().dialect.name == "postgresql":
            with op.get_context().autocommit_block():
                op.execute("ALTER TYPE jobflow_job_status "
                           "ADD VALUE IF NOT EXISTS 'slow_running' AFTER 'quick_running'")
        else:
            with op.batch_alter_table("jobflow_jobs") as batch:
                batch.drop_constraint(op.f(CHECK), type_="check")
                batch.create_check_constraint(op.f(CHECK), _labels(NEW))


    def downgrade() -> None:
        if op.get_bind().dialect.name != "postgresql":
            with op.batch_alter_table("jobflow_jobs") as batch:
                batch.drop_constraint(op.f(CHECK), type_="check")
                batch.create_check_constraint(op.f(CHECK), _labels(OLD))
'''


def migrate_with_example(engine: sa.Engine, folder: Path, direction: str, revision: str) -> None:
    with engine.connect() as conn:
        config = jobflow.migrations.config(conn)
        config.set_main_option("version_locations",
                               f"{jobflow.migrations.SCRIPT_LOCATION / 'versions'}:{folder}")
        getattr(command, direction)(config, revision)
        conn.commit()


def test_a_status_label_migration_runs_on_both_databases(engine: sa.Engine,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / "more_versions"
    folder.mkdir()
    (folder / "0003_example.py").write_text(textwrap.dedent(NEW_LABEL_MIGRATION))
    jobflow.migrations.upgrade(engine)
    job_id = unverified_job(engine)
    set_label = sa.text("UPDATE jobflow_jobs SET status = 'slow_running', "
                        "upload_verified_at = created_at")

    migrate_with_example(engine, folder, "upgrade", "head")
    if engine.dialect.name == "postgresql":
        assert status_labels(engine) == [
            "awaiting_upload", "queued", "quick_running", "slow_running", "done", "failed"]
    with engine.begin() as conn:
        conn.execute(set_label)  # the new label is accepted...
        conn.execute(sa.text("UPDATE jobflow_jobs SET status = 'awaiting_upload', "
                             "upload_verified_at = NULL"))
    with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
        # ...and the rebuilt table still refuses an unverified queued job.
        conn.execute(sa.text("UPDATE jobflow_jobs SET status = 'queued'"))

    migrate_with_example(engine, folder, "downgrade", "0005")
    assert jobflow.migrations.current(engine) == "0005"
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn, pytest.raises(sa.exc.IntegrityError):
            conn.execute(set_label)
    flow: JobFlow = flow_on(SqlAlchemyJobStore(engine), InMemoryObjectStore())
    assert flow.get(job_id).status is JobStatus.AWAITING_UPLOAD


OLD_JOB = "00000000-0000-4000-8000-000000000001"


def test_jobs_from_before_the_size_range_keep_working_after_0002(engine: sa.Engine) -> None:
    """A job created under revision 0001 has no stored size range: after the
    upgrade it is verified against the verifying process's policy, and a new
    job stores its own range."""
    jobflow.migrations.upgrade(engine, "0001")
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with engine.begin() as conn:  # only the columns revision 0001 has
        conn.execute(sa.insert(jobs).values(
            id=OLD_JOB, owner_id="alice", status=JobStatus.AWAITING_UPLOAD, params={},
            bucket="videos", object_key="uploads/old", content_type="video/mp4",
            created_at=now, updated_at=now, upload_expires_at=now + timedelta(days=36500),
            run_at=now, max_attempts=3, attempts=0, history_length=1))
    jobflow.migrations.upgrade(engine)
    objects = InMemoryObjectStore()
    flow = flow_on(SqlAlchemyJobStore(engine), objects)
    old = flow.get(OLD_JOB)
    assert (old.min_bytes, old.max_bytes) == (None, None)
    objects.put(old.key, b"\x00" * 10, content_type="video/mp4")
    assert flow.complete_upload(old.id).status is JobStatus.QUEUED
    new = flow.get(flow.initiate_upload("alice", content_type="video/mp4").job_id)
    assert (new.min_bytes, new.max_bytes) == (flow.policy.min_bytes, flow.policy.max_bytes)
