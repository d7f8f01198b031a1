"""The web app: FastAPI routes on an ``AsyncSession``, jobs through AsyncJobFlow.

* ``POST /api/coaches/plus/sessions`` creates a coach session (the app's own row).
* ``POST /api/coaches/plus/videos/upload/initiate`` creates the session's
  video job and says how to upload the video: the job and the session's link
  to it are written in one transaction, the app's.
* ``POST /api/coaches/plus/videos/upload/complete`` asks jobflow to verify the
  upload and queue the job (idempotent).
* ``GET /api/coaches/plus/videos/jobs/{job_id}``: status, stage, progress,
  error and result.
* ``GET /``: a page that does all of the above from a browser.

Every request carries ``Authorization: Bearer <token>``; the token names the
owner, and another owner's session or job is a 404. jobflow's errors become
HTTP answers in one exception handler, by their ``http_status``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import jobflow.migrations
from examples.video_app.models import Base, CoachSession
from examples.video_app.settings import Settings
from jobflow import AsyncJobFlow, Job, JobEvent, JobStatus
from jobflow.adapters.localfs import LocalObjectStore
from jobflow.adapters.sqlalchemy import AsyncSqlAlchemyJobStore
from jobflow.config import open_object_store
from jobflow.errors import JobflowError, UploadRejected
from jobflow.ports import ObjectStore

API = "/api/coaches/plus"
log = structlog.get_logger("video_app")


# -- wiring: built once in the lifespan, handed to routes by dependencies ---------------


class Jobs:
    """jobflow as the routes use it: the flow on the app's own connections, and
    the same flow bound to a request's AsyncSession."""

    def __init__(self, store: AsyncSqlAlchemyJobStore, objects: ObjectStore,
                 settings: Settings) -> None:
        self.store = store
        self.objects = objects
        self.policy = settings.policy
        self.flow = self.on(store)

    def on(self, store: AsyncSqlAlchemyJobStore) -> AsyncJobFlow:
        return AsyncJobFlow(store=store, objects=self.objects, policy=self.policy)

    def in_transaction_of(self, session: AsyncSession) -> AsyncJobFlow:
        """The flow writing in ``session``'s transaction: the session's commit or
        rollback decides for the job too."""
        return self.on(self.store.bind(session))

    @property
    def uploads_through_the_app(self) -> bool:
        """The embedded default: a local folder the browser cannot reach, so the
        app receives the upload itself (S3 receives it in production)."""
        return isinstance(self.objects, LocalObjectStore)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_engine(settings.database_url)
        # For the example's convenience; with several app processes, run
        # `jobflow db upgrade` and the host's own migrations in the deploy step.
        await jobflow.migrations.upgrade_async(engine)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        store = AsyncSqlAlchemyJobStore(engine)
        app.state.jobs = Jobs(store, open_object_store(settings.stores), settings)
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.tokens = dict(settings.tokens)
        try:
            yield
        finally:
            await store.drain()
            await engine.dispose()

    app = FastAPI(title="Coach videos", lifespan=lifespan)
    app.add_exception_handler(JobflowError, jobflow_error)
    app.include_router(router_for())
    return app


async def jobflow_error(request: Request, exc: Exception) -> Response:
    """Every jobflow error, answered with the status it carries. Server-side
    failures (5xx) do not show their message: it may name hosts or buckets."""
    assert isinstance(exc, JobflowError)
    status = exc.http_status
    if status >= 500:
        log.error("request.failed", path=request.url.path, error=type(exc).__name__,
                  detail=str(exc))
        detail = "try again later" if status == 503 else "internal error"
    else:
        detail = str(exc)
    body = {"error": type(exc).__name__, "detail": detail}
    if isinstance(exc, UploadRejected):
        body["reason"] = exc.reason  # what the user can fix: size, type, checksum
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


def jobs_of(request: Request) -> Jobs:
    jobs: Jobs = request.app.state.jobs
    return jobs


_bearer = HTTPBearer(auto_error=False)


