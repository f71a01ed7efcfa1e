"""The local cloud's AWS Batch stand-in (local_batch): each submitted job runs once, here.

moto emulates Batch without Docker when its server's /moto-api/config says
{"batch": {"use_docker": false}}, but marks every job SUCCEEDED inside SubmitJob and runs
nothing; the local cloud holds each job RUNNABLE and runs it as a compute environment would.
"""

import gzip
import json
import logging
import time

import pytest

import AwsS3
import lambda_function
import local_batch
from local_cloud import REPO, LocalCloud, Tracker

# What each test job writes, one line a run, into $OUT/<job id>: the environment the
# runner gave it and when it ran (bash's clock), so the test can count runs and overlaps.
PROBE = r"""
set -euo pipefail
trap 'echo TERM >"$OUT/$AWS_BATCH_JOB_ID.term"; exit 143' TERM
start=$EPOCHREALTIME
sleep "${PROBE_SLEEP:-0.3}" & wait $!
end=$EPOCHREALTIME
START=$start END=$end BASH_SEEN=$BASH_VERSION \
  "$PROBE_PYTHON" -c 'import json, os; print(json.dumps(dict(os.environ)))' >>"$OUT/$AWS_BATCH_JOB_ID"
exit "${PROBE_EXIT:-0}"
"""


def register_batch(batch, iam, command, environment=(), timeout=None):
    """Register an unmanaged compute environment, the queue `local-jobs` and a job
    definition `local-probe` running `command` with `environment`; return the definition's ARN."""
    role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                "Principal": {"Service": "batch.amazonaws.com"}}]}))
    environment_arn = batch.create_compute_environment(
        computeEnvironmentName="local-ce", type="UNMANAGED", state="ENABLED",
        serviceRole=role["Role"]["Arn"])["computeEnvironmentArn"]
    batch.create_job_queue(jobQueueName="local-jobs", state="ENABLED", priority=1,
                           computeEnvironmentOrder=[{"order": 1,
                                                     "computeEnvironment": environment_arn}])
    extra = {"timeout": timeout} if timeout else {}
    return batch.register_job_definition(
        jobDefinitionName="local-probe", type="container", containerProperties={
            "image": "public.ecr.aws/amazonlinux/amazonlinux:2023", "command": command,
            "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                     {"type": "MEMORY", "value": "2048"}],
            "environment": [{"name": n, "value": v} for n, v in environment]},
        **extra)["jobDefinitionArn"]


@pytest.fixture
def batch_cloud():
    """A local cloud of 2 slots running Batch jobs; S3 events off, so only the jobs a test
    submits run (deploy.sh has no Batch engine yet on this branch: the test registers its
    own compute environment, queue and job definition)."""
    with LocalCloud(workers=2, tracker=Tracker(quiet=True)) as cloud:
        cloud.client("s3").put_bucket_notification_configuration(
            Bucket=cloud.names["data_bucket"], NotificationConfiguration={})
        cloud.enable_batch()
        yield cloud


def test_job_environment_key_and_timeout_rules():
    """The overrides win over the definition's environment, by name (AWS Batch API
    Reference, ContainerOverrides.environment); the key comes out of JOB_FIELDS_B64 byte for
    byte; the job's timeout comes before the definition's."""
    merged = local_batch.job_environment(
        [{"name": "A", "value": "def"}, {"name": "B", "value": "def"}],
        [{"name": "B", "value": "job"}, {"name": "C", "value": "job"}])
    assert merged == {"A": "def", "B": "job", "C": "job"}
    key = "in/$(touch x)\n'q\"/ünï\tcode.csv"
    obj = {"bucket": "data-b", "key": key, "etag": "e", "version_id": "", "sequencer": "",
           "event_name": "ObjectCreated:Put", "size": 1}
    environment = {e["name"]: e["value"] for e in lambda_function.batch_environment(
        obj, lambda_function.load_settings({}))}
    assert local_batch.job_key(environment) == key
    assert local_batch.job_key({}) is None and local_batch.job_key({"JOB_FIELDS_B64": "%%"}) is None
    assert local_batch.attempt_seconds(None, {"attemptDurationSeconds": 60}) == 60
    assert local_batch.attempt_seconds({"attemptDurationSeconds": 5}, {"attemptDurationSeconds": 60}) == 5
    assert local_batch.attempt_seconds({}, None) is None
    assert [local_batch.container_exit_code(code) for code in (0, 5, -9, -15)] == [0, 5, 137, 143]


