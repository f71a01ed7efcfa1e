"""Fault injection on the local cloud (issue 6).

Every fault is injected into the running pipeline (S3 event -> handler -> RunInstances ->
user-data under bash -> worker), and every case asserts the same three things:
  * each machine that booted shut itself down and was terminated;
  * the input is byte-identical (or, where the fault deletes it, still absent);
  * the object is accounted for: a report, an error report, or a dead-letter entry;
then `deploy.py reconcile --key-prefix P` (as an operator runs it) brings the prefix back to
complete: no input unprocessed, no worker running, no dead letter left for it.

One local cloud serves every fault (deploying one costs seconds); each test has its own key
prefix and reconciles only that prefix. A watchdog minute lasts WATCHDOG_SECONDS here.
"""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import AwsS3
import deploy
import local_cloud
from local_cloud import FaultProxy, LocalCloud, Tracker

REPO = local_cloud.REPO
WATCHDOG_SECONDS = 4.0
OUTCOME_TIMEOUT = 120
CSV = b"sample,reads\nS1,10\nS2,20\n"
FASTQ_RECORD = b"@read\n" + b"ACGT" * 25 + b"\n+\n" + b"I" * 100 + b"\n"


@pytest.fixture(scope="module")
def shared_cloud():
    # A message goes to the dead-letter queue after Lambda's first try and 2 retries, as the
    # function's asynchronous invocations did, instead of a day's worth of receives.
    with LocalCloud(workers=2, tracker=Tracker(quiet=True),
                    watchdog_seconds_per_minute=WATCHDOG_SECONDS,
                    max_receive_count=local_cloud.LAMBDA_RETRIES + 1) as running:
        yield running


@pytest.fixture
def cloud(shared_cloud, monkeypatch):
    """The shared local cloud, reachable from this test; its hooks and settings reset after."""
    # conftest's autouse fixture points every test at no endpoint: point this one at the cloud.
    for name, value in local_cloud.local_environment(shared_cloud.endpoint).items():
        monkeypatch.setenv(name, value)
    yield shared_cloud
    shared_cloud.before_boot = None
    shared_cloud.setting_overrides.clear()
    publish_worker(shared_cloud)
    assert shared_cloud.wait_idle(60) == [], "a machine outlived its test"


# --- helpers: each fault's three assertions, and reconcile ---------------------------


def publish_worker(cloud, code=None):
    """Publish AwsS3.py (or a stand-in's code) to the software bucket."""
    body = (REPO / "AwsS3.py").read_bytes() if code is None else code.encode()
    cloud.client("s3").put_object(Bucket=cloud.names["software_bucket"], Key="AwsS3.py", Body=body)


def put(cloud, key, body):
    """Upload an input; return its eTag."""
    s3 = cloud.client("s3")
    etag = s3.put_object(Bucket=cloud.names["data_bucket"], Key=key, Body=body)["ETag"]
    cloud.tracker.stage(key, "uploaded", f"{len(body):,} bytes")
    return etag.strip('"')


def set_handler_setting(cloud, monkeypatch, name, value):
    """Change one of the function's settings for this test (the fixture restores it); the
    local Lambda reads the deployed configuration for each batch and puts this over it."""
    cloud.setting_overrides[name] = value
    cloud.function_env[name] = value
    monkeypatch.setenv(name, value)


def wait_for_outcome(cloud, *keys):
    """Wait until each key has an outcome and no machine runs."""
    assert cloud.tracker.wait_for(list(keys), OUTCOME_TIMEOUT) == []
    assert cloud.wait_idle(60) == []