def owner_of(request: Request, credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    """The owner the bearer token stands for."""
    owner = None if credentials is None else request.app.state.tokens.get(credentials.credentials)
    if owner is None:
        raise HTTPException(401, "a valid bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})
    return str(owner)


Owner = Annotated[str, Depends(owner_of)]
Session = Annotated[AsyncSession, Depends(db_session)]
JobsDep = Annotated[Jobs, Depends(jobs_of)]


# -- request and response bodies -----------------------------------------------------------


class NewSession(BaseModel):
    title: str = Field(default="Training session", min_length=1, max_length=200)


class CreatedSession(BaseModel):
    session_id: int
    title: str


class InitiateUpload(BaseModel):
    session_id: int
    sample_fps: int = Field(default=10, ge=1, le=60)
    include_frames: bool = False
    content_type: str = "video/mp4"


class UploadInstructions(BaseModel):
    method: str
    url: str
    headers: dict[str, str]
    fields: dict[str, str]
    expires_at: datetime


class InitiatedUpload(BaseModel):
    job_id: str
    status: str
    upload: UploadInstructions


class CompleteUpload(BaseModel):
    job_id: str


class JobState(BaseModel):
    job_id: str
    status: str
    stage: str | None
    progress: float | None
    error: dict[str, str | None] | None
    result: dict[str, Any] | None


def job_state(job: Job, history: list[JobEvent]) -> JobState:
    """What a client sees of a job: the worker's latest stage and progress (from
    its heartbeats), the error of a failed job, the result of a done one."""
    stage: str | None = {JobStatus.AWAITING_UPLOAD: "waiting for the upload",
                         JobStatus.QUEUED: "queued"}.get(job.status)
    progress: float | None = None
    if job.status is JobStatus.QUICK_RUNNING:
        beats = [row.detail for row in history if row.detail.get("stage") is not None]
        stage = str(beats[-1]["stage"]) if beats else "started"
        progress = float(beats[-1].get("progress") or 0) if beats else 0.0
    elif job.status is JobStatus.DONE:
        stage, progress = "done", 1.0
    error = None
    if job.status is JobStatus.FAILED:
        error = {"code": job.error_code, "message": job.error_message}
    return JobState(job_id=job.id, status=job.status.value, stage=stage, progress=progress,
                    error=error, result=job.result)


# -- routes ------------------------------------------------------------------------------


def router_for() -> APIRouter:
    router = APIRouter()

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return resources.files("examples.video_app").joinpath("page.html").read_text()

    @router.post(f"{API}/sessions", status_code=201)
    async def create_session(body: NewSession, owner: Owner, session: Session
                             ) -> CreatedSession:
        row = CoachSession(owner_id=owner, title=body.title)
        session.add(row)
        await session.commit()
        return CreatedSession(session_id=row.id, title=row.title)

    @router.post(f"{API}/videos/upload/initiate")
    async def initiate_upload(body: InitiateUpload, owner: Owner, session: Session,
                              jobs: JobsDep) -> InitiatedUpload:
        coach_session = await session.get(CoachSession, body.session_id)
        if coach_session is None or coach_session.owner_id != owner:
            raise HTTPException(404, f"session {body.session_id} not found")
        # The job and the session's link to it: one transaction, the request's.
        flow = jobs.in_transaction_of(session)
        ticket = await flow.initiate_upload(
            owner, {"session_id": coach_session.id, "sample_fps": body.sample_fps,
                    "include_frames": body.include_frames},
            content_type=body.content_type)
        coach_session.video_job_id = ticket.job_id
        coach_session.sample_fps = body.sample_fps
        coach_session.include_frames = body.include_frames
        await session.commit()
        upload = UploadInstructions(method=ticket.method, url=ticket.url,
                                    headers=ticket.headers, fields=ticket.fields,
                                    expires_at=ticket.expires_at)
        if jobs.uploads_through_the_app:
            upload.url = f"{API}/videos/upload/{ticket.job_id}/object"
            upload.method, upload.fields = "PUT", {}
        return InitiatedUpload(job_id=ticket.job_id, status=JobStatus.AWAITING_UPLOAD.value,
                               upload=upload)

    @router.post(f"{API}/videos/upload/complete")
    async def complete_upload(body: CompleteUpload, owner: Owner, jobs: JobsDep
                              ) -> JobState:
        # On the flow's own transactions, not the request's: a rejected upload
        # fails the job even though this request then answers 422.
        job = await jobs.flow.complete_upload(body.job_id, owner_id=owner)
        return job_state(job, [])

    @router.get(f"{API}/videos/jobs/{{job_id}}")
    async def get_job(job_id: str, owner: Owner, jobs: JobsDep) -> JobState:
        job = await jobs.flow.get(job_id, owner_id=owner)
        history = await jobs.flow.history(job_id, owner_id=owner)
        return job_state(job, history)

    @router.put(f"{API}/videos/upload/{{job_id}}/object", status_code=204,
                include_in_schema=False)
    async def receive_upload(job_id: str, request: Request, owner: Owner,
                             jobs: JobsDep) -> Response:
        """The embedded defaults only: the app stands in for S3's presigned PUT."""
        if not jobs.uploads_through_the_app:
            raise HTTPException(404, "uploads go to the object store")
        job = await jobs.flow.get(job_id, owner_id=owner)
        if job.status is not JobStatus.AWAITING_UPLOAD:
            raise HTTPException(409, f"job {job_id} is not waiting for an upload")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > jobs.policy.max_bytes:
                raise HTTPException(413, f"larger than the upload limit of "
                                         f"{jobs.policy.max_bytes} bytes")
        content_type = request.headers.get("content-type", "application/octet-stream")
        await asyncio.to_thread(jobs.objects.put, job.key, bytes(data),
                                content_type=content_type)
        return Response(status_code=204)

    return router
