"""The AWS Batch engine's deploy side (awsfun_deploy/batch.py): deploy --engine batch on moto,
a second deploy that changes nothing, teardown, the teardown order on a fake client that
enforces AWS's rules (moto does not), and the IAM documents for it."""

import base64
import io
import json
import re
import urllib.request

import pytest
from botocore.exceptions import ClientError
from conftest import REPO
from parliament import analyze_policy_string

import deploy
import lambda_function
from awsfun_deploy import batch as batch_module
from awsfun_deploy import batch_jobs as jobs_module
from awsfun_deploy import reconcile as reconcile_module
from awsfun_deploy.batch import (
    DEFAULT_IMAGE,
    EVALUATE_ON_EXIT,
    JOB_DEFINITION_LIMIT,
    batch_names,
    job_definition_request,
    job_script,
)
from awsfun_deploy.batch_teardown import teardown_batch
from awsfun_deploy.core import CREATED, DELETED, GONE, KEPT, UPDATED, Progress
from awsfun_deploy.names import deployed_names

NAMES = deploy.derive_names("su2c", "123456789012", "us-east-1")


def no_sleep(_):
    return None


@pytest.fixture(autouse=True)
def ecs_instance_policy(request):
    """moto loads AWS's managed policies only when asked (MOTO_IAM_LOAD_MANAGED_POLICIES, all
    of them, slowly); AWS has AmazonEC2ContainerServiceforEC2Role in every account. Put that
    one into moto's IAM, as AWS has it, for the tests that deploy."""
    if "clients" not in request.fixturenames:
        return
    from moto.iam.models import (
        AWSManagedPolicy,
        aws_managed_policies_data,
        iam_backends,
    )

    request.getfixturevalue("clients")
    name = batch_module.ECS_INSTANCE_POLICY.rsplit("/", 1)[1]
    data = json.loads(aws_managed_policies_data)[name]
    backend = iam_backends["123456789012"]["aws"]
    policy = AWSManagedPolicy.from_data(name, "123456789012", "us-east-1", data)
    backend.managed_policies[policy.arn] = policy


def deploy_batch(clients, names, **options):
    progress = Progress(echo=False)
    result = deploy.deploy(clients, names, progress=progress, engine="batch", sleep=no_sleep,
                           **options)
    return result, progress


def batch_state(clients, names):
    """What Batch holds for the deployment: environments, queue, ACTIVE definitions."""
    batch = clients("batch")
    parts = batch_names(names)
    environments = {e["computeEnvironmentName"]: e for e in batch.describe_compute_environments(
        computeEnvironments=[parts["spot"], parts["ondemand"]])["computeEnvironments"]
        if e.get("status") != "DELETED"}
    queues = [q for q in batch.describe_job_queues(jobQueues=[parts["queue"]])["jobQueues"]
              if q.get("status") != "DELETED"]
    definitions = batch.describe_job_definitions(jobDefinitionName=parts["definition"],
                                                 status="ACTIVE")["jobDefinitions"]
    return environments, queues, definitions


def function_env(clients, names):
    config = clients("lambda").get_function(FunctionName=names.function_name)["Configuration"]
    return config["Environment"]["Variables"]


# --- deploy, re-deploy, teardown on moto -----------------------------------------------------

def test_deploy_engine_batch_makes_spot_then_on_demand_a_queue_and_the_job_definition(
        clients, names):
    result, progress = deploy_batch(clients, names, max_vcpus=8)
    parts = batch_names(names)
    environments, (queue,), (definition,) = batch_state(clients, names)

    spot = environments[parts["spot"]]["computeResources"]
    ondemand = environments[parts["ondemand"]]["computeResources"]
    assert (spot["type"], spot["allocationStrategy"]) == ("SPOT", "SPOT_PRICE_CAPACITY_OPTIMIZED")
    assert (ondemand["type"], ondemand["allocationStrategy"]) == ("EC2", "BEST_FIT_PROGRESSIVE")
    for resources in (spot, ondemand):
        assert (resources["minvCpus"], resources["maxvCpus"]) == (0, 8)
        assert resources["instanceTypes"] == ["optimal"]
        # moto keeps what it was given, so this checks the request and that moto takes it.
        assert resources["ec2Configuration"] == [{"imageType": "ECS_AL2023"}]
        # The EC2 engine's placement: the default VPC's default subnets, the stack's group.
        assert resources["securityGroupIds"] == [result["security_group_id"]]
        assert resources["subnets"]
        assert resources["instanceRole"].endswith(
            f":instance-profile/{parts['instance_role']}")
    # The service-linked role's ARN as IAM gave it (moto: AWSServiceRoleForbatch).
    assert environments[parts["spot"]]["serviceRole"].startswith(
        f"arn:aws:iam::{names.account}:role/aws-service-role/batch.amazonaws.com/")

    assert [(e["order"], e["computeEnvironment"].rsplit("/", 1)[1])
            for e in sorted(queue["computeEnvironmentOrder"], key=lambda e: e["order"])] == [
        (1, parts["spot"]), (2, parts["ondemand"])]
    assert queue["state"] == "ENABLED"

    container = definition["containerProperties"]
    assert container["command"][:2] == ["bash", "-c"]
    assert container["command"][2] == lambda_function.batch_job_script(
        (REPO / "bootstrap/bootstrap.sh").read_text(encoding="utf-8"),
        (REPO / "bootstrap/launcher.py").read_text(encoding="utf-8"))
    assert container["image"] == DEFAULT_IMAGE
    assert container["jobRoleArn"] == names.worker_role_arn
    assert sorted((r["type"], r["value"]) for r in container["resourceRequirements"]) == [
        ("MEMORY", "2048"), ("VCPU", "1")]
    assert definition["timeout"] == {"attemptDurationSeconds": 120 * 60}
    assert definition["retryStrategy"]["attempts"] == 3
    assert [dict(e, action=e["action"].upper())
            for e in definition["retryStrategy"]["evaluateOnExit"]] == EVALUATE_ON_EXIT
    assert definition["platformCapabilities"] == ["EC2"]

    env = function_env(clients, names)
    assert (env["ENGINE"], env["JOB_QUEUE"], env["JOB_DEFINITION"]) == (
        "batch", parts["queue"], parts["definition"])
    assert (result["job_queue"], result["job_definition"]) == (parts["queue"],
                                                               parts["definition"])
    # The worker role may be assumed by Batch's containers as well as by EC2.
    trust = clients("iam").get_role(RoleName=names.worker_role)["Role"]["AssumeRolePolicyDocument"]
    assert [s["Principal"]["Service"] for s in trust["Statement"]] == [
        "ec2.amazonaws.com", "ecs-tasks.amazonaws.com"]
    # The launcher may submit to its queue.
    policy = clients("iam").get_role_policy(RoleName=names.lambda_role,
                                            PolicyName=names.lambda_policy_name)
    assert "batch:SubmitJob" in json.dumps(policy["PolicyDocument"])
    assert {s["what"] for s in progress.steps if s["outcome"] == CREATED} >= {
        "compute environment", "job queue", "job definition", "batch instance role",
        "batch instance profile"}


