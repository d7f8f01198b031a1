"""The video job's handler, run by the ``jobflow worker`` command::

    jobflow worker --handler examples.video_app.worker:analyse_video

It runs in the worker's process, never in the web app's: the web app only
creates and verifies jobs. It reads the MP4's duration from its container
header and lists the instants it would sample at the requested rate; a real
app would decode frames there.
"""

from __future__ import annotations

import math
from typing import Any

from jobflow import Job
from jobflow.demo import mp4_duration
from jobflow.worker import JobContext

#: The most frame instants a result lists (include_frames).
MAX_LISTED_FRAMES = 100


def analyse_video(job: Job, ctx: JobContext) -> dict[str, Any]:
    ctx.heartbeat(stage="downloading", progress=0.1)
    path = ctx.download()  # exactly the verified object, or ObjectChanged
    ctx.heartbeat(stage="reading the container", progress=0.4)
    with path.open("rb") as stream:
        duration = mp4_duration(stream)  # PermanentJobError when it is no MP4
    sample_fps = int(job.params.get("sample_fps", 10))
    frames = math.floor(duration * sample_fps)
    ctx.heartbeat(stage="sampling frames", progress=0.8)
    result: dict[str, Any] = {"duration_seconds": round(duration, 3),
                              "sample_fps": sample_fps, "frames_sampled": frames,
                              "bytes": path.stat().st_size}
    if job.params.get("include_frames"):
        result["frame_times"] = [round(i / sample_fps, 3)
                                 for i in range(min(frames, MAX_LISTED_FRAMES))]
    return result
