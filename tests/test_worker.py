"""Tests of the worker, AwsS3.py: report names, URIs, local mode, S3 mode (moto in-process),
idempotency per eTag, error reports, and denied or failing S3 calls."""

import gzip
import hashlib
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from moto import mock_aws

import AwsS3
from support import REPO, fail_operation, record_calls

sys.path.insert(0, str(REPO / "bootstrap"))
import launcher  # noqa: E402

BUCKET = "awsfun-data"
CSV = b"sample,reads,ok\nS1,10,yes\nS2,20,no\nS3,30,yes\n"
BOOTSTRAP = (REPO / "bootstrap" / "bootstrap.sh").read_text(encoding="utf-8")
MUTATING = {"PutObject", "DeleteObject", "DeleteObjects", "CopyObject", "CreateMultipartUpload",
            "PutObjectAcl", "PutObjectTagging", "RestoreObject"}


# --- report_key -----------------------------------------------------------------------


def test_report_key_is_beside_the_input_under_analysis():
    assert AwsS3.report_key("inbox/a b.csv") == "analysis/inbox/a b.csv.json"
    assert AwsS3.report_key("inbox/a.csv", ".error.json") == "analysis/inbox/a.csv.error.json"
    assert AwsS3.report_key("ü/€.txt", ".log") == "analysis/ü/€.txt.log"


@pytest.mark.parametrize("suffix", [".json", ".error.json", ".log"])
def test_report_key_at_exactly_1024_bytes_stays_put(suffix):
    key = "k" * (1024 - len("analysis/") - len(suffix))
    assert len(("analysis/" + key + suffix).encode()) == 1024
    assert AwsS3.report_key(key, suffix) == "analysis/" + key + suffix


@pytest.mark.parametrize("suffix", [".json", ".error.json", ".log"])
def test_report_key_past_1024_bytes_goes_under_long(suffix):
    key = "k" * (1025 - len("analysis/") - len(suffix))
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert AwsS3.report_key(key, suffix) == f"analysis/_long/{digest}{suffix}"


def test_report_key_counts_bytes_not_characters():
    key = "€" * 338  # 338 characters but 1,014 bytes: analysis/KEY.json would be 1,028 bytes
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    assert AwsS3.report_key(key) == f"analysis/_long/{digest}.json"
    assert len(AwsS3.report_key("€" * 336).encode()) == 1022  # still fits


def test_long_report_keys_are_distinct_and_valid():
    a, b = "x" * 1015 + "a", "x" * 1015 + "b"
    assert AwsS3.report_key(a) != AwsS3.report_key(b)
    assert all(len(AwsS3.report_key(k).encode()) <= 1024 for k in (a, b, "€" * 341))


# The bootstrap's keys for .error.json and .log come from lambda_function.report_key (rendered
# into the user-data): tests/test_lambda.py checks that rule agrees with this one.


# --- parse_s3_uri ---------------------------------------------------------------------


@pytest.mark.parametrize("uri, expected", [
    ("s3://bkt/key.csv", ("bkt", "key.csv")),
    ("s3://bkt/dir/sub/key.csv", ("bkt", "dir/sub/key.csv")),
    ("s3://bkt//lead", ("bkt", "/lead")),
    ("s3://bkt/dir/", ("bkt", "dir/")),
    ("s3://bkt/a b?c#d%20e+f", ("bkt", "a b?c#d%20e+f")),  # never URL-decoded
    ("s3://bkt/a\nb\t$(x)", ("bkt", "a\nb\t$(x)")),
    ("s3://bkt/s3://bkt/x", ("bkt", "s3://bkt/x")),
])
def test_parse_s3_uri_keeps_the_key_byte_for_byte(uri, expected):
    assert AwsS3.parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["s3://", "s3://bkt", "s3://bkt/", "s3:///key", "bkt/key",
                                 "S3://bkt/key", "/tmp/x"])
def test_parse_s3_uri_rejects_incomplete_uris(uri):
    with pytest.raises(ValueError, match="s3://"):
        AwsS3.parse_s3_uri(uri)


@pytest.mark.parametrize("argv", [[], ["s3://bkt"], ["s3://bkt/"]])
def test_command_line_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        AwsS3.main(argv)
    assert raised.value.code == 2


# --- local mode -----------------------------------------------------------------------


