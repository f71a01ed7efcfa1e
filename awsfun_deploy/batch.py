"""The AWS Batch engine (./deploy.sh deploy --engine batch): two managed EC2 compute
environments (spot first, then on demand), one job queue, one job definition that runs the
bootstrap in a container, the ECS container instance role, and their teardown.

Request builders are pure; each ensure_* reads, compares what it sets, and creates or updates
only on a difference, recording one progress line like the rest of the stack.
"""

from __future__ import annotations

import json
import logging
import time

from botocore.exceptions import ClientError

import lambda_function

from .artifacts import BOOTSTRAP_KEY, LAUNCHER_KEY, software_sources
from .core import (
    CREATED,
    IN_PLACE,
    UPDATED,
    DeployError,
    canonical,
    log_client_error,
)
from .iam import create_stack_role, ensure_profile_of, read_role
from .names import STACK_TAG

logger = logging.getLogger(__name__)

ENGINES = ("ec2", "batch")
DEFAULT_ENGINE = "ec2"
DEFAULT_MAX_VCPUS = 16
# The Dockerfile at the top of the repository builds FROM this image; a test keeps them equal.
DEFAULT_IMAGE = "public.ecr.aws/amazonlinux/amazonlinux:2023"
JOB_VCPUS = 1
JOB_MEMORY_MIB = 2048
RETRY_ATTEMPTS = 3
# "Job definition size: 24 KiB" (AWS Batch User Guide, "AWS Batch service quotas").
JOB_DEFINITION_LIMIT = 24 * 1024
# "optimal" now selects the same families as default_x86_64 (m6i, c6i, r6i, c7i): "Starting on
# 11/01/2025 the behavior of optimal is going to be changed to match default_x86_64" (AWS Batch
# API Reference, ComputeResource, instanceTypes). Both are documented; moto 5.2 refuses
# default_x86_64 ("Instance type default_x86_64 does not exist"), so optimal it is.
INSTANCE_TYPES = ["optimal"]
# Spot reclaims and host failures end a job with a statusReason beginning "Host EC2"
# ("Host EC2 (instance i-...) terminated."); they are retried, anything else (the worker's
# own non-zero exit included) ends the job. "If evaluateOnExit is specified, but none of the
# retry strategies match, then the job is retried. For jobs that don't match to exit, add a
# final entry that exits for any reason" (AWS Batch User Guide, "Automated job retries";
# API Reference, EvaluateOnExit: glob patterns, actions RETRY | EXIT, not case sensitive).
EVALUATE_ON_EXIT = [{"action": "RETRY", "onStatusReason": "Host EC2*"},
                    {"action": "EXIT", "onReason": "*"}]
# The instances' AMI family, named rather than left to Batch's default, which has moved: "If
# Ec2Configuration isn't specified, the default is ECS_AL2 (Amazon Linux 2)", and "Starting
# in January 2026, AWS Batch will change the default AMI for new Amazon ECS compute
# environments from Amazon Linux 2 to Amazon Linux 2023" (AWS Batch API Reference,
# Ec2Configuration; imageType ECS_AL2 | ECS_AL2023 | ...). Pinned, an environment made
# before and one made after that change run the same AMI, the one the container image
# (amazonlinux:2023) matches, and AL2's end of support does not reach it.
IMAGE_TYPE = "ECS_AL2023"
BATCH_SERVICE = "batch.amazonaws.com"
# AWS names it AWSServiceRoleForBatch; moto 5.x AWSServiceRoleForbatch: its ARN is read back
# (CreateServiceLinkedRole's answer, or ListRoles under its path), never built from a name.
BATCH_SERVICE_ROLE_PATH = f"/aws-service-role/{BATCH_SERVICE}/"
ECS_INSTANCE_POLICY = "service-role/AmazonEC2ContainerServiceforEC2Role"
# Waiting for Batch's asynchronous CREATING/UPDATING/DELETING states.
WAIT_SECONDS = 600.0
WAIT_DELAY = 5.0
# After an update or a delete, a describe may still show the status from before it (an
# INVALID one included) for a little while: INVALID fails a wait only after this long.
INVALID_GRACE_SECONDS = 60.0


