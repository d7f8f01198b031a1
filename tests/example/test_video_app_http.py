"""The video example over HTTP, as its clients call it: the original routes and
request bodies, against uvicorn on a real port, PostgreSQL, moto's S3 server
and ``jobflow worker`` subprocesses."""

from __future__ import annotations

import pytest
import requests
import sqlalchemy as sa

from jobflow import Event, JobStatus
from jobflow.adapters.sqlalchemy.schema import events, jobs
from tests.example.conftest import API, CLIP, LONG_CLIP, MAX_BYTES, VideoApp

pytestmark = pytest.mark.postgres

ORIGINAL_BODY = {"sample_fps": 10, "include_frames": False}
UNKNOWN = "5d3f3a52-1c8e-4c53-9a0e-7d6f1c2b9e41"


def new_session(app: VideoApp, token: str = "coach-1-token") -> int:
    created = app.call("POST", f"{API}/sessions", token, json={"title": "Tuesday"})
    assert created.status_code == 201, created.text
    session_id: int = created.json()["session_id"]
    return session_id


def initiate(app: VideoApp, token: str = "coach-1-token", **body: object) -> dict[str, object]:
    session_id = body.pop("session_id", None) or new_session(app, token)
    answer = app.call("POST", f"{API}/videos/upload/initiate", token,
                      json={"session_id": session_id, **ORIGINAL_BODY, **body})
    assert answer.status_code == 200, answer.text
    ticket: dict[str, object] = answer.json()
    return ticket


def upload(ticket: dict[str, object], data: bytes) -> None:
    """What the browser does with the upload instructions (a presigned PUT)."""
    instructions = ticket["upload"]
    assert isinstance(instructions, dict) and instructions["method"] == "PUT"
    sent = requests.put(instructions["url"], data=data, headers=instructions["headers"],
                        timeout=30)
    assert sent.status_code == 200, sent.text


def complete(app: VideoApp, job_id: object, token: str = "coach-1-token") -> requests.Response:
    return app.call("POST", f"{API}/videos/upload/complete", token, json={"job_id": job_id})


def test_the_original_routes_take_a_job_from_awaiting_upload_to_done(
        video_app: VideoApp) -> None:
    ticket = initiate(video_app)
    assert ticket["status"] == "awaiting_upload"
    instructions = ticket["upload"]
    assert isinstance(instructions, dict)
    assert instructions["url"].startswith(video_app.env["JOBFLOW_S3_ENDPOINT_URL"])
    assert instructions["headers"] == {"Content-Type": "video/mp4"}
    job_id = ticket["job_id"]

    early = complete(video_app, job_id)
    assert (early.status_code, early.json()["error"]) == (409, "UploadMissing")

    upload(ticket, CLIP)
    first, again = complete(video_app, job_id), complete(video_app, job_id)
    assert (first.status_code, first.json()["status"]) == (200, "queued")
    assert (again.status_code, again.json()["status"]) == (200, "queued")
    history = video_app.flow().history(str(job_id))
    assert [row.event for row in history] == [Event.CREATED, Event.VERIFY_UPLOAD]

    video_app.run_worker_until_idle()

    state = video_app.call("GET", f"{API}/videos/jobs/{job_id}").json()
    assert state == {"job_id": job_id, "status": "done", "stage": "done", "progress": 1.0,
                     "error": None, "result": {"duration_seconds": 3.5, "sample_fps": 10,
                                               "frames_sampled": 35, "bytes": len(CLIP)}}
    stages = [row.detail.get("stage") for row in video_app.flow().history(str(job_id))
              if row.event is Event.HEARTBEAT]
    assert stages == ["downloading", "reading the container", "sampling frames"]


def test_include_frames_lists_the_sampled_instants(video_app: VideoApp) -> None:
    ticket = initiate(video_app, sample_fps=2, include_frames=True)
    upload(ticket, CLIP)
    assert complete(video_app, ticket["job_id"]).status_code == 200
    video_app.run_worker_until_idle()
    result = video_app.call("GET", f"{API}/videos/jobs/{ticket['job_id']}").json()["result"]
    assert result["frame_times"] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def test_the_session_row_and_the_job_are_one_transaction(video_app: VideoApp) -> None:
    """The host's commit fails (a deferred check PostgreSQL runs at COMMIT):
    neither the session's link to a job nor any job is left behind."""
    session_id = new_session(video_app)
    with video_app.engine.begin() as conn:
        conn.exec_driver_sql("""
            CREATE FUNCTION refuse_video() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'the host refuses this commit'; END $$;
            CREATE CONSTRAINT TRIGGER refuse_video AFTER UPDATE ON coach_sessions
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_video();
        """)

    answer = video_app.call("POST", f"{API}/videos/upload/initiate",
                            json={"session_id": session_id, **ORIGINAL_BODY})

    assert answer.status_code == 500
    with video_app.engine.connect() as conn:
        for table in (jobs, events):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0
        assert conn.execute(sa.text("SELECT video_job_id FROM coach_sessions WHERE id = :id"),
                            {"id": session_id}).scalar_one() is None