def test_a_second_batch_deploy_changes_nothing_and_registers_no_revision(clients, names):
    deploy_batch(clients, names)
    calls = []
    clients("batch").meta.events.register(
        "before-call.batch.*", lambda model, **_: calls.append(model.name))
    _, progress = deploy_batch(clients, names)
    changed = [(s["what"], s["name"], s["detail"]) for s in progress.steps
               if s["outcome"] in deploy.CHANGES]
    assert changed == []
    assert {"RegisterJobDefinition", "CreateComputeEnvironment", "UpdateComputeEnvironment",
            "CreateJobQueue", "UpdateJobQueue"}.isdisjoint(calls), calls
    (definition,) = batch_state(clients, names)[2]
    assert definition["revision"] == 1


def test_a_changed_image_registers_one_new_revision(clients, names):
    deploy_batch(clients, names)
    _, progress = deploy_batch(clients, names, image="public.ecr.aws/example/worker:2")
    (step,) = [s for s in progress.steps if s["what"] == "job definition"]
    assert step["outcome"] == "updated" and "image" in step["detail"]
    revisions = batch_state(clients, names)[2]
    assert sorted(r["revision"] for r in revisions) == [1, 2]


def test_teardown_leaves_no_environment_queue_definition_or_batch_role(clients, names):
    deploy_batch(clients, names)
    names = deployed_names(clients)
    assert names.engine == "batch"
    progress = deploy.teardown(clients, names, progress=Progress(echo=False), wait=False,
                               sleep=no_sleep)
    assert batch_state(clients, names) == ({}, [], [])
    role = batch_names(names)["instance_role"]
    iam = clients("iam")
    assert role not in [r["RoleName"] for r in iam.list_roles()["Roles"]]
    assert role not in [p["InstanceProfileName"]
                        for p in iam.list_instance_profiles()["InstanceProfiles"]]
    deleted = [s["what"] for s in progress.steps if s["outcome"] == DELETED]
    assert deleted.index("job queue") < deleted.index("compute environment")


def test_teardown_of_an_ec2_deployment_removes_batch_leftovers(clients, names):
    """Deployed with --engine batch, then again with ec2: the function says ENGINE is gone,
    the Batch pieces are still there, and teardown removes them."""
    deploy_batch(clients, names)
    deploy.deploy(clients, names, progress=Progress(echo=False), sleep=no_sleep)
    assert "ENGINE" not in function_env(clients, names)
    names = deployed_names(clients)
    assert names.engine == "ec2"
    deploy.teardown(clients, names, progress=Progress(echo=False), wait=False, sleep=no_sleep)
    assert batch_state(clients, names) == ({}, [], [])


# --- the order AWS enforces, which moto does not ---------------------------------------------

def refuse(message, operation):
    return ClientError({"Error": {"Code": "ClientException", "Message": message}}, operation)