def test_each_job_runs_once_under_bash_with_its_environment_within_the_slots(batch_cloud, tmp_path):
    """Seven jobs on 2 slots: each job id runs exactly once, though the runner hears of
    every job twice (start_jobs, as from the handler's answer, and its poll of moto's jobs)
    and two are only ever found by the poll; never more than 2 at once; each job gets the
    definition's environment overlaid by its overrides, AWS_BATCH_JOB_ID/ATTEMPT/JQ_NAME,
    the local endpoint and a TMPDIR of its own, runs under bash, calls no `shutdown`; a
    non-zero exit ends the job FAILED with that exit code, as Batch reports it; the
    definition is read once, not per job. An eighth job past its SubmitJob timeout gets
    SIGTERM (its first process) and ends FAILED; its timeout is 1 s, below the 60 s Batch
    allows (SubmitJob, JobTimeout), which moto does not check."""
    import sys

    cloud = batch_cloud
    out = tmp_path / "out"
    out.mkdir()
    arn = register_batch(cloud.client("batch"), cloud.client("iam"), ["bash", "-c", PROBE],
                         [("OUT", str(out)), ("PROBE_PYTHON", sys.executable),
                          ("SHARED", "definition"), ("DEFINITION_ONLY", "d")])
    batch = cloud.client("batch")
    submitted = {}
    for index in range(7):
        overrides = [{"name": "SHARED", "value": f"job-{index}"},
                     {"name": "PROBE_EXIT", "value": "3" if index == 4 else "0"}]
        job_id = batch.submit_job(jobName=f"probe-{index}", jobQueue="local-jobs",
                                  jobDefinition=arn,
                                  containerOverrides={"environment": overrides})["jobId"]
        submitted[job_id] = index
        if index < 5:  # the other two only the poll finds, as reconcile's submissions
            cloud.batch.start_jobs([job_id, job_id])
    cloud.batch.stop_timeout = 2
    stopped = batch.submit_job(jobName="probe-timeout", jobQueue="local-jobs", jobDefinition=arn,
                               timeout={"attemptDurationSeconds": 1}, containerOverrides={
                                   "environment": [{"name": "PROBE_SLEEP", "value": "30"}]})[
        "jobId"]
    cloud.batch.start_jobs([stopped])
    deadline = time.monotonic() + 60
    while cloud.batch.unfinished() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cloud.batch.unfinished() == []
    time.sleep(1.5)  # a poll after the end: nothing runs again
    assert sorted(cloud.batch.jobs) == sorted([*submitted, stopped])
    assert (out / f"{stopped}.term").read_text() == "TERM\n" and not (out / stopped).exists()
    [ended] = batch.describe_jobs(jobs=[stopped])["jobs"]
    assert ended["status"] == "FAILED" and ended["container"]["exitCode"] == 143
    assert "timeout" in ended["statusReason"]
    runs = {job_id: [json.loads(line) for line in (out / job_id).read_text().splitlines()]
            for job_id in submitted}
    assert {job_id: len(lines) for job_id, lines in runs.items()} == {j: 1 for j in submitted}
    for job_id, [env] in runs.items():
        assert env["AWS_BATCH_JOB_ID"] == job_id and env["AWS_BATCH_JOB_ATTEMPT"] == "1"
        assert env["AWS_BATCH_JQ_NAME"] == "local-jobs"
        assert env["SHARED"] == f"job-{submitted[job_id]}" and env["DEFINITION_ONLY"] == "d"
        assert env["AWS_ENDPOINT_URL"] == cloud.endpoint and env["BASH_SEEN"]
        assert env["TMPDIR"].startswith(str(cloud.scratch_root / job_id))
        assert cloud.batch.jobs[job_id]["shutdown_calls"] == []
    spans = sorted((float(env["START"]), float(env["END"])) for [env] in runs.values())
    overlaps = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert overlaps <= 2 and cloud.batch.peak == 2
    described = {job["jobId"]: job for job in batch.describe_jobs(jobs=list(submitted))["jobs"]}
    failed = next(j for j, i in submitted.items() if i == 4)
    assert described[failed]["status"] == "FAILED"
    assert described[failed]["container"]["exitCode"] == 3
    assert {described[j]["status"] for j in submitted if j != failed} == {"SUCCEEDED"}
    assert cloud.batch.definition_reads == 1


