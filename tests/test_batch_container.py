"""The bootstrap as an AWS Batch job: the job definition's `bash -c SCRIPT` (batch_job_script),
with the job's container environment (batch_environment), AWS_BATCH_JOB_ID and
AWS_BATCH_JOB_ATTEMPT, against the moto server, with a recording `shutdown` on PATH.

In a container nothing may shut down (no watchdog, no final `shutdown -h now`): the job ends
when the script exits, with its status, so Batch marks a failed worker FAILED.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from support import (
    REPO,
    ShutdownStub,
    bare_path,
    publish_software,
    python_path,
    s3_event,
    s3_record,
    target_venv_bin,
)

import lambda_function as lf

DATA = "awsfun-batch-data"
SOFTWARE = "awsfun-batch-software"
JOB_ID = "7f1c2a9e-0b3d-4c6e-9f10-5a6b7c8d9e0f"
TEMPLATE = (REPO / "bootstrap" / "bootstrap.sh").read_text(encoding="utf-8")
LAUNCHER = (REPO / "bootstrap" / "launcher.py").read_text(encoding="utf-8")
CSV = b"a,b\n1,2\n"


@pytest.fixture
def s3(local_aws):
    client = boto3.client("s3")
    for bucket in (DATA, SOFTWARE):
        client.create_bucket(Bucket=bucket)
    publish_software(client, SOFTWARE)
    return client


def job_environment(key, etag):
    """The container environment Batch gives the job: SubmitJob's overrides plus its own."""
    [obj], _ = lf.parse_records(s3_event(s3_record(DATA, key, etag=etag)))
    settings = lf.load_settings({"AWS_REGION": "us-east-1", "SOFTWARE_BUCKET": SOFTWARE,
                                 "ENGINE": "batch", "JOB_QUEUE": "q", "JOB_DEFINITION": "d"})
    env = {item["name"]: item["value"] for item in lf.batch_environment(obj, settings)}
    return dict(env, AWS_BATCH_JOB_ID=JOB_ID, AWS_BATCH_JOB_ATTEMPT="1")


def start_job(s3, key, body, tmp_path, path=None, **popen):
    """Put `body` at `key` (None: leave it out) and start its job as Batch would."""
    etag = "0" * 32
    if body is not None:
        etag = s3.put_object(Bucket=DATA, Key=key, Body=body)["ETag"].strip('"')
    stub = ShutdownStub(tmp_path / "stub")
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(scratch), PATH=f"{stub.bin}:{path or python_path()}",
               **job_environment(key, etag))
    script = lf.batch_job_script(TEMPLATE, LAUNCHER)
    # As the job definition's command: the script is an argument, never a file.
    process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    return process, stub


def run_job(s3, key, body, tmp_path, path=None):
    process, stub = start_job(s3, key, body, tmp_path, path)
    output, _ = process.communicate(timeout=120)
    return process.returncode, output.decode("utf-8", "replace"), stub


def report(s3, key, suffix):
    return json.loads(s3.get_object(Bucket=DATA, Key=lf.report_key(key, suffix))["Body"].read())


def log_of(s3, key):
    return s3.get_object(Bucket=DATA, Key=lf.report_key(key, ".log"))["Body"].read().decode()


def test_a_good_object_reports_exits_zero_and_shuts_nothing_down(s3, tmp_path):
    key = "inbox/batch ü $(x).csv"
    status, output, stub = run_job(s3, key, CSV, tmp_path)
    assert status == 0, output[-3000:]
    assert report(s3, key, ".json")["input"]["key"] == key
    assert stub.calls() == []
    log = log_of(s3, key)
    assert "the job ends" in log and "shutting down" not in log and key in log


def test_a_worker_failure_reports_and_fails_the_job_without_a_shutdown(s3, tmp_path):
    """An empty input: the worker writes its error report and exits 5, so the job FAILS."""
    key = "inbox/empty.csv"
    status, output, stub = run_job(s3, key, b"", tmp_path)
    assert status == 5, output[-3000:]
    error = report(s3, key, ".error.json")
    assert error["input"]["key"] == key and error["stage"] == "analyse"
    assert stub.calls() == [] and "shutting down" not in output


def test_a_crashed_worker_leaves_the_launchers_report_naming_the_job(s3, tmp_path):
    """The worker dies before reporting: the launcher's report names the Batch job and its
    attempt as instance_id (no instance metadata asked)."""
    key = "inbox/crash.csv"
    s3.put_object(Bucket=SOFTWARE, Key="AwsS3.py", Body=b"raise SystemError('stand-in')\n")
    status, output, stub = run_job(s3, key, CSV, tmp_path)
    assert status == 1, output[-3000:]
    error = report(s3, key, ".error.json")
    assert (error["written_by"], error["stage"]) == ("bootstrap", "worker")
    assert error["instance_id"] == f"{JOB_ID}#1"
    assert stub.calls() == []


