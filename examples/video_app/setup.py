"""Deployment set-up: the bucket, with the CORS rules a browser's upload needs.

Run once per environment (``python -m examples.video_app.setup``, with the
app's environment), as a deploy step would; the web app itself never creates
buckets. Browsers send presigned uploads straight to S3, a cross-origin
request: S3 answers the browser's preflight only if the bucket's CORS rules
allow the page's origin, the method and the headers jobflow signs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from botocore.exceptions import ClientError

from examples.video_app.settings import Settings
from jobflow.adapters.s3 import S3ObjectStore
from jobflow.config import open_object_store

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CORSRuleTypeDef


def cors_rules(origins: Sequence[str]) -> list[CORSRuleTypeDef]:
    """What a page on ``origins`` needs to PUT or POST a presigned upload."""
    return [{
        "AllowedOrigins": list(origins),
        "AllowedMethods": ["PUT", "POST"],
        "AllowedHeaders": ["content-type", "x-amz-checksum-sha256",
                           "x-amz-sdk-checksum-algorithm"],
        "ExposeHeaders": ["ETag"],
        "MaxAgeSeconds": 3600,
    }]


def prepare_bucket(objects: S3ObjectStore, origins: Sequence[str]) -> None:
    """Create the bucket if it does not exist, and set its CORS rules."""
    client = objects.client
    try:
        client.head_bucket(Bucket=objects.bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        region = client.meta.region_name
        if region in (None, "us-east-1"):
            client.create_bucket(Bucket=objects.bucket)
        else:
            client.create_bucket(Bucket=objects.bucket, CreateBucketConfiguration={
                "LocationConstraint": cast(Any, region)})
    client.put_bucket_cors(Bucket=objects.bucket,
                           CORSConfiguration={"CORSRules": cors_rules(origins)})


def main() -> None:
    settings = Settings.from_env()
    objects = open_object_store(settings.stores)
    if not isinstance(objects, S3ObjectStore):
        print("no JOBFLOW_S3_BUCKET: uploads go to a local folder, nothing to set up")
        return
    prepare_bucket(objects, settings.allowed_origins)
    print(f"bucket {objects.bucket} ready for uploads from {', '.join(settings.allowed_origins)}")


if __name__ == "__main__":
    main()
