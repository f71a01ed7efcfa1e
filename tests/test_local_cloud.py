"""The local cloud: the README's main command, bursts, hostile names, duplicates, failures."""

import gzip
import json
import logging
import os
import re
import subprocess
import sys
import threading
import types
import time

import pytest

import AwsS3
import lambda_function
import local_cloud
from local_cloud import LocalCloud, Tracker, process_files

REPO = local_cloud.REPO

HOSTILE_NAMES = [
    "with space.csv",
    "$(touch CANARY).txt",
    "`touch CANARY`.txt",
    "quote'single.csv",
    'quote"double.csv',
    "semi;colon&amp.txt",
    "ünïcødé-数据.csv",
    "-leading-dash.txt",
    # No line feed: moto's server cannot store such a key (PutObject answers 404); keys with
    # line feeds are proven in test_injection.py, through bash, with the worker in-process.
    "tab\there.txt",
    "back\\slash.txt",
    "star*question?.txt",
    "percent%2F+plus.txt",
]


def test_pure_helpers():
    user_data = lambda_user_data("data-bucket", "a/b c$(x)\n")
    assert local_cloud.job_from_user_data(user_data) == ("data-bucket", "a/b c$(x)\n")
    with pytest.raises(ValueError):
        local_cloud.job_from_user_data("#!/bin/bash\necho no job\n")
    calls = [["-h", "+120", "awsfun watchdog"], ["-h", "now"]]
    assert local_cloud.watchdog_minutes(calls) == 120
    assert local_cloud.halted(calls) and not local_cloud.halted(calls[:1])
    assert local_cloud.object_key("in/", "/tmp/x y.csv") == "in/x y.csv"
    assert local_cloud.object_key("", "/tmp/x.csv") == "x.csv"


def test_ec2_tags_after_speed_up_are_what_moto_would_answer():
    """local_cloud.speed_up_moto's tag lookup (the conftest applies it) against moto's own
    describe_tags by resource id, and a tag-filtered DescribeInstances on top of it."""
    import boto3
    import moto.ec2.utils
    from moto import mock_aws
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2 import ec2_backends
    from moto.ec2.models.core import TaggedEC2Resource

    assert TaggedEC2Resource.get_tags.__module__ == "local_cloud"
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images(Owners=["amazon"], MaxResults=5)["Images"][0]["ImageId"]
        ids = [ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, TagSpecifications=[
            {"ResourceType": kind, "Tags": [{"Key": "stack", "Value": f"s{index % 2}"},
                                            {"Key": "n", "Value": str(index)}]}
            for kind in ("instance", "volume")])["Instances"][0]["InstanceId"]
            for index in range(5)]
        group = ec2.create_security_group(GroupName="g", Description="g")["GroupId"]
        ec2.create_tags(Resources=[group], Tags=[{"Key": "stack", "Value": "s1"}])
        backend = ec2_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
        resources = [*backend.get_multi_instances_by_id(ids),
                     *backend.volumes.values(), backend.get_security_group_from_id(group)]
        for resource in resources:
            assert resource.get_tags() == backend.describe_tags(
                filters={"resource-id": [resource.id]})
        ec2.terminate_instances(InstanceIds=ids[:2])
        filters = [{"Name": "tag:stack", "Values": ["s0"]},
                   {"Name": "instance-state-name", "Values": ["running"]}]
        # Either order: speed_up_moto checks the state first, the same AND of both.
        for order in (filters, filters[::-1]):
            found = sorted(i["InstanceId"] for r in ec2.describe_instances(
                Filters=order)["Reservations"] for i in r["Instances"])
            assert found == sorted(ids[2::2])
    assert moto.ec2.utils.passes_filter_dict.__module__ == "local_cloud"


def test_the_event_pump_backs_off_while_the_queue_cannot_be_read(caplog):
    """A receive that keeps failing (here a parameter SQS refuses) is tried about once a
    second, not in a busy loop that logs a traceback per try."""
    from botocore.exceptions import ParamValidationError

    calls = []

    class FailingSqs:
        def receive_message(self, **params):
            calls.append(params)
            raise ParamValidationError(report="VisibilityTimeout: not an integer")

    cloud = object.__new__(local_cloud.LocalCloud)
    cloud.stop_event, cloud.queue_url, cloud.visibility_seconds = threading.Event(), "q", 1
    cloud.client = lambda service: FailingSqs()
    pump = threading.Thread(target=cloud.pump_events)
    pump.start()
    time.sleep(1.5)
    cloud.stop_event.set()
    pump.join(timeout=5)
    assert not pump.is_alive() and 1 <= len(calls) <= 3, len(calls)