def stored(cloud, key):
    """Return the input's bytes, or None once it is deleted."""
    s3 = cloud.client("s3")
    try:
        return s3.get_object(Bucket=cloud.names["data_bucket"], Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None


def s3_text(cloud, key):
    """Return an object of the data bucket as text (a report or a log)."""
    return cloud.client("s3").get_object(Bucket=cloud.names["data_bucket"],
                                         Key=key)["Body"].read().decode("utf-8")


def machines_for(cloud, key):
    """Return {instance id: halt reason} of every machine that booted for `key`."""
    with cloud.lock:
        return {iid: m["halt"] for iid, m in cloud.machines.items() if m["key"] == key}


def assert_shut_down(cloud, key, count=1, halt="shutdown -h now"):
    """Every machine for `key` halted as expected and EC2 terminated it."""
    machines = machines_for(cloud, key)
    assert len(machines) == count, machines
    assert all(reason and reason.startswith(halt) for reason in machines.values()), machines
    reply = cloud.client("ec2").describe_instances(InstanceIds=list(machines))
    states = {i["InstanceId"]: i["State"]["Name"]
              for r in reply["Reservations"] for i in r["Instances"]}
    assert set(states.values()) == {"terminated"}, states


def dead_letters(cloud):
    """Return the S3 events in the dead-letter queue, leaving them there."""
    sqs, url = cloud.client("sqs"), cloud.names["dlq_url"]
    found = []
    for _ in range(3):
        reply = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            found.append(json.loads(message["Body"]))
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"],
                                          VisibilityTimeout=0)
        if found:
            break
    return found


def dead_letter_keys(cloud):
    """Return the keys of every record in the dead-letter queue."""
    return {local_cloud._record_key(record)
            for event in dead_letters(cloud) for record in event.get("Records", [])}


def assert_accounted_for(cloud, key):
    """The key has a report, an error report or a dead letter; return which."""
    outcome, _ = cloud.fetch_report(key)
    if outcome:
        return outcome
    # SQS moves a message to the dead-letter queue on the receive after its last: a poll away.
    deadline = time.monotonic() + 10
    while key not in dead_letter_keys(cloud) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert key in dead_letter_keys(cloud), f"{key!r}: no report, no error report, no dead letter"
    return "dead letter"


def reconcile(cloud, prefix, dry_run=False, command_line=False):
    """Reconcile one key prefix of the local cloud; return the result.

    In-process (deploy.reconcile) by default, saving an interpreter start per call; with
    command_line, as an operator runs it: `deploy.py reconcile --json` in a subprocess.
    """
    if command_line:
        command = [sys.executable, str(REPO / "deploy.py"), "reconcile", "--prefix", cloud.prefix,
                   "--key-prefix", prefix, "--json"] + (["--dry-run"] if dry_run else [])
        done = subprocess.run(command, env=cloud.environment(), cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)
    clients = deploy.Clients()
    names = deploy.discover_names(clients("lambda"), deploy.resolve_names(clients, cloud.prefix))
    return deploy.reconcile(clients, names, key_prefix=prefix, dry_run=dry_run,
                            progress=deploy.Progress(echo=False))


def assert_reconciled_to_complete(cloud, prefix, command_line=False):
    """Reconcile the prefix, let what it launched finish, and check nothing is left to do."""
    result = reconcile(cloud, prefix, command_line=command_line)
    assert result["failed"] == [] and result["dlq_failed"] == [], result
    assert cloud.wait_idle(OUTCOME_TIMEOUT) == []
    check = reconcile(cloud, prefix, dry_run=True)
    counts = check["counts"]
    assert counts["unprocessed"] == 0 and counts["running"] == 0, check
    left = [entry for entry in check["dlq_kept"] + check["dlq_failed"]
            if any(r["key"].startswith(prefix) for r in entry["records"])]
    assert left == [], left
    return result


# --- the faults ----------------------------------------------------------------------


def find_worker_process(cloud, instance_id, which="child", timeout=60):
    """Return the pid of one machine's launcher python, or of the analysis child it forked."""
    scratch = str(cloud.scratch_root / instance_id).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        launchers = {}
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                status = (entry / "status").read_text()
            except (OSError, ValueError):
                continue
            # `python3 WORK_DIR/launcher.pyz WORK_DIR ...`: launcher and child; not `timeout`.
            if (len(argv) > 2 and b"python" in os.path.basename(argv[0])
                    and argv[1].startswith(scratch) and argv[1].endswith(b"/launcher.pyz")):
                parent = int(status.split("PPid:")[1].split()[0])
                launchers[int(entry.name)] = parent
        children = [pid for pid, parent in launchers.items() if parent in launchers]
        if children:
            return children[0] if which == "child" else launchers[children[0]]
        time.sleep(0.05)
    raise AssertionError(f"{instance_id} never started its worker")


