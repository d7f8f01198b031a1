"""``jobflow demo``: the whole life of upload-first jobs, on the embedded defaults.

In a fresh folder it creates a SQLite database and a local object folder,
generates a few real files (small but valid MP4s it writes itself), and
uploads them exactly as clients would: through their upload tickets. One
client never uploads, one uploads an empty file, one forgets to call
``complete_upload``, one sends a file that is not a video at all. A worker
then runs :func:`example_handler` on every verified job, the clock is moved
two hours on so that ``reconcile`` expires the missing upload and adopts the
forgotten one, and the status and one job's history are printed.

:func:`example_handler` is also a handler to start from::

    jobflow worker --handler jobflow.demo:example_handler
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from jobflow.config import StoreSettings, open_flow
from jobflow.errors import (
    ContentTypeNotAllowed,
    PermanentJobError,
    UploadError,
    UploadRejected,
)
from jobflow.flow import JobFlow
from jobflow.models import Job, JobStatus, UploadPolicy
from jobflow.reporting import StatusReport, history_lines
from jobflow.upload_client import send_file
from jobflow.wakeup import PollingWakeup
from jobflow.worker import JobContext, Worker

MP4_TYPES = frozenset({"video/mp4", "video/quicktime"})
_HEADER = struct.Struct(">I4s")


# -- ISO base media files (MP4): just enough to write one and read its duration -----------


def _box(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(_HEADER.size + len(payload), kind) + payload


def _shell_command() -> str:
    """How a shell runs this jobflow: ``jobflow`` when it is on PATH, else the
    script installed beside this Python (a virtual environment not activated),
    else ``python -m jobflow``."""
    if shutil.which("jobflow"):
        return "jobflow"
    beside = Path(sys.executable).with_name("jobflow")
    if beside.is_file():
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m jobflow"


def minimal_mp4(duration_seconds: float, *, timescale: int = 1000,
                media_bytes: int = 4096) -> bytes:
    """A small, structurally valid MP4: ``ftyp``, ``moov`` with a version-0
    ``mvhd`` (the movie's timescale and duration) and an ``mdat`` of filler."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2mp41")
    identity_matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(b"mvhd", struct.pack(
        ">B3xIIIIIH10x", 0, 0, 0, timescale, round(duration_seconds * timescale),
        0x10000, 0x100) + identity_matrix + bytes(24) + struct.pack(">I", 2))
    mdat = _box(b"mdat", bytes(range(256)) * (media_bytes // 256))
    return ftyp + _box(b"moov", mvhd) + mdat


def _boxes(stream: BinaryIO, end: int | None) -> Any:
    """(type, payload start, payload size) of each box from the stream's position to ``end``."""
    position = stream.tell()
    while end is None or position + _HEADER.size <= end:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return
        size, kind = _HEADER.unpack(header)
        start = position + _HEADER.size
        if size == 1:  # a 64-bit size follows the type
            (size,) = struct.unpack(">Q", stream.read(8))
            start += 8
        elif size == 0:  # the box runs to the end of the file
            size = (end if end is not None else stream.seek(0, 2)) - position
        if size < start - position:
            raise PermanentJobError(f"corrupt MP4: box {kind!r} declares {size} bytes",
                                    error_code="corrupt_media")
        yield kind, start, size - (start - position)
        position += size
        stream.seek(position)


def mp4_duration(stream: BinaryIO) -> float:
    """The duration in seconds from an MP4's ``moov/mvhd`` box (a seekable stream).

    Raises :class:`PermanentJobError` when the data is not an MP4 or has no
    movie header: trying again would not change the file.
    """
    first = next(_boxes(stream, None), None)
    if first is None or first[0] != b"ftyp":
        raise PermanentJobError("not an MP4 file: it does not start with an ftyp box",
                                error_code="not_mp4")
    stream.seek(0)
    for kind, start, size in _boxes(stream, None):
        if kind != b"moov":
            continue
        stream.seek(start)
        for child, child_start, child_size in _boxes(stream, start + size):
            if child != b"mvhd":
                continue
            stream.seek(child_start)
            version = stream.read(4)[0]
            layout = ">QQIQ" if version == 1 else ">IIII"
            fields = stream.read(struct.calcsize(layout))
            if len(fields) < struct.calcsize(layout) or child_size < len(fields) + 4:
                break
            _, _, timescale, duration = struct.unpack(layout, fields)
            if timescale == 0:
                break
            return float(duration) / float(timescale)
        break
    raise PermanentJobError("MP4 without a readable movie header (moov/mvhd)",
                            error_code="corrupt_media")


def example_handler(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Real work on the uploaded file: its SHA-256 and size, and for an MP4 its
    duration from the container header."""
    path = ctx.download()
    ctx.heartbeat(stage="downloaded", progress=0.3)
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    ctx.heartbeat(stage="hashed", progress=0.7)
    result: dict[str, Any] = {"sha256": digest.hexdigest(), "size": size}
    if job.content_type in MP4_TYPES:
        with path.open("rb") as stream:
            result["duration_seconds"] = round(mp4_duration(stream), 3)
    return result


# -- the scripted run -----------------------------------------------------------------------


class MovableClock:
    """The system clock plus an offset the demo moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def _write_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    contents = {
        "beach.mp4": minimal_mp4(12.5, media_bytes=64 * 1024),
        "interview.mp4": minimal_mp4(754.25, timescale=600, media_bytes=16 * 1024),
        "forgotten.mp4": minimal_mp4(3.0),
        "notes.mp4": b"Meeting notes, saved with the wrong extension.\n",
        "empty.mp4": b"",
        "notes.txt": b"Plain text is not allowed by the upload policy.\n",
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


class DemoRun:
    """One run of the demo, printing what happens to ``out``."""

    def __init__(self, directory: Path, out: TextIO) -> None:
        self.directory = directory
        self.out = out
        self.clock = MovableClock()
        self.flow: JobFlow = open_flow(StoreSettings(workdir=directory), UploadPolicy(),
                                       clock=self.clock)
        self.names: dict[str, str] = {}  # job id -> file name

    def say(self, line: str = "") -> None:
        print(line, file=self.out)

    def run(self) -> None:
        files = _write_files(self.directory / "files")
        self.say(f"jobflow demo in {self.directory}")
        self.say("  jobs: SQLite jobflow.sqlite3 · objects: folder jobflow-objects/")
        self.say()
        self.say("1. Clients upload through their tickets, then call complete_upload")
        for name in ("beach.mp4", "interview.mp4", "notes.mp4", "empty.mp4"):
            self._upload(name, files[name], complete=True)
        self._upload("forgotten.mp4", files["forgotten.mp4"], complete=False)
        self._upload("never.mp4", None, complete=False)
        self._upload("notes.txt", files["notes.txt"], complete=True, content_type="text/plain")
        self.say()
        self.say("2. A worker runs the example handler on every verified job")
        self._work()
        self.say()
        self.say("3. Two hours later, reconcile settles the uploads nobody completed")
        self.clock.offset = timedelta(hours=2)
        report = self.flow.reconcile()
        for job_id in report.adopted:
            self.say(f"   {self.names[job_id]:<14} adopted: the store shows a valid object, "
                     "so it is queued")
        for job_id in report.expired:
            self.say(f"   {self.names[job_id]:<14} expired: no object before the deadline")
        self._work()
        self.say()
        self.say("4. jobflow status")
        status = StatusReport.collect(self.flow, stuck_after=timedelta(minutes=60),
                                      failure_window=timedelta(minutes=180))
        for line in status.lines():
            self.say(f"   {line}" if line else "")
        self.say()
        shown = next(job_id for job_id, name in self.names.items() if name == "beach.mp4")
        self.say(f"5. jobflow show {shown}   (beach.mp4: its history)")
        for line in history_lines(self.flow.history(shown), indent="   "):
            self.say(line)
        self.say()
        self.say(f"Look around: cd {shlex.quote(str(self.directory.resolve()))} && "
                 f"{_shell_command()} status")
        self.say(f"Or in a browser: cd {shlex.quote(str(self.directory.resolve()))} && "
                 f"{_shell_command()} dashboard")

    def _upload(self, name: str, path: Path | None, *, complete: bool,
                content_type: str = "video/mp4") -> None:
        try:
            ticket = self.flow.initiate_upload("demo-client", {"file": name},
                                               content_type=content_type)
        except ContentTypeNotAllowed as exc:
            self.say(f"   {name:<14} refused before any job exists: {exc}")
            return
        self.names[ticket.job_id] = name
        label = f"   {name:<14} job {ticket.job_id[:8]}"
        if path is None:
            self.say(f"{label}  awaiting_upload  (this client never uploads)")
            return
        send_file(ticket, path)
        size = f"{path.stat().st_size} bytes"
        if not complete:
            self.say(f"{label}  awaiting_upload  ({size} uploaded; complete_upload "
                     "never called)")
            return
        try:
            job = self.flow.complete_upload(ticket.job_id)
        except UploadError as exc:
            reason = exc.reason if isinstance(exc, UploadRejected) else str(exc)
            self.say(f"{label}  failed           ({size}: upload rejected, {reason})")
            return
        self.say(f"{label}  {job.status.value:<16} ({size}, verified by the object store)")

    def _work(self) -> None:
        worker = Worker(self.flow, example_handler, concurrency=2, poll_interval=0.05,
                        wakeup=PollingWakeup(), worker_id="demo-worker")
        before = {job_id: self.flow.get(job_id).status for job_id in self.names}
        worker.run(until_idle=True)
        for job_id, name in self.names.items():
            job = self.flow.get(job_id)
            if before[job_id] is job.status or job.status not in (JobStatus.DONE,
                                                                  JobStatus.FAILED):
                continue
            self.say(f"   {name:<14} {job.status.value:<6} {_outcome(job)}")


def _outcome(job: Job) -> str:
    if job.status is JobStatus.FAILED:
        return f"{job.error_code}: {job.error_message}"
    result = job.result or {}
    text = f"sha256 {str(result.get('sha256', ''))[:12]}…  {result.get('size')} bytes"
    if "duration_seconds" in result:
        text += f"  {result['duration_seconds']:g} s of video"
    return text


def run_demo(directory: Path | None, out: TextIO,
             make_dir: Callable[[], str] = lambda: tempfile.mkdtemp(prefix="jobflow-demo-")
             ) -> Path:
    """Run the demo in ``directory`` (default: a new temporary folder); return the folder."""
    folder = Path(directory) if directory is not None else Path(make_dir())
    folder.mkdir(parents=True, exist_ok=True)
    DemoRun(folder.resolve(), out).run()
    return folder