class RuleKeepingBatch:
    """A Batch client that keeps AWS's rules moto skips: DeleteJobQueue only of a DISABLED
    queue, DeleteComputeEnvironment only of a DISABLED environment no queue refers to
    (AWS Batch API Reference, DeleteJobQueue, DeleteComputeEnvironment), neither while a
    change is under way (UPDATING); no update of what is being deleted or is deleted, and
    no create under a name still in use (DELETING). A change takes one describe in
    UPDATING (or CREATING) and then settles to the item's "_settles" status (VALID unless a
    test says INVALID); a deletion one describe in DELETING, then DELETED. An item in
    `stale` is described once more as it was before the last write, as Batch's eventually
    consistent describe may (names in `stale_after_write`). `jobs` holds {status: number} for ListJobs of the queue."""

    def __init__(self, names):
        parts = batch_names(names)
        self.calls = []
        self.stale, self.stale_after_write = {}, set()
        self.jobs = {}
        self.environments = {parts[k]: {"computeEnvironmentName": parts[k], "state": "ENABLED",
                                        "status": "VALID"} for k in ("spot", "ondemand")}
        self.queues = {parts["queue"]: {"jobQueueName": parts["queue"], "state": "ENABLED",
                                        "status": "VALID", "computeEnvironmentOrder": [
                                            {"order": 1, "computeEnvironment": parts["spot"]},
                                            {"order": 2, "computeEnvironment": parts["ondemand"]}]}}
        self.definitions = [{"jobDefinitionName": parts["definition"], "revision": r,
                             "jobDefinitionArn": f"arn:def:{r}", "status": "ACTIVE"}
                            for r in (1, 2)]

    @staticmethod
    def _tick(items):
        for item in items.values():
            if item["status"] in ("UPDATING", "CREATING"):
                item["status"] = item.get("_settles", "VALID")
            elif item["status"] == "DELETING":
                item["status"] = "DELETED"

    def _describe(self, items, names):
        answer = []
        for name in names:
            if name in self.stale:
                answer.append(self.stale.pop(name))
            elif name in items:
                answer.append({k: v for k, v in items[name].items() if not k.startswith("_")})
        self._tick(items)
        return answer

    def _write(self, items, name, operation):
        """The item about to change, its description kept for one stale read; refused when
        it is being deleted or is deleted, as Batch refuses an update of it."""
        found = items[name]
        if found["status"] in ("DELETING", "DELETED"):
            raise refuse(f"{name} is {found['status']}", operation)
        if name in self.stale_after_write:
            self.stale[name] = {k: v for k, v in found.items() if not k.startswith("_")}
        return found

    def describe_job_queues(self, jobQueues):
        self.calls.append("DescribeJobQueues")
        return {"jobQueues": self._describe(self.queues, jobQueues)}

    def describe_compute_environments(self, computeEnvironments):
        self.calls.append("DescribeComputeEnvironments")
        return {"computeEnvironments": self._describe(self.environments, computeEnvironments)}

    def create_job_queue(self, jobQueueName, **request):
        self.calls.append("CreateJobQueue")
        if self.queues.get(jobQueueName, {}).get("status", "DELETED") != "DELETED":
            raise refuse("Object already exists", "CreateJobQueue")
        self.queues[jobQueueName] = dict(request, jobQueueName=jobQueueName, status="CREATING",
                                         jobQueueArn=f"arn:queue:{jobQueueName}")

    def update_job_queue(self, jobQueue, state, **request):
        self.calls.append(f"UpdateJobQueue {state}")
        self._write(self.queues, jobQueue, "UpdateJobQueue").update(
            request, state=state, status="UPDATING")

    def delete_job_queue(self, jobQueue):
        self.calls.append("DeleteJobQueue")
        queue = self.queues[jobQueue]
        if queue["state"] != "DISABLED" or queue["status"] not in ("VALID", "INVALID"):
            raise refuse("Job queue must be disabled and not UPDATING", "DeleteJobQueue")
        queue["status"] = "DELETING"

    def create_compute_environment(self, computeEnvironmentName, **request):
        self.calls.append(f"CreateComputeEnvironment {computeEnvironmentName}")
        if self.environments.get(computeEnvironmentName, {}).get(
                "status", "DELETED") != "DELETED":
            raise refuse("Object already exists", "CreateComputeEnvironment")
        self.environments[computeEnvironmentName] = dict(
            request, computeEnvironmentName=computeEnvironmentName, status="CREATING",
            computeEnvironmentArn=f"arn:ce:{computeEnvironmentName}")

    def update_compute_environment(self, computeEnvironment, state, **request):
        self.calls.append(f"UpdateComputeEnvironment {state}")
        found = self._write(self.environments, computeEnvironment, "UpdateComputeEnvironment")
        found.update(request, state=state, status="UPDATING")

    def delete_compute_environment(self, computeEnvironment):
        self.calls.append(f"DeleteComputeEnvironment {computeEnvironment}")
        found = self.environments[computeEnvironment]
        if any(e["computeEnvironment"] == computeEnvironment
               for q in self.queues.values() if q["status"] != "DELETED"
               for e in q["computeEnvironmentOrder"]):
            raise refuse("Cannot delete, found existing JobQueue relationship",
                         "DeleteComputeEnvironment")
        # DISABLED is the rule (DeleteComputeEnvironment); INVALID is no bar, UPDATING is.
        if found["state"] != "DISABLED" or found["status"] not in ("VALID", "INVALID"):
            raise refuse("Compute environment must be disabled", "DeleteComputeEnvironment")
        found["status"] = "DELETING"

    def get_paginator(self, name):
        assert name in ("describe_job_definitions", "list_jobs")
        outer = self

        class Pages:
            def paginate(self, jobDefinitionName=None, status=None, jobQueue=None,
                         jobStatus=None, PaginationConfig=None):
                if name == "list_jobs":
                    outer.calls.append(f"ListJobs {jobStatus}")
                    return [{"jobSummaryList": [{"jobName": "j"}] * outer.jobs.get(jobStatus, 0)}]
                return [{"jobDefinitions": [d for d in outer.definitions
                                            if d["status"] == status]}]
        return Pages()

    def deregister_job_definition(self, jobDefinition):
        self.calls.append(f"DeregisterJobDefinition {jobDefinition}")
        for definition in self.definitions:
            if definition["jobDefinitionArn"] == jobDefinition:
                definition["status"] = "INACTIVE"