def test_batch_engine_reports_error_reports_and_a_job_that_left_none(tmp_path, capsys):
    """LocalCloud(engine="batch"), the deployed job definition (`bash -c`
    lambda_function.batch_job_script) run with the handler's batch_environment: a good
    file's report (SUCCEEDED, exit 0), a broken gzip's error report (the job FAILED with the
    worker's "failed and reported" status, 5, as the bootstrap passes it on), and a job whose
    fields do not decode ends FAILED with no report, which the tracker calls "failed"; a
    duplicate delivery of the good file's event submits no second job and leaves its one
    report as it was; the
    stages go launched -> running -> outcome; no job calls `shutdown` (a container has none);
    deploy gave Batch the local vCPUs as maxvCpus; the table and --out are the EC2 engine's;
    reconcile's resubmission of the lost job, which only the runner's poll of moto's jobs
    finds, runs and reports."""
    import deploy
    import local_cloud
    from local_cloud import process_files

    good = tmp_path / "fine.csv"
    good.write_text("a,b\n1,2\n3,4\n")
    bad = tmp_path / "broken.csv.gz"
    bad.write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000, mtime=0)[:-20])
    lost = tmp_path / "lost.csv"
    lost.write_text("a\n1\n")

    def garble(job_id, key, env):
        if key.endswith("lost.csv"):
            env["JOB_FIELDS_B64"] = "AAAA"  # decodes to no fields: the bootstrap gives up

    with LocalCloud(workers=2, tracker=Tracker(quiet=True), engine="batch") as cloud:
        cloud.before_boot = garble
        delivered = []  # every SQS event the handler has handled, as the pump gave it
        invoke = cloud.invoke_handler
        cloud.invoke_handler = lambda event: (invoke(event), delivered.append(event))[0]
        outcomes = process_files(cloud, [good, bad, lost], "b", timeout=120)
        assert outcomes == {"b/fine.csv": "report", "b/broken.csv.gz": "error",
                            "b/lost.csv": "failed"}
        assert cloud.wait_idle() == []
        jobs = {job["key"]: (job_id, job) for job_id, job in cloud.batch.jobs.items()}
        assert sorted(jobs) == sorted(outcomes)
        assert {key: job["exit_code"] for key, (_, job) in jobs.items()} == {
            "b/fine.csv": 0, "b/broken.csv.gz": AwsS3.EXIT_FAILED_REPORTED, "b/lost.csv": 2}
        assert all(job["shutdown_calls"] == [] for _, job in jobs.values())
        described = {job["jobId"]: job for job in cloud.client("batch").describe_jobs(
            jobs=[job_id for job_id, _ in jobs.values()])["jobs"]}
        assert {key: described[job_id]["status"] for key, (job_id, _) in jobs.items()} == {
            "b/fine.csv": "SUCCEEDED", "b/broken.csv.gz": "FAILED", "b/lost.csv": "FAILED"}
        for key in outcomes:
            stages = cloud.tracker.files[key]["stages"]
            assert stages["launched"] <= stages["running"] <= stages[outcomes[key]]
        assert "left no report" in cloud.tracker.files["b/lost.csv"]["detail"]
        _, report = cloud.fetch_report("b/fine.csv")
        assert report["summary"]["rows"] == 2
        _, error = cloud.fetch_report("b/broken.csv.gz")
        assert "gzip" in error["error"]
        assert cloud.function_env["JOB_QUEUE"] == described[jobs["b/fine.csv"][0]][
            "jobQueue"].rsplit("/", 1)[1]
        # A duplicate delivery of the good file's event (SQS delivers at least once): the
        # handler finds the job by its name and submits none; the one report stays.
        body = next(record["body"] for event in delivered for record in event["Records"]
                    if "fine.csv" in record["body"])
        s3 = cloud.client("s3")
        report_key = AwsS3.report_key("b/fine.csv")
        written = s3.head_object(Bucket=cloud.names["data_bucket"], Key=report_key)["ETag"]
        handled = len(delivered)
        cloud.client("sqs").send_message(QueueUrl=cloud.queue_url, MessageBody=body)
        deadline = time.monotonic() + 30
        while len(delivered) == handled and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(delivered) > handled
        assert cloud.wait_idle() == []
        assert [key for _, job in cloud.batch.jobs.items()
                for key in [job["key"]] if key == "b/fine.csv"] == ["b/fine.csv"]
        assert s3.head_object(Bucket=cloud.names["data_bucket"], Key=report_key)["ETag"] == \
            written
        # deploy.sh --engine batch --max-vcpus WORKERS: Batch's cap is the local vCPUs.
        environments = cloud.client("batch").describe_compute_environments()[
            "computeEnvironments"]
        assert environments and {e["computeResources"]["maxvCpus"] for e in environments} == {2}
        # The summary table and --out, as for the EC2 engine.
        status = local_cloud.finish(cloud, outcomes, tmp_path / "out")
        # reconcile resubmits the job that left no report (the next attempt's name); no
        # handler answer names that job: the runner finds it in moto's jobs and runs it.
        cloud.before_boot = None
        cloud.tracker.files.pop("b/lost.csv")
        clients = deploy.Clients()
        names = deploy.discover_names(clients("lambda"), deploy.resolve_names(clients, cloud.prefix))
        result = deploy.reconcile(clients, names, key_prefix="b/",
                                  progress=deploy.Progress(echo=False))
        assert [entry["key"] for entry in result["launched"]] == ["b/lost.csv"], result
        assert cloud.tracker.wait_for(["b/lost.csv"], timeout=60) == []
        assert cloud.tracker.outcome("b/lost.csv") == "report"
        again = [job_id for job_id, job in cloud.batch.jobs.items() if job["key"] == "b/lost.csv"]
        assert len(again) == 2 and len({described_name(cloud, j) for j in again}) == 2
    assert status == 1  # an error report and a lost job: not every file reported
    table = capsys.readouterr().out
    header = table[table.index("\nfile "):].split("\n")[1]
    assert header.split()[:6] == ["file", "outcome", "upload", "launch", "worker", "total"]
    assert "1 of 3 files reported; 2 reports saved" in table
    assert "machines still running: 0" in table
    saved = json.loads((tmp_path / "out" / "b" / "fine.csv.json").read_text())
    assert saved["input"]["key"] == "b/fine.csv"
    assert (tmp_path / "out" / "b" / "broken.csv.gz.error.json").exists()
    assert (tmp_path / "out" / "summary.csv").exists()


