"""End to end on the moto server: S3 → SQS event → lambda_handler → EC2 user-data → bash → worker.

The handler runs as it would when pasted into the Lambda console (nothing packaged beside it),
so it reads the published template from the software bucket. Each instance's user-data is read
back from EC2 and executed with bash, a recording `shutdown` first on PATH.
"""

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

import AwsS3
import lambda_function as lf
from support import (REPO, ShutdownStub, bare_path, find_aws_cli, publish_software, python_path,
                     receive_s3_records, run_user_data, s3_event, s3_record, target_venv_bin,
                     worker_image_id)

DATA = "awsfun-data"
SOFTWARE = "awsfun-software"
CSV = b"sample,reads,passed\nS1,100,yes\nS2,250,no\nS3,75,yes\n"
TEXT = b"".join(b"read %05d ACGTACGTTGCA\n" % i for i in range(5000))


class Cloud:
    """The moto-backed account: data and software buckets, queue, launch template."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.s3 = boto3.client("s3")
        self.ec2 = boto3.client("ec2")
        self.sqs = boto3.client("sqs")
        for bucket in (DATA, SOFTWARE):
            self.s3.create_bucket(Bucket=bucket)
        publish_software(self.s3, SOFTWARE)
        image = worker_image_id(boto3.client("ssm"))
        self.ec2.create_launch_template(
            LaunchTemplateName="su2cw_worker",
            LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro",
                                "InstanceInitiatedShutdownBehavior": "terminate"})
        self.queue = self.sqs.create_queue(QueueName="awsfun-events")["QueueUrl"]
        arn = self.sqs.get_queue_attributes(
            QueueUrl=self.queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        self.s3.put_bucket_notification_configuration(
            Bucket=DATA, NotificationConfiguration={"QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
        self.runs = 0

    def put(self, key, body):
        self.s3.put_object(Bucket=DATA, Key=key, Body=body)
        return self.head(key)["ETag"]

    def head(self, key):
        return self.s3.head_object(Bucket=DATA, Key=key)

    def get(self, key):
        return self.s3.get_object(Bucket=DATA, Key=key)["Body"].read()

    def report(self, key, suffix=".json"):
        return json.loads(self.get(AwsS3.report_key(key, suffix)))

    def keys(self):
        return sorted(o["Key"] for o in self.s3.list_objects_v2(Bucket=DATA).get("Contents", []))

    def events(self, count):
        return receive_s3_records(self.sqs, self.queue, count)

    def user_data(self, instance_id):
        value = self.ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
        return base64.b64decode(value).decode("utf-8")

    def tags(self, instance_id):
        [reservation] = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return {t["Key"]: t["Value"] for t in reservation["Instances"][0].get("Tags", [])}

    def launch(self, key, body):
        """Store an object, deliver its real S3 event to the handler; return the instance id."""
        self.put(key, body)
        [event] = self.events(1)
        result = lf.lambda_handler(event, None)
        [launched] = result["launched"]
        assert launched["key"] == key
        return launched["instance_id"]

    def run(self, instance_id, path=None, timeout=120):
        """Boot the instance: run its user-data with bash; return (process, shutdown stub)."""
        self.runs += 1
        workdir = self.workdir / f"instance-{self.runs}"
        stub = ShutdownStub(workdir / "stub")
        done = run_user_data(self.user_data(instance_id), workdir, stub,
                             path=path or python_path(), timeout=timeout)
        return done, stub


@pytest.fixture
def cloud(local_aws, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTWARE_BUCKET", SOFTWARE)
    # As pasted into the Lambda console: no template beside the handler, so it reads S3.
    console = tmp_path / "console"
    console.mkdir()
    monkeypatch.setattr(lf, "__file__", str(console / "lambda_function.py"))
    return Cloud(tmp_path)


def assert_shut_down(stub, watchdog=True):
    calls = stub.calls()
    assert calls and calls[-1] == "-h now", calls
    if watchdog:
        assert calls[0].startswith("-h +120 "), calls
        assert len(calls) == 2, calls


def assert_error_report(cloud, key, stage, *fragments, written_by=None):
    report = cloud.report(key, ".error.json")
    assert report["status"] == "error" and report["stage"] == stage
    assert report["input"]["bucket"] == DATA and report["input"]["key"] == key
    for fragment in fragments:
        assert fragment in report["error"], report
    if written_by:
        assert report["written_by"] == written_by
    assert AwsS3.report_key(key) not in cloud.keys()
    return report


# --- the happy path -------------------------------------------------------------------


def test_end_to_end(cloud, tmp_path):
    canary = tmp_path / "CANARY"
    weird = (f"inbox/we ird ü €/$(touch {canary}) `touch {canary}`; touch {canary} | x & y "
             f"> z '\"\\ *?.csv")
    objects = {"inbox/table.csv": CSV, "inbox/reads.txt.gz": gzip.compress(TEXT, mtime=0), weird: CSV}
    etags = {key: cloud.put(key, body) for key, body in objects.items()}

    events = cloud.events(len(objects))
    instances, first_event = {}, {}
    for event in events:
        result = lf.lambda_handler(event, None)
        assert result["skipped"] == []
        [launched] = result["launched"]
        assert launched["bucket"] == DATA
        instances[launched["key"]] = launched["instance_id"]
        first_event[launched["key"]] = event
    assert set(instances) == set(objects)

    for key, instance_id in instances.items():
        user_data = cloud.user_data(instance_id)
        assert key not in user_data and len(user_data.encode()) < 16 * 1024
        tags = cloud.tags(instance_id)
        assert tags["awsfun:bucket"] == DATA and tags["awsfun:key"] == lf.shorten_tag_value(key)

        done, stub = cloud.run(instance_id)
        assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
        report = cloud.report(key)
        stored = cloud.get(key)
        assert stored == objects[key]  # input untouched, byte for byte ...
        assert cloud.head(key)["ETag"] == etags[key]  # ... and the same version
        assert report["input"] == {**report["input"], "bucket": DATA, "key": key,
                                   "size": len(stored), "etag": etags[key].strip('"')}
        assert report["bytes"] == len(stored)
        assert report["sha256"] == hashlib.sha256(stored).hexdigest()
        assert isinstance(report["summary"], dict)
        log = cloud.get(AwsS3.report_key(key, ".log")).decode("utf-8")
        assert "worker succeeded" in log and key in log
        # The shell's lines carry UTC time as the launcher's do (bash's printf %(...)T).
        assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ awsfun-bootstrap: worker succeeded$",
                         log, re.MULTILINE)
        assert_shut_down(stub)

    assert cloud.report("inbox/table.csv")["format"] == "csv"
    assert cloud.report("inbox/table.csv")["lines"] == 4
    gz = cloud.report("inbox/reads.txt.gz")
    assert "gzip" in (gz["format"], gz.get("compression"))
    assert gz["lines"] == 5000  # lines of the content, not of the compressed bytes
    assert cloud.report(weird)["format"] == "csv"
    assert not canary.exists()

    # The worker's output (3 reports, 3 logs) raised S3 events too: none launches a worker.
    for event in cloud.events(6):
        result = lf.lambda_handler(event, None)
        assert result["launched"] == []
        assert all(entry["key"].startswith("analysis/") and "'analysis'" in entry["reason"]
                   for entry in result["skipped"])

    # A second delivery of the same event: same ClientToken; the re-run rewrites nothing.
    key = "inbox/table.csv"
    before = cloud.s3.head_object(Bucket=DATA, Key=AwsS3.report_key(key))
    result = lf.lambda_handler(first_event[key], None)
    [again] = result["launched"]
    assert cloud.tags(again["instance_id"])["awsfun:token"] == \
        cloud.tags(instances[key])["awsfun:token"]
    time.sleep(1.1)  # S3's LastModified has one-second resolution
    done, stub = cloud.run(again["instance_id"])
    assert done.returncode == 0, done.stderr
    after = cloud.s3.head_object(Bucket=DATA, Key=AwsS3.report_key(key))
    assert (after["LastModified"], after["ETag"]) == (before["LastModified"], before["ETag"])
    assert "already written" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)
    assert cloud.get(key) == CSV


def test_the_packaged_handler_launches_the_same_job(cloud, monkeypatch):
    """With bootstrap.sh beside the handler (a zip deployment) no S3 read is needed."""
    monkeypatch.setattr(lf, "__file__", str(REPO / "lambda_function.py"))
    lf._template_cache.clear()
    cloud.s3.delete_object(Bucket=SOFTWARE, Key="bootstrap/bootstrap.sh")
    instance_id = cloud.launch("inbox/zip.csv", CSV)
    done, stub = cloud.run(instance_id)
    assert done.returncode == 0, done.stderr
    assert cloud.report("inbox/zip.csv")["format"] == "csv"
    assert_shut_down(stub)


# --- failure paths: each leaves an error report, and the machine always shuts down ----------


def _corrupt_gzip():
    data = bytearray(gzip.compress(TEXT, mtime=0))
    data[200:260] = b"\xff" * 60
    return bytes(data)


@pytest.mark.parametrize("name, body, message", [
    ("corrupt.txt.gz", _corrupt_gzip(), "corrupt gzip"),
    ("truncated.txt.gz", gzip.compress(TEXT, mtime=0)[:-40], "truncated gzip"),
    ("empty.csv", b"", "empty"),
])
def test_bad_objects_leave_an_error_report(cloud, name, body, message):
    key = f"inbox/{name}"
    instance_id = cloud.launch(key, body)
    done, stub = cloud.run(instance_id)
    assert done.returncode == AwsS3.EXIT_FAILED_REPORTED
    assert_error_report(cloud, key, "analyse", message, written_by="worker")
    assert cloud.get(key) == body
    assert "worker failed and wrote its error report" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)


def test_object_deleted_before_the_worker_starts(cloud):
    key = "inbox/gone before boot.csv"
    instance_id = cloud.launch(key, CSV)
    cloud.s3.delete_object(Bucket=DATA, Key=key)
    done, stub = cloud.run(instance_id)
    assert done.returncode == AwsS3.EXIT_FAILED_REPORTED
    report = assert_error_report(cloud, key, "analyse", written_by="worker")
    assert report["error_code"] in ("404", "NoSuchKey", "NotFound")
    assert_shut_down(stub)


CURL_RECORDER = """#!/bin/sh
printf '%s\\n' "$*" >>"{calls}"
{action}
"""


@pytest.mark.parametrize("curl_works", [True, False], ids=["curl", "curl-fails"])
def test_log_goes_up_whole_by_curl_or_else_boto3(cloud, tmp_path, curl_works):
    """The launcher presigns the log's PUT, so curl uploads it without a third python3 start;
    should curl fail, boto3 does. Either way the log is whole and holds no signature."""
    key = "inbox/log upload ü [x] {y} &z.csv"
    instance_id = cloud.launch(key, CSV)
    tools, calls = tmp_path / "tools", tmp_path / "curl.calls"
    tools.mkdir()
    action = f'exec {shutil.which("curl")} "$@"' if curl_works else "exit 22"
    (tools / "curl").write_text(CURL_RECORDER.format(calls=calls, action=action))
    (tools / "curl").chmod(0o755)
    done, stub = cloud.run(instance_id, path=python_path(f"{tools}:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    [call] = calls.read_text().splitlines()
    assert call.startswith("--config ") and "X-Amz" not in call  # the URL stays out of argv
    log = cloud.get(AwsS3.report_key(key, ".log")).decode("utf-8")
    # The bootstrap's last line made it: the log went up after everything else was done.
    assert log.splitlines()[-1].endswith("finished with status 0; shutting down"), log
    assert key in log and "worker succeeded" in log and "X-Amz-Signature" not in log
    assert cloud.head(AwsS3.report_key(key, ".log"))["ContentType"] == "text/plain"
    console = done.stdout.decode() + done.stderr.decode()
    assert ("curl could not upload the log" in console) is not curl_works
    assert_shut_down(stub)


# A worker that logs a line, then waits (up to 8 s) for that line to reach analysis/KEY.log
# in S3 while it still runs; its status says whether it did (0) or not (9).
LIVE_LOG_WORKER = """import os, sys, time, boto3
print("stand-in worker: first line", flush=True)
bucket, _, key = sys.argv[-1][len("s3://"):].partition("/")
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
for _ in range(80):
    try:
        log = s3.get_object(Bucket=bucket, Key="analysis/" + key + ".log")["Body"].read()
    except s3.exceptions.NoSuchKey:
        log = b""
    if b"stand-in worker: first line" in log:
        print("stand-in worker: saw the live log", flush=True)
        sys.exit(0)
    time.sleep(0.1)