def lambda_user_data(bucket, key):
    import lambda_function

    settings = lambda_function.load_settings({})
    obj = {"bucket": bucket, "key": key, "etag": "e", "version_id": "", "sequencer": "",
           "event_name": "ObjectCreated:Put", "size": 1}
    template = (REPO / "bootstrap" / "bootstrap.sh").read_text()
    return lambda_function.render_user_data(template, obj, settings)


@pytest.mark.long_running
def test_demo_command_exits_zero_and_reports_every_sample(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "demo", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    samples = sorted(p.name for p in (REPO / "samples").iterdir())
    for name in samples:
        assert f"demo/{name}" in done.stdout
    reports = {p.name: json.loads(p.read_text()) for p in (out / "demo").glob("*.json")}
    assert sorted(reports) == sorted(f"{name}.json" for name in samples)
    expected = {name: AwsS3.analyse_file(str(REPO / "samples" / name)) for name in samples}
    for name in samples:
        report, local = reports[f"{name}.json"], expected[name]
        assert report["input"]["key"] == f"demo/{name}"
        for field in ("format", "compression", "lines", "bytes", "sha256", "summary"):
            assert report[field] == local[field], (name, field)
    assert {reports[f"{n}.json"]["format"] for n in samples} >= {"csv", "fastq", "vcf"}
    assert any(r["compression"] == "gzip" for r in reports.values())
    assert "machines still running: 0" in done.stdout


@pytest.fixture
def cloud(tmp_path):
    with LocalCloud(workers=2, tracker=Tracker(quiet=True)) as running:
        yield running


# Each machine costs the 2-core CI box about 0.55 CPU-seconds (bash, curl, the moto server, the
# job): 500 take two to three minutes. Their python3 starts warm (local_forkserver): cold, it
# would add 0.6 CPU-s a machine of importing boto3. AWSFUN_BURST_FILES=N changes the count.
BURST_FILES = int(os.environ.get("AWSFUN_BURST_FILES", "500"))
# The cap (deploy.sh --max-workers) below the machine slots: only the cap can hold them to 3.
BURST_SLOTS = 4
BURST_CAP = 3


def burst_keys(count, canary):
    """Return `count` keys for a burst: a folder per index, a command injection that would
    create the file `canary`, and one of HOSTILE_NAMES (pure; the EC2 and Batch bursts and
    bench/engines.py send the same keys)."""
    injections = [f"$(touch {canary})", f"`touch {canary}`", f";touch {canary};",
                  f"' && touch {canary} #"]
    return [f"burst/{index:03d}/{injections[index % len(injections)]}/"
            f"{HOSTILE_NAMES[index % len(HOSTILE_NAMES)]}" for index in range(count)]


def burst_body(index):
    """Return the small CSV a burst uploads as its index-th file (pure)."""
    return f"id,value\n{index},{index * 2}\n".encode()


def sample_live_machines(ec2, stop, peaks):
    """Append, until `stop` is set, how many instances EC2 itself says are pending or running
    (DescribeInstanceStatus, every instance): the cap measured from EC2's own state.

    Every 0.25 s: each call walks every instance the burst made, in the process that also
    serves the machines, and at 20 a second it cost a 200-file burst a fifth of its time; a
    machine lives for seconds, so each is still seen many times."""
    while not stop.is_set():
        live = 0
        for page in ec2.get_paginator("describe_instance_status").paginate(
                IncludeAllInstances=True, Filters=[
                    {"Name": "instance-state-name", "Values": ["pending", "running"]}]):
            live += len(page["InstanceStatuses"])
        peaks.append(live)
        stop.wait(0.25)


@pytest.mark.long_running
def test_burst_of_uploads_at_once_with_hostile_names(tmp_path):
    """BURST_FILES small uploads at once through the events queue, a cap of 3 workers on 4
    machine slots: one report per input, each naming its key exactly; never more than 3
    machines at once by EC2's own count; records deferred at the cap came back and were
    launched (none dead-lettered); no machine left, no token launched twice, no report for a
    report."""
    canary = tmp_path / "CANARY"
    keys = burst_keys(BURST_FILES, canary)
    with LocalCloud(workers=BURST_SLOTS, tracker=Tracker(quiet=True),
                    max_workers=BURST_CAP, warm_python=True) as cloud:
        s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]
        stop, peaks = threading.Event(), []
        sampler = threading.Thread(target=sample_live_machines,
                                   args=(cloud.client("ec2"), stop, peaks), daemon=True)
        sampler.start()
        started = time.monotonic()
        for index, key in enumerate(keys):
            s3.put_object(Bucket=bucket, Key=key, Body=burst_body(index))
            cloud.tracker.stage(key, "uploaded")
        pending = cloud.tracker.wait_for(keys, timeout=60 + 3 * BURST_FILES)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join(timeout=10)
        logging.getLogger(__name__).warning(
            "burst: %d files in %.1f s (%.2f files/s), peak %d machines, %d deferrals, "
            "%d invocations", BURST_FILES, elapsed, BURST_FILES / elapsed, max(peaks),
            cloud.deferred, cloud.invocations)
        assert pending == []
        assert cloud.wait_idle() == []
        assert len(peaks) > 10 and max(peaks) <= BURST_CAP
        assert cloud.deferred > 0  # the cap held work back, and it came back after all
        sqs = cloud.client("sqs")
        dead = sqs.get_queue_attributes(QueueUrl=cloud.names["dlq_url"], AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        assert dead == {"ApproximateNumberOfMessages": "0",
                        "ApproximateNumberOfMessagesNotVisible": "0"}
        outputs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="analysis/") for o in page.get("Contents", [])]
        reports = [k for k in outputs if k.endswith(".json") and not k.endswith(".error.json")]
        named = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["input"]["key"]
                 for k in reports]
        # One report per input, each for exactly its key; nothing else but their logs and
        # receipts.
        assert sorted(named) == sorted(keys)
        assert sorted(outputs) == sorted([AwsS3.report_key(k) for k in keys]
                                         + [AwsS3.report_key(k, ".log") for k in keys]
                                         + [AwsS3.receipt_key(AwsS3.report_key(k)) for k in keys])
        # Every launch had its own token and booted one machine, which shut itself down;
        # the reports and logs (keys with "analysis") started none.
        tokens = list(cloud.booted.values())
        assert len(tokens) == len(set(tokens)) == len(cloud.tokens) == BURST_FILES
        assert sorted(m["key"] for m in cloud.machines.values()) == sorted(keys)
        assert {m["halt"] for m in cloud.machines.values()} == {"shutdown -h now"}
        assert cloud.warm_starts() == BURST_FILES  # one python3 a job, each from the fork server
    assert not canary.exists()