class NoIam:
    """IAM with no batch instance role: teardown finds it gone."""

    def get_instance_profile(self, **_):
        raise ClientError({"Error": {"Code": "NoSuchEntity", "Message": ""}}, "GetInstanceProfile")

    def get_role(self, **_):
        raise ClientError({"Error": {"Code": "NoSuchEntity", "Message": ""}}, "GetRole")


def test_the_fake_client_refuses_what_aws_refuses():
    """So that the order test below can fail: deleting first is refused."""
    fake = RuleKeepingBatch(NAMES)
    parts = batch_names(NAMES)
    with pytest.raises(ClientError):
        fake.delete_job_queue(jobQueue=parts["queue"])
    with pytest.raises(ClientError):
        fake.delete_compute_environment(computeEnvironment=parts["spot"])
    # Disabled but not yet applied (UPDATING): refused; DISABLED and INVALID: deleted.
    fake.queues = {}
    fake.update_compute_environment(computeEnvironment=parts["spot"], state="DISABLED")
    with pytest.raises(ClientError):
        fake.delete_compute_environment(computeEnvironment=parts["spot"])
    fake.environments[parts["spot"]]["status"] = "INVALID"
    fake.delete_compute_environment(computeEnvironment=parts["spot"])
    assert fake.environments[parts["spot"]]["status"] == "DELETING"


def test_teardown_disables_and_waits_before_each_delete_queue_first():
    fake = RuleKeepingBatch(NAMES)
    parts = batch_names(NAMES)
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, sleep=no_sleep)
    writes = [c for c in fake.calls if not c.startswith(("Describe", "ListJobs"))]
    assert writes == [
        "UpdateJobQueue DISABLED", "DeleteJobQueue",
        "UpdateComputeEnvironment DISABLED", f"DeleteComputeEnvironment {parts['spot']}",
        "UpdateComputeEnvironment DISABLED", f"DeleteComputeEnvironment {parts['ondemand']}",
        "DeregisterJobDefinition arn:def:2", "DeregisterJobDefinition arn:def:1"]
    assert all(item["status"] == "DELETED"
               for item in [*fake.queues.values(), *fake.environments.values()])
    assert [d["status"] for d in fake.definitions] == ["INACTIVE", "INACTIVE"]


def steps_of(progress):
    return [(s["outcome"], s["what"], s["name"], s["detail"]) for s in progress.steps]


def test_teardown_deletes_an_invalid_compute_environment_and_goes_on():
    """An environment made before IAM had propagated its instance profile is INVALID and
    stays INVALID once disabled; DeleteComputeEnvironment asks for DISABLED only, so it is
    deleted, and the rest after it."""
    fake = RuleKeepingBatch(NAMES)
    parts = batch_names(NAMES)
    fake.environments[parts["spot"]].update(status="INVALID", _settles="INVALID",
                                            statusReason="instance profile not found")
    # The first describe after disabling may still show it ENABLED (and INVALID).
    fake.stale_after_write.add(parts["spot"])
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, sleep=no_sleep)
    assert [s[:3] for s in steps_of(progress)][:4] == [
        (DELETED, "job queue", parts["queue"]),
        (DELETED, "compute environment", parts["spot"]),
        (DELETED, "compute environment", parts["ondemand"]),
        (DELETED, "job definition", parts["definition"])]
    assert all(item["status"] == "DELETED"
               for item in [*fake.queues.values(), *fake.environments.values()])


def test_teardown_counts_the_unfinished_jobs_its_queue_deletion_terminates():
    """"All jobs in the queue are eventually terminated when you delete a job queue" (AWS
    Batch API Reference, DeleteJobQueue): the queue's line says how many, counted before it
    is disabled, one ListJobs page per unfinished status."""
    fake = RuleKeepingBatch(NAMES)
    fake.jobs = {"RUNNABLE": 2, "RUNNING": 1, "SUCCEEDED": 5, "FAILED": 1}
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, sleep=no_sleep)
    (queue,) = [s for s in steps_of(progress) if s[1] == "job queue"]
    assert queue[3] == ("3 unfinished jobs terminated with it: their inputs get no report; "
                        "reconcile after the next deploy submits them again")
    listed = [c for c in fake.calls if c.startswith("ListJobs")]
    assert listed == [f"ListJobs {status}" for status in jobs_module.LIVE_STATUSES]
    assert fake.calls.index(listed[-1]) < fake.calls.index("UpdateJobQueue DISABLED")

    fake = RuleKeepingBatch(NAMES)
    fake.jobs = {"SUCCEEDED": 5}
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, sleep=no_sleep)
    assert [s[3] for s in steps_of(progress) if s[1] == "job queue"] == [""]


def test_unfinished_jobs_detail_counts_a_capped_status_as_at_least():
    detail = jobs_module.unfinished_jobs_detail
    assert detail({"RUNNABLE": 0, "RUNNING": 0}) == ""
    assert detail({"RUNNABLE": 1, "RUNNING": 0}).startswith("1 unfinished job terminated ")
    assert detail({"RUNNABLE": "100+", "RUNNING": 2}).startswith(
        "102+ unfinished jobs terminated ")