def test_local_mode_prints_the_report_touching_no_aws(tmp_path, monkeypatch, capsys):
    path = tmp_path / "table.csv"
    path.write_bytes(CSV)
    # No AWS service may be touched: boto3 cannot even be imported.
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "botocore", None)
    assert AwsS3.main([str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"] == {"path": str(path), "size": len(CSV)}
    assert report["bytes"] == len(CSV)
    assert report["lines"] == 4
    assert report["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert report["format"] == "csv"
    assert isinstance(report["summary"], dict)


def test_local_mode_as_a_command(tmp_path):
    path = tmp_path / "reads ü.txt.gz"
    content = b"".join(b"line %d\n" % i for i in range(1000))
    path.write_bytes(gzip.compress(content, mtime=0))
    done = subprocess.run([sys.executable, str(REPO / "AwsS3.py"), str(path)], capture_output=True,
                          check=False, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["input"]["path"] == str(path)
    assert report["bytes"] == path.stat().st_size
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()  # of the stored bytes
    assert report["lines"] == 1000  # of the content
    assert "gzip" in (report["format"], report.get("compression"))


def test_local_lines_count_a_last_unterminated_line(tmp_path, capsys):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\nb\nc")
    assert AwsS3.main([str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["lines"] == 3


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "empty"),
    ("corrupt.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 64, "corrupt gzip"),
    ("truncated.gz", gzip.compress(b"x\n" * 5000, mtime=0)[:-20], "truncated"),
])
def test_local_mode_failures_print_an_error_report_and_exit_5(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert AwsS3.main([str(path)]) == AwsS3.EXIT_FAILED_REPORTED == 5
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "error" and message in report["error"]
    assert report["input"]["path"] == str(path)


def test_local_mode_missing_file(tmp_path, capsys):
    assert AwsS3.main([str(tmp_path / "nope.csv")]) == AwsS3.EXIT_FAILED_REPORTED
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "error" and "nope.csv" in report["error"]


# --- S3 mode (moto in-process) --------------------------------------------------------


@pytest.fixture
def s3():
    """An S3 client on moto in-process with the data bucket, failing on any write to an input."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        client.inputs = set()
        client.calls = record_calls(client)
        client.reader = boto3.client("s3", region_name="us-east-1")  # unaffected by fault hooks
        yield client
        for name, params in client.calls:
            if name in MUTATING:
                assert params.get("Key") not in client.inputs, f"{name} on the input {params}"


def put_input(s3, key, body):
    """Store an input object (the test's write, not the worker's); return its eTag."""
    s3.reader.put_object(Bucket=BUCKET, Key=key, Body=body)
    s3.inputs.add(key)
    return s3.reader.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')


def get_json(s3, key):
    return json.loads(s3.reader.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def keys(s3):
    return sorted(o["Key"] for o in s3.reader.list_objects_v2(Bucket=BUCKET).get("Contents", []))


def puts(s3):
    return [params["Key"] for name, params in s3.calls if name == "PutObject"]


def test_s3_mode_writes_the_report(s3, monkeypatch):
    key = "inbox/run 1/table ü.csv"
    etag = put_input(s3, key, CSV)
    monkeypatch.setenv("AWSFUN_EXPECTED_ETAG", etag)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == 0
    report = get_json(s3, AwsS3.report_key(key))
    assert report["input"]["bucket"] == BUCKET and report["input"]["key"] == key
    assert report["input"]["size"] == len(CSV) and report["input"]["etag"] == etag
    assert report["bytes"] == len(CSV) and report["lines"] == 4
    assert report["sha256"] == hashlib.sha256(CSV).hexdigest()
    assert report["format"] == "csv"
    assert isinstance(report["summary"], dict)
    assert keys(s3) == sorted([key, AwsS3.report_key(key),
                               AwsS3.receipt_key(AwsS3.report_key(key))])
    assert s3.reader.get_object(Bucket=BUCKET, Key=key)["Body"].read() == CSV


def listed_etags(s3):
    """{key: ETag} as ListObjectsV2 gives them: all status and reconcile see without a read."""
    return {o["Key"]: o["ETag"].strip('"')
            for o in s3.reader.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


@pytest.mark.parametrize("name, body, suffix", [("good.csv", CSV, ".json"),
                                                ("empty.csv", b"", ".error.json")])
def test_each_report_has_a_receipt_a_listing_can_check(s3, monkeypatch, name, body, suffix):
    """The receipt's listed ETag is the MD5 of receipt_body(report key, the report's listed ETag,
    the input eTag the report records), so a listing shows which input eTag the report was
    written for; long keys too."""
    for key in (f"inbox/{name}", "inbox/" + "€" * 335 + name):
        etag = put_input(s3, key, body)
        monkeypatch.setenv("AWSFUN_EXPECTED_ETAG", etag)  # an error report records the event's
        AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3)
        target = AwsS3.report_key(key, suffix)
        listed = listed_etags(s3)
        receipt = AwsS3.receipt_key(target)
        assert receipt == "analysis/_receipts/" + hashlib.sha256(target.encode()).hexdigest()
        assert listed[receipt] == hashlib.md5(
            AwsS3.receipt_body(target, listed[target], etag)).hexdigest()
        assert json.loads(s3.reader.get_object(Bucket=BUCKET, Key=receipt)["Body"].read()) == {
            "input_etag": etag, "report": target, "report_etag": listed[target]}


def test_a_receipt_that_cannot_be_written_leaves_the_report_and_the_outcome(s3, caplog):
    key = "inbox/no receipt.csv"
    put_input(s3, key, CSV)

    def refuse_receipts(params, **_):
        if params["Key"].startswith(AwsS3.RECEIPT_PREFIX):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "injected"}},
                              "PutObject")

    s3.meta.events.register("provide-client-params.s3.PutObject", refuse_receipts)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == AwsS3.EXIT_OK
    assert get_json(s3, AwsS3.report_key(key))["status"] == "ok"
    assert keys(s3) == sorted([key, AwsS3.report_key(key)])
    assert "cannot write the receipt of analysis/inbox/no receipt.csv.json: AccessDenied" \
        in caplog.text


def test_s3_mode_through_main_makes_its_own_client(s3):
    key = "inbox/main.csv"
    put_input(s3, key, CSV)
    assert AwsS3.main([f"s3://{BUCKET}/{key}"]) == 0
    assert get_json(s3, AwsS3.report_key(key))["input"]["key"] == key


def test_s3_mode_long_keys_report_under_long(s3):
    key = "inbox/" + "€" * 335 + ".csv"  # 1,015 bytes: fits S3, analysis/KEY.json does not
    put_input(s3, key, CSV)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == 0
    target = AwsS3.report_key(key)
    assert target.startswith("analysis/_long/")
    assert get_json(s3, target)["input"]["key"] == key  # the full key is inside


def test_s3_mode_is_idempotent_per_etag(s3):
    key = "inbox/again.csv"
    first_etag = put_input(s3, key, CSV)
    uri = f"s3://{BUCKET}/{key}"
    assert AwsS3.run_s3(uri, s3=s3) == 0
    before = s3.reader.head_object(Bucket=BUCKET, Key=AwsS3.report_key(key))
    del s3.calls[:]
    assert AwsS3.run_s3(uri, s3=s3) == 0  # duplicate delivery
    assert puts(s3) == [] and "GetObject" not in [name for name, _ in s3.calls]
    after = s3.reader.head_object(Bucket=BUCKET, Key=AwsS3.report_key(key))
    assert (after["ETag"], after["LastModified"]) == (before["ETag"], before["LastModified"])

    # A new version of the object is analysed again.
    put_input(s3, key, CSV + b"S4,40,no\n")
    assert AwsS3.run_s3(uri, s3=s3) == 0
    report = get_json(s3, AwsS3.report_key(key))
    assert report["input"]["etag"] != first_etag and report["lines"] == 5


def test_an_error_report_does_not_block_a_later_success(s3):
    key = "inbox/fixed.csv"
    put_input(s3, key, b"")
    uri = f"s3://{BUCKET}/{key}"
    assert AwsS3.run_s3(uri, s3=s3) == AwsS3.EXIT_FAILED_REPORTED
    put_input(s3, key, CSV)
    assert AwsS3.run_s3(uri, s3=s3) == 0
    assert get_json(s3, AwsS3.report_key(key))["status"] == "ok"


def test_a_changed_object_is_analysed_as_it_is_now(s3, monkeypatch, caplog):
    key = "inbox/changed.csv"
    etag = put_input(s3, key, CSV)
    monkeypatch.setenv("AWSFUN_EXPECTED_ETAG", "0" * 32)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == 0
    assert get_json(s3, AwsS3.report_key(key))["input"]["etag"] == etag
    assert "object changed since the event" in caplog.text


def _corrupt_gzip():
    data = bytearray(gzip.compress(b"line\n" * 20000, mtime=0))
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    return bytes(data)


@pytest.mark.parametrize("name, body, message", [
    ("empty.csv", b"", "empty"),
    ("corrupt.gz", _corrupt_gzip(), "corrupt gzip"),
    ("not-gzip-after-magic.gz", b"\x1f\x8b" + b"\x00" * 100, "gzip"),
    ("truncated.gz", gzip.compress(b"line\n" * 20000, mtime=0)[:-30], "truncated gzip"),
])
def test_s3_mode_failures_leave_an_error_report(s3, name, body, message):
    key = f"inbox/{name}"
    etag = put_input(s3, key, body)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == AwsS3.EXIT_FAILED_REPORTED
    report = get_json(s3, AwsS3.report_key(key, ".error.json"))
    assert report["status"] == "error" and message in report["error"]
    assert report["input"]["bucket"] == BUCKET and report["input"]["key"] == key
    assert report["stage"]
    assert AwsS3.report_key(key) not in keys(s3)
    assert s3.reader.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    assert s3.reader.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"') == etag


def test_s3_mode_missing_object_leaves_an_error_report(s3):
    key = "inbox/deleted before the worker.csv"
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == AwsS3.EXIT_FAILED_REPORTED
    report = get_json(s3, AwsS3.report_key(key, ".error.json"))
    assert report["status"] == "error" and report["input"]["key"] == key
    assert report["error_code"] in ("404", "NoSuchKey", "NotFound")
    target = AwsS3.report_key(key, ".error.json")
    assert keys(s3) == sorted([target, AwsS3.receipt_key(target)])


def test_s3_mode_denied_read_leaves_an_error_report(s3):
    key = "inbox/secret.csv"
    put_input(s3, key, CSV)
    fail_operation(s3, "GetObject", "AccessDenied")
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == AwsS3.EXIT_FAILED_REPORTED
    report = get_json(s3, AwsS3.report_key(key, ".error.json"))
    assert report["error_code"] == "AccessDenied" and "AccessDenied" in report["error"]


def test_denied_report_write_exits_3_and_logs(s3, caplog):
    key = "inbox/unwritable.csv"
    put_input(s3, key, CSV)
    denied = fail_operation(s3, "PutObject", "AccessDenied")
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == 3
    # It tried the report, then the error report, and says so in the log.
    assert [p["Key"] for p in denied] == [AwsS3.report_key(key), AwsS3.report_key(key, ".error.json")]
    assert "failed on s3://awsfun-data/inbox/unwritable.csv: AccessDenied" in caplog.text
    assert "cannot write the error report: AccessDenied" in caplog.text
    assert keys(s3) == [key]


def test_denied_report_write_through_main_exits_3(s3, monkeypatch, caplog):
    key = "inbox/unwritable.csv"
    put_input(s3, key, CSV)
    fail_operation(s3, "PutObject", "AccessDenied")
    monkeypatch.setattr(AwsS3, "make_s3_client", lambda: s3)
    assert AwsS3.main([f"s3://{BUCKET}/{key}"]) == AwsS3.EXIT_FAILED_UNREPORTED == 3
    assert "cannot write the error report" in caplog.text


# --- the exit-status contract with the bootstrap ---------------------------------------


def test_the_reported_failure_status_is_none_python_exits_with_by_itself():
    """1 is Python's status for an uncaught exception (a crash at import too), 2 argparse's:
    the bootstrap must tell "failed and wrote my error report" apart from both."""
    statuses = {AwsS3.EXIT_OK, AwsS3.EXIT_USAGE, AwsS3.EXIT_FAILED_UNREPORTED,
                AwsS3.EXIT_FAILED_REPORTED, 1}
    assert len(statuses) == 5
    constants = dict(re.findall(r"^(WORKER_REPORTED)=(\d+)\b", BOOTSTRAP, re.M))
    assert int(constants["WORKER_REPORTED"]) == AwsS3.EXIT_FAILED_REPORTED
    assert launcher.WORKER_REPORTED == AwsS3.EXIT_FAILED_REPORTED
    assert launcher.outcome(AwsS3.EXIT_FAILED_REPORTED, 60) == (AwsS3.EXIT_FAILED_REPORTED, None)
    assert launcher.FETCH_FAILED not in statuses


# --- the launcher's supervision (bootstrap/launcher.py, forked child) ---------------------


def _supervised(tmp_path, code, seconds=30):
    """Run `code` as the worker the way the launcher does; return (exit code, timed out)."""
    worker = tmp_path / "AwsS3.py"
    worker.write_text(code)
    saved = signal.getsignal(signal.SIGTERM)
    try:
        return launcher.run(str(worker), ["s3://b/k"], time.time() + seconds,
                            threading.Thread(target=lambda: None))
    finally:
        signal.signal(signal.SIGTERM, saved)


def test_a_child_killed_by_sigkill_leaves_the_launcher_alive_to_report(tmp_path):
    """What the OOM killer does to the large analysis child: the launcher's process lives on."""
    code, timed_out = _supervised(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert (code, timed_out) == (-signal.SIGKILL, False)
    status, message = launcher.outcome(code, 60)
    assert status == 137 and "SIGKILL" in message and "out of memory" in message


def test_the_launcher_stops_a_child_at_its_deadline(tmp_path):
    started = time.monotonic()
    code, timed_out = _supervised(tmp_path, "import time\ntime.sleep(60)\n", seconds=0.5)
    assert timed_out and time.monotonic() - started < 10
    assert launcher.outcome(code, 7, timed_out=True) == (124, "worker exceeded its time limit of 7s")


class _Done:
    """A stand-in for the launcher's threading.Event: wait() returns at once, calls `between`
    with the number of waits so far, and says "set" after `count` waits."""

    def __init__(self, count, between):
        self.count, self.between, self.timeouts = count, between, []

    def wait(self, timeout):
        self.timeouts.append(timeout)
        self.between(len(self.timeouts))
        return len(self.timeouts) > self.count


class _Puts:
    """An S3 client's put_object that records each body, failing the calls numbered in `fail`."""

    def __init__(self, fail=()):
        self.bodies, self.calls, self.fail = [], 0, fail

    def put_object(self, Bucket, Key, Body, ContentType):
        self.calls += 1
        if self.calls in self.fail:
            raise OSError("connection reset")
        assert (Bucket, Key, ContentType) == ("data", "analysis/k.log", "text/plain")
        self.bodies.append(Body)


def test_the_running_job_s_log_goes_up_only_when_it_grew(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AWSFUN_LOG_SECONDS", "7")
    log = tmp_path / "bootstrap.log"
    writes = {1: b"started\n", 3: b"MB done\n", 4: b"more\n"}  # before the 1st, 3rd, 4th wait ends

    def between(waits):
        if waits in writes:
            with log.open("ab") as handle:
                handle.write(writes[waits])

    s3, done = _Puts(fail={2}), _Done(5, between)
    launcher.send_log(s3, "data", "analysis/k.log", str(tmp_path), done)
    # wait 1: put; 2: no growth; 3: grew, the put fails; 4: grew, put (the whole log); 5: none
    assert s3.bodies == [b"started\n", b"started\nMB done\nmore\n"]
    assert s3.calls == 3 and done.timeouts == [7.0] * 6
    assert "log upload: connection reset" in caplog.text


def test_the_deadline_counts_from_the_shell_s_clock_less_a_margin():
    assert launcher.deadline("1000.5", 100, now=5000.0) == 1000.5 + 100 - 10
    assert launcher.deadline("1000,5", 5, now=5000.0) == 1000.5 + 5 - 1  # a comma locale
    assert launcher.deadline("", 5, now=5000.0) == 5000.0 + 5 - 1  # bash < 5: its own start


class _NoCredentials:
    """A boto3 session as one looks while instance metadata has no credentials yet."""

    def get_credentials(self):
        return None


def test_the_launcher_waits_for_instance_profile_credentials_that_come_late():
    """AWS fact: right after boot the instance profile's credentials can be missing from
    instance metadata for a few seconds, and botocore asks once (NoCredentialsError). The
    launcher tries again with a short sleep until a session holds credentials."""
    real = boto3.Session(aws_access_key_id="a", aws_secret_access_key="s", region_name="us-east-1")
    answers = iter([_NoCredentials(), RuntimeError("IMDS timed out"), real])

    def new_session():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    sleeps = []
    assert launcher.wait_for_credentials(new_session, sleeps.append) is real
    assert len(sleeps) == 2 and all(0 < pause <= 10 for pause in sleeps)


def test_a_launcher_whose_credentials_never_come_exits_for_the_shell_to_report(tmp_path,
                                                                               monkeypatch):
    """AWS fact as above: when the instance profile's credentials never come, the wait is
    bounded (about 60 s) and the launcher ends with a status the shell reads as "Python could
    not report" (not 0, 5 or 127, and no WORK_DIR/reported), so its AWS CLI writes it."""
    monkeypatch.setattr(boto3, "Session", _NoCredentials)
    sleeps = []
    argv = ["launcher.pyz", str(tmp_path), "software", "AwsS3.py", "analysis/k.error.json",
            "analysis/k.log", "600", "", "s3://b/k"]
    status = launcher.main(argv, sleep=sleeps.append)
    assert status == AwsS3.EXIT_FAILED_UNREPORTED
    assert status not in (AwsS3.EXIT_OK, AwsS3.EXIT_FAILED_REPORTED, 127)
    assert not (tmp_path / "reported").exists()
    assert 30 <= sum(sleeps) <= 60


def test_the_worker_reuses_the_launchers_session_and_its_loaded_models(tmp_path, monkeypatch):
    """One python3 start per job: the forked worker's boto3.client() takes the launcher's
    session, whose S3 service model is already parsed (about 0.15 CPU-seconds a job)."""
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    probe = tmp_path / "loads.json"
    worker = f"""import json, boto3, botocore.loaders
loads = []
read = botocore.loaders.JSONFileLoader.load_file
botocore.loaders.JSONFileLoader.load_file = lambda self, path: loads.append(path) or read(self, path)
boto3.client("s3")
open({str(probe)!r}, "w").write(json.dumps(loads))
"""
    with mock_aws():
        s3 = boto3.Session(region_name="us-east-1").client("s3")  # not the default session
        s3.create_bucket(Bucket="software")
        s3.create_bucket(Bucket="data")
        s3.put_object(Bucket="software", Key="AwsS3.py", Body=worker.encode())
        argv = ["launcher.pyz", str(tmp_path), "software", "AwsS3.py", "analysis/k.error.json",
                "analysis/k.log", "600", "", "s3://data/k"]
        assert launcher.main(argv) == AwsS3.EXIT_OK
    loads = json.loads(probe.read_text())
    assert not [path for path in loads if "/s3/" in path], loads


@pytest.mark.parametrize("code, status, fragment", [
    ("raise RuntimeError('broke')\n", 1, "RuntimeError: broke"),
    ("def broken(:\n", 1, "SyntaxError"),
    ("import sys\nsys.exit(3)\n", 3, "exited with status 3"),
    ("import sys\nsys.exit(5)\n", 5, None),
    ("import sys\nsys.exit()\n", 0, None),
])
def test_the_launcher_reads_how_the_worker_ended(tmp_path, code, status, fragment):
    exit_code, timed_out = _supervised(tmp_path, code)
    crash = (tmp_path / "AwsS3.py.crash").read_text() if exit_code == 1 else ""
    got, message = launcher.outcome(exit_code, 60, crash, timed_out)
    assert got == status
    assert (message is None) if fragment is None else (fragment in message)


def test_a_route_input_that_does_not_fit_on_disk_leaves_a_copy_stage_report(s3, monkeypatch):
    """AWS fact: an instance's disk is what its root volume holds, so a route's local copy of
    a large input can run out of space: the worker checks first and reports stage, needed
    and free bytes, instead of dying half-way through the copy."""
    import collections as _c
    usage = _c.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda path: usage(1000, 990, 10))
    key = "inbox/too big.csv"
    put_input(s3, key, CSV)
    ran = []
    monkeypatch.setattr(AwsS3.subprocess, "run", lambda *a, **k: ran.append(a))
    status = AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3, command=[sys.executable, "{input}"])
    assert status == AwsS3.EXIT_FAILED_REPORTED and not ran
    report = get_json(s3, AwsS3.report_key(key, ".error.json"))
    assert report["stage"] == "copy"
    assert (report["needed_bytes"], report["free_bytes"]) == (len(CSV), 10)
    assert "not enough disk space" in report["error"]


def test_a_route_command_works_on_disk_not_in_al2023_s_ram_backed_tmp(s3, monkeypatch):
    """AWS fact: on Amazon Linux 2023 /tmp is a tmpfs holding at most half the memory
    (AL2023 User Guide, "/tmp (small temporary files)"); large files belong in /var/tmp. With
    TMPDIR unset, as under cloud-init, the route's input copy and outputs are under /var/tmp."""
    import tempfile
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    key = "inbox/where.csv"
    put_input(s3, key, CSV)
    command = [sys.executable, "-c", ("import os, sys; open(os.path.join(sys.argv[2], 'where'), "
                                      "'w').write(sys.argv[1])"), "{input}", "{output_dir}"]
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3.reader, command=command) == AwsS3.EXIT_OK
    where = s3.reader.get_object(Bucket=BUCKET, Key=f"analysis/{key}/where")["Body"].read().decode()
    assert where.startswith("/var/tmp/") and not where.startswith("/tmp/"), where


def test_an_unexpected_exception_in_s3_mode_still_writes_the_error_report(s3, monkeypatch, caplog):
    key = "inbox/bug ü.csv"
    put_input(s3, key, CSV)

    def broken(uri, s3=None, command=None):
        raise RuntimeError("a bug outside the analysis")

    monkeypatch.setattr(AwsS3, "run_s3", broken)
    monkeypatch.setattr(AwsS3, "make_s3_client", lambda: s3)
    monkeypatch.setenv("AWSFUN_EXPECTED_ETAG", "e" * 32)
    assert AwsS3.main([f"s3://{BUCKET}/{key}"]) == AwsS3.EXIT_FAILED_REPORTED
    report = get_json(s3, AwsS3.report_key(key, ".error.json"))
    assert report["written_by"] == "worker" and report["stage"] == "worker"
    assert report["error"] == "RuntimeError: a bug outside the analysis"
    assert report["input"] == {"bucket": BUCKET, "key": key, "etag": "e" * 32}
    assert "Traceback" in caplog.text  # the log keeps the traceback


def test_an_unexpected_exception_that_cannot_be_reported_exits_3(s3, monkeypatch):
    key = "inbox/bug, denied.csv"
    put_input(s3, key, CSV)
    monkeypatch.setattr(AwsS3, "run_s3", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(AwsS3, "make_s3_client", lambda: s3)
    fail_operation(s3, "PutObject", "AccessDenied")
    assert AwsS3.main([f"s3://{BUCKET}/{key}"]) == AwsS3.EXIT_FAILED_UNREPORTED
    assert keys(s3) == [key]


def test_an_unexpected_exception_in_local_mode_prints_an_error_report(tmp_path, monkeypatch, capsys):
    path = tmp_path / "t.csv"
    path.write_bytes(CSV)
    monkeypatch.setattr(AwsS3, "analyse_file", lambda p: [][1])
    assert AwsS3.main([str(path)]) == AwsS3.EXIT_FAILED_REPORTED
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "error" and report["error"].startswith("IndexError: ")
    assert report["input"] == {"path": str(path)}


def test_the_worker_names_the_endpoint_itself(monkeypatch):
    """botocore reads AWS_ENDPOINT_URL itself only from 1.31.0 on; AWS_IGNORE_CONFIGURED_ENDPOINT_URLS
    makes any botocore behave as an older one would, and the worker still reaches the endpoint."""
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert AwsS3.make_s3_client().meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the service's own wins
    assert AwsS3.make_s3_client().meta.endpoint_url == "http://127.0.0.1:10"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert AwsS3.make_s3_client().meta.endpoint_url.startswith("https://s3.")


def test_transient_s3_errors_are_retried(s3):
    """botocore's standard retry mode: a 503 SlowDown on the read is retried, not reported."""
    key = "inbox/busy.csv"
    put_input(s3, key, CSV)
    client = AwsS3.make_s3_client()
    assert client.meta.config.retries["mode"] == "standard"
    failures = []

    def slow_down_once(request, **_):
        if not failures:
            failures.append(request.url)
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            return AWSResponse(request.url, 503, {}, _Raw(body))
        return None

    client.meta.events.register_first("before-send.s3.GetObject", slow_down_once)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=client) == 0
    assert len(failures) == 1
    assert get_json(s3, AwsS3.report_key(key))["status"] == "ok"


class _Raw:
    def __init__(self, body):
        self._body = io.BytesIO(body)

    def stream(self, **_):
        yield self._body.read()

    def read(self, *args):
        return self._body.read(*args)


def test_large_objects_stream_in_chunks(s3, monkeypatch):
    """The object is read in chunks, never whole: the analysis sees many bounded blocks."""
    key = "inbox/big.txt"
    line = b"x" * 99 + b"\n"
    put_input(s3, key, line * 30000)  # 3 MB
    seen = []
    original = AwsS3.analyse_stream

    def spy(chunks, total=None, **options):
        def counted():
            for chunk in chunks:
                seen.append(len(chunk))
                yield chunk
        return original(counted(), total, **options)

    monkeypatch.setattr(AwsS3, "analyse_stream", spy)
    assert AwsS3.run_s3(f"s3://{BUCKET}/{key}", s3=s3) == 0
    assert sum(seen) == 3_000_000 and len(seen) >= 3 and max(seen) <= AwsS3.CHUNK_SIZE
    assert get_json(s3, AwsS3.report_key(key))["lines"] == 30000


class _Imds:
    """A stand-in for the instance metadata service (IMDSv2): a token for a PUT, then
    spot/instance-action for a GET carrying it, as `notice` says (None: 404, no notice)."""

    def __init__(self, notice):
        import http.server
        import threading

        outer = self
        self.notice, self.requests = notice, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body=b""):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path))
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self.answer(200, b"token-1") if ttl else self.answer(400)

            def do_GET(self):
                outer.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") != "token-1":
                    self.answer(401)
                elif self.path == "/latest/meta-data/spot/instance-action" and outer.notice:
                    self.answer(200, json.dumps(outer.notice).encode())
                else:
                    self.answer(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


NOTICE = {"action": "terminate", "time": "2026-12-01T02:20:00Z"}


@pytest.mark.parametrize("notice", [NOTICE, None])
def test_the_launcher_reads_ec2s_spot_interruption_notice_with_imdsv2(notice):
    imds = _Imds(notice)
    try:
        environ = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.endpoint}
        assert launcher.spot_interruption(environ) == notice
        assert imds.requests == [("PUT", "/latest/api/token"),
                                 ("GET", "/latest/meta-data/spot/instance-action")]
        assert launcher.spot_interruption({**environ, "AWS_EC2_METADATA_DISABLED": "true"}) is None
    finally:
        imds.close()
    # Nothing listening (not an EC2 instance): no notice, at once.
    assert launcher.spot_interruption(environ, timeout=0.5) is None