sys.exit(9)
"""


def test_a_running_job_s_log_reaches_s3_before_the_job_ends(cloud, monkeypatch):
    """The launcher uploads the log every AWSFUN_LOG_SECONDS (60 s; 0.5 here) while the worker
    runs, so `./deploy.sh logs KEY --follow` shows a long job; the shell's final upload still
    leaves the whole log."""
    monkeypatch.setenv("AWSFUN_LOG_SECONDS", "0.5")
    _publish_stand_in(cloud, LIVE_LOG_WORKER)
    key = "inbox/live log.csv"
    instance_id = cloud.launch(key, CSV)
    done, stub = cloud.run(instance_id, timeout=60)
    log = cloud.get(AwsS3.report_key(key, ".log")).decode("utf-8")
    assert done.returncode == 0, log
    assert "saw the live log" in log and "worker succeeded" in log
    assert log.splitlines()[-1].endswith("finished with status 0; shutting down")
    assert_shut_down(stub)


def test_worker_code_missing_from_the_software_bucket(cloud):
    key = "inbox/no worker.csv"
    instance_id = cloud.launch(key, CSV)
    cloud.s3.delete_object(Bucket=SOFTWARE, Key="AwsS3.py")
    done, stub = cloud.run(instance_id)
    assert done.returncode == 4  # the bootstrap's FETCH_FAILED, distinct from the worker's statuses
    report = assert_error_report(cloud, key, "fetch", f"s3://{SOFTWARE}/AwsS3.py",
                                 written_by="bootstrap")
    assert report["exit_code"] == 4
    assert "wrote error report for stage fetch" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)


def _publish_stand_in(cloud, code):
    cloud.s3.put_object(Bucket=SOFTWARE, Key="AwsS3.py", Body=code.encode())


def test_worker_hung_past_its_time_limit(cloud, monkeypatch):
    monkeypatch.setenv("WORKER_TIMEOUT_SECONDS", "2")
    _publish_stand_in(cloud, "import time\ntime.sleep(600)\n")
    key = "inbox/hangs.csv"
    instance_id = cloud.launch(key, CSV)
    started = time.monotonic()
    done, stub = cloud.run(instance_id, timeout=60)
    assert time.monotonic() - started < 30
    assert done.returncode == 124
    report = assert_error_report(cloud, key, "worker", "time limit", "2s", written_by="bootstrap")
    assert report["exit_code"] == 124
    assert_shut_down(stub)


def test_worker_that_cannot_write_its_report(cloud):
    """Exit 3 (the worker could not even write its error report): the bootstrap writes one."""
    _publish_stand_in(cloud, "import sys\nsys.stderr.write('AccessDenied on PutObject\\n')\nsys.exit(3)\n")
    key = "inbox/unwritable.csv"
    instance_id = cloud.launch(key, CSV)
    done, stub = cloud.run(instance_id)
    assert done.returncode == 3
    report = assert_error_report(cloud, key, "worker", "exited with status 3", written_by="bootstrap")
    assert report["exit_code"] == 3
    assert "AccessDenied on PutObject" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)


# A worker that dies without a report of its own: the bootstrap writes one naming the cause.
# (stand-in code, settings, exit status, what the report's error must say)
WORKER_DEATHS = {
    "import-error": ("import awsfun_no_such_module\n", {}, 1,
                     ("crashed", "ModuleNotFoundError", "awsfun_no_such_module")),
    "syntax-error": ("def broken(:\n    pass\n", {}, 1, ("crashed", "SyntaxError")),
    "uncaught-exception": ("raise RuntimeError('the worker broke')\n", {}, 1,
                           ("crashed", "RuntimeError: the worker broke")),
    "oom-kill": ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", {}, 137,
                 ("SIGKILL", "out of memory")),
    "timeout": ("import time\ntime.sleep(600)\n", {"WORKER_TIMEOUT_SECONDS": "1"}, 124,
                ("time limit of 1s",)),
}


@pytest.mark.parametrize("death", list(WORKER_DEATHS))
def test_a_worker_that_dies_without_a_report_gets_one_from_the_bootstrap(cloud, monkeypatch, death):
    """Python exits 1 on any uncaught exception, a crash at import included: 1 is never the
    worker's "I wrote my error report" (AwsS3.EXIT_FAILED_REPORTED), so the bootstrap writes it."""
    code, settings, status, fragments = WORKER_DEATHS[death]
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    _publish_stand_in(cloud, code)
    key = f"inbox/dies/{death}.csv"
    instance_id = cloud.launch(key, CSV)
    done, stub = cloud.run(instance_id, timeout=60)
    assert done.returncode == status, done.stdout.decode() + done.stderr.decode()
    report = assert_error_report(cloud, key, "worker", *fragments, written_by="bootstrap")
    assert report["exit_code"] == status
    log = cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert "wrote error report for stage worker" in log
    assert "wrote its error report" not in log
    assert cloud.keys() == sorted([key, AwsS3.report_key(key, ".error.json"),
                                   AwsS3.report_key(key, ".log")])
    assert_shut_down(stub)