def test_teardown_says_one_revision_in_the_singular():
    fake = RuleKeepingBatch(NAMES)
    fake.definitions = fake.definitions[:1]
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, sleep=no_sleep)
    assert [s[3] for s in steps_of(progress) if s[1] == "job definition"] == [
        "1 revision deregistered"]


def described_as(fake, request, **found):
    """Put into the fake the compute environment `request` makes, with `found` over it."""
    name = request["computeEnvironmentName"]
    fake.environments[name] = dict(request, computeEnvironmentArn=f"arn:ce:{name}", **found)
    return name


def environment_request(kind="spot"):
    return batch_module.compute_environment_request(
        NAMES, kind, 16, ["subnet-a"], ["sg-1"], "profile", "service")


def test_an_update_of_an_invalid_environment_outlasts_a_stale_invalid_read():
    """The deploy updates an INVALID environment; Batch's describe may still show it INVALID
    from before the update, which is no reason to give up at once."""
    fake = RuleKeepingBatch(NAMES)
    request = environment_request()
    name = described_as(fake, request, state="ENABLED", status="INVALID",
                        statusReason="instance profile not found")
    fake.stale_after_write.add(name)
    progress = Progress(echo=False)
    assert batch_module.ensure_compute_environment(fake, request, progress, no_sleep) == \
        f"arn:ce:{name}"
    assert steps_of(progress) == [
        (UPDATED, "compute environment", name, "INVALID (instance profile not found)")]
    # Still INVALID once the update has been applied: the deploy stops, after the grace.
    fake = RuleKeepingBatch(NAMES)
    described_as(fake, request, state="ENABLED", status="INVALID", _settles="INVALID",
                 statusReason="instance profile not found")
    with pytest.raises(deploy.DeployError, match="is INVALID: instance profile not found"):
        batch_module.ensure_compute_environment(fake, request, Progress(echo=False), no_sleep)


@pytest.mark.parametrize("status", ["DELETED", "DELETING"])
def test_a_deploy_soon_after_a_teardown_creates_what_is_still_described(status):
    """A deleted environment or queue is described as DELETED (DELETING before) for a while;
    Batch refuses to update it: it is created again, once gone."""
    fake = RuleKeepingBatch(NAMES)
    parts = batch_names(NAMES)
    request = environment_request()
    described_as(fake, request, state="DISABLED", status=status)
    queue_request = batch_module.job_queue_request(NAMES)
    fake.queues[parts["queue"]] = dict(queue_request, state="DISABLED", status=status)
    progress = Progress(echo=False)
    batch_module.ensure_compute_environment(fake, request, progress, no_sleep)
    batch_module.ensure_job_queue(fake, queue_request, progress, no_sleep)
    assert [s[:3] for s in steps_of(progress)] == [
        (CREATED, "compute environment", parts["spot"]), (CREATED, "job queue", parts["queue"])]
    assert [c for c in fake.calls if not c.startswith("Describe")] == [
        f"CreateComputeEnvironment {parts['spot']}", "CreateJobQueue"]
    assert fake.environments[parts["spot"]]["status"] == "VALID"
    assert fake.queues[parts["queue"]]["status"] == "VALID"


def test_status_reads_a_queue_described_as_deleted_as_missing():
    fake = RuleKeepingBatch(NAMES)
    queue = batch_names(NAMES)["queue"]
    fake.queues[queue]["status"] = "DELETED"
    assert jobs_module.batch_status(fake, NAMES) == {"job_queue": queue, "missing": True}


def test_an_environment_without_the_al2023_image_type_is_updated_to_it():
    """Environments made before the image type was pinned (Batch's default then ECS_AL2)
    are updated to ECS_AL2023; what Batch adds to the entry is not a difference."""
    request = environment_request()
    assert request["computeResources"]["ec2Configuration"] == [{"imageType": "ECS_AL2023"}]
    resources = {k: v for k, v in request["computeResources"].items()
                 if k != "ec2Configuration"}
    found = {"state": "ENABLED", "status": "VALID", "serviceRole": "service",
             "computeResources": resources}
    differences = batch_module.compute_environment_differences
    assert differences(request, found) == ["ec2Configuration"]
    resources["ec2Configuration"] = [{"imageType": "ECS_AL2"}]
    assert differences(request, found) == ["ec2Configuration"]
    resources["ec2Configuration"] = [{"imageType": "ECS_AL2023", "batchImageStatus": "LATEST"}]
    assert differences(request, found) == []

    fake = RuleKeepingBatch(NAMES)
    name = described_as(fake, request, state="ENABLED", status="VALID")
    fake.environments[name]["computeResources"] = dict(
        request["computeResources"], ec2Configuration=[{"imageType": "ECS_AL2"}])
    progress = Progress(echo=False)
    batch_module.ensure_compute_environment(fake, request, progress, no_sleep)
    assert steps_of(progress) == [(UPDATED, "compute environment", name, "ec2Configuration")]
    assert fake.environments[name]["computeResources"]["ec2Configuration"] == [
        {"imageType": "ECS_AL2023"}]