# --- names ------------------------------------------------------------------------------------

def batch_names(names):
    """Return {what: name} of the Batch pieces of a deployment (pure)."""
    return {"spot": f"{names.prefix}-spot", "ondemand": f"{names.prefix}-ondemand",
            "queue": f"{names.prefix}-jobs", "definition": f"{names.prefix}-worker",
            # IAM is global to the account, so its names carry the region (names.py).
            "instance_role": f"{names.prefix}-batch-instance-{names.region}"}


def batch_arn(names, kind, name):
    """Return the ARN of a Batch resource of this deployment (pure)."""
    return f"arn:{names.partition}:batch:{names.region}:{names.account}:{kind}/{name}"


def instance_profile_arn(names):
    return (f"arn:{names.partition}:iam::{names.account}:instance-profile/"
            f"{batch_names(names)['instance_role']}")


def ecs_instance_policy_arn(partition):
    return f"arn:{partition}:iam::aws:policy/{ECS_INSTANCE_POLICY}"


# --- pure request builders --------------------------------------------------------------------

def compute_environment_request(names, kind, max_vcpus, subnets, group_ids, profile_arn,
                                service_role_arn):
    """Return CreateComputeEnvironment's parameters for `kind` "spot" or "ondemand" (pure).

    SPOT with SPOT_PRICE_CAPACITY_OPTIMIZED needs no spotIamFleetRole: "This role is required
    if the allocation strategy set to BEST_FIT or if the allocation strategy isn't specified"
    (AWS Batch API Reference, ComputeResource). minvCpus 0: no instance while the queue is
    empty. The AMI family is pinned (IMAGE_TYPE) rather than left to Batch's default.
    """
    if int(max_vcpus) < 1:
        raise DeployError(f"--max-vcpus {max_vcpus}: at least 1")
    spot = kind == "spot"
    return {
        "computeEnvironmentName": batch_names(names)[kind],
        "type": "MANAGED",
        "state": "ENABLED",
        "computeResources": {
            "type": "SPOT" if spot else "EC2",
            "allocationStrategy": ("SPOT_PRICE_CAPACITY_OPTIMIZED" if spot
                                   else "BEST_FIT_PROGRESSIVE"),
            "minvCpus": 0,
            "maxvCpus": int(max_vcpus),
            "instanceTypes": list(INSTANCE_TYPES),
            "subnets": list(subnets),
            "securityGroupIds": list(group_ids),
            "instanceRole": profile_arn,
            "ec2Configuration": [{"imageType": IMAGE_TYPE}],
            "tags": {STACK_TAG: names.prefix},
        },
        "serviceRole": service_role_arn,
        "tags": {STACK_TAG: names.prefix},
    }


def job_queue_request(names):
    """Return CreateJobQueue's parameters: spot first (order 1), then on demand (pure)."""
    parts = batch_names(names)
    return {
        "jobQueueName": parts["queue"],
        "state": "ENABLED",
        "priority": 1,
        "computeEnvironmentOrder": [
            {"order": 1, "computeEnvironment": batch_arn(names, "compute-environment",
                                                         parts["spot"])},
            {"order": 2, "computeEnvironment": batch_arn(names, "compute-environment",
                                                         parts["ondemand"])}],
        "tags": {STACK_TAG: names.prefix},
    }


def job_script(sources=None):
    """Return the script the job definition runs (lambda_function.batch_job_script of the
    published bootstrap.sh and launcher.py)."""
    sources = sources or software_sources()
    return lambda_function.batch_job_script(
        sources[BOOTSTRAP_KEY].read_text(encoding="utf-8"),
        sources[LAUNCHER_KEY].read_text(encoding="utf-8"))