@pytest.mark.parametrize("status", [1, AwsS3.EXIT_FAILED_UNREPORTED, 42])
def test_a_launcher_that_ends_without_a_report_gets_one_from_the_shell(cloud, status):
    """Any launcher status other than 0, 5 (reported) and 127 (boto3 missing) without
    WORK_DIR/reported takes the shell's AWS CLI fallback: 3 is what the launcher returns when
    the instance profile's credentials never came to instance metadata (AWS: they can be
    missing for a few seconds after boot), 1 a launcher that died."""
    if find_aws_cli() is None:
        pytest.skip("no self-contained AWS CLI on this machine")
    cloud.s3.put_object(Bucket=SOFTWARE, Key="bootstrap/launcher.py",
                        Body=f"import sys\nsys.exit({status})\n".encode())
    key = f"inbox/stand-in launcher {status}.csv"
    instance_id = cloud.launch(key, CSV)
    cli_dir = os.path.dirname(find_aws_cli())
    done, stub = cloud.run(instance_id, path=python_path(cli_dir + os.pathsep + os.environ["PATH"]))
    assert done.returncode == status, done.stdout.decode() + done.stderr.decode()
    report = assert_error_report(cloud, key, "worker", f"status {status}", written_by="bootstrap")
    assert report["exit_code"] == status
    assert "wrote error report for stage worker" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)


