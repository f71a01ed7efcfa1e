"""The worker on its real target: Amazon Linux 2023's python3 (3.9) with its boto3 1.28.0 and
botocore 1.31.0, as .venv-target holds them (made by `python3 tests/target_python.py`).

Without that venv these tests fail, naming the command that makes it: they never skip.
"""

import json
import os
import subprocess

import pytest

from support import (REPO, RecordingEc2, ShutdownStub, publish_software, run_user_data, s3_event,
                     s3_record, target_venv_bin)

#: The worker's own tests, whole: every test that runs AwsS3.py in-process.
# The report agrees with the peers on the target's Python too; the 3-million-row table runs
# once, under the suite's own Python (its bounded-memory twin is in test_analysis).
WORKER_TESTS = ("tests/test_worker.py", "tests/test_analysis.py", "tests/test_peer_agreement.py",
                "--deselect",
                "tests/test_peer_agreement.py::test_report_agrees_with_the_peer[csv/unclosed_quote.csv.gz]")
DATA = "awsfun-data"
SOFTWARE = "awsfun-software"


@pytest.mark.long_running
def test_the_worker_tests_pass_on_the_target_python():
    python = target_venv_bin() / "python"
    # A clean environment for the inner run: no PYTEST_* of this one, no endpoint, no profile.
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "AWS_"))}
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-o", "addopts=",  # one process: pytest-xdist is not in the target
                           *WORKER_TESTS], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert " passed" in output.splitlines()[-1] and "skipped" not in output.splitlines()[-1], \
        output[-2000:]


def test_a_job_runs_end_to_end_on_the_target_python(local_aws, tmp_path, monkeypatch):
    """handler -> user-data -> bash with the target venv first on PATH -> worker -> S3."""
    import boto3
    import lambda_function as lf

    monkeypatch.setenv("SOFTWARE_BUCKET", SOFTWARE)
    s3 = boto3.client("s3")
    for bucket in (DATA, SOFTWARE):
        s3.create_bucket(Bucket=bucket)
    publish_software(s3, SOFTWARE)
    key = "inbox/target ü/calls.vcf"
    body = (REPO / "samples" / "calls.vcf").read_bytes()
    etag = s3.put_object(Bucket=DATA, Key=key, Body=body)["ETag"].strip('"')
    ec2 = RecordingEc2()
    monkeypatch.setitem(lf._clients, "ec2", ec2)
    result = lf.lambda_handler(s3_event(s3_record(DATA, key, etag=etag, size=len(body))), None)
    assert [entry["key"] for entry in result["launched"]] == [key]
    [request] = ec2.requests

    stub = ShutdownStub(tmp_path / "stub")
    path = os.pathsep.join([str(target_venv_bin()), os.environ["PATH"]])
    done = run_user_data(request["UserData"], tmp_path, stub, path=path, timeout=120)
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    assert done.returncode == 0, output[-4000:]
    report = json.loads(s3.get_object(Bucket=DATA, Key=f"analysis/{key}.json")["Body"].read())
    assert report["input"]["key"] == key and report["input"]["etag"] == etag
    assert report["format"] == "vcf" and report["summary"]["records"] > 0
    # The report names the interpreter and the packages that ran the worker.
    assert report["worker"]["python"].startswith("3.9."), report["worker"]
    assert (report["worker"]["boto3"], report["worker"]["botocore"]) == ("1.28.0", "1.31.0")
    log = s3.get_object(Bucket=DATA, Key=f"analysis/{key}.log")["Body"].read().decode("utf-8")
    assert "worker succeeded" in log and key in log
    assert stub.calls()[-1] == "-h now"


def test_the_target_venv_installs_with_uv_when_there_is_one(tmp_path):
    import target_python

    venv, requirements = tmp_path / "venv", tmp_path / "requirements.txt"
    with_uv = target_python.install_command(venv, requirements, "/ci/bin/uv")
    assert with_uv[:3] == ["/ci/bin/uv", "pip", "install"]
    # Compiled at install either way: Python may not cache bytecode (PYTHONDONTWRITEBYTECODE).
    assert "--compile-bytecode" in with_uv
    assert with_uv[with_uv.index("--python") + 1] == str(venv / "bin" / "python")
    assert with_uv[-2:] == ["-r", str(requirements)]
    with_pip = target_python.install_command(venv, requirements)
    assert with_pip[:4] == [str(venv / "bin" / "python"), "-m", "pip", "install"]
    assert with_pip[-2:] == ["-r", str(requirements)]
