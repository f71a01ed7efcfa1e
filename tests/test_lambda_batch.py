"""The handler under ENGINE=batch: one SubmitJob per new upload, on moto's Batch (in-process).

moto's Batch is used without Docker (`mock_aws(config={"batch": {"use_docker": False}})`):
a submitted job finishes at once, as SUCCEEDED. Its ListJobs applies the JOB_NAME filter and,
as AWS documents (ListJobs: "When the filter is used, jobStatus is ignored"), returns jobs of
every status then, so a finished job still stops a second SubmitJob.
"""

import json

import boto3
import pytest
from botocore.config import Config
from moto import mock_aws
from support import REPO, fail_first, record_calls, s3_event, s3_record

import lambda_function as lf

BUCKET = "awsfun-batch-data"
QUEUE = "awsfun-queue"
DEFINITION = "awsfun-job"


@pytest.fixture
def batch(monkeypatch):
    """moto Batch holding an unmanaged compute environment, QUEUE and DEFINITION; the handler's
    batch client (no retries: a refusal is seen at once) and ENGINE=batch in its environment."""
    with mock_aws(config={"batch": {"use_docker": False}}):
        iam = boto3.client("iam")
        role = iam.create_role(RoleName="batch-service", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "sts:AssumeRole",
                "Principal": {"Service": "batch.amazonaws.com"}}]}))["Role"]["Arn"]
        client = boto3.client("batch", config=Config(retries={"mode": "standard",
                                                               "max_attempts": 1}))
        # moto needs serviceRole on CreateComputeEnvironment (AWS makes it optional).
        environment = client.create_compute_environment(
            computeEnvironmentName="awsfun-ce", type="UNMANAGED", state="ENABLED",
            serviceRole=role)["computeEnvironmentArn"]
        client.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                                computeEnvironmentOrder=[{"order": 1,
                                                          "computeEnvironment": environment}])
        client.register_job_definition(jobDefinitionName=DEFINITION, type="container",
                                       containerProperties={
                                           "image": "public.ecr.aws/amazonlinux/amazonlinux:2023",
                                           "vcpus": 1, "memory": 512,
                                           "command": ["bash", "-c", "true"]})
        for name, value in (("ENGINE", "batch"), ("JOB_QUEUE", QUEUE),
                            ("JOB_DEFINITION", DEFINITION)):
            monkeypatch.setenv(name, value)
        monkeypatch.setitem(lf._clients, "batch", client)
        yield client


def calls_of(calls, operation):
    return [params for name, params in calls if name == operation]


def job_from_environment(environment):
    """Decode a job's containerOverrides.environment with the handler's own decode_job."""
    text = "\n".join(f"{item['name']}='{item['value']}'" for item in environment)
    return lf.decode_job(text + "\nJOB_LAUNCHER_B64=''")


def upload(key, sequencer="0055AED6DCD90281E5", **record):
    return s3_record(BUCKET, key, sequencer=sequencer, **record)


def test_one_submit_job_per_new_object_with_queue_definition_and_job(batch):
    calls = record_calls(batch)
    keys = ["inbox/a.csv", "inbox/b ü $(x).csv"]
    result = lf.lambda_handler(s3_event(*(upload(key) for key in keys)), None)
    submits = calls_of(calls, "SubmitJob")
    assert [job_from_environment(s["containerOverrides"]["environment"])["KEY"]
            for s in submits] == keys
    for params, entry in zip(submits, result["launched"]):
        assert (params["jobQueue"], params["jobDefinition"]) == (QUEUE, DEFINITION)
        job = job_from_environment(params["containerOverrides"]["environment"])
        assert (job["BUCKET"], job["REGION"], job["WATCHDOG_MINUTES"]) == (BUCKET, "us-east-1",
                                                                          "120")
        # The default watchdog (120 min) is the attempt's timeout; the worker's limit is shorter.
        assert params["timeout"] == {"attemptDurationSeconds": 7200}
        assert int(job["TIMEOUT_SECONDS"]) < 7200
        # No tags: tagging on creation needs batch:TagResource, which the launcher lacks.
        assert "tags" not in params and "propagateTags" not in params
        assert entry["engine"] == "batch" and entry["submitted"] is True
        assert entry["job_name"] == params["jobName"] and entry["route"] == "default"
    described = batch.describe_jobs(jobs=[e["job_id"] for e in result["launched"]])["jobs"]
    assert sorted(j["jobName"] for j in described) == sorted(s["jobName"] for s in submits)
    assert result["deferred"] == result["failed"] == []