def job_definition_request(names, script, watchdog_minutes, image=DEFAULT_IMAGE):
    """Return RegisterJobDefinition's parameters (pure).

    The job runs the bootstrap as `bash -c SCRIPT` with the worker role as its job role;
    each attempt ends after the watchdog (the EC2 engine's WATCHDOG_MINUTES); a spot reclaim
    or host failure is retried, up to RETRY_ATTEMPTS attempts (EVALUATE_ON_EXIT).
    DeployError when the request exceeds Batch's 24 KiB (JOB_DEFINITION_LIMIT).
    """
    request = {
        "jobDefinitionName": batch_names(names)["definition"],
        "type": "container",
        "platformCapabilities": ["EC2"],
        "containerProperties": {
            "image": image,
            "command": ["bash", "-c", script],
            "jobRoleArn": names.worker_role_arn,
            "resourceRequirements": [{"type": "VCPU", "value": str(JOB_VCPUS)},
                                     {"type": "MEMORY", "value": str(JOB_MEMORY_MIB)}],
        },
        "retryStrategy": {"attempts": RETRY_ATTEMPTS,
                          "evaluateOnExit": [dict(entry) for entry in EVALUATE_ON_EXIT]},
        "timeout": {"attemptDurationSeconds": int(watchdog_minutes) * 60},
        "tags": {STACK_TAG: names.prefix},
    }
    size = len(json.dumps(request).encode("utf-8"))
    if size >= JOB_DEFINITION_LIMIT:
        raise DeployError(f"the job definition would be {size:,} bytes; AWS Batch allows "
                          f"{JOB_DEFINITION_LIMIT:,} (a smaller bootstrap or launcher)")
    return request


# --- comparisons (pure) -----------------------------------------------------------------------

def _requirements(container):
    return sorted((r["type"], str(r["value"])) for r in container.get("resourceRequirements")
                  or [])


def _retry(strategy):
    """A retry strategy with its actions upper-cased: Batch's actions are not case sensitive
    (API Reference, EvaluateOnExit), and moto echoes them lower-cased."""
    strategy = strategy or {}
    return {"attempts": strategy.get("attempts"),
            "evaluateOnExit": [dict(e, action=e.get("action", "").upper())
                               for e in strategy.get("evaluateOnExit") or []]}


def job_definition_differences(request, revision):
    """Return what an ACTIVE revision lacks of what `request` sets (pure); [] when equal."""
    if revision is None:
        return ["missing"]
    found = []
    wanted, have = request["containerProperties"], revision.get("containerProperties") or {}
    for key in ("image", "command", "jobRoleArn"):
        if wanted[key] != have.get(key):
            found.append(key)
    if _requirements(wanted) != _requirements(have):
        found.append("resourceRequirements")
    for key in ("type", "platformCapabilities", "timeout"):
        if request[key] != revision.get(key):
            found.append(key)
    if _retry(request["retryStrategy"]) != _retry(revision.get("retryStrategy")):
        found.append("retryStrategy")
    return found


# What UpdateComputeEnvironment's ComputeResourceUpdate takes of what we set (AWS Batch API
# Reference, ComputeResourceUpdate); ec2Configuration included: moto echoes computeResources
# as created (not as updated), so a second deploy on moto still reads it back equal.
COMPUTE_UPDATABLE = ("minvCpus", "maxvCpus", "subnets", "securityGroupIds", "instanceTypes",
                     "instanceRole", "ec2Configuration")


def _comparable(key, value):
    """A computeResources setting as compared (pure): lists unordered; ec2Configuration as
    its image types only, since Batch may add to an entry what we do not set
    (Ec2Configuration also has imageIdOverride, batchImageStatus)."""
    if key == "ec2Configuration":
        return sorted(entry.get("imageType") for entry in value or [])
    if isinstance(value, list):
        return sorted(value)
    return value


def compute_environment_differences(request, found):
    """Return the updatable settings a compute environment differs in (pure). DeployError
    when it is another kind (type, provisioning model or allocation strategy), which
    UpdateComputeEnvironment cannot change in place."""
    wanted, have = request["computeResources"], found.get("computeResources") or {}
    for key in ("type", "allocationStrategy"):
        if wanted[key] != have.get(key):
            raise DeployError(
                f"compute environment {request['computeEnvironmentName']} has {key} "
                f"{have.get(key)!r}, not {wanted[key]!r}: remove it (./deploy.sh teardown) "
                "or choose another --prefix")
    differences = [key for key in COMPUTE_UPDATABLE
                   if _comparable(key, wanted[key]) != _comparable(key, have.get(key))]
    if found.get("state") != "ENABLED":
        differences.append("state")
    if found.get("status") == "INVALID":
        # E.g. an instance profile IAM had not propagated yet when it was created: applying
        # the settings again has Batch validate it again.
        differences.append(f"INVALID ({found.get('statusReason')})")
    if found.get("serviceRole") != request["serviceRole"]:
        differences.append("serviceRole")
    return differences


