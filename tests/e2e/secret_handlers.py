"""A handler that fails while a local variable holds a secret, for the tests
that check a worker's log never shows it."""

from __future__ import annotations

from typing import Any

from jobflow import Job
from jobflow.worker import JobContext

#: Stands in for a payment provider's live key; no log line may contain it.
API_KEY = "sk_live_" + "51Hx0e2eN0tAR3alK3yButS3cr3t"
#: Parts of the failure's message that are secret too: a presigned URL's
#: signature and credential, and a database password.
SIGNATURE = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
ACCESS_KEY_ID = "AKIA" + "Q3EGRSTUVWXYZ234"
DB_PASSWORD = "c0rrect-h0rse"
UPLOAD_URL = ("https://uploads.s3.amazonaws.com/u/1?X-Amz-Algorithm=AWS4-HMAC-SHA256"
              f"&X-Amz-Credential={ACCESS_KEY_ID}%2F20300101%2Fus-east-1%2Fs3%2Faws4_request"
              f"&X-Amz-Signature={SIGNATURE}")
DATABASE_URL = f"postgresql://billing:{DB_PASSWORD}@db.internal/billing"


def charge(job: Job, ctx: JobContext) -> dict[str, Any]:
    """Fail the way a handler's own bug does, with a secret in a local variable."""
    api_key = API_KEY
    endpoint = UPLOAD_URL
    if api_key:
        raise RuntimeError(f"charge failed: fetching {endpoint} for {DATABASE_URL}")
    return {}