# Keys a generic HTTP tool would rewrite: dot segments (curl squashes /./ and /../ unless
# --path-as-is), an encoded dot segment, and the characters URLs give a meaning to.
PATH_KEYS = ("a/../b.csv", "x/./y.csv", "../z.csv", "d/%2e%2e/e.csv", "p/q/..",
             "odd/?x=1#frag+plus%20 100% ü €/a b.csv")


def _failing_curl(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "curl").write_text("#!/bin/sh\nexit 22\n")
    (directory / "curl").chmod(0o755)
    return str(directory)


def _boot_each(cloud, keys, body, path, variant, env=None):
    """Store `keys` with `body`, launch each through the handler, boot them all at once;
    return {key: CompletedProcess}."""
    runs = {}
    for key in keys:
        etag = cloud.put(key, body).strip('"')
        [launched] = lf.lambda_handler(s3_event(s3_record(DATA, key, etag=etag)), None)["launched"]
        runs[key] = cloud.user_data(launched["instance_id"])

    def boot(item):
        index, (key, user_data) = item
        workdir = cloud.workdir / f"{variant}-{index}"
        return key, run_user_data(user_data, workdir, ShutdownStub(workdir / "stub"), env, path)

    with ThreadPoolExecutor(3) as pool:
        return dict(pool.map(boot, enumerate(runs.items())))


