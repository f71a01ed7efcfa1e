"""A Batch job that ended without a report is listed by status and reconcile, with Batch's
reason, as an EC2 worker that ended without one is (awsfun_deploy/batch_jobs.py)."""

import io

from test_batch import (  # noqa: F401 - ecs_instance_policy: an autouse fixture
    deploy_batch,
    ecs_instance_policy,
    jobs_without_docker,
    upload,
)

import deploy
import lambda_function
from awsfun_deploy import reconcile as reconcile_module
from awsfun_deploy.batch_jobs import ended_job, ended_jobs, job_input
from awsfun_deploy.core import Progress
from awsfun_deploy.names import deployed_names


def described(key="in/a.csv", bucket="data", status="FAILED", **extra):
    """One of DescribeJobs' jobs as the handler's SubmitJob leaves it."""
    fields = {name: "" for name in lambda_function.JOB_FIELDS}
    fields.update(BUCKET=bucket, KEY=key)
    environment = [{"name": "JOB_FIELDS_B64", "value": lambda_function.job_fields_b64(fields)},
                   {"name": "AWS_BATCH_JOB_ID", "value": "j-1"}]
    return {"jobId": "j-1", "jobName": "awsfun-x", "status": status,
            "createdAt": 1764547200000, "container": {"environment": environment, **extra}}


def test_a_jobs_input_is_read_from_its_environment_byte_for_byte():
    key = "in/ü ; $(rm -rf ~)\n.csv"
    assert job_input(described(key)) == ("data", key)
    assert job_input({"jobId": "other", "container": {"environment": [
        {"name": "JOB_FIELDS_B64", "value": "not base64!"}]}}) is None
    assert job_input({"jobId": "other"}) is None


def test_an_ended_job_reads_like_an_ended_worker_with_batchs_reason():
    job = dict(described(exitCode=127), statusReason="Essential container in task exited")
    assert ended_job(job, "in/a.csv") == {
        "instance_id": "j-1", "state": "FAILED", "key": "in/a.csv", "object": "",
        "launch_time": "2025-12-01T00:00:00+00:00",
        "state_reason": "Essential container in task exited",
        "state_transition_reason": "the container exited with 127"}
    assert reconcile_module.ended_detail(ended_job(job, "in/a.csv")) == (
        "FAILED, in/a.csv: Essential container in task exited; the container exited with 127")


def test_ended_jobs_keeps_the_buckets_failed_jobs_and_describes_100_at_a_time():
    class Batch:
        def __init__(self):
            self.described = []

        @staticmethod
        def describe_job_queues(jobQueues):
            return {"jobQueues": [{"jobQueueName": "q", "status": "VALID"}]}

        def get_paginator(self, name):
            assert name == "list_jobs"

            class Pages:
                def paginate(self, jobQueue, jobStatus, PaginationConfig):
                    assert (jobQueue, jobStatus) == ("q", "FAILED")
                    return [{"jobSummaryList": [{"jobId": f"j-{n}"} for n in range(100)]},
                            {"jobSummaryList": [{"jobId": "j-100"}]}]
            return Pages()

        def describe_jobs(self, jobs):
            self.described.append(len(jobs))
            return {"jobs": [dict(described(bucket="other" if i == "j-7" else "data"), jobId=i)
                             for i in jobs]}

    fake = Batch()
    found = ended_jobs(fake, "q", "data", pages=2)
    assert fake.described == [100, 1]
    assert len(found) == 100 and "j-7" not in {job["instance_id"] for job in found}


def test_status_and_reconcile_list_a_job_that_failed_without_a_report(clients, names, local_aws):
    jobs_without_docker(local_aws)
    deploy_batch(clients, names)
    names = deployed_names(clients)
    upload(clients, names, "in/a.csv")
    upload(clients, names, "in/b.csv")
    launched = deploy.reconcile(clients, names, progress=Progress(echo=False))["launched"]
    job_of = {entry["key"]: entry["instance_id"] for entry in launched}
    # moto has marked both SUCCEEDED without running them (and TerminateJob leaves them so):
    # end them FAILED in its backend, in this process, as Batch shows a job whose image never
    # pulled. b.csv has its report.
    from moto.batch.models import batch_backends

    jobs = batch_backends[names.account][names.region]._jobs
    for key in ("in/a.csv", "in/b.csv"):
        jobs[job_of[key]].status = "FAILED"
        jobs[job_of[key]].job_stopped_reason = "CannotPullContainerError: no route to host"
    clients("s3").put_object(Bucket=names.data_bucket, Key="analysis/in/b.csv.json", Body=b"{}")

    _, ended = reconcile_module.input_status(clients, names)
    assert [(e["instance_id"], e["key"], e["state"]) for e in ended] == [
        (job_of["in/a.csv"], "in/a.csv", "FAILED")]
    assert "CannotPullContainerError" in ended[0]["state_reason"]

    printed = io.StringIO()
    deploy.print_status(deploy.collect_status(clients, names), printed)
    lines = printed.getvalue().splitlines()
    assert ("workers ended without a report: 1 (EC2's StateReason; StateTransitionReason, or "
            "Batch's statusReason; exit code)") in lines
    assert (f"  {job_of['in/a.csv']}  FAILED, in/a.csv: CannotPullContainerError: no route to "
            "host; no exit code (the container never ran, or Batch does not show it)") in lines

    result = deploy.reconcile(clients, names, progress=Progress(echo=False))
    assert [e["instance_id"] for e in result["ended_without_report"]] == [job_of["in/a.csv"]]


def test_under_ec2_status_asks_batch_nothing(clients, names, monkeypatch):
    deploy.deploy(clients, names, progress=Progress(echo=False), sleep=lambda _: None)
    names = deployed_names(clients)
    monkeypatch.setattr(reconcile_module, "ended_jobs",
                        lambda *_: (_ for _ in ()).throw(AssertionError("Batch was asked")))
    counts, ended = reconcile_module.input_status(clients, names)
    assert counts is not None and ended == []