def test_teardown_without_batch_permissions_under_ec2_says_it_did_not_look():
    class Denied:
        def describe_job_queues(self, **_):
            raise ClientError({"Error": {"Code": "AccessDeniedException", "Message": "no"}},
                              "DescribeJobQueues")

    progress = Progress(echo=False)
    teardown_batch(Denied(), NoIam(), NAMES, progress, required=False)
    assert [(s["outcome"], s["what"]) for s in progress.steps] == [(KEPT, "batch pieces")]
    with pytest.raises(ClientError):
        teardown_batch(Denied(), NoIam(), NAMES, Progress(echo=False), required=True)


def test_teardown_with_nothing_there_under_ec2_touches_nothing():
    fake = RuleKeepingBatch(NAMES)
    fake.queues, fake.environments, fake.definitions = {}, {}, []
    progress = Progress(echo=False)
    teardown_batch(fake, NoIam(), NAMES, progress, required=False)
    assert progress.steps == []
    teardown_batch(fake, NoIam(), NAMES, progress, required=True)
    assert {s["outcome"] for s in progress.steps} == {GONE}


# --- pure pieces ------------------------------------------------------------------------------

def test_the_job_definition_is_under_batchs_24_kib():
    """AWS Batch service quotas: a job definition of at most 24 KiB."""
    request = job_definition_request(NAMES, job_script(), 120)
    assert len(json.dumps(request).encode("utf-8")) < JOB_DEFINITION_LIMIT
    with pytest.raises(deploy.DeployError, match="24,576"):
        job_definition_request(NAMES, "x" * JOB_DEFINITION_LIMIT, 120)


def test_the_dockerfile_builds_from_the_default_image():
    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert base == DEFAULT_IMAGE
    assert "python3-boto3" in text and "dnf clean all" in text


@pytest.mark.parametrize("argv, message", [
    (["--engine", "fargate"], "invalid choice: 'fargate'"),
    (["--max-vcpus", "0"], "a whole number of vCPUs >= 1"),
    (["--image", "a b"], "no spaces"),
])
def test_cli_mistakes_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as ended:
        deploy.main(["deploy", *argv])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_deploy_engine_batch_reaches_deploy(clients, monkeypatch):
    seen = {}
    monkeypatch.setattr("awsfun_deploy.cli.deploy",
                        lambda *a, **k: seen.update(k) or {"function_arn": "arn"})
    assert deploy.main(["--engine", "batch", "--max-vcpus", "4", "--image", "img:1"],
                       clients=clients) == 0
    assert (seen["engine"], seen["max_vcpus"], seen["image"]) == ("batch", 4, "img:1")


# --- IAM ----------------------------------------------------------------------------------------

def lambda_policy(batch):
    return deploy.render_policy("lambda-policy", deploy.policy_values(NAMES, batch=batch))


def test_the_launcher_submits_only_to_its_queue_and_definition_and_only_under_batch():
    assert "batch:" not in json.dumps(lambda_policy(False))
    document = lambda_policy(True)
    (submit,) = [s for s in document["Statement"] if s["Action"] == "batch:SubmitJob"]
    prefix = f"arn:aws:batch:us-east-1:{NAMES.account}"
    # SubmitJob's resource types are job-queue, job-definition and job (Service
    # Authorization Reference, AWS Batch); the job's id is Batch's, so job/*.
    assert submit["Resource"] == [f"{prefix}:job-queue/su2c-jobs",
                                  f"{prefix}:job-definition/su2c-worker",
                                  f"{prefix}:job-definition/su2c-worker:*",
                                  f"{prefix}:job/*"]
    (listing,) = [s for s in document["Statement"] if s["Action"] == "batch:ListJobs"]
    # ListJobs has no resource type (Service Authorization Reference): "*" only.
    assert listing["Resource"] == "*"


def test_batch_policies_lint_clean_with_parliament():
    for name, accepted in (("lambda-policy", {"PRIVILEGE_ESCALATION",
                                              "PERMISSIONS_MANAGEMENT_ACTIONS"}),
                           ("deployer-policy", {"PRIVILEGE_ESCALATION",
                                                "PERMISSIONS_MANAGEMENT_ACTIONS"})):
        document = deploy.render_policy(name, deploy.policy_values(NAMES, batch=True))
        findings = analyze_policy_string(json.dumps(document),
                                         include_community_auditors=True).findings
        left = [(f.issue, f.detail) for f in findings if f.issue not in accepted
                and not (f.issue == "RESOURCE_MISMATCH" and all(
                    item["action"] in ("ec2:RunInstances", "ec2:CreateSecurityGroup")
                    or item["required_format"] == "*" for item in f.detail))]
        assert left == [], name


def test_the_deployer_passes_only_the_three_batch_roles():
    document = deploy.render_policy("deployer-policy", deploy.policy_values(NAMES, batch=True))
    (passing,) = [s for s in document["Statement"] if s.get("Sid") == "PassBatchRoles"]
    assert passing["Resource"] == [
        f"arn:aws:iam::{NAMES.account}:role/su2c-batch-instance-us-east-1",
        (f"arn:aws:iam::{NAMES.account}:role/aws-service-role/batch.amazonaws.com/"
         "AWSServiceRoleForBatch"),
        NAMES.worker_role_arn]
    (attach,) = [s for s in document["Statement"] if s.get("Sid") ==
                 "BatchInstanceRoleGetsOnlyTheEcsPolicy"]
    assert attach["Condition"] == {"ArnEquals": {"iam:PolicyARN": (
        "arn:aws:iam::aws:policy/service-role/AmazonEC2ContainerServiceforEC2Role")}}


