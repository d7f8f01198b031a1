"""The ``jobflow`` job commands as a subprocess: short job id prefixes, ``--param``
values read as JSON, the ``jobs`` listing, the options each command shows, and
the exit codes of bad configuration."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from jobflow import JobFlow, UploadPolicy
from jobflow.demo import minimal_mp4
from tests.e2e.conftest import Deployment
from tests.e2e.test_cli import ACCESS_KEY, SECRET_KEY, one_error_line

#: Job ids that share prefixes: two start with abcd1234, one with abcd9.
TWIN_A = "abcd1234-0000-4000-8000-00000000000a"
TWIN_B = "abcd1234-0000-4000-8000-00000000000b"
LONER = "abcd9999-0000-4000-8000-000000000000"


def _flow_with_ids(deployment: Deployment, ids: list[str]) -> JobFlow:
    base = deployment.flow()
    return JobFlow(store=base.store, objects=base.objects, policy=UploadPolicy(),
                   new_job_id=iter(ids).__next__)


def _queue(flow: JobFlow, owner: str = "e2e-owner") -> str:
    ticket = flow.initiate_upload(owner, {}, content_type="video/mp4")
    flow.objects.put(ticket.key, b"\x00\x00\x00\x18ftypmp42 video", content_type="video/mp4")
    flow.complete_upload(ticket.job_id)
    return ticket.job_id


def _empty_env(deployment: Deployment) -> dict[str, str]:
    return {name: "" for name in deployment.env if name.startswith("JOBFLOW_")}


# -- 1. short job id prefixes ----------------------------------------------------------------


def test_job_commands_accept_a_unique_id_prefix(deployment: Deployment) -> None:
    flow = _flow_with_ids(deployment, [TWIN_A, TWIN_B, LONER])
    for _ in range(3):
        _queue(flow)

    for prefix in ("abcd9", "ABCD9999", "abcd9999-00", LONER):
        shown = deployment.cli("show", prefix, "--json")
        assert shown.returncode == 0, (prefix, shown.stderr)
        assert json.loads(shown.stdout)["job"]["id"] == LONER
    assert deployment.cli("show", TWIN_A.replace("-", "")).returncode == 0

    cancelled = deployment.cli("cancel", "abcd9")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {LONER}: queued -> failed (cancelled)"
    requeued = deployment.cli("requeue", "abcd99", "--json")
    assert requeued.returncode == 0, requeued.stderr
    assert json.loads(requeued.stdout)["status"] == "queued"


def test_ambiguous_malformed_and_unknown_ids(deployment: Deployment) -> None:
    flow = _flow_with_ids(deployment, [TWIN_A, TWIN_B])
    _queue(flow)
    _queue(flow)

    for command in ("show", "cancel", "requeue"):
        ambiguous = deployment.cli(command, "abcd1234")
        assert ambiguous.returncode == 2, (command, ambiguous.stderr)
        line = one_error_line(ambiguous.stderr)
        assert "ambiguous" in line and TWIN_A in line and TWIN_B in line

        for malformed in ("not-a-job", "abc", "12345678-zzzz", "x" * 100):
            bad = deployment.cli(command, malformed)
            assert bad.returncode == 2, (command, malformed, bad.stderr)
            assert "is not a job id" in bad.stderr and "Traceback" not in bad.stderr

        for unknown in ("6d1c7a56-3f9f-4a39-9a0e-4a7b3c1b2d5e", "ffff"):
            missing = deployment.cli(command, unknown)
            assert missing.returncode == 3, (command, unknown, missing.stderr)
            assert "not found" in one_error_line(missing.stderr) or "no job id starts" in (
                missing.stderr)
    assert deployment.flow().get(TWIN_A).status.value == "queued"  # nothing was cancelled


# -- 2. --param values as JSON -----------------------------------------------------------------


def test_param_values_are_json_when_they_are_json(sqlite_deployment: Deployment,
                                                  tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(1.0))
    uploaded = sqlite_deployment.cli(
        "upload", str(clip), "--json", "--param", "sample_fps=10", "--param", "flag=true",
        "--param", 'tags=["a"]', "--param", "title=holiday", "--param", "ratio=0.5",
        "--param", "nothing=null", "--param", "odd=NaN", "--param-str", "code=007",
        "--param-str", "quoted=true")
    assert uploaded.returncode == 0, uploaded.stderr
    job_id = json.loads(uploaded.stdout)["id"]
    shown = sqlite_deployment.cli("show", job_id[:8], "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["job"]["params"] == {
        "sample_fps": 10, "flag": True, "tags": ["a"], "title": "holiday", "ratio": 0.5,
        "nothing": None, "odd": "NaN", "code": "007", "quoted": "true"}

    by_env = sqlite_deployment.cli("upload", str(clip), "--json",
                                   env={"JOBFLOW_PARAMS": "n=3 s=x",
                                        "JOBFLOW_PARAMS_STR": "n2=3"})
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["params"] == {"n": 3, "s": "x", "n2": "3"}

    bad = sqlite_deployment.cli("upload", str(clip), "--param-str", "novalue")
    assert bad.returncode == 2 and "expected KEY=VALUE" in bad.stderr


# -- 3. jobflow jobs ---------------------------------------------------------------------------


@pytest.fixture
def listed(deployment: Deployment) -> Iterator[tuple[Deployment, list[str]]]:
    """Five jobs: three queued of alice, one cancelled of bob, one awaiting_upload."""
    flow = deployment.flow()
    ids = [_queue(flow, "alice") for _ in range(3)]
    cancelled = _queue(flow, "bob")
    flow.cancel(cancelled)
    waiting = flow.initiate_upload("carol", content_type="video/mp4").job_id
    yield deployment, [*ids, cancelled, waiting]


def _listed_ids(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    return [job["id"] for job in document["jobs"]]


def test_jobs_lists_with_filters(listed: tuple[Deployment, list[str]]) -> None:
    deployment, ids = listed
    every = deployment.cli("jobs", "--json")
    assert every.returncode == 0, every.stderr
    document = json.loads(every.stdout)
    assert [job["id"] for job in document["jobs"]] == ids  # oldest first
    assert document["next_after"] is None
    assert set(document["jobs"][0]) >= {"id", "status", "owner_id", "created_at", "attempts",
                                        "error_code"}

    assert _listed_ids(deployment.cli("jobs", "--json", "--owner", "alice")) == ids[:3]
    assert _listed_ids(deployment.cli("jobs", "--json", "--status", "failed",
                                      "--status", "awaiting_upload")) == ids[3:]
    assert _listed_ids(deployment.cli("jobs", "--json", "--error-code", "cancelled")) == [
        ids[3]]
    assert _listed_ids(deployment.cli("jobs", "--json", "--newer-than", "1h")) == ids
    assert _listed_ids(deployment.cli("jobs", "--json", "--older-than", "3600")) == []
    assert _listed_ids(deployment.cli("jobs", "--json", "--older-than", "0s",
                                      env={"JOBFLOW_JOBS_OWNER": "bob"})) == [ids[3]]

    text = deployment.cli("jobs", "--status", "failed")
    assert text.returncode == 0, text.stderr
    header, row = text.stdout.splitlines()
    assert header.split() == ["job", "status", "owner", "created", "attempts", "error_code"]
    assert row.startswith(ids[3][:8] + "  failed  bob") and row.endswith("cancelled")

    for bad in (["--status", "lost"], ["--older-than", "soon"], ["--limit", "0"],
                ["--after", "zz"]):
        refused = deployment.cli("jobs", *bad)
        assert refused.returncode == 2, (bad, refused.stderr)
        assert "Traceback" not in refused.stderr


def test_jobs_pages_with_after(listed: tuple[Deployment, list[str]]) -> None:
    deployment, ids = listed
    seen: list[str] = []
    after: list[str] = []
    while True:
        page = deployment.cli("jobs", "--json", "--limit", "2", *after)
        assert page.returncode == 0, page.stderr
        document = json.loads(page.stdout)
        seen += [job["id"] for job in document["jobs"]]
        if document["next_after"] is None:
            break
        after = ["--after", document["next_after"][:8]]  # a prefix is enough
    assert seen == ids
    text = deployment.cli("jobs", "--limit", "2")
    assert text.stdout.splitlines()[-1] == f"more: jobflow jobs --after {ids[1]} (same filters)"
    unknown = deployment.cli("jobs", "--after", "6d1c7a56-3f9f-4a39-9a0e-4a7b3c1b2d5e")
    assert unknown.returncode == 3


def test_jobs_creates_nothing_in_an_empty_folder(sqlite_deployment: Deployment,
                                                 tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    result = sqlite_deployment.cli("jobs", cwd=empty, env=_empty_env(sqlite_deployment))
    assert result.returncode == 2, result.stderr
    assert "no jobflow database at" in one_error_line(result.stderr)
    assert list(empty.iterdir()) == []


# -- 4. each command shows the options that matter to it ---------------------------------------


def test_commands_that_only_look_or_cancel_show_no_upload_policy(
        sqlite_deployment: Deployment) -> None:
    policy = ("--min-bytes", "--max-bytes", "--content-types", "--backoff", "--upload-ttl",
              "--max-attempts", "--adopt-after", "--s3-upload-method")
    for command in ("show", "jobs", "status", "cancel", "purge"):
        shown = sqlite_deployment.cli(command, "--help")
        assert shown.returncode == 0, shown.stderr
        assert "--database-url" in shown.stdout and "--s3-bucket" in shown.stdout
        for option in policy:
            assert option not in shown.stdout, (command, option)
    for command in ("upload", "worker", "reconcile", "requeue"):
        assert "--min-bytes" in sqlite_deployment.cli(command, "--help").stdout
    # A policy variable a deployment sets does not trouble the commands that ignore it.
    job_id = sqlite_deployment.queue_job()
    assert sqlite_deployment.cli("show", job_id, env={"JOBFLOW_MIN_BYTES": "5"}
                                 ).returncode == 0


# -- 5. exit codes of bad configuration --------------------------------------------------------


def test_a_sqlite_file_in_a_missing_folder_is_configuration(sqlite_deployment: Deployment,
                                                            tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(1.0))
    url = "sqlite:////nonexistent/dir/x.sqlite3"
    for args in (["status"], ["worker", "--handler", "tests.e2e.handlers:record", "--burst"],
                 ["db", "upgrade"], ["db", "current"], ["upload", str(clip)], ["jobs"],
                 ["reconcile"], ["show", "abcd"]):
        result = sqlite_deployment.cli(*args, env={"JOBFLOW_DATABASE_URL": url})
        assert result.returncode == 2, (args, result.stderr)
        assert "does not exist" in one_error_line(result.stderr), args


def test_bad_option_values_are_one_line_and_exit_2(sqlite_deployment: Deployment) -> None:
    worker = ["worker", "--handler", "tests.e2e.handlers:record", "--burst"]
    for args, env in (
            ([*worker, "--lease-seconds", "1e12"], {}),
            ([*worker, "--lease-seconds", "nan"], {}),
            ([*worker, "--poll-interval", "inf"], {}),
            ([*worker, "--heartbeat-interval", "1e300"], {}),
            ([*worker, "--concurrency", "0"], {}),
            ([*worker, "--concurrency", "abc"], {}),
            ([*worker, "--concurrency", "5000"], {}),
            (worker, {"JOBFLOW_SHUTDOWN_GRACE": "-1"}),
            (["status"], {"JOBFLOW_DATABASE_URL": "garbage"}),
            (worker, {"JOBFLOW_DATABASE_URL": "garbage"}),
            (["db", "upgrade"], {"JOBFLOW_DATABASE_URL": "garbage"}),
            (["status", "--stuck-after", "inf"], {}),
    ):
        result = sqlite_deployment.cli(*args, env=env)
        assert result.returncode == 2, (args, env, result.stderr)
        assert "Traceback" not in result.stderr, (args, env)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert lines and (lines[-1].startswith(("jobflow: error: ", "Error: "))), lines


@pytest.fixture
def s3_missing_bucket(moto_endpoint: str, tmp_path: Path) -> dict[str, str]:
    """A deployment's S3 settings whose bucket was never created."""
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                 aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
                 ).list_buckets()  # the server answers
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "JOBFLOW_S3_BUCKET": "e2e-never-created", "JOBFLOW_S3_ENDPOINT_URL": moto_endpoint,
            "JOBFLOW_S3_REGION": "us-east-1"}


def test_an_upload_to_a_missing_bucket_is_configuration(sqlite_deployment: Deployment,
                                                        s3_missing_bucket: dict[str, str],
                                                        tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(1.0))
    result = sqlite_deployment.cli("upload", str(clip), env=s3_missing_bucket)
    assert result.returncode == 2, result.stderr
    line = one_error_line(result.stderr)
    assert "e2e-never-created" in line and "does not exist" in line
    assert SECRET_KEY not in result.stderr and "Signature" not in line