def test_a_bearer_token_names_the_owner_and_hides_other_owners_jobs(
        video_app: VideoApp) -> None:
    ticket = initiate(video_app)
    job = f"{API}/videos/jobs/{ticket['job_id']}"

    assert video_app.call("GET", job, token=None).status_code == 401
    assert video_app.call("GET", job, token="nobody's token").status_code == 401
    assert video_app.call("GET", job, token="coach-2-token").status_code == 404
    assert complete(video_app, ticket["job_id"], token="coach-2-token").status_code == 404
    theirs = video_app.call("POST", f"{API}/videos/upload/initiate", "coach-2-token",
                            json={"session_id": new_session(video_app), **ORIGINAL_BODY})
    assert theirs.status_code == 404
    assert video_app.call("GET", job).json()["status"] == "awaiting_upload"


@pytest.mark.parametrize(("body", "error"), [
    ({"sample_fps": 0}, None),
    ({"sample_fps": "ten"}, None),
    ({"content_type": "text/html"}, "ContentTypeNotAllowed"),
])
def test_invalid_input_is_422(video_app: VideoApp, body: dict[str, object],
                              error: str | None) -> None:
    answer = video_app.call("POST", f"{API}/videos/upload/initiate",
                            json={"session_id": new_session(video_app), **ORIGINAL_BODY,
                                  **body})
    assert answer.status_code == 422
    if error is not None:
        assert answer.json()["error"] == error
    assert sum(video_app.flow().counts().values()) == 0


@pytest.mark.parametrize("job_id", [UNKNOWN, "../../etc/passwd", "x" * 300])
def test_unknown_jobs_are_404(video_app: VideoApp, job_id: str) -> None:
    assert video_app.call("GET", f"{API}/videos/jobs/{job_id}").status_code == 404
    assert complete(video_app, job_id).status_code == 404


def test_an_upload_over_the_limit_is_rejected_with_422_and_fails_the_job(
        video_app: VideoApp) -> None:
    ticket = initiate(video_app)
    upload(ticket, LONG_CLIP)
    assert len(LONG_CLIP) > MAX_BYTES

    answers = [complete(video_app, ticket["job_id"]) for _ in range(2)]

    assert [(a.status_code, a.json()["error"]) for a in answers] == [
        (422, "UploadRejected")] * 2
    assert "above the limit" in answers[0].json()["reason"]
    state = video_app.call("GET", f"{API}/videos/jobs/{ticket['job_id']}").json()
    assert state["status"] == "failed" and state["error"]["code"] == "upload_rejected"
    assert video_app.flow().get(str(ticket["job_id"])).status is JobStatus.FAILED


def test_a_database_that_dropped_its_connections_is_503_then_recovers(
        video_app: VideoApp) -> None:
    ticket = initiate(video_app)
    job = f"{API}/videos/jobs/{ticket['job_id']}"
    assert video_app.call("GET", job).status_code == 200
    with video_app.engine.connect() as conn:  # as a failover or a restart does
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        conn.commit()

    down = video_app.call("GET", job)

    assert down.status_code == 503
    assert down.headers["Retry-After"] == "5"
    assert down.json() == {"error": "StorageUnavailable", "detail": "try again later"}
    assert video_app.call("GET", job).status_code == 200


def test_the_bucket_answers_the_browser_preflight_for_the_app_origin_only(
        video_app: VideoApp) -> None:
    ticket = initiate(video_app)
    instructions = ticket["upload"]
    assert isinstance(instructions, dict)
    preflight = {"Access-Control-Request-Method": "PUT",
                 "Access-Control-Request-Headers": "content-type"}

    allowed = requests.options(instructions["url"], timeout=30,
                               headers={**preflight, "Origin": video_app.base_url})
    refused = requests.options(instructions["url"], timeout=30,
                               headers={**preflight, "Origin": "http://elsewhere.example"})

    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == video_app.base_url
    assert "PUT" in allowed.headers["Access-Control-Allow-Methods"]
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