@pytest.mark.long_running
def test_every_byte_of_a_key_reaches_s3_on_every_write_path(cloud, tmp_path):
    """The report and the worker's error report (boto3), the bootstrap's error report (boto3,
    and the AWS CLI without python3), and the log (curl with a presigned URL, else boto3, else
    the AWS CLI) each land at exactly analysis/KEY.SUFFIX, and nothing else is written but the
    worker's receipts (analysis/_receipts/<sha256 of the report key>).

    moto takes a presigned PUT whose path curl squashed (the signature no longer matches the
    path, which S3 refuses with 403, and the boto3 fallback would then hide curl's slip), so
    where curl uploads the log the test also asserts curl did not fail."""
    venv_bin = target_venv_bin()
    no_python = bare_path(tmp_path / "bare-bin", extra=[str(venv_bin / "aws")])
    variants = [
        # name, body, stand-in worker, PATH, report suffix, written_by, stage, curl must succeed
        ("report, log by curl", CSV, None, python_path(), ".json", None, None, True),
        ("worker error report, log by boto3", b"", None,
         python_path(f"{_failing_curl(tmp_path / 'no-curl')}:{os.environ['PATH']}"),
         ".error.json", "worker", "analyse", False),
        ("bootstrap error report by boto3, log by curl", CSV, "raise SystemError('stand-in')\n",
         python_path(), ".error.json", "bootstrap", "worker", True),
        ("bootstrap error report and log by the AWS CLI", CSV, None, no_python,
         ".error.json", "bootstrap", "start", False),
    ]
    problems = []
    for variant, body, stand_in, path, suffix, written_by, stage, curl_ok in variants:
        if stand_in:
            _publish_stand_in(cloud, stand_in)
        runs = _boot_each(cloud, PATH_KEYS, body, path, variant.split(",")[0])
        publish_software(cloud.s3, SOFTWARE)
        expected = set(PATH_KEYS)
        for key, done in runs.items():
            console = (done.stdout + done.stderr).decode("utf-8", "replace")
            report_key, log_key = f"analysis/{key}{suffix}", f"analysis/{key}.log"
            expected |= {report_key, log_key}
            if written_by != "bootstrap":  # the worker's reports come with their receipts
                expected.add(AwsS3.receipt_key(report_key))
            if curl_ok and "curl could not upload the log" in console:
                problems.append(f"{variant}: {key!r}: curl failed: {console[-1500:]}")
            try:
                report = json.loads(cloud.get(report_key))
                log = cloud.get(log_key).decode("utf-8")
            except cloud.s3.exceptions.NoSuchKey:
                problems.append(f"{variant}: {key!r}: {report_key!r} or its log is missing")
                continue
            if report["input"]["key"] != key or (report.get("written_by"), report.get("stage")) \
                    != (written_by, stage):
                problems.append(f"{variant}: {key!r}: report {report}")
            if key not in log:
                problems.append(f"{variant}: {key!r}: the log does not name the key")
        others = set(cloud.keys()) - expected
        missing = expected - set(cloud.keys())
        if others or missing:
            problems.append(f"{variant}: keys written besides the expected: {sorted(others)}, "
                            f"expected but missing: {sorted(missing)}")
        for key in cloud.keys():
            cloud.s3.delete_object(Bucket=DATA, Key=key)
    assert problems == [], "\n".join(problems)