def test_the_batch_module_is_importable_without_aws():
    assert batch_module.ENGINES == ("ec2", "batch")


@pytest.mark.parametrize("region", ["us-east-1", "ap-southeast-5", "eu-central-2"])
def test_for_batch_spot_and_three_groups_the_deployer_policy_fits_a_roles_inline_policy(region):
    """Batch's statements take the deployer policy past a managed policy (6,144 characters):
    the command says so (deployer_policy_fit); a role's inline policy (10,240) holds it."""
    names = deploy.derive_names("su2c", "123456789012", region)
    document = deploy.render_policy("deployer-policy", deploy.policy_values(
        names, batch=True, spot=True, security_group_ids=[
            "sg-0aaaaaaaaaaaaaaaa", "sg-0bbbbbbbbbbbbbbbb", "sg-0cccccccccccccccc"]))
    assert len(deploy.canonical(document)) <= 10240


def test_the_deployer_creates_only_batchs_service_linked_role_for_batch():
    document = deploy.render_policy("deployer-policy", deploy.policy_values(NAMES, batch=True))
    (statement,) = [s for s in document["Statement"]
                    if s["Action"] == "iam:CreateServiceLinkedRole"]
    assert statement["Resource"].endswith(
        "role/aws-service-role/batch.amazonaws.com/AWSServiceRoleForBatch")
    assert statement["Condition"] == {
        "StringEquals": {"iam:AWSServiceName": "batch.amazonaws.com"}}


def test_deployer_policy_engine_batch_prints_the_batch_statements(clients, capsys):
    assert deploy.main(["deployer-policy", "--engine", "batch"], clients=clients) == 0
    printed = capsys.readouterr()
    document = json.loads(printed.out[printed.out.index('{\n  "Version"'):])
    assert "PassBatchRoles" in [s.get("Sid") for s in document["Statement"]]
    assert "inline policy of a role" in printed.err
    assert deploy.main(["deployer-policy"], clients=clients) == 0
    assert "batch:" not in capsys.readouterr().out


# --- status ---------------------------------------------------------------------------------

def test_status_under_batch_says_the_engine_and_counts_the_queues_jobs(clients, names):
    deploy_batch(clients, names)
    names = deployed_names(clients)
    status = deploy.collect_status(clients, names)
    assert status["engine"] == "batch"
    assert status["batch"]["job_queue"] == batch_names(names)["queue"]
    assert status["batch"]["jobs"] == {name: 0 for name in jobs_module.JOB_STATUSES}
    assert status["drift"] == []
    out = io.StringIO()
    deploy.print_status(status, stream=out)
    assert "engine: batch" in out.getvalue()
    assert "su2c-jobs (ENABLED, VALID): submitted 0" in out.getvalue()


def test_status_under_batch_notes_a_missing_queue_as_drift(clients, names):
    deploy_batch(clients, names)
    names = deployed_names(clients)
    batch = clients("batch")
    queue = batch_names(names)["queue"]
    batch.update_job_queue(jobQueue=queue, state="DISABLED")
    batch.delete_job_queue(jobQueue=queue)
    status = deploy.collect_status(clients, names)
    assert {"resource": "job queue", "name": queue, "problem": "missing"} in status["drift"]
    assert status["batch"] == {"job_queue": queue, "missing": True}


def test_job_counts_reads_a_capped_number_of_pages():
    class Pages:
        def __init__(self):
            self.read = []

        def get_paginator(self, name):
            assert name == "list_jobs"
            outer = self

            class Paginator:
                def paginate(self, jobQueue, jobStatus, PaginationConfig):
                    many = jobStatus == "RUNNING"
                    for number in range(5 if many else 1):
                        outer.read.append(jobStatus)
                        yield {"jobSummaryList": [{"jobName": "j"}] * 100,
                               "nextToken": "t" if many and number < 4 else None}
            return Paginator()

    fake = Pages()
    counts = jobs_module.job_counts(fake, "q", pages=2)
    # Batch's ListJobs pages by nextToken (API Reference, ListJobs).
    assert counts["RUNNING"] == "200+" and counts["FAILED"] == 100
    assert fake.read.count("RUNNING") == 2
    assert jobs_module.job_counts(fake, "q", pages=5)["RUNNING"] == 500


# --- reconcile --------------------------------------------------------------------------------

def upload(clients, names, key="in/a.csv"):
    clients("s3").put_object(Bucket=names.data_bucket, Key=key, Body=b"a,b\n1,2\n")


def jobs_without_docker(endpoint):
    """moto's Batch marks jobs done without running them, instead of in Docker."""
    request = urllib.request.Request(f"{endpoint}/moto-api/config", method="POST",
                                     data=json.dumps({"batch": {"use_docker": False}}).encode())
    urllib.request.urlopen(request, timeout=10).close()


def submitted_jobs(clients, names):
    """Return [(job name, job id, status)] of every job in the stack's queue, by DescribeJobs."""
    batch = clients("batch")
    queue = batch_module.batch_names(names)["queue"]
    ids = {job["jobId"] for status in jobs_module.JOB_STATUSES
           for job in batch.list_jobs(jobQueue=queue, jobStatus=status)["jobSummaryList"]}
    return sorted((job["jobName"], job["jobId"], job["status"])
                  for job in batch.describe_jobs(jobs=sorted(ids))["jobs"]) if ids else []