def test_multipart_upload_events_process_the_object_once(cloud, tmp_path):
    big = tmp_path / "big.csv"
    row = b"1,2,3,4,5,6,7,8\n"
    big.write_bytes(b"a,b,c,d,e,f,g,h\n" + row * (9 * 1024 * 1024 // len(row)))
    outcomes = process_files(cloud, [big], "multi", timeout=120)
    assert outcomes == {"multi/big.csv": "report"}
    assert cloud.wait_idle() == []
    # moto sends an event per multipart completion step; the handler gives both the same
    # ClientToken, and EC2 (the local cloud's moto, see honour_client_tokens) answers the
    # repeat with the first instance: one instance exists at all, and one machine ran.
    reservations = cloud.client("ec2").describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 1
    assert len(cloud.booted) == len(cloud.tokens) == 1
    _, report = cloud.fetch_report("multi/big.csv")
    assert report["summary"]["rows"] == 9 * 1024 * 1024 // len(row)


def test_failing_worker_leaves_error_report_and_run_fails(cloud, tmp_path, capsys):
    bad = tmp_path / "broken.csv.gz"
    bad.write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000, mtime=0)[:-20])
    good = tmp_path / "fine.csv"
    good.write_text("a,b\n1,2\n")
    outcomes = process_files(cloud, [bad, good], "mixed", timeout=120)
    assert outcomes == {"mixed/broken.csv.gz": "error", "mixed/fine.csv": "report"}
    outcome, report = cloud.fetch_report("mixed/broken.csv.gz")
    assert outcome == "error" and "gzip" in report["error"]
    status = local_cloud.finish(cloud, outcomes, tmp_path / "out")
    assert status == 1
    assert (tmp_path / "out" / "mixed" / "broken.csv.gz.error.json").exists()
    assert "1 of 2 files reported" in capsys.readouterr().out