def queue_differences(request, found):
    """Return what a job queue differs in: state, priority, compute environment order (pure)."""
    order = sorted((e["order"], e["computeEnvironment"])
                   for e in found.get("computeEnvironmentOrder") or [])
    wanted = sorted((e["order"], e["computeEnvironment"])
                    for e in request["computeEnvironmentOrder"])
    return ([key for key in ("state", "priority") if found.get(key) != request[key]]
            + (["computeEnvironmentOrder"] if order != wanted else []))


# --- reading ----------------------------------------------------------------------------------

def read_compute_environment(batch, name):
    """Return the compute environment's description, or None."""
    found = batch.describe_compute_environments(computeEnvironments=[name])
    return next(iter(found.get("computeEnvironments") or []), None)


def read_job_queue(batch, name):
    """Return the job queue's description, or None."""
    found = batch.describe_job_queues(jobQueues=[name])
    return next(iter(found.get("jobQueues") or []), None)


def active_revisions(batch, name):
    """Return every ACTIVE revision of a job definition, newest first."""
    found = []
    for page in batch.get_paginator("describe_job_definitions").paginate(
            jobDefinitionName=name, status="ACTIVE"):
        found += page.get("jobDefinitions") or []
    return sorted(found, key=lambda d: d["revision"], reverse=True)


def read_live(answer):
    """A description whose status is DELETED reads as gone (pure)."""
    return None if answer is None or answer.get("status") == "DELETED" else answer


def wait_for(read, done, what, name, sleep=time.sleep, timeout=WAIT_SECONDS, delay=WAIT_DELAY,
             invalid_after=0.0):
    """Poll read() until done(answer) holds (an answer of None: gone); return the last answer.
    DeployError after `timeout` seconds of waiting, or on an INVALID status read once
    `invalid_after` seconds have been waited (0: at the first read; None: never, for a
    caller to whom INVALID is no failure)."""
    waited = 0.0
    while True:
        answer = read()
        if done(answer):
            return answer
        if answer and answer.get("status") == "INVALID" and invalid_after is not None \
                and waited >= invalid_after:
            raise DeployError(f"{what} {name} is INVALID: {answer.get('statusReason')}")
        if waited >= timeout:
            raise DeployError(f"gave up waiting for {what} {name} "
                              f"({(answer or {}).get('status')}) after {int(waited)} s")
        sleep(delay)
        waited += delay


def settled(answer):
    """True when a compute environment or queue is VALID, not CREATING/UPDATING (pure)."""
    return answer is not None and answer.get("status") == "VALID"


def disabled(answer):
    """True when a compute environment or queue is DISABLED and no change is under way: its
    status VALID or INVALID, not CREATING/UPDATING (pure)."""
    return (answer is not None and answer.get("state") == "DISABLED"
            and answer.get("status") in ("VALID", "INVALID"))


def gone(answer):
    """True when read_live found nothing (pure)."""
    return answer is None


# --- ensure -----------------------------------------------------------------------------------