def test_analysis_keys_and_folder_markers_submit_nothing(batch):
    calls = record_calls(batch)
    result = lf.lambda_handler(s3_event(upload("analysis/inbox/a.csv.json"),
                                        upload("inbox/new folder/", size=0)), None)
    assert calls == [] and result["launched"] == []
    assert len(result["skipped"]) == 2


def test_a_duplicate_delivery_submits_once_and_names_the_same_job(batch):
    """Two invocations of the same event (SQS delivers at least once): ListJobs finds the
    first job by its name, whatever its status (it has SUCCEEDED on moto)."""
    calls = record_calls(batch)
    event = s3_event(upload("inbox/a.csv"))
    first = lf.lambda_handler(json.loads(json.dumps(event)), None)
    second = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert len(calls_of(calls, "SubmitJob")) == 1
    assert second["launched"][0]["job_id"] == first["launched"][0]["job_id"]
    assert second["launched"][0]["submitted"] is False
    # The job found is the one submitted, under the upload's name (moto has already marked
    # it SUCCEEDED: ListJobs with a name filter finds jobs of every status).
    (described,) = batch.describe_jobs(jobs=[first["launched"][0]["job_id"]])["jobs"]
    assert described["jobName"] == first["launched"][0]["job_name"] == \
        second["launched"][0]["job_name"]


def test_a_duplicate_within_one_invocation_submits_once(batch):
    calls = record_calls(batch)
    result = lf.lambda_handler(s3_event(upload("inbox/a.csv"), upload("inbox/a.csv")), None)
    assert len(calls_of(calls, "SubmitJob")) == 1 and len(result["skipped"]) == 1


def test_a_new_upload_of_the_same_key_submits_again(batch):
    calls = record_calls(batch)
    first = lf.lambda_handler(s3_event(upload("inbox/a.csv", sequencer="0055AED6DCD90281E5")),
                              None)
    second = lf.lambda_handler(s3_event(upload("inbox/a.csv", sequencer="0055AED6DCD90281F0")),
                               None)
    submits = calls_of(calls, "SubmitJob")
    assert len(submits) == 2 and submits[0]["jobName"] != submits[1]["jobName"]
    assert first["launched"][0]["job_id"] != second["launched"][0]["job_id"]


def test_throttling_defers_the_record_and_the_rest_of_the_invocation(batch):
    """TooManyRequestsException (HTTP 429, Batch's throttle) once retries are spent: deferred,
    and the records after it are deferred unasked (the rate is the Region's)."""
    submits = fail_first(batch, "SubmitJob", "TooManyRequestsException", "Too Many Requests",
                         times=1, status=429)
    event = {"Records": [{"eventSource": "aws:sqs", "messageId": f"m{i}",
                          "body": json.dumps(s3_event(upload(f"inbox/{i}.csv")))}
                         for i in range(3)]}
    result = lf.lambda_handler(event, None)
    assert len(submits) == 1
    assert [e["code"] for e in result["deferred"]] == ["TooManyRequestsException"] * 3
    assert result["launched"] == [] and result["failed"] == []
    assert result["batchItemFailures"] == [{"itemIdentifier": f"m{i}"} for i in range(3)]


def test_a_client_exception_fails_one_record_and_the_others_submit(batch):
    submits = fail_first(batch, "SubmitJob", "ClientException", "Job queue does not exist",
                         times=1)
    event = {"Records": [{"eventSource": "aws:sqs", "messageId": f"m{i}",
                          "body": json.dumps(s3_event(upload(f"inbox/{i}.csv")))}
                         for i in range(3)]}
    result = lf.lambda_handler(event, None)
    assert len(submits) == 3
    assert [(e["key"], e["code"]) for e in result["failed"]] == [("inbox/0.csv", "ClientException")]
    assert [e["key"] for e in result["launched"]] == ["inbox/1.csv", "inbox/2.csv"]
    assert result["batchItemFailures"] == [{"itemIdentifier": "m0"}]