def test_the_bootstrap_names_the_endpoint_to_every_tool(cloud, tmp_path):
    """AWS_IGNORE_CONFIGURED_ENDPOINT_URLS makes botocore and the AWS CLI behave as those from
    before AWS_ENDPOINT_URL (botocore < 1.31.0, AWS CLI < 1.29.0) do: the worker, the launcher,
    the boto3 PUT and the AWS CLI must each be handed the endpoint, or they go to AWS."""
    env = {"AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "true"}
    no_python = bare_path(tmp_path / "bare-bin", extra=[str(target_venv_bin() / "aws")])
    for key, body, path, suffix in (("inbox/ok.csv", CSV, python_path(), ".json"),
                                    ("inbox/failed.csv", b"", python_path(), ".error.json"),
                                    ("inbox/cli.csv", CSV, no_python, ".error.json")):
        done = _boot_each(cloud, [key], body, path, key.split("/")[1], env)[key]
        console = (done.stdout + done.stderr).decode("utf-8", "replace")
        assert "curl could not upload the log" not in console, console
        assert cloud.report(key, suffix)["input"]["key"] == key, console
        assert key in cloud.get(f"analysis/{key}.log").decode("utf-8")


def test_python_missing_with_the_aws_cli(cloud):
    cli = find_aws_cli()
    if cli is None:
        pytest.skip("no self-contained AWS CLI on this machine (see the test without one)")
    key = "inbox/no python ü.csv"
    instance_id = cloud.launch(key, CSV)
    bare = bare_path(cloud.workdir / "bare-bin", extra=[cli])
    done, stub = cloud.run(instance_id, path=bare)
    assert done.returncode == 127
    report = assert_error_report(cloud, key, "start", "python3 with boto3 is not available",
                                 written_by="bootstrap")
    assert report["exit_code"] == 127
    assert "wrote error report for stage start" in cloud.get(AwsS3.report_key(key, ".log")).decode()
    assert_shut_down(stub)


def _recording_aws(directory):
    """An `aws` that records the instance-metadata settings it runs with, and its arguments."""
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "aws.calls"
    (directory / "aws").write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s %s %s\\n" "${AWS_METADATA_SERVICE_NUM_ATTEMPTS-unset}" '
        f'"${{AWS_METADATA_SERVICE_TIMEOUT-unset}}" "$*" >> "{calls}"\n')
    (directory / "aws").chmod(0o755)
    return directory / "aws", calls