def described_name(cloud, job_id):
    """Return a job's name as DescribeJobs gives it."""
    return cloud.client("batch").describe_jobs(jobs=[job_id])["jobs"][0]["jobName"]


# --- the Batch engine end to end: deploy.sh --engine batch, the handler's SubmitJob ---------


def test_engine_option_parses_and_says_what_it_does():
    """--engine on every command, ec2 by default; an unknown engine is one line, status 2."""
    import subprocess
    import sys

    import local_cloud

    parser = local_cloud.build_parser()
    assert parser.parse_args(["up", "--engine", "batch"]).engine == "batch"
    assert parser.parse_args(["demo"]).engine == "ec2"
    assert parser.parse_args(["run", "x", "--engine=batch"]).engine == "batch"
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "run", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert "--engine {ec2,batch}" in done.stdout and "AWS Batch job per file" in done.stdout
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "demo", "--engine",
                           "lambda"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    with pytest.raises(ValueError):
        LocalCloud(engine="fargate")


@pytest.mark.parametrize("argv", [["run", "--engine", "batch", "--workers", "3", "{file}"],
                                  ["demo", "--engine=batch", "--workers", "3"],
                                  ["up", "--workers", "3", "--engine", "batch"]])
def test_every_command_starts_the_batch_engine_on_its_workers(tmp_path, monkeypatch, argv):
    """run, demo and up hand --engine and --workers to the LocalCloud they start (which
    deploys with --engine batch --max-vcpus WORKERS: the engine test below); none started."""
    import local_cloud

    sample = tmp_path / "a.csv"
    sample.write_text("a\n1\n")
    started = []

    class Stop(Exception):
        pass

    def fake(**options):
        started.append(options)
        raise Stop

    monkeypatch.setattr(local_cloud, "LocalCloud", fake)
    args = local_cloud.build_parser().parse_args(
        [part.replace("{file}", str(sample)) for part in argv] + ["--out", str(tmp_path / "o")]
        if argv[0] != "up" else argv)
    with pytest.raises(Stop):
        args.func(args)
    assert started[0]["engine"] == "batch" and started[0]["workers"] == 3


# Issue 16's figure beside the EC2 burst (tests/test_local_cloud.py): the same keys and
# bodies through Batch on 4 local vCPUs. AWSFUN_BURST_FILES=N changes the count for both.
BATCH_BURST_VCPUS = 4