def test_reconcile_under_batch_submits_the_handlers_job_and_launches_no_instance(
        clients, names, local_aws):
    """reconcile submits through lambda_function.submit_object_detail: the job is named from
    the scan's token and carries the object in its environment, and no instance starts."""
    jobs_without_docker(local_aws)
    deploy_batch(clients, names)
    names = deployed_names(clients)
    upload(clients, names)
    instances_before = clients("ec2").describe_instances()["Reservations"]
    result = deploy.reconcile(clients, names, progress=Progress(echo=False))
    obj = reconcile_module.head_input(clients("s3"), names.data_bucket, "in/a.csv")
    ((job_name, job_id, _),) = submitted_jobs(clients, names)
    assert job_name == lambda_function.batch_job_name(lambda_function.client_token(obj, 0))
    assert result["launched"] == [{"key": "in/a.csv", "instance_id": job_id, "source": "scan"}]
    (job,) = clients("batch").describe_jobs(jobs=[job_id])["jobs"]
    environment = {e["name"]: e["value"] for e in job["container"]["environment"]}
    fields = base64.b64decode(environment["JOB_FIELDS_B64"]).split(b"\0")
    assert fields[:2] == [names.data_bucket.encode(), b"in/a.csv"]
    assert clients("ec2").describe_instances()["Reservations"] == instances_before


def test_reconcile_under_batch_resubmits_when_the_jobs_ended_without_a_report(
        clients, names, local_aws):
    """Batch has no client token: a job name already used is an earlier attempt's. Ended
    with no report, the next attempt's name is submitted."""
    jobs_without_docker(local_aws)
    deploy_batch(clients, names)
    names = deployed_names(clients)
    upload(clients, names)
    first = deploy.reconcile(clients, names, progress=Progress(echo=False))["launched"]
    # moto ends a job at once without Docker; terminate_job makes it FAILED if it has not.
    clients("batch").terminate_job(jobId=first[0]["instance_id"], reason="host went away")
    result = deploy.reconcile(clients, names, progress=Progress(echo=False))
    obj = reconcile_module.head_input(clients("s3"), names.data_bucket, "in/a.csv")
    jobs = submitted_jobs(clients, names)
    assert sorted(name for name, _, _ in jobs) == sorted(
        lambda_function.batch_job_name(lambda_function.client_token(obj, attempt))
        for attempt in (0, 1))
    (second,) = [job_id for name, job_id, _ in jobs if job_id != first[0]["instance_id"]]
    assert result["launched"] == [{"key": "in/a.csv", "instance_id": second, "source": "scan"}]


def test_reconcile_under_batch_leaves_an_input_with_a_live_job(clients, names, monkeypatch):
    deploy_batch(clients, names)
    names = deployed_names(clients)
    upload(clients, names)
    obj = reconcile_module.head_input(clients("s3"), names.data_bucket, "in/a.csv")
    live = lambda_function.batch_job_name(lambda_function.client_token(obj, 0))
    monkeypatch.setattr(reconcile_module, "live_job_names", lambda batch, queue: {live})
    monkeypatch.setattr(lambda_function, "submit_object_detail",
                        lambda *a, **k: pytest.fail("submitted again"))
    result = deploy.reconcile(clients, names, progress=Progress(echo=False))
    assert result["launched"] == [{"key": "in/a.csv", "instance_id": live, "source": "scan"}]


def test_compute_environment_differences_name_what_an_update_changes():
    request = batch_module.compute_environment_request(
        NAMES, "spot", 16, ["subnet-b", "subnet-a"], ["sg-1"], "profile", "service")
    found = {"state": "ENABLED", "status": "VALID", "serviceRole": "service",
             "computeResources": dict(request["computeResources"],
                                      subnets=["subnet-a", "subnet-b"])}
    assert batch_module.compute_environment_differences(request, found) == []
    found["computeResources"]["maxvCpus"] = 8
    found.update(state="DISABLED", status="INVALID", statusReason="profile not found")
    assert batch_module.compute_environment_differences(request, found) == [
        "maxvCpus", "state", "INVALID (profile not found)"]
    # Another kind of environment under the name cannot be updated into ours.
    found["computeResources"]["type"] = "EC2"
    with pytest.raises(deploy.DeployError, match="type 'EC2', not 'SPOT'"):
        batch_module.compute_environment_differences(request, found)


def test_job_definition_differences_ignore_what_batch_adds_and_the_case_of_actions():
    request = job_definition_request(NAMES, "echo", 120)
    echoed = {**request, "revision": 1, "status": "ACTIVE",
              "containerProperties": {**request["containerProperties"], "environment": [],
                                      "resourceRequirements": list(reversed(
                                          request["containerProperties"][
                                              "resourceRequirements"]))},
              "retryStrategy": {"attempts": 3, "evaluateOnExit": [
                  dict(e, action=e["action"].lower()) for e in EVALUATE_ON_EXIT]}}
    assert batch_module.job_definition_differences(request, echoed) == []
    assert batch_module.job_definition_differences(
        job_definition_request(NAMES, "echo", 60), echoed) == ["timeout"]
    assert batch_module.job_definition_differences(request, None) == ["missing"]