@pytest.mark.parametrize("preset, expected", [
    ({}, "5 3"),
    ({"AWS_METADATA_SERVICE_NUM_ATTEMPTS": "9", "AWS_METADATA_SERVICE_TIMEOUT": "7"}, "9 7"),
])
def test_the_aws_cli_fallback_gives_instance_metadata_time_to_answer(tmp_path, preset, expected):
    """By default the AWS CLI asks instance metadata for credentials once, with a 1 s timeout
    (AWS SDKs and Tools Reference Guide, "Amazon EC2 instance metadata":
    AWS_METADATA_SERVICE_NUM_ATTEMPTS and AWS_METADATA_SERVICE_TIMEOUT, both 1). A machine
    without python3 writes its only error report, and its log, through the CLI; one slow answer
    at boot would lose both. The shell's CLI calls get 5 attempts of 3 s each; a value the
    machine's environment already sets is kept."""
    template = (REPO / "bootstrap" / "bootstrap.sh").read_text(encoding="utf-8")
    launcher = (REPO / "bootstrap" / "launcher.py").read_text(encoding="utf-8")
    settings = lf.load_settings({"AWS_REGION": "us-east-1", "SOFTWARE_BUCKET": SOFTWARE})
    obj = {"bucket": DATA, "key": "inbox/no python.csv", "etag": "0" * 32}
    user_data = lf.render_user_data(template, obj, settings, launcher)
    aws, calls = _recording_aws(tmp_path / "cli")
    bare = bare_path(tmp_path / "bare-bin", extra=[str(aws)])
    done = run_user_data(user_data, tmp_path / "run", ShutdownStub(tmp_path / "stub"), preset,
                         path=bare)
    assert done.returncode == 127, done.stderr.decode()
    recorded = calls.read_text().splitlines()
    assert [line.split(" s3api ")[0] for line in recorded] == [expected, expected]
    assert "--key analysis/inbox/no python.csv.error.json" in recorded[0]
    assert "--key analysis/inbox/no python.csv.log" in recorded[1]