@pytest.mark.long_running
def test_batch_burst_of_uploads_at_once_with_hostile_names(tmp_path):
    """BURST_FILES small uploads at once through the events queue, the handler submitting a
    Batch job for each, 4 local vCPUs: a report for every key and no error (0 lost), one
    job per key and no job name submitted twice, never more than 4 jobs at once, no job
    called `shutdown`, nothing dead-lettered, no report for a report, no canary."""
    import logging
    import resource

    from test_local_cloud import BURST_FILES, burst_body, burst_keys

    canary = tmp_path / "CANARY"
    keys = burst_keys(BURST_FILES, canary)
    before = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with LocalCloud(workers=BATCH_BURST_VCPUS, tracker=Tracker(quiet=True), engine="batch",
                    warm_python=True) as cloud:
        s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]
        started = time.monotonic()
        for index, key in enumerate(keys):
            s3.put_object(Bucket=bucket, Key=key, Body=burst_body(index))
            cloud.tracker.stage(key, "uploaded")
        pending = cloud.tracker.wait_for(keys, timeout=60 + 3 * BURST_FILES)
        elapsed = time.monotonic() - started
        runner = cloud.batch
        outcomes = {key: cloud.tracker.outcome(key) for key in keys}
        logging.getLogger(__name__).warning(
            "batch burst: %d files in %.1f s (%.2f files/s), %d vCPUs, peak %d jobs, "
            "%d invocations", BURST_FILES, elapsed, BURST_FILES / elapsed, BATCH_BURST_VCPUS,
            runner.peak, cloud.invocations)
        assert pending == []
        assert cloud.wait_idle() == []
        assert outcomes == {key: "report" for key in keys}
        # One job per key, each run once, each ended 0, none called shutdown.
        assert sorted(job["key"] for job in runner.jobs.values()) == sorted(keys)
        assert {job["exit_code"] for job in runner.jobs.values()} == {0}
        assert all(job["shutdown_calls"] == [] for job in runner.jobs.values())
        assert 1 <= runner.peak <= BATCH_BURST_VCPUS
        assert runner.definition_reads == 1
        # Batch's own record: every job SUCCEEDED, no name twice (the handler's dedup).
        queue = cloud.function_env["JOB_QUEUE"]
        batch = cloud.client("batch")
        names = [summary["jobName"] for status in local_batch.FINAL_STATES
                 for summary in batch.list_jobs(jobQueue=queue, jobStatus=status)[
                     "jobSummaryList"]]
        assert len(names) == len(set(names)) == BURST_FILES
        assert batch.list_jobs(jobQueue=queue, jobStatus="FAILED")["jobSummaryList"] == []
        dead = cloud.client("sqs").get_queue_attributes(
            QueueUrl=cloud.names["dlq_url"], AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])[
            "Attributes"]
        assert dead == {"ApproximateNumberOfMessages": "0",
                        "ApproximateNumberOfMessagesNotVisible": "0"}
        outputs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="analysis/") for o in page.get("Contents", [])]
        assert sorted(outputs) == sorted([AwsS3.report_key(k) for k in keys]
                                         + [AwsS3.report_key(k, ".log") for k in keys]
                                         + [AwsS3.receipt_key(AwsS3.report_key(k)) for k in keys])
        assert cloud.warm_starts() == BURST_FILES
    # This process's and its children's CPU (bash, the fork server and its workers, deploy.sh),
    # start-up included: the figure to read beside the EC2 burst's 0.53 CPU-s a file.
    after = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    logging.getLogger(__name__).warning("batch burst: %.2f CPU-s per file (%.1f CPU-s)",
                                        cpu / BURST_FILES, cpu)
    assert not canary.exists()


def test_a_lasting_job_listing_fault_is_one_line_once(caplog, monkeypatch):
    """BatchRunner.poll logged a traceback on every poll of a lasting fault; now one line
    with the AWS code and message, once while it lasts, and a line when it works again."""
    import threading
    import time
    import types

    from botocore.exceptions import ClientError

    failures = iter([ClientError({"Error": {"Code": "ServerException", "Message": "down"}},
                                 "ListJobs")] * 5)

    def runnable_job_ids():
        failure = next(failures, None)
        if failure:
            raise failure
        return []

    monkeypatch.setattr(local_batch, "JOB_POLL_SECONDS", 0.05)
    runner = local_batch.BatchRunner(types.SimpleNamespace(stop_event=threading.Event()))
    runner.runnable_job_ids = runnable_job_ids
    caplog.set_level(logging.INFO, logger="awsfun.local.batch")
    poll = threading.Thread(target=runner.poll)
    poll.start()
    time.sleep(0.6)
    runner.cloud.stop_event.set()
    poll.join(timeout=5)
    assert not poll.is_alive() and next(failures, None) is None
    records = [r for r in caplog.records if r.name == "awsfun.local.batch"]
    assert [r for r in records if r.exc_info or r.exc_text] == []
    assert [(r.levelname, r.getMessage()) for r in records if r.levelno >= logging.INFO] == [
        ("ERROR", "cannot list the Batch jobs: ServerException: down"),
        ("INFO", "can list the Batch jobs again")]