def test_run_command_rejects_missing_files(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "run", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a file" in done.stderr


@pytest.mark.parametrize("option, value", [("--max-workers", "0"), ("--max-workers", "-1"),
                                           ("--workers", "0")])
def test_run_refuses_a_count_below_one_in_one_line(tmp_path, option, value):
    """0 once meant "no cap" silently, and -1 ended in deploy.sh's traceback."""
    sample = tmp_path / "a.csv"
    sample.write_text("a\n1\n")
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "run", str(sample),
                           f"{option}={value}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"'{value}': a whole number of workers >= 1" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr  # not argparse's usage first


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("demo", "run", "up"):
        assert command in done.stdout


def test_summary_table_splits_upload_launch_and_worker(capsys):
    tracker = Tracker(quiet=True)
    tracker.files["in/a.csv"] = {
        "stages": {"uploading": 1.0, "uploaded": 3.0, "launched": 3.5, "running": 4.0,
                   "report": 6.5},
        "outcome": "report", "detail": "csv, 3 lines"}
    local_cloud.print_table(types.SimpleNamespace(tracker=tracker), {"in/a.csv": "report"})
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:6] == ["file", "outcome", "upload", "launch", "worker", "total"]
    # upload 1->3, launch 3->4 (event, handler, boot), worker 4->6.5, total 1->6.5
    assert row.split()[:6] == ["in/a.csv", "report", "2.00s", "1.00s", "2.50s", "5.50s"]


# --- EC2's answers to a used ClientToken, and S3's sequencer ------------------------------


def test_local_ec2_answers_a_used_client_token_as_ec2_does(local_aws):
    """EC2 since January 2025 (moto ignores ClientToken): the same token and parameters give
    the same instance while it is not terminated, IdempotentInstanceTerminated once it is,
    and IdempotentParameterMismatch whenever the other parameters differ."""
    import boto3
    from botocore.exceptions import ClientError

    ec2 = boto3.client("ec2")
    from support import worker_image_id

    image = worker_image_id(boto3.client("ssm"))

    def launch(token, user_data="echo a"):
        params = dict(ImageId=image, MinCount=1, MaxCount=1, UserData=user_data)
        if token:
            params["ClientToken"] = token
        return ec2.run_instances(**params)["Instances"][0]["InstanceId"]

    def refusal(token, user_data="echo a"):
        with pytest.raises(ClientError) as raised:
            launch(token, user_data)
        return raised.value.response["Error"]["Code"]

    restore = local_cloud.honour_client_tokens()
    try:
        first = launch("token-1")
        assert launch("token-1") == first
        assert refusal("token-1", "echo b") == "IdempotentParameterMismatch"
        assert launch("token-2") != first
        assert launch(None) != launch(None)  # no token: a new instance each time
        ec2.terminate_instances(InstanceIds=[first])
        assert refusal("token-1") == "IdempotentInstanceTerminated"
        assert refusal("token-1", "echo b") == "IdempotentParameterMismatch"
    finally:
        restore()


def test_local_s3_events_carry_one_sequencer_per_upload(local_aws):
    """S3 gives each write its own event `sequencer` (two PUTs of the same bytes differ);
    moto sends none, and sends two events for one multipart upload, which share one here."""
    import boto3

    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    s3.create_bucket(Bucket="seq-data")
    url = sqs.create_queue(QueueName="seq-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"]
    s3.put_bucket_notification_configuration(Bucket="seq-data", NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})
    restore = local_cloud.stamp_s3_sequencers()
    try:
        for _ in range(2):
            s3.put_object(Bucket="seq-data", Key="same.csv", Body=b"a,b\n")
        upload = s3.create_multipart_upload(Bucket="seq-data", Key="multi.csv")["UploadId"]
        part = s3.upload_part(Bucket="seq-data", Key="multi.csv", UploadId=upload, PartNumber=1,
                              Body=b"x" * 10)["ETag"]
        s3.complete_multipart_upload(Bucket="seq-data", Key="multi.csv", UploadId=upload,
                                     MultipartUpload={"Parts": [{"ETag": part, "PartNumber": 1}]})
    finally:
        restore()
    from support import receive_s3_records

    events = receive_s3_records(sqs, url, 4)
    records = [r["s3"]["object"] for e in events for r in e["Records"]]
    same = [o["sequencer"] for o in records if o["key"] == "same.csv"]
    multi = {o["sequencer"] for o in records if o["key"] == "multi.csv"}
    assert len(same) == 2 and same[0] != same[1] and len(multi) == 1
    assert all(re.fullmatch("[0-9A-F]+", o["sequencer"]) for o in records)