def test_python_missing_without_any_aws_client(cloud):
    """Nothing can reach S3: the bootstrap can only log why, and still shuts down."""
    key = "inbox/no python, no cli.csv"
    instance_id = cloud.launch(key, CSV)
    bare = bare_path(cloud.workdir / "bare-bin")
    done, stub = cloud.run(instance_id, path=bare)
    assert done.returncode == 127
    output = done.stdout.decode() + done.stderr.decode()
    assert "neither python3 with boto3 nor the aws CLI is available" in output
    assert "could not write the error report for stage start" in output
    assert cloud.keys() == [key]  # no report could be written; the input is untouched
    assert_shut_down(stub)


def test_the_unrendered_template_refuses_and_shuts_down(tmp_path):
    stub = ShutdownStub(tmp_path / "stub")
    template = (REPO / "bootstrap" / "bootstrap.sh").read_text(encoding="utf-8")
    done = run_user_data(template, tmp_path, stub, path=python_path())
    assert done.returncode == 2
    assert "unrendered template" in done.stdout.decode() + done.stderr.decode()
    assert stub.calls() == ["-h now"]


# --- EC2's answers to a used ClientToken (since January 2025) --------------------------


@pytest.fixture
def real_answers():
    """The moto server answers as AWS does where moto does not (the local cloud's emulation):
    RunInstances refuses a used ClientToken whose instance terminated
    (IdempotentInstanceTerminated) or that comes with other parameters
    (IdempotentParameterMismatch), and each S3 event carries its write's `sequencer`."""
    import local_cloud

    restores = [local_cloud.honour_client_tokens(), local_cloud.stamp_s3_sequencers()]
    yield
    for restore in restores:
        restore()


def test_a_duplicate_event_after_the_job_ended_is_skipped(cloud, real_answers):
    """S3 may deliver an event twice; once its worker has ended EC2 answers its token with
    IdempotentInstanceTerminated, which used to fail the invocation into the dead-letter
    queue. The record is skipped, naming the report the worker wrote."""
    key = "inbox/twice.csv"
    cloud.put(key, CSV)
    [event] = cloud.events(1)
    [launched] = lf.lambda_handler(event, None)["launched"]
    done, _ = cloud.run(launched["instance_id"])
    assert done.returncode == 0
    cloud.ec2.terminate_instances(InstanceIds=[launched["instance_id"]])  # its shutdown
    result = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert result["launched"] == []
    [skipped] = result["skipped"]
    assert skipped["reason"].startswith(f"already processed: report {AwsS3.report_key(key)}")
    assert AwsS3.report_key(key) in cloud.keys()


def test_the_same_bytes_again_after_a_failed_job_get_a_new_worker_and_report(cloud, real_answers):
    """Unversioned bucket: after a failed job, the error report is deleted and the identical
    bytes uploaded again (same eTag). S3 gives the new PUT's event a new sequencer, so the
    upload gets a new token and a new worker; with the eTag-only token EC2 answered
    IdempotentInstanceTerminated (before January 2025: the ended instance, "launched" with
    no worker running), and no report ever came."""
    key = "inbox/again.txt.gz"
    body = gzip.compress(TEXT, mtime=0)[:-40]
    first = cloud.launch(key, body)
    done, _ = cloud.run(first)
    assert done.returncode == AwsS3.EXIT_FAILED_REPORTED
    cloud.ec2.terminate_instances(InstanceIds=[first])
    error_key = AwsS3.report_key(key, ".error.json")
    cloud.s3.delete_object(Bucket=DATA, Key=error_key)
    cloud.sqs.purge_queue(QueueUrl=cloud.queue)  # the first job's report and log events
    second = cloud.launch(key, body)
    assert second != first
    done, _ = cloud.run(second)
    assert done.returncode == AwsS3.EXIT_FAILED_REPORTED
    assert error_key in cloud.keys()
    assert_error_report(cloud, key, "analyse", "truncated gzip", written_by="worker")
