"""The ``jobflow`` command's operations, as a subprocess: status, reconcile, show,
cancel, requeue, upload (local folder and moto's S3 server), demo, and its errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import click
import pytest

from jobflow import JobStatus, UploadPolicy
from jobflow.cli import cli
from jobflow.demo import minimal_mp4
from jobflow.models import Event
from tests.e2e.conftest import Deployment

SECRET_KEY = "e2e-secret-access-key-do-not-print"
ACCESS_KEY = "E2EACCESSKEYID"


def one_error_line(stderr: str) -> str:
    """The command's only stderr line, which must be an error line and no traceback."""
    lines = [line for line in stderr.splitlines() if not line.startswith("{")]  # logs are JSON
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("jobflow: error: ")
    return lines[0]


def test_status_thresholds_set_the_exit_code(deployment: Deployment) -> None:
    flow = deployment.flow()
    for _ in range(2):
        flow.initiate_upload("e2e-owner", content_type="video/mp4")  # never uploaded
    flow.cancel(deployment.queue_job())

    report = deployment.cli("status", "--json", "--stuck-after", "0")
    assert report.returncode == 0, report.stderr
    status = json.loads(report.stdout)
    assert status["counts"] == {"awaiting_upload": 2, "queued": 0, "quick_running": 0,
                                "done": 0, "failed": 1}
    assert status["stuck_uploads"]["count"] == 2
    assert status["recent_failures"]["by_error_code"] == {"cancelled": 1}
    assert status["alerts"] == []

    assert deployment.cli("status", "--stuck-after", "0", "--max-stuck", "2",
                          "--max-failed", "1").returncode == 0
    too_many_stuck = deployment.cli("status", "--stuck-after", "0", "--max-stuck", "1")
    assert too_many_stuck.returncode == 7
    assert "2 uploads stuck in awaiting_upload" in too_many_stuck.stderr
    assert deployment.cli("status", "--max-failed", "0").returncode == 7
    # Not yet stuck by the default hour: no alert.
    assert deployment.cli("status", "--max-stuck", "0").returncode == 0
    assert deployment.cli("status", env={"JOBFLOW_MAX_FAILED": "0"}).returncode == 7