def test_a_repeated_event_and_a_reupload_after_a_failed_job(cloud, tmp_path):
    """The issue's two cases on the local cloud, whose EC2 answers as EC2 does since January
    2025: the same event again after its worker ended is skipped (EC2 answers
    IdempotentInstanceTerminated; no retries, no dead letter), and after the error report
    is deleted, the same bytes uploaded again (same eTag, new sequencer) get a new worker
    and a new report, where the ended instance used to come back as "launched"."""
    bad = tmp_path / "broken.csv.gz"
    bad.write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000, mtime=0)[:-20])
    events, results = [], []
    original = cloud.invoke_handler

    def invoke(event):
        # An SQS batch: each message's body is the S3 event.
        events.extend(json.loads(record["body"]) for record in event["Records"])
        original(event)

    cloud.invoke_handler = invoke
    assert process_files(cloud, [bad], "again", timeout=120) == {"again/broken.csv.gz": "error"}
    assert cloud.wait_idle() == []
    first = next(e for e in events if "Records" in e
                 and e["Records"][0]["s3"]["object"]["key"].startswith("again"))
    os.environ.update(cloud.function_env)
    results.append(lambda_function.lambda_handler(json.loads(json.dumps(first)), None))
    [skipped] = results[0]["skipped"]
    assert skipped["reason"].startswith("already processed: report analysis/again/broken.csv.gz")
    assert results[0]["launched"] == []

    s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]
    s3.delete_object(Bucket=bucket, Key=AwsS3.report_key("again/broken.csv.gz", ".error.json"))
    machines = len(cloud.machines)
    cloud.tracker.files.pop("again/broken.csv.gz", None)
    assert process_files(cloud, [bad], "again", timeout=120) == {"again/broken.csv.gz": "error"}
    assert cloud.wait_idle() == []
    assert len(cloud.machines) == machines + 1
    assert cloud.fetch_report("again/broken.csv.gz")[0] == "error"
    dlq = cloud.names.get("dlq_url")
    if dlq:
        attributes = cloud.client("sqs").get_queue_attributes(
            QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages"])["Attributes"]
        assert attributes["ApproximateNumberOfMessages"] == "0"


# --- friendliness: folders, options checked before start-up, rows told apart, `up` --------


def test_run_takes_folders_recursively_and_keeps_relative_paths_in_the_keys(tmp_path):
    """Two R1.fastq.gz in different folders are two inputs; hidden files and folders are
    skipped; a file given as such keeps its name only."""
    runs = tmp_path / "runs"
    for relative in ("a/R1.fastq.gz", "b/R1.fastq.gz", "b/R2.fastq.gz", "b/deep/x y.csv",
                     "b/.DS_Store", ".git/config", ".hidden.csv"):
        (runs / relative).parent.mkdir(parents=True, exist_ok=True)
        (runs / relative).write_text("x\n")
    single = tmp_path / "single.vcf"
    single.write_text("x\n")
    keys = local_cloud.input_keys("in/", [str(runs), str(single)])
    assert keys == {"in/a/R1.fastq.gz": runs / "a/R1.fastq.gz",
                    "in/b/R1.fastq.gz": runs / "b/R1.fastq.gz",
                    "in/b/R2.fastq.gz": runs / "b/R2.fastq.gz",
                    "in/b/deep/x y.csv": runs / "b/deep/x y.csv",
                    "in/single.vcf": single}
    assert local_cloud.object_key("", runs / "a/R1.fastq.gz", runs) == "a/R1.fastq.gz"


def refused(capsys, argv, monkeypatch):
    """Run local_cloud's command for argv in-process; return its one stderr line. A
    LocalCloud that starts fails the test: every check comes before start-up."""
    def no_start(*args, **kwargs):
        raise AssertionError("the local cloud started before the options were checked")

    monkeypatch.setattr(local_cloud, "LocalCloud", no_start)
    with pytest.raises(SystemExit) as stopped:
        args = local_cloud.build_parser().parse_args(argv)
        args.func(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("setup, argv, said", [
    (None, ["--timeout", "0"], "argument --timeout: '0': a number of seconds > 0"),
    (None, ["--timeout=-5"], "argument --timeout: '-5': a number of seconds > 0"),
    (None, ["--timeout", "nan"], "argument --timeout: 'nan': a number of seconds > 0"),
    (None, ["--workers", "-1"], "'-1': a whole number of workers >= 1"),
    ("file", ["--out", "{tmp}/taken"], "local_cloud.py: --out {tmp}/taken: a file, not a folder"),
    ("dup", ["{tmp}/a/R1.fq", "{tmp}/b/R1.fq"], "two files would share the key 'incoming/R1.fq'"),
    ("empty", ["{tmp}/empty"], "local_cloud.py: no file (hidden ones are skipped) in {tmp}/empty"),
    (None, ["--prefix", "analysis-2024"], "the pipeline skips keys containing 'analysis'"),
])
def test_run_checks_every_option_before_start_up(tmp_path, capsys, monkeypatch, setup, argv,
                                                  said):
    sample = tmp_path / "a" / "R1.fq"
    sample.parent.mkdir()
    sample.write_text("@r\nA\n+\nI\n")
    if setup == "file":
        (tmp_path / "taken").write_text("")
    elif setup == "dup":
        (tmp_path / "b").mkdir()
        (tmp_path / "b" / "R1.fq").write_text("@r\nA\n+\nI\n")
    elif setup == "empty":
        (tmp_path / "empty" / ".cache").mkdir(parents=True)
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    if not any(part.startswith(str(tmp_path)) and not part.endswith("taken") for part in argv):
        argv.append(str(sample))
    line = refused(capsys, ["run", *argv], monkeypatch)
    assert said.replace("{tmp}", str(tmp_path)) in line


def test_table_rows_can_be_told_apart():
    """A cut to the column keeps the start and the distinguishing end (R1/R2); keys that a
    cut would still make the same are shown whole; control characters are escaped."""
    deep = "incoming/project-2024-rnaseq/batch-07/lane-3/"
    keys = [deep + "sample_R1.fastq.gz", deep + "sample_R2.fastq.gz",
            "x" * 30 + "-first-" + "y" * 30, "x" * 30 + "-other-" + "y" * 30, "tab\there.csv"]
    names = local_cloud.table_names(keys)
    assert len(set(names.values())) == len(keys)
    assert names[keys[0]].startswith("incoming/project")
    assert names[keys[0]].endswith("sample_R1.fastq.gz") and len(names[keys[0]]) == 40
    assert names[keys[2]] == keys[2] and names[keys[3]] == keys[3]  # the middle differs
    assert names["tab\there.csv"] == "tab\\there.csv"
    assert (local_cloud.plural(1, "worker"), local_cloud.plural(2, "worker"),
            local_cloud.plural(0, "file")) == ("1 worker", "2 workers", "0 files")


def test_up_prints_commands_that_work_pasted_as_they_are(local_aws, tmp_path):
    """The lines `up` prints, pasted into bash (with an AWS_PROFILE of the person's own that
    would otherwise win), reach the endpoint with deploy.sh's --prefix: status answers for
    that prefix, account and region."""
    names = {"data_bucket": "local-data-123456789012-us-east-1",
             "software_bucket": "local-software-123456789012-us-east-1",
             "function_name": "local-launcher"}
    text = local_cloud.up_instructions(local_aws, names, "lc-2")
    pasted = [line.strip() for line in text.splitlines()
              if line.strip().startswith((". ", "unset ", "export ")) or " status --prefix " in line]
    # This suite runs in a virtual environment: the lines activate it first, as a person's
    # other shell needs for `results` (jinja2, plotly) and deploy.sh's python3.
    assert pasted[0] == f". {sys.prefix}/bin/activate" and len(pasted) == 4
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("AWS_") or key in ("AWS_CONFIG_FILE",
                                                    "AWS_SHARED_CREDENTIALS_FILE")}
    env.update({"AWS_PROFILE": "someone"})
    done = subprocess.run(["bash", "-c", "\n".join(pasted)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("awsfun lc-2 in account 123456789012, region us-east-1")
    assert " results --prefix lc-2\n" in text and " logs --prefix lc-2 incoming/" in text


# --- a running `up` across a teardown and redeploys from another shell ---------------------


def client_error(code, message, operation="ReceiveMessage"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


def bare_cloud():
    """A LocalCloud with only what its polling loops read: no server, nothing deployed."""
    cloud = object.__new__(local_cloud.LocalCloud)
    cloud.stop_event, cloud.queue_url, cloud.visibility_seconds = threading.Event(), "q", 1
    cloud.names = {"events_queue": "local-events"}
    return cloud


def run_for(target, stop_event, seconds):
    thread = threading.Thread(target=target)
    thread.start()
    time.sleep(seconds)
    stop_event.set()
    thread.join(timeout=5)
    assert not thread.is_alive()


def person_lines(caplog, logger_name="awsfun.local"):
    """Return the (level, message) a person would see (WARNING and up) from logger_name;
    fail on any record that carries a traceback."""
    records = [r for r in caplog.records if r.name == logger_name]
    assert [r for r in records if r.exc_info or r.exc_text] == []
    return [(r.levelname, r.getMessage()) for r in records if r.levelno >= logging.WARNING]


def test_a_lasting_receive_fault_is_one_line_once_without_a_traceback(caplog):
    """A receive that keeps failing is tried about once a second and logged once, as one
    line with the AWS code and message: it used to log a traceback every second."""
    calls = []

    class FailingSqs:
        def receive_message(self, **params):
            calls.append(params)
            raise client_error("ServiceUnavailable", "try\nlater")

    cloud = bare_cloud()
    cloud.client = lambda service: FailingSqs()
    caplog.set_level(logging.DEBUG, logger="awsfun.local")
    run_for(cloud.pump_events, cloud.stop_event, 2.5)
    assert 2 <= len(calls) <= 4, len(calls)
    assert person_lines(caplog) == [
        ("ERROR", "cannot receive from the events queue: ServiceUnavailable: try later")]


# SQS's code for a missing queue in its query protocol, and in its JSON protocol.
@pytest.mark.parametrize("code", ["AWS.SimpleQueueService.NonExistentQueue",
                                  "QueueDoesNotExist"])
def test_a_torn_down_events_queue_is_said_once_and_taken_again_after_a_redeploy(caplog, code):
    """`deploy.sh teardown` against a running `up` deletes the events queue: the pump says
    so once (not a traceback a second), waits quietly, and when a redeploy makes the queue
    again it takes over its event source and hands the handler its events."""
    calls, taken_over, handed = [], [], []
    redeployed = threading.Event()
    threading.Timer(2.5, redeployed.set).start()  # gone for about two polls

    class Sqs:
        def receive_message(self, **params):
            calls.append(params)
            if len(calls) == 1 or redeployed.is_set():
                return {"Messages": [{"MessageId": f"m{len(calls)}", "ReceiptHandle": "r",
                                      "Body": "{}"}]}
            raise client_error(code, "The specified queue does not exist.")

    def take_over():
        # What take_over_the_event_source asks first: the queue's URL.
        if not redeployed.is_set():
            raise client_error(code, "The specified queue does not exist.", "GetQueueUrl")
        taken_over.append(True)

    cloud = bare_cloud()
    cloud.client = lambda service: Sqs()
    cloud.take_over_the_event_source = take_over
    cloud.invoke_handler = lambda event: handed.extend(r["messageId"] for r in event["Records"])
    run_for(cloud.pump_events, cloud.stop_event, 4.5)
    assert person_lines(caplog) == [
        ("WARNING", ("the events queue local-events is gone (torn down?): no event is taken "
                     "until a redeploy brings it back")),
        ("WARNING", "the events queue is back (redeployed): taking its events again")]
    assert taken_over == [True] and handed[0] == "m1" and len(handed) >= 2, handed


def test_a_lasting_instance_listing_fault_is_one_line_once(caplog, monkeypatch):
    """boot_instances logged a traceback on every poll of a lasting fault; now one line with
    the exception's text, once, and a line when it works again."""
    failures = iter([RuntimeError("moto's backend is gone")] * 5)

    def running_instance_ids():
        failure = next(failures, None)
        if failure:
            raise failure
        return []

    monkeypatch.setattr(local_cloud, "BOOT_POLL_SECONDS", 0.05)
    cloud = bare_cloud()
    cloud.client = lambda service: None
    cloud.running_instance_ids = running_instance_ids
    cloud.boot_new_instances = lambda ec2, ids: None
    caplog.set_level(logging.INFO, logger="awsfun.local")
    run_for(cloud.boot_instances, cloud.stop_event, 0.6)
    assert next(failures, None) is None  # every failure was polled, then it worked
    assert person_lines(caplog) == [
        ("ERROR", "cannot list the running instances: moto's backend is gone")]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "can list the running instances again"]


def test_a_running_cloud_follows_redeploys_of_the_engine_and_settings(tmp_path, monkeypatch):
    """Lambda gives each new invocation the function's configuration as last updated: a
    redeploy against a running `up` with --engine batch has the next upload run as a Batch
    job here, and one back to --engine ec2 with --max-workers 3 has the next one boot an instance,
    its handler seeing MAX_WORKERS=3 and no JOB_QUEUE (dropped by the redeploy). The local
    cloud used to keep the configuration it read at start."""
    seen = []
    handler = lambda_function.lambda_handler

    def watched(event, context):
        seen.append({name: os.environ.get(name) for name in ("ENGINE", "MAX_WORKERS",
                                                             "JOB_QUEUE")})
        return handler(event, context)

    monkeypatch.setattr(lambda_function, "lambda_handler", watched)
    said = []
    cloud = LocalCloud(workers=2, tracker=Tracker(quiet=True), batch_ready=True)
    cloud.say = said.append
    with cloud:
        assert said[1] == (f"deploying the stack with deploy.sh --prefix local deploy to "
                           f"{cloud.endpoint}")
        s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]

        def redeploy(*options):
            done = subprocess.run(["bash", str(REPO / "deploy.sh"), "--prefix", "local",
                                   "deploy", *options], env=cloud.environment(),
                                  capture_output=True, text=True, timeout=300, check=False)
            assert done.returncode == 0, done.stderr

        def process(key):
            seen.clear()
            s3.put_object(Bucket=bucket, Key=key, Body=b"a,b\n1,2\n")
            cloud.tracker.stage(key, "uploaded")
            assert cloud.tracker.wait_for([key], 120) == []
            assert cloud.tracker.outcome(key) == "report"
            return seen[0]

        redeploy("--engine", "batch", "--max-vcpus", "2")
        assert process("in/batch.csv")["ENGINE"] == "batch"
        assert [job["key"] for job in cloud.batch.jobs.values()] == ["in/batch.csv"]
        # deploy keeps the deployed engine without --engine: switching back names it.
        redeploy("--engine", "ec2", "--max-workers", "3")
        assert process("in/ec2.csv") == {"ENGINE": None, "MAX_WORKERS": "3", "JOB_QUEUE": None}
        assert [machine["key"] for machine in cloud.machines.values()] == ["in/ec2.csv"]
        assert cloud.wait_idle() == []


def test_the_start_up_line_names_the_deploy_options_it_uses(monkeypatch):
    """Under --engine batch the progress line said `deploy.sh --prefix local` only; it now
    shows the arguments deploy.sh is run with (the deploy is stopped here: it is the line)."""
    said = []
    cloud = LocalCloud(workers=3, tracker=Tracker(quiet=True), engine="batch")
    cloud.say = said.append

    def deploy():
        raise local_cloud.LocalCloudError("stopped by the test")

    cloud.deploy = deploy
    with pytest.raises(local_cloud.LocalCloudError):
        cloud.start()
    assert said[1] == ("deploying the stack with deploy.sh --prefix local deploy --engine batch "
                       f"--max-vcpus 3 to {cloud.endpoint}")
    assert LocalCloud(max_workers=2, spot=True).deploy_arguments() == [
        "--prefix", "local", "deploy", "--max-workers", "2", "--spot"]


def test_up_names_what_the_work_runs_on():
    names = {"data_bucket": "d", "software_bucket": "s", "function_name": "f"}
    batch = local_cloud.up_instructions("http://x", names, "local", engine="batch",
                                        function_env={"JOB_QUEUE": "local-jobs"})
    assert "  runs on          Batch job queue local-jobs (run in this process)\n" in batch
    ec2 = local_cloud.up_instructions("http://x", names, "local",
                                      function_env={"LAUNCH_TEMPLATE": "local_worker"})
    assert "  runs on          launch template local_worker (run in this process)\n" in ec2


@pytest.mark.parametrize("argv, option", [
    (["up", "--engine", "batch", "--max-workers", "3"], "--max-workers"),
    (["up", "--spot", "--engine=batch"], "--spot"),
    (["run", "--engine", "batch", "--max-workers=2", "{file}"], "--max-workers"),
    (["run", "--engine", "batch", "--spot", "{file}"], "--spot"),
])
def test_options_the_batch_engine_ignores_are_refused_in_one_line(tmp_path, capsys,
                                                                  monkeypatch, argv, option):
    """The handler reads neither MAX_WORKERS nor SPOT under ENGINE=batch: the options were
    accepted and dropped silently; now argparse's one line, status 2, nothing started."""
    sample = tmp_path / "a.csv"
    sample.write_text("a\n1\n")
    line = refused(capsys, [part.replace("{file}", str(sample)) for part in argv], monkeypatch)
    # The program's name is pytest's here; main's is local_cloud.py (the subprocess below).
    assert line.endswith(f" {argv[0]}: argument {option}: applies to --engine ec2 only (under "
                         "--engine batch, --workers sets the local vCPUs) (--help for usage)")
    # Under ec2 (the default) both are taken.
    args = local_cloud.build_parser().parse_args(["up", "--max-workers", "3", "--spot"])
    assert (args.max_workers, args.spot, args.engine) == (3, True, "ec2")
    with pytest.raises(SystemExit):
        local_cloud.build_parser().parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-workers N --engine ec2 only: deploy.sh --max-workers, at most N instances" \
        in help_text
    assert "at most N machines" not in help_text


def test_main_refuses_spot_under_the_batch_engine_in_one_line():
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "up", "--engine",
                           "batch", "--spot"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert (done.returncode, done.stderr) == (2, (
        "local_cloud.py up: argument --spot: applies to --engine ec2 only (under --engine "
        "batch, --workers sets the local vCPUs) (--help for usage)\n"))