def wait_until(condition, timeout, what):
    """Poll `condition` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# Not "analysis" in a key: the handler skips those as worker output (SKIP_SUBSTRING).
@pytest.mark.parametrize("which", ["child", "launcher"])
def test_worker_killed_mid_stream(cloud, which):
    """SIGKILL (as the OOM killer sends) while a quarter of the input has been streamed: to the
    analysis child (the OOM killer's pick: the large process), which the launcher reports, or
    to the launcher itself, which the bootstrap reports (the child dies with it)."""
    key = f"faults/killed/{which}/big.fastq"
    body = FASTQ_RECORD * (16 * 1024 * 1024 // len(FASTQ_RECORD))
    input_path = f"/{cloud.names['data_bucket']}/{key}"
    # A slow network (4 MB/s for this object) keeps the worker mid-stream for seconds.
    proxy = FaultProxy(cloud.endpoint, throttle=lambda method, path:
                       4 * 1024 * 1024 if method == "GET" and path == input_path else None)
    booted = []

    def through_the_proxy(instance_id, booting_key, env):
        if booting_key == key:
            env["AWS_ENDPOINT_URL"] = proxy.url
            booted.append(instance_id)

    cloud.before_boot = through_the_proxy
    try:
        put(cloud, key, body)
        wait_until(lambda: proxy.sent.get(input_path, 0) >= len(body) // 4, OUTCOME_TIMEOUT,
                   "a quarter of the input to stream")
        os.kill(find_worker_process(cloud, booted[0], which), signal.SIGKILL)
        streamed = proxy.sent[input_path]
        wait_for_outcome(cloud, key)
    finally:
        proxy.close()
    assert streamed < len(body), "the whole input had streamed before the kill"

    outcome, report = cloud.fetch_report(key)
    # Killed before it finished: the launcher or the shell, not the worker, reports it.
    assert outcome == "error", report
    assert (report["stage"], report["exit_code"], report["written_by"]) == ("worker", 137, "bootstrap")
    assert "SIGKILL" in report["error"]
    assert ("out of memory" in report["error"]) and \
        ("before it reported" in report["error"]) is (which == "launcher"), report
    assert "wrote error report for stage worker" in s3_text(cloud, AwsS3.report_key(key, ".log"))
    assert_shut_down(cloud, key)
    assert stored(cloud, key) == body
    assert_reconciled_to_complete(cloud, f"faults/killed/{which}/")


def test_worker_hung_past_a_short_watchdog(cloud, monkeypatch):
    """A hung worker under a 1-minute watchdog (WATCHDOG_SECONDS here): the machine's shutdown
    stops the bootstrap with SIGTERM, which still writes the error report and the log."""
    publish_worker(cloud, "import time\ntime.sleep(3600)\n")
    set_handler_setting(cloud, monkeypatch, "WATCHDOG_MINUTES", "1")
    key = "faults/hung/stuck.csv"
    started = time.monotonic()
    put(cloud, key, CSV)
    wait_for_outcome(cloud, key)
    assert time.monotonic() - started < 60  # the watchdog, not the worker's 60 s limit, ended it

    outcome, report = cloud.fetch_report(key)
    assert outcome == "error", report
    assert (report["stage"], report["exit_code"], report["written_by"]) == \
        ("bootstrap", 143, "bootstrap")
    assert "stopped by SIGTERM" in report["error"]
    assert "finished with status 143" in s3_text(cloud, AwsS3.report_key(key, ".log"))
    assert_shut_down(cloud, key, halt="watchdog after 1 min")
    assert stored(cloud, key) == CSV
    publish_worker(cloud)
    assert_reconciled_to_complete(cloud, "faults/hung/")


def _fastq(reads):
    return FASTQ_RECORD * reads


def _corrupt_gzip():
    data = bytearray(gzip.compress(_fastq(2000), mtime=0))
    data[200:260] = b"\xff" * 60
    return bytes(data)


BAD_INPUTS = {
    # name: (body, outcome, what the report must say)
    "corrupt.fastq.gz": (_corrupt_gzip(), "error", "corrupt gzip"),
    "truncated.fastq.gz": (gzip.compress(_fastq(2000), mtime=0)[:-40], "error", "truncated gzip"),
    "truncated.fastq": (_fastq(100) + FASTQ_RECORD[:30], "report", "ends inside a record"),
    "empty.csv": (b"", "error", "empty"),
}


def test_bad_inputs_each_leave_a_report_or_an_error_report(cloud):
    keys = {f"faults/bad/{name}": case for name, case in BAD_INPUTS.items()}
    for key, (body, _, _) in keys.items():
        put(cloud, key, body)
    wait_for_outcome(cloud, *keys)
    for key, (body, expected, says) in keys.items():
        outcome, report = cloud.fetch_report(key)
        assert outcome == expected, (key, report)
        if expected == "error":
            assert report["stage"] == "analyse" and says in report["error"], (key, report)
        else:
            # A FASTQ cut inside its last record is analysed, and the cut is reported.
            assert report["summary"]["malformed_records"] == 1, report["summary"]
            assert says in report["summary"]["first_malformed_reason"]
        assert_shut_down(cloud, key)
        assert stored(cloud, key) == body
    assert_reconciled_to_complete(cloud, "faults/bad/")


def test_object_deleted_between_event_and_boot(cloud):
    key = "faults/deleted/gone.csv"

    def delete_it(instance_id, booting_key, env):
        if booting_key == key:
            cloud.client("s3").delete_object(Bucket=cloud.names["data_bucket"], Key=key)

    cloud.before_boot = delete_it
    put(cloud, key, CSV)
    wait_for_outcome(cloud, key)
    outcome, report = cloud.fetch_report(key)
    assert outcome == "error" and report["stage"] == "analyse", report
    assert report["error_code"] in ("404", "NoSuchKey", "NotFound"), report
    assert_shut_down(cloud, key)
    assert stored(cloud, key) is None  # nothing recreated the input
    result = assert_reconciled_to_complete(cloud, "faults/deleted/")
    assert result["launched"] == [] and result["counts"]["inputs"] == 0


def test_object_overwritten_between_event_and_boot(cloud):
    key = "faults/overwritten/table.csv"
    second = CSV + b"S3,30\n"
    overwritten = []

    def overwrite_first_boot(instance_id, booting_key, env):
        if booting_key == key and not overwritten:
            overwritten.append(put(cloud, key, second))

    cloud.before_boot = overwrite_first_boot
    first_etag = put(cloud, key, CSV)
    # Two versions, two events, two machines: wait until both have halted.
    deadline = time.monotonic() + OUTCOME_TIMEOUT
    while len(machines_for(cloud, key)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_for_outcome(cloud, key)
    outcome, report = cloud.fetch_report(key)
    # Whichever machine ran first analysed the object as it is now: one report, of version 2.
    assert outcome == "report", report
    assert report["input"]["etag"] == overwritten[0] != first_etag
    assert report["sha256"] == hashlib.sha256(second).hexdigest()
    assert_shut_down(cloud, key, count=2)
    assert stored(cloud, key) == second
    result = assert_reconciled_to_complete(cloud, "faults/overwritten/")
    assert result["launched"] == []


def test_report_put_denied(cloud):
    """The machine may not write the report (as if its role lacked s3:PutObject on it)."""
    key = "faults/denied/table.csv"
    report_path = f"/{cloud.names['data_bucket']}/{AwsS3.report_key(key)}"
    proxy = FaultProxy(cloud.endpoint,
                       lambda method, path: (403, "AccessDenied")
                       if method == "PUT" and path == report_path else None)

    def through_the_proxy(instance_id, booting_key, env):
        if booting_key == key:
            env["AWS_ENDPOINT_URL"] = proxy.url

    cloud.before_boot = through_the_proxy
    try:
        put(cloud, key, CSV)
        wait_for_outcome(cloud, key)
    finally:
        proxy.close()
    assert proxy.refused, "the worker never tried to write its report"
    outcome, report = cloud.fetch_report(key)
    assert outcome == "error" and report["error_code"] == "AccessDenied", report
    assert report["written_by"] == "worker"
    assert "worker failed and wrote its error report" in s3_text(cloud, AwsS3.report_key(key, ".log"))
    assert_shut_down(cloud, key)
    assert stored(cloud, key) == CSV
    assert_reconciled_to_complete(cloud, "faults/denied/")


def test_software_bucket_missing_the_worker(cloud):
    cloud.client("s3").delete_object(Bucket=cloud.names["software_bucket"], Key="AwsS3.py")
    key = "faults/noworker/table.csv"
    put(cloud, key, CSV)
    wait_for_outcome(cloud, key)
    outcome, report = cloud.fetch_report(key)
    assert outcome == "error" and report["stage"] == "fetch", report
    assert f"s3://{cloud.names['software_bucket']}/AwsS3.py" in report["error"]
    assert_shut_down(cloud, key)
    assert stored(cloud, key) == CSV
    publish_worker(cloud)
    assert_reconciled_to_complete(cloud, "faults/noworker/")


@pytest.mark.parametrize("code, status", [("InsufficientInstanceCapacity", 500),
                                          ("UnauthorizedOperation", 403)])
def test_run_instances_failing_until_retries_run_out(cloud, code, status):
    prefix = f"faults/launch-{code}/"
    key = prefix + "table.csv"
    with cloud.failing_handler_calls("ec2", "RunInstances", code, status) as refused:
        put(cloud, key, CSV)
        assert cloud.tracker.wait_for([key], OUTCOME_TIMEOUT) == []
    # Lambda's first attempt and its retries each tried once; then the event went to the DLQ.
    assert len(refused) == local_cloud.LAMBDA_RETRIES + 1
    assert cloud.tracker.outcome(key) == "failed"
    assert machines_for(cloud, key) == {}  # nothing booted, so nothing to shut down
    assert stored(cloud, key) == CSV
    assert assert_accounted_for(cloud, key) == "dead letter"

    # Once through the operator's command line, once in-process.
    result = assert_reconciled_to_complete(cloud, prefix, command_line=code == "UnauthorizedOperation")
    assert [r["key"] for entry in result["replayed"] for r in entry["records"]] == [key]
    outcome, report = cloud.fetch_report(key)
    assert outcome == "report" and report["input"]["key"] == key
    assert_shut_down(cloud, key)
    assert key not in dead_letter_keys(cloud)


def test_machine_lost_without_a_trace_is_relaunched_by_reconcile(cloud):
    key = "faults/lost/table.csv"
    booted = []

    def note_boot(instance_id, booting_key, env):
        if booting_key == key:
            # The worker that never finishes: the machine is lost while it runs.
            booted.append(instance_id)

    publish_worker(cloud, "import time\ntime.sleep(3600)\n")
    cloud.before_boot = note_boot
    put(cloud, key, CSV)
    wait_until(lambda: booted and find_worker_process(cloud, booted[0]), OUTCOME_TIMEOUT,
               "the worker to start")
    with cloud.lock:
        process = cloud.processes[booted[0]]
    local_cloud._kill_group(process)  # every process of the machine, at once: no trap runs
    cloud.client("ec2").terminate_instances(InstanceIds=booted)  # as EC2 does for a lost host
    wait_for_outcome(cloud, key)
    publish_worker(cloud)
    assert cloud.fetch_report(key) == (None, None)
    assert stored(cloud, key) == CSV
    assert_reconciled_to_complete(cloud, "faults/lost/")
    assert cloud.fetch_report(key)[0] == "report"