def test_reconcile_expires_missing_uploads_and_adopts_only_verified_ones(
        deployment: Deployment) -> None:
    short_lived = deployment.flow(UploadPolicy(upload_ttl_seconds=0.2))
    flow = deployment.flow()
    never = short_lived.initiate_upload("e2e-owner", content_type="video/mp4").job_id
    still_uploading = flow.initiate_upload("e2e-owner", content_type="video/mp4").job_id
    forgotten = flow.initiate_upload("e2e-owner", content_type="video/mp4")
    flow.objects.put(forgotten.key, b"\x00\x00\x00\x18ftypmp42", content_type="video/mp4")
    broken = flow.initiate_upload("e2e-owner", content_type="video/mp4")
    flow.objects.put(broken.key, b"", content_type="video/mp4")
    time.sleep(0.3)  # past the short-lived job's upload deadline

    result = deployment.cli("reconcile", "--json", env={"JOBFLOW_ADOPT_AFTER": "0"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["adopted"] == [forgotten.job_id]
    assert report["expired"] == [never]
    assert report["rejected"] == [broken.job_id]

    assert flow.get(forgotten.job_id).status is JobStatus.QUEUED
    assert flow.get(never).error_code == "upload_expired"
    assert flow.get(broken.job_id).error_code == "upload_rejected"
    # No object, deadline ahead: never queued, still waiting for its client.
    assert flow.get(still_uploading).status is JobStatus.AWAITING_UPLOAD


def test_show_cancel_and_requeue_a_job(deployment: Deployment) -> None:
    job_id = deployment.queue_job({"title": "clip"})

    cancelled = deployment.cli("cancel", job_id)
    assert cancelled.returncode == 0
    assert cancelled.stdout.strip() == f"job {job_id}: queued -> failed (cancelled)"
    requeued = deployment.cli("requeue", job_id, "--json")
    assert requeued.returncode == 0
    assert json.loads(requeued.stdout)["status"] == "queued"

    shown = deployment.cli("show", job_id, "--json")
    assert shown.returncode == 0
    document = json.loads(shown.stdout)
    assert document["job"]["params"] == {"title": "clip"}
    assert "lease_token" not in document["job"]
    assert [row["event"] for row in document["history"]] == [
        "created", "verify_upload", "cancel", "requeue"]
    text = deployment.cli("show", job_id)
    assert text.returncode == 0 and "requeue" in text.stdout and "status           queued" in (
        text.stdout)


def test_errors_are_one_line_with_distinct_exit_codes(sqlite_deployment: Deployment,
                                                      tmp_path: Path) -> None:
    deployment = sqlite_deployment
    job_id = deployment.queue_job()
    deployment.flow().cancel(job_id)

    missing = deployment.cli("show", "6d1c7a56-3f9f-4a39-9a0e-4a7b3c1b2d5e")
    assert missing.returncode == 3
    assert "not found" in one_error_line(missing.stderr)

    refused = deployment.cli("cancel", job_id)
    assert refused.returncode == 4
    assert one_error_line(refused.stderr) == (
        f"jobflow: error: cannot cancel job {job_id} in failed")

    unreachable = deployment.cli("status", env={
        "JOBFLOW_DATABASE_URL": "postgresql://jobflow:hunter2@127.0.0.1:9/jobs"})
    assert unreachable.returncode == 5
    assert "hunter2" not in unreachable.stderr + unreachable.stdout
    one_error_line(unreachable.stderr)

    bad_url = deployment.cli("status", env={"JOBFLOW_DATABASE_URL": "mysql://x/y"})
    assert bad_url.returncode == 2
    assert "unsupported database" in one_error_line(bad_url.stderr)

    no_handler = deployment.cli("worker", "--handler", "tests.e2e.nowhere:handler")
    assert no_handler.returncode == 2
    assert "cannot import the handler module" in one_error_line(no_handler.stderr)

    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    wrong_type = deployment.cli("upload", str(text))
    assert wrong_type.returncode == 2
    assert "content type 'text/plain' is not allowed" in one_error_line(wrong_type.stderr)

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    rejected = deployment.cli("upload", str(empty))
    assert rejected.returncode == 6
    assert "the file is empty; no job was created" in one_error_line(rejected.stderr)

    usage = deployment.cli("status", "--max-stuck", "many")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr

    debug = deployment.cli("--debug", "cancel", job_id)
    assert debug.returncode == 4 and "Traceback" in debug.stderr


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_reads_a_jobflow_variable_shown_in_help(
        sqlite_deployment: Deployment) -> None:
    checked = 0
    for path, command in _commands(cli):
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            assert isinstance(param.envvar, str) and param.envvar.startswith("JOBFLOW_"), (
                path, param.name)
            assert param.show_envvar, (path, param.name)
            checked += 1
    assert checked > 40
    shown = sqlite_deployment.cli("worker", "--help")
    assert shown.returncode == 0
    help_text = " ".join(shown.stdout.split())
    for variable in ("JOBFLOW_HANDLER", "JOBFLOW_CONCURRENCY", "JOBFLOW_DATABASE_URL",
                     "JOBFLOW_S3_BUCKET", "JOBFLOW_SHUTDOWN_GRACE", "JOBFLOW_MAX_ATTEMPTS"):
        assert f"env var: {variable}" in help_text
    assert "Exit codes:" in sqlite_deployment.cli("--help").stdout


def test_upload_through_the_local_folder_and_process_it(sqlite_deployment: Deployment,
                                                        tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(2.5))
    uploaded = sqlite_deployment.cli("upload", str(clip), "--json", "--checksum",
                                     "--param", "title=holiday")
    assert uploaded.returncode == 0, uploaded.stderr
    job = json.loads(uploaded.stdout)
    assert (job["status"], job["params"], job["object_size"]) == (
        "queued", {"title": "holiday"}, clip.stat().st_size)
    flow = sqlite_deployment.flow()
    assert [row.event for row in flow.history(job["id"])] == [Event.CREATED,
                                                             Event.VERIFY_UPLOAD]


def test_demo_runs_in_an_empty_folder(sqlite_deployment: Deployment, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {name: "" for name in sqlite_deployment.env if name.startswith("JOBFLOW_")}
    demo = sqlite_deployment.cli("demo", "--dir", "run", cwd=empty, env=env)
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert "beach.mp4      done   sha256" in out and "12.5 s of video" in out
    assert "empty.mp4" in out and "upload rejected, object is empty" in out
    assert "never.mp4      expired" in out
    assert "forgotten.mp4  adopted" in out
    assert "notes.mp4      failed not_mp4" in out
    assert "refused before any job exists" in out
    assert "succeed" in out  # the history of one job is printed

    status = sqlite_deployment.cli("status", "--json", cwd=empty / "run", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["counts"] == {
        "awaiting_upload": 0, "queued": 0, "quick_running": 0, "done": 3, "failed": 3}

    # The command the demo suggests runs as printed, from a shell.
    [suggested] = [line.removeprefix("Look around: ") for line in out.splitlines()
                   if line.startswith("Look around: ")]
    looked = subprocess.run(suggested, shell=True, env={**sqlite_deployment.env, **env},
                            capture_output=True, text=True, timeout=120, check=False)
    assert looked.returncode == 0, (suggested, looked.stderr)
    assert "done             3" in looked.stdout


def test_commands_about_existing_jobs_create_no_database(sqlite_deployment: Deployment,
                                                         tmp_path: Path) -> None:
    """In a folder where nothing ran yet, status, show, reconcile, cancel,
    requeue, metrics and dashboard say there is no database (exit 2), db current and diagram only
    look, an upload the policy refuses is refused first: the folder stays empty."""
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    env = {name: "" for name in sqlite_deployment.env if name.startswith("JOBFLOW_")}
    job_id = "00000000-0000-4000-8000-000000000000"
    for args in (["status"], ["show", job_id], ["reconcile"], ["cancel", job_id],
                 ["requeue", job_id], ["requeue", "--error-code", "cancelled"],
                 ["purge", "--finished-before", "30d"], ["metrics", "--port", "0"],
                 ["dashboard", "--port", "0"]):
        result = sqlite_deployment.cli(*args, cwd=empty, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert "no jobflow database at" in one_error_line(result.stderr)
        assert str(empty / "jobflow.sqlite3") in result.stderr
    looked = sqlite_deployment.cli("db", "current", cwd=empty, env=env)
    assert looked.returncode == 0 and "no jobflow database at" in looked.stdout
    assert sqlite_deployment.cli("diagram", cwd=empty, env=env).returncode == 0
    # An upload the policy refuses is refused before anything is created.
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 100)
    for args, code, says in (
            (["upload", str(tmp_path / "notes.txt")], 2, "'text/plain' is not allowed"),
            (["upload", str(tmp_path / "clip.mp4"), "--max-bytes", "10"], 6,
             "the file is 100 bytes; the upload policy allows 1 to 10; no job was created")):
        refused = sqlite_deployment.cli(*args, cwd=empty, env=env)
        assert refused.returncode == code, (args, refused.stderr)
        assert says in one_error_line(refused.stderr)
    assert list(empty.iterdir()) == []


def test_looking_at_an_older_database_does_not_migrate_it(sqlite_deployment: Deployment,
                                                          tmp_path: Path) -> None:
    """status and show only look: a database at an older revision is reported
    (exit 2, run `jobflow db upgrade`), not migrated behind the operator's back."""
    folder = tmp_path / "older"
    folder.mkdir()
    env = {name: "" for name in sqlite_deployment.env if name.startswith("JOBFLOW_")}
    assert sqlite_deployment.cli("db", "upgrade", "--revision", "0001", cwd=folder,
                                 env=env).returncode == 0
    for args in (["status"], ["show", "00000000-0000-4000-8000-000000000000"]):
        result = sqlite_deployment.cli(*args, cwd=folder, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert "run `jobflow db upgrade`" in one_error_line(result.stderr)
    current = sqlite_deployment.cli("db", "current", cwd=folder, env=env)
    assert current.stdout.startswith("0001 "), current.stdout
    assert sorted(path.name for path in folder.iterdir()) == ["jobflow.sqlite3"]


# -- S3 over real HTTP (moto's server) -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def s3_env(moto_endpoint: str, tmp_path: Path) -> dict[str, str]:
    """The environment of a deployment on a fresh bucket of moto's server."""
    bucket = f"e2e-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
           "AWS_EC2_METADATA_DISABLED": "true",
           "JOBFLOW_S3_BUCKET": bucket, "JOBFLOW_S3_ENDPOINT_URL": moto_endpoint,
           "JOBFLOW_S3_REGION": "us-east-1"}
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                 aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
                 ).create_bucket(Bucket=bucket)
    return env


@pytest.mark.parametrize("method", ["PUT", "POST"])
def test_upload_to_s3_over_http_and_never_print_secrets(sqlite_deployment: Deployment,
                                                        s3_env: dict[str, str],
                                                        tmp_path: Path, method: str) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(4.0))
    uploaded = sqlite_deployment.cli("--log-level", "debug", "upload", str(clip), "--json",
                                     env={**s3_env, "JOBFLOW_S3_UPLOAD_METHOD": method})
    assert uploaded.returncode == 0, uploaded.stderr
    job = json.loads(uploaded.stdout)
    assert (job["status"], job["bucket"], job["object_size"]) == (
        "queued", s3_env["JOBFLOW_S3_BUCKET"], clip.stat().st_size)
    printed = uploaded.stdout + uploaded.stderr
    for secret in (SECRET_KEY, "X-Amz-Signature", "Signature=", "X-Amz-Credential"):
        assert secret not in printed
    stored = boto3.client("s3", endpoint_url=s3_env["JOBFLOW_S3_ENDPOINT_URL"],
                          region_name="us-east-1", aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY).get_object(
        Bucket=s3_env["JOBFLOW_S3_BUCKET"], Key=job["key"])
    assert stored["Body"].read() == clip.read_bytes()
    assert stored["ContentType"] == "video/mp4"


def test_an_upload_s3_cannot_reach_is_a_storage_error(sqlite_deployment: Deployment,
                                                      s3_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(minimal_mp4(1.0))
    unreachable = sqlite_deployment.cli(
        "upload", str(clip),
        env={**s3_env, "JOBFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}"})
    assert unreachable.returncode == 5
    line = one_error_line(unreachable.stderr)
    assert SECRET_KEY not in unreachable.stderr and "Signature" not in line


def test_python_dash_m_and_the_console_script_are_the_same_command(
        sqlite_deployment: Deployment) -> None:
    via_module = sqlite_deployment.cli("diagram")
    script = Path(sys.executable).with_name("jobflow")
    via_script = subprocess.run([str(script), "diagram"], capture_output=True, text=True,
                                env=sqlite_deployment.env, check=False, timeout=60)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    assert via_module.stdout.startswith("stateDiagram-v2\n")
    assert "quick_running --> queued: release" in via_module.stdout