def ensure_batch_service_role(iam, progress):
    """Return the ARN of Batch's service-linked role, creating it unless it exists.

    IAM answers InvalidInput "... has been taken in this account" when it exists (moto:
    EntityAlreadyExists); its ARN is then read from ListRoles under its path, since moto names
    it AWSServiceRoleForbatch and AWS AWSServiceRoleForBatch (AWS Batch User Guide, "Using
    service-linked roles for AWS Batch"). Teardown keeps it: it is the account's.
    """
    try:
        role = iam.create_service_linked_role(AWSServiceName=BATCH_SERVICE)["Role"]
    except ClientError as err:
        error = err.response.get("Error", {})
        if not (error.get("Code") == "EntityAlreadyExists" or (
                error.get("Code") == "InvalidInput"
                and "has been taken" in error.get("Message", ""))):
            log_client_error(err, "creating Batch's service-linked role")
            raise
        roles = [r for page in iam.get_paginator("list_roles").paginate(
            PathPrefix=BATCH_SERVICE_ROLE_PATH) for r in page["Roles"]]
        if not roles:
            raise DeployError("IAM says Batch's service-linked role exists, yet none is under "
                              f"{BATCH_SERVICE_ROLE_PATH}") from None
        progress.record(IN_PLACE, "batch service role", roles[0]["RoleName"])
        return roles[0]["Arn"]
    progress.record(CREATED, "batch service role", role["RoleName"],
                    "account-wide; teardown keeps it")
    return role["Arn"]


def ecs_instance_trust(names):
    """The trust policy of the ECS container instance role: EC2 assumes it (pure)."""
    principal = "ec2.amazonaws.com.cn" if names.partition == "aws-cn" else "ec2.amazonaws.com"
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": principal}, "Action": "sts:AssumeRole"}]}


def ensure_instance_role(iam, names, progress):
    """Create or correct the Batch instances' role (AmazonEC2ContainerServiceforEC2Role
    attached, nothing else) and its instance profile; return the profile's ARN."""
    role_name = batch_names(names)["instance_role"]
    trust, policy = ecs_instance_trust(names), ecs_instance_policy_arn(names.partition)
    role = read_role(iam, role_name)
    changed = []
    if role is None:
        create_stack_role(iam, role_name, trust, names, "batch instances")
        role = {"trust": trust, "inline": {}, "attached": []}
        changed.append("created")
    if canonical(role["trust"]) != canonical(trust):
        iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))
        changed.append("trust policy")
    for name in role["inline"]:
        iam.delete_role_policy(RoleName=role_name, PolicyName=name)
        changed.append(f"extra policy {name}")
    for arn in role["attached"]:
        if arn != policy:
            iam.detach_role_policy(RoleName=role_name, PolicyArn=arn)
            changed.append(f"attached policy {arn}")
    if policy not in role["attached"]:
        iam.attach_role_policy(RoleName=role_name, PolicyArn=policy)
        changed.append(f"{ECS_INSTANCE_POLICY} attached")
    outcome = CREATED if "created" in changed else (UPDATED if changed else IN_PLACE)
    progress.record(outcome, "batch instance role", role_name,
                    ", ".join(c for c in changed if c != "created"))

    return ensure_profile_of(iam, role_name, role_name, names.prefix, progress,
                             "batch instance profile")


def read_absent_or_live(read, what, name, sleep):
    """Return read_live(read()), waiting first until one being deleted (DELETING) is gone:
    Batch describes a deleted item as DELETED for a while and refuses to update it, so a
    deploy soon after a teardown creates it again. DeployError when the wait times out."""
    found = read_live(read())
    if found is not None and found.get("status") == "DELETING":
        found = wait_for(lambda: read_live(read()), gone, what, name, sleep,
                         invalid_after=INVALID_GRACE_SECONDS)
    return found


def ensure_compute_environment(batch, request, progress, sleep=time.sleep):
    """Create or update one compute environment and wait until it is VALID; return its ARN.
    DeployError when it is still INVALID INVALID_GRACE_SECONDS after an update."""
    name = request["computeEnvironmentName"]
    found = read_absent_or_live(lambda: read_compute_environment(batch, name),
                                "compute environment", name, sleep)
    if found is None:
        batch.create_compute_environment(**request)
        outcome, detail = CREATED, ""
    else:
        differences = compute_environment_differences(request, found)
        if differences:
            resources = {key: request["computeResources"][key] for key in COMPUTE_UPDATABLE}
            batch.update_compute_environment(computeEnvironment=name, state="ENABLED",
                                             computeResources=resources,
                                             serviceRole=request["serviceRole"])
        outcome = UPDATED if differences else IN_PLACE
        detail = ", ".join(differences)
    # After an update the first describes may still show the INVALID from before it.
    found = wait_for(lambda: read_compute_environment(batch, name), settled,
                     "compute environment", name, sleep,
                     invalid_after=INVALID_GRACE_SECONDS if outcome == UPDATED else 0.0)
    progress.record(outcome, "compute environment", name, detail)
    return found["computeEnvironmentArn"]