@pytest.mark.parametrize("notice", [NOTICE, None])
def test_a_worker_stopped_by_a_spot_reclaim_says_so_in_its_error_report(tmp_path, monkeypatch,
                                                                        notice):
    """AWS fact: EC2 reclaims a spot instance two minutes after a notice in instance metadata
    (spot/instance-action), by a shutdown, whose SIGTERM the launcher turns into an error
    report. That report says it was a reclaim, in its body and in the metadata reconcile
    reads with a HEAD, so reconcile relaunches the input instead of calling it failed."""
    imds = _Imds(notice)
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint)
    monkeypatch.setenv("AWSFUN_EXPECTED_ETAG", "e" * 32)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    worker = b"import os, signal, time\nos.kill(os.getppid(), signal.SIGTERM)\ntime.sleep(30)\n"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with mock_aws():
            s3 = boto3.client("s3", region_name="us-east-1")
            for bucket in ("software", "data"):
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket="software", Key="AwsS3.py", Body=worker)
            argv = ["launcher.pyz", str(tmp_path), "software", "AwsS3.py",
                    "analysis/k.error.json", "analysis/k.log", "600", "", "s3://data/k"]
            assert launcher.main(argv) == 143
            head = s3.head_object(Bucket="data", Key="analysis/k.error.json")
            report = json.loads(s3.get_object(Bucket="data", Key="analysis/k.error.json")[
                "Body"].read())
    finally:
        signal.signal(signal.SIGTERM, handler)
        imds.close()
    assert report["exit_code"] == 143 and "SIGTERM" in report["error"]
    assert report.get("spot_interruption") == notice
    expected = {"input-etag": "e" * 32, **({"interruption": "spot"} if notice else {})}
    assert head["Metadata"] == expected


# --- the launcher as an AWS Batch job (AWS_BATCH_JOB_ID set) -------------------------------


def test_in_a_batch_container_the_launcher_asks_no_instance_metadata(monkeypatch):
    """A container may not reach instance metadata (hop limit 1): the spot notice is not
    asked, the host's board tag is not read, and the report names the job and attempt."""
    import urllib.request

    monkeypatch.setenv("AWS_BATCH_JOB_ID", "job-1")
    monkeypatch.setenv("AWSFUN_INSTANCE_ID", "job-1#2")
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)
    asked, opened = [], []
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: asked.append(a))
    monkeypatch.setattr(launcher, "open", lambda path, *a, **k: opened.append(path),
                        raising=False)
    assert launcher.spot_interruption() is None and asked == []
    report = launcher.error_report("b", "k", "worker", "stopped", 143)
    assert report["instance_id"] == "job-1#2" and opened == []


def test_a_stopped_batch_job_is_not_called_a_shutdown():
    status, message = launcher.outcome(-signal.SIGTERM, 60, container=True)
    assert status == 143 and "Batch job was stopped" in message and "shutdown" not in message
    assert "a shutdown" in launcher.outcome(-signal.SIGTERM, 60)[1]
