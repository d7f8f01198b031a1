"""The host app's own table: a coach's training session, and the video job that
analyses its recording."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class CoachSession(Base):
    __tablename__ = "coach_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[str] = mapped_column(sa.String(255), index=True)
    title: Mapped[str] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), default=lambda: datetime.now(UTC))
    #: The jobflow job analysing the session's video (the latest one asked for).
    video_job_id: Mapped[str | None] = mapped_column(sa.String(36), default=None)
    sample_fps: Mapped[int | None] = mapped_column(default=None)
    include_frames: Mapped[bool] = mapped_column(default=False)