def ensure_job_queue(batch, request, progress, sleep=time.sleep):
    """Create or update the job queue and wait until it is VALID; return its ARN."""
    name = request["jobQueueName"]
    found = read_absent_or_live(lambda: read_job_queue(batch, name), "job queue", name, sleep)
    if found is None:
        batch.create_job_queue(**request)
        outcome, differences = CREATED, []
    else:
        differences = queue_differences(request, found)
        if differences:
            batch.update_job_queue(jobQueue=name, state=request["state"],
                                   priority=request["priority"],
                                   computeEnvironmentOrder=request["computeEnvironmentOrder"])
        outcome = UPDATED if differences else IN_PLACE
    found = wait_for(lambda: read_job_queue(batch, name), settled, "job queue", name, sleep,
                     invalid_after=INVALID_GRACE_SECONDS if differences else 0.0)
    progress.record(outcome, "job queue", name, ", ".join(differences))
    return found["jobQueueArn"]


def ensure_job_definition(batch, request, progress):
    """Register a new revision only when the latest ACTIVE one differs in what `request` sets
    (RegisterJobDefinition always makes a new revision); return the ARN in use."""
    name = request["jobDefinitionName"]
    revisions = active_revisions(batch, name)
    differences = job_definition_differences(request, revisions[0] if revisions else None)
    if not differences:
        progress.record(IN_PLACE, "job definition", name, f"revision {revisions[0]['revision']}")
        return revisions[0]["jobDefinitionArn"]
    answer = batch.register_job_definition(**request)
    progress.record(CREATED if differences == ["missing"] else UPDATED, "job definition", name,
                    f"revision {answer['revision']}" + (
                        "" if differences == ["missing"] else ": " + ", ".join(differences)))
    return answer["jobDefinitionArn"]


def ensure_batch(batch, iam, names, subnets, group_ids, progress, max_vcpus=DEFAULT_MAX_VCPUS,
                 image=DEFAULT_IMAGE, watchdog_minutes=120, sources=None, sleep=time.sleep):
    """Create or update every Batch piece; return {"job_queue", "job_definition"} (names the
    function's environment carries: JOB_QUEUE, JOB_DEFINITION without a revision)."""
    # Pure checks first: nothing is made for a bad --max-vcpus or an oversized definition.
    definition = job_definition_request(names, job_script(sources), watchdog_minutes, image)
    compute_environment_request(names, "spot", max_vcpus, subnets, group_ids, "", "")
    service_role = ensure_batch_service_role(iam, progress)
    profile = ensure_instance_role(iam, names, progress)
    for kind in ("spot", "ondemand"):
        ensure_compute_environment(batch, compute_environment_request(
            names, kind, max_vcpus, subnets, group_ids, profile, service_role), progress, sleep)
    ensure_job_queue(batch, job_queue_request(names), progress, sleep)
    ensure_job_definition(batch, definition, progress)
    parts = batch_names(names)
    return {"job_queue": parts["queue"], "job_definition": parts["definition"]}


def batch_subnets(ec2, subnets, vpc_id):
    """Return the subnets the compute environments launch in: --subnets as given, else the
    default VPC's default subnets (one per Availability Zone), as the EC2 engine launches in
    the default VPC without --subnets (ec2.workers_vpc)."""
    if subnets:
        return list(subnets)
    found = [s["SubnetId"] for page in ec2.get_paginator("describe_subnets").paginate(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                 {"Name": "default-for-az", "Values": ["true"]}]) for s in page["Subnets"]]
    if not found:
        raise DeployError(f"the default VPC {vpc_id} has no default subnets for the compute "
                          "environments: name them with --subnets")
    return sorted(found)
