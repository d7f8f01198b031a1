"""The app's settings, from the environment.

Where jobs and uploads live is read from the same ``JOBFLOW_*`` variables the
``jobflow worker`` command reads, so one environment configures the web app
and its workers alike; unset, both use the embedded defaults (the SQLite file
``jobflow.sqlite3`` and the folder ``jobflow-objects/`` in the working
directory). The app's own settings are ``VIDEO_APP_*``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs
import sqlalchemy as sa

from jobflow import UploadPolicy
from jobflow.config import StoreSettings
from jobflow.errors import ConfigurationError

#: For trying the app out only: every deployment sets VIDEO_APP_TOKENS.
DEMO_TOKENS = {"coach-1-token": "coach-1", "coach-2-token": "coach-2"}
VIDEO_TYPES = frozenset({"video/mp4", "video/quicktime"})


def async_database_url(url: str) -> sa.URL:
    """``url`` through its dialect's asyncio driver (psycopg 3, aiosqlite)."""
    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+psycopg_async")
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    raise ConfigurationError(f"the video app runs on PostgreSQL or SQLite, not {backend!r}")


def video_policy(policy: UploadPolicy) -> UploadPolicy:
    """``policy``, accepting the videos the worker can read only."""
    # (attrs' mypy plugin cannot type a field whose converter is frozenset)
    return attrs.evolve(policy, allowed_content_types=VIDEO_TYPES)  # type: ignore[arg-type]


def _tokens(text: str | None) -> dict[str, str]:
    """``token:owner,token:owner`` -> {token: owner}."""
    if not text:
        return dict(DEMO_TOKENS)
    pairs = [item.split(":", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ConfigurationError("VIDEO_APP_TOKENS must look like token:owner,token:owner")
    return {token.strip(): owner.strip() for token, owner in pairs}


@attrs.frozen
class Settings:
    """Everything the app needs to start."""

    stores: StoreSettings = attrs.field(factory=StoreSettings)
    #: Bearer token -> owner id. A real app asks its identity provider instead.
    tokens: Mapping[str, str] = attrs.field(factory=lambda: dict(DEMO_TOKENS))
    policy: UploadPolicy = attrs.field(factory=lambda: video_policy(UploadPolicy()))
    host: str = "127.0.0.1"
    port: int = 8000
    #: Origins whose pages may upload straight to the bucket (its CORS rules).
    origins: tuple[str, ...] = ()

    @property
    def database_url(self) -> sa.URL:
        return async_database_url(self.stores.resolved_database_url())

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        return self.origins or (f"http://{self.host}:{self.port}",)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        objects_dir = env.get("JOBFLOW_OBJECTS_DIR")
        stores = StoreSettings(
            database_url=env.get("JOBFLOW_DATABASE_URL") or None,
            objects_dir=Path(objects_dir) if objects_dir else None,
            s3_bucket=env.get("JOBFLOW_S3_BUCKET") or None,
            s3_endpoint_url=env.get("JOBFLOW_S3_ENDPOINT_URL") or None,
            s3_region=env.get("JOBFLOW_S3_REGION") or None,
            s3_prefix=env.get("JOBFLOW_S3_PREFIX", ""),
            s3_upload_method=env.get("JOBFLOW_S3_UPLOAD_METHOD", "PUT"))
        policy = video_policy(UploadPolicy(
            max_bytes=int(env.get("JOBFLOW_MAX_BYTES", 500 * 1024**2)),
            upload_ttl_seconds=float(env.get("JOBFLOW_UPLOAD_TTL", 3600))))
        origins = tuple(origin.strip() for origin in env.get("VIDEO_APP_ORIGINS", "").split(",")
                        if origin.strip())
        return cls(stores=stores, tokens=_tokens(env.get("VIDEO_APP_TOKENS")), policy=policy,
                   host=env.get("VIDEO_APP_HOST", "127.0.0.1"),
                   port=int(env.get("VIDEO_APP_PORT", 8000)), origins=origins)