def test_no_python_still_leaves_an_error_report_by_the_aws_cli(s3, tmp_path):
    """A crash before the worker (no python3 in the image): the shell's own report, by the AWS
    CLI, names the job; the job fails with 127 and nothing shuts down."""
    key = "inbox/no-python.csv"
    no_python = bare_path(tmp_path / "bare-bin", extra=[str(target_venv_bin() / "aws")])
    status, output, stub = run_job(s3, key, CSV, tmp_path, path=no_python)
    assert status == 127, output[-3000:]
    error = report(s3, key, ".error.json")
    assert (error["written_by"], error["stage"]) == ("bootstrap", "start")
    assert error["instance_id"] == f"{JOB_ID}#1"
    assert stub.calls() == []


def test_a_killed_launcher_is_reported_by_boto3_without_the_aws_cli(s3, tmp_path):
    """The job's image (deploy's Dockerfile) has python3 and boto3 but no AWS CLI: when the
    launcher itself dies (here its worker SIGKILLs it, as the OOM killer could), the shell's
    own error report and the log still reach S3, through boto3."""
    key = "inbox/killed launcher.csv"
    s3.put_object(Bucket=SOFTWARE, Key="AwsS3.py",
                  Body=b"import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    image = bare_path(tmp_path / "image-bin")
    python3 = Path(image) / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    status, output, stub = run_job(s3, key, CSV, tmp_path, path=image)
    assert status == 137, output[-3000:]
    error = report(s3, key, ".error.json")
    assert (error["written_by"], error["stage"], error["exit_code"]) == ("bootstrap", "worker",
                                                                         137)
    assert error["instance_id"] == f"{JOB_ID}#1" and "killed launcher" in log_of(s3, key)
    assert stub.calls() == []


def test_undecodable_fields_fail_the_job_without_a_shutdown(s3, tmp_path, monkeypatch):
    """Fields that name no object leave nothing to report on: the job fails (status 2), says
    why in its output, and nothing shuts down."""
    monkeypatch.setattr(lf, "batch_environment", lambda obj, settings: [
        {"name": "JOB_FIELDS_B64", "value": "bm90IGEgam9i"},  # "not a job": no NULs
        {"name": "JOB_WATCHDOG_MINUTES", "value": "5"},
        {"name": "JOB_TIMEOUT_SECONDS", "value": "60"}])
    status, output, stub = run_job(s3, "inbox/x.csv", CSV, tmp_path)
    assert status == 2 and "did not decode" in output, output[-3000:]
    assert s3.list_objects_v2(Bucket=DATA, Prefix="analysis/").get("KeyCount") == 0
    assert stub.calls() == []


def test_fields_of_another_version_still_leave_an_error_report(s3, tmp_path, monkeypatch):
    """A job from a handler with one field more (another version) still names its object:
    the bootstrap's error report and the log say it did not decode; the job fails (2)."""
    real = lf.job_fields_b64
    monkeypatch.setattr(lf, "job_fields_b64", lambda fields: base64.b64encode(
        base64.b64decode(real(fields)) + b"a field of a newer version\0").decode())
    key = "inbox/newer ü.csv"
    status, output, stub = run_job(s3, key, CSV, tmp_path)
    assert status == 2, output[-3000:]
    error = report(s3, key, ".error.json")
    assert (error["written_by"], error["stage"], error["input"]["key"]) == (
        "bootstrap", "bootstrap", key)
    assert "did not decode" in log_of(s3, key) and stub.calls() == []


def test_a_stopped_job_reports_that_the_job_was_stopped(s3, tmp_path):
    """Batch stops a job (its timeout, TerminateJob) with SIGTERM to the container's first
    process only (bash here), then SIGKILL: the shell must pass it on at once, so the launcher
    stops the worker and reports; no message speaks of a machine shutting down."""
    key = "inbox/stopped.csv"
    s3.put_object(Bucket=SOFTWARE, Key="AwsS3.py",
                  Body=b"import time\nprint('worker started', flush=True)\ntime.sleep(60)\n")
    process, stub = start_job(s3, key, CSV, tmp_path)
    deadline = time.monotonic() + 30
    # The launcher writes the worker into its WORK_DIR just before running it.
    while not any((tmp_path / "scratch").glob("*/AwsS3.py")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    output, _ = process.communicate(timeout=90)
    text = output.decode("utf-8", "replace")
    # Well inside the 30 s before the SIGKILL (ECS_CONTAINER_STOP_TIMEOUT's default): the
    # shell passes SIGTERM on to the launcher, instead of waiting for the 60 s worker.
    assert time.monotonic() - stopped < 20, text[-3000:]
    assert process.returncode == 143, text[-3000:]
    error = report(s3, key, ".error.json")
    assert "Batch job was stopped" in error["error"] and "shutting down" not in text, error
    assert error["exit_code"] == 143 and error["instance_id"] == f"{JOB_ID}#1"
    assert stub.calls() == []


def test_a_job_runs_on_the_target_python(s3, tmp_path):
    """The launcher and worker under Amazon Linux 2023's python3 (3.9, boto3 1.28)."""
    key = "inbox/target ü.csv"
    status, output, stub = run_job(s3, key, CSV, tmp_path,
                                   path=f"{target_venv_bin()}:{os.environ['PATH']}")
    assert status == 0, output[-3000:]
    assert report(s3, key, ".json")["input"]["key"] == key
    assert stub.calls() == []