def test_dry_run_lists_jobs_and_submits_nothing(batch, monkeypatch):
    existing = lf.lambda_handler(s3_event(upload("inbox/old.csv")), None)["launched"][0]
    monkeypatch.setenv("DRY_RUN", "1")
    calls = record_calls(batch)
    result = lf.lambda_handler(s3_event(upload("inbox/old.csv"), upload("inbox/new.csv")), None)
    assert calls_of(calls, "SubmitJob") == [] and len(calls_of(calls, "ListJobs")) == 2
    old, new = result["dry_run"]
    assert (old["code"], old["job_id"]) == ("AlreadySubmitted", existing["job_id"])
    assert (new["code"], new["job_id"], new["allowed"]) == ("", None, True)
    assert "would submit " + new["job_name"] in new["message"]
    assert result["launched"] == []


def test_a_route_sets_command_and_watchdog_and_its_instance_type_is_ignored(batch, tmp_path):
    (tmp_path / "routes.json").write_text(json.dumps({"routes": [{
        "name": "vcf", "match": "*.vcf", "launch_template": "su2cw_big",
        "instance_type": "r6i.large", "watchdog_minutes": 30,
        "command": ["wc", "-l", "{input}"]}]}))
    calls = record_calls(batch)
    settings = lf.load_settings()
    [obj], _ = lf.parse_records(s3_event(upload("inbox/calls.vcf")))
    detail = lf.submit_object_detail(obj, settings, local_dir=str(tmp_path))
    [params] = calls_of(calls, "SubmitJob")
    job = job_from_environment(params["containerOverrides"]["environment"])
    assert detail["route"] == "vcf" and params["timeout"] == {"attemptDurationSeconds": 1800}
    assert json.loads(job["COMMAND"]) == ["wc", "-l", "{input}"]
    assert job["WATCHDOG_MINUTES"] == "30" and int(job["TIMEOUT_SECONDS"]) < 1800
    assert "r6i" not in json.dumps(params)


def test_submit_object_relaunch_attempt_names_a_new_job(batch):
    settings = lf.load_settings()
    [obj], _ = lf.parse_records(s3_event(upload("inbox/a.csv")))
    first = lf.submit_object(obj, settings)
    assert lf.submit_object(obj, settings) == first
    again = lf.submit_object(obj, settings, attempt=1)
    assert again != first
    names = {j["jobName"] for j in batch.describe_jobs(jobs=[first, again])["jobs"]}
    assert names == {lf.batch_job_name(lf.client_token(obj)),
                     lf.batch_job_name(lf.client_token(obj, 1))}


@pytest.mark.parametrize("engine", ["lambda", "fargate", "EC 2"])
def test_an_unknown_engine_is_a_clear_error(engine):
    with pytest.raises(ValueError, match=f"ENGINE {engine.strip().lower()!r} is not one of ec2, batch"):
        lf.load_settings({"ENGINE": engine})


def test_batch_needs_its_queue_and_definition():
    with pytest.raises(ValueError, match="JOB_QUEUE and JOB_DEFINITION"):
        lf.load_settings({"ENGINE": "batch", "JOB_QUEUE": QUEUE})


def test_the_default_engine_is_ec2():
    assert lf.load_settings({})["ENGINE"] == "ec2"
    assert lf.load_settings({"ENGINE": " Batch ", "JOB_QUEUE": "q",
                             "JOB_DEFINITION": "d"})["ENGINE"] == "batch"


def test_find_batch_job_takes_the_newest_exact_name():
    """ListJobs lists newest first, and JOB_NAME matches case-insensitively (AWS Batch API
    Reference, ListJobs): the first summary of the exact name is the job."""

    class Batch:
        def list_jobs(self, **params):
            self.params = params
            return {"jobSummaryList": [{"jobName": "AWSFUN-ABC", "jobId": "new"},
                                       {"jobName": "awsfun-abc", "jobId": "old"}]}

    fake = Batch()
    assert lf.find_batch_job(fake, QUEUE, "awsfun-abc") == "new"
    assert fake.params == {"jobQueue": QUEUE,
                           "filters": [{"name": "JOB_NAME", "values": ["awsfun-abc"]}]}
    assert "jobStatus" not in fake.params


def test_the_job_definition_script_fits_batch_s_limit():
    """AWS Batch allows a job definition of 24 KiB (AWS Batch User Guide, "AWS Batch service
    quotas"); the command carries the whole bootstrap and the launcher's zip, and 4 KiB
    stay for the rest of the definition."""
    template = (REPO / "bootstrap" / "bootstrap.sh").read_text()
    script = lf.batch_job_script(template, (REPO / lf.LAUNCHER_KEY).read_text())
    assert len(json.dumps(["bash", "-c", script]).encode()) < 20 * 1024
