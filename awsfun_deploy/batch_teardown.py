"""Teardown of the Batch engine (./deploy.sh teardown): the job queue, then the compute
environments, each disabled and deleted in the order Batch requires, every job definition
revision, and the ECS container instance role and profile."""

from __future__ import annotations

import time

from botocore.exceptions import ClientError

from .batch import (
    INVALID_GRACE_SECONDS,
    active_revisions,
    batch_names,
    disabled,
    gone,
    read_compute_environment,
    read_job_queue,
    read_live,
    wait_for,
)
from .batch_jobs import LIVE_STATUSES, job_counts, unfinished_jobs_detail
from .core import DELETED, GONE, KEPT, error_code, plural
from .iam import read_instance_profile, read_role


def _disable_then_delete(read, disable, delete, what, name, progress, sleep,
                         before=lambda: ""):
    """Disable, wait until that change has settled, delete, wait until gone; read() is a
    read_live. "Before you can delete a compute environment, you must set its state to
    DISABLED with the UpdateComputeEnvironment API operation and disassociate it from any job
    queues with the UpdateJobQueue API operation" (AWS Batch API Reference,
    DeleteComputeEnvironment); "You must first disable submissions for a queue with the
    UpdateJobQueue operation" (DeleteJobQueue). Neither asks for a VALID status: an INVALID
    one (e.g. made before IAM had propagated its instance profile) is deleted as well. The
    wait for a settled status (VALID or INVALID) is for our own disabling, which reads
    UPDATING until Batch has applied it. before() is called once before disabling; what it
    returns is the detail of the progress line."""
    found = read()
    if found is None:
        progress.record(GONE, what, name)
        return
    detail = ""
    if found.get("status") != "DELETING":
        detail = before()
        if found.get("state") != "DISABLED":
            disable()
        wait_for(read, disabled, what, name, sleep, invalid_after=None)
        delete()
    # Described as DELETED (read_live: None) for a while after, then not at all.
    wait_for(read, gone, what, name, sleep, invalid_after=INVALID_GRACE_SECONDS)
    progress.record(DELETED, what, name, detail)


def teardown_batch(batch, iam, names, progress, sleep=time.sleep, required=True):
    """Remove the queue, then the compute environments, every ACTIVE job definition revision
    and the instance role and profile, in that order (a queue refers to the environments).

    required=False (the function says ENGINE=ec2, or there is no function): leftovers are
    removed just the same, but a deployer without batch:Describe* only hears that they were
    not looked for (KEPT), since the EC2 engine's deployer policy holds no Batch action.
    """
    parts = batch_names(names)
    try:
        queue = read_job_queue(batch, parts["queue"])
    except ClientError as err:
        if required or error_code(err) not in ("AccessDenied", "AccessDeniedException"):
            raise
        progress.record(KEPT, "batch pieces", parts["queue"],
                        "not looked for: no batch:DescribeJobQueues (deployer-policy "
                        "--engine batch)")
        return
    if queue is not None or required or any(
            read_compute_environment(batch, parts[k]) for k in ("spot", "ondemand")) or \
            active_revisions(batch, parts["definition"]):
        _remove(batch, iam, names, parts, progress, sleep)


def _remove(batch, iam, names, parts, progress, sleep):
    queue = parts["queue"]
    _disable_then_delete(
        lambda: read_live(read_job_queue(batch, queue)),
        lambda: batch.update_job_queue(jobQueue=queue, state="DISABLED"),
        lambda: batch.delete_job_queue(jobQueue=queue), "job queue", queue, progress, sleep,
        # "All jobs in the queue are eventually terminated when you delete a job queue"
        # (AWS Batch API Reference, DeleteJobQueue): say how many, before they are.
        lambda: unfinished_jobs_detail(job_counts(batch, queue, LIVE_STATUSES, pages=1)))
    for kind in ("spot", "ondemand"):
        name = parts[kind]
        _disable_then_delete(
            lambda name=name: read_live(read_compute_environment(batch, name)),
            lambda name=name: batch.update_compute_environment(computeEnvironment=name,
                                                               state="DISABLED"),
            lambda name=name: batch.delete_compute_environment(computeEnvironment=name),
            "compute environment", name, progress, sleep)
    revisions = active_revisions(batch, parts["definition"])
    for revision in revisions:
        batch.deregister_job_definition(jobDefinition=revision["jobDefinitionArn"])
    progress.record(DELETED if revisions else GONE, "job definition", parts["definition"],
                    f"{plural(len(revisions), 'revision')} deregistered" if revisions else "")
    delete_instance_role(iam, parts["instance_role"], progress)


def delete_instance_role(iam, role_name, progress):
    """Delete the batch instance profile and role (attached policy detached); tolerate gone."""
    profile = read_instance_profile(iam, role_name)
    if profile is None:
        progress.record(GONE, "batch instance profile", role_name)
    else:
        for role in profile.get("Roles", []):
            iam.remove_role_from_instance_profile(InstanceProfileName=role_name,
                                                  RoleName=role["RoleName"])
        iam.delete_instance_profile(InstanceProfileName=role_name)
        progress.record(DELETED, "batch instance profile", role_name)
    role = read_role(iam, role_name)
    if role is None:
        progress.record(GONE, "batch instance role", role_name)
        return
    for name in role["inline"]:
        iam.delete_role_policy(RoleName=role_name, PolicyName=name)
    for arn in role["attached"]:
        iam.detach_role_policy(RoleName=role_name, PolicyArn=arn)
    iam.delete_role(RoleName=role_name)
    progress.record(DELETED, "batch instance role", role_name)
