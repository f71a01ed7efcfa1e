"""iam/deployer-policy.json: what the person running ./deploy.sh needs, and nothing more.

Every boto3 call the deploy package makes (and the handler's, which reconcile runs) is found by
reading the code: an AST scan of `client.method(`, `client.get_paginator("name")` and
`client.get_waiter("name")`, mapped to its API operation with botocore's service model, then
to the IAM action(s) AWS checks for it. The rendered policy must allow every one of them, and
its actions must be exactly those: an unused permission fails as much as a missing one.
"""

import ast
import fnmatch
import json

import botocore.session
import pytest
from botocore import xform_name
from botocore.exceptions import ClientError
from conftest import REPO
from parliament import analyze_policy_string, expand_action, iam_definition

import deploy
import lambda_function
from awsfun_deploy.ec2 import (
    wait_until_ec2_accepts_profile,
    worker_launch_template_data,
)
from awsfun_deploy.function import capacity_environment

SCANNED = [*sorted((REPO / "awsfun_deploy").glob("*.py")), REPO / "lambda_function.py"]
# The names the code gives its clients (awsfun_deploy/*: the client is the first parameter;
# reconcile's Reconciler keeps them on self), and `clients("service")` itself.
CLIENT_NAMES = {"s3": "s3", "iam": "iam", "ec2": "ec2", "lam": "lambda", "sqs": "sqs",
                "logs": "logs", "ssm": "ssm", "kms": "kms", "s3control": "s3control",
                "sts": "sts", "batch": "batch"}
HELPERS = {"get_paginator", "get_waiter", "meta", "exceptions"}
# S3's IAM actions are not its API operations' names (S3 User Guide, "Required permissions
# for Amazon S3 API operations"); S3 Control's GetPublicAccessBlock is the account's.
S3_ACTIONS = {
    ("s3", "HeadBucket"): "s3:ListBucket",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "ListObjectVersions"): "s3:ListBucketVersions",
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "DeleteObjects"): "s3:DeleteObject",
    ("s3", "GetPublicAccessBlock"): "s3:GetBucketPublicAccessBlock",
    ("s3", "PutPublicAccessBlock"): "s3:PutBucketPublicAccessBlock",
    ("s3", "GetBucketEncryption"): "s3:GetEncryptionConfiguration",
    ("s3", "PutBucketEncryption"): "s3:PutEncryptionConfiguration",
    ("s3", "DeleteBucketTagging"): "s3:PutBucketTagging",
    ("s3", "GetBucketNotificationConfiguration"): "s3:GetBucketNotification",
    ("s3", "PutBucketNotificationConfiguration"): "s3:PutBucketNotification",
    ("s3control", "GetPublicAccessBlock"): "s3:GetAccountPublicAccessBlock",
}
# Actions AWS checks besides the operation's own, each for a documented reason.
ALSO_CHECKED = {
    # Tagging on create needs the service's tag action too: IAM User Guide (CreateRole,
    # CreateInstanceProfile with Tags); SQS Developer Guide ("tag on creation" needs
    # sqs:TagQueue); CloudWatch Logs API (CreateLogGroup tags: logs:TagResource); Lambda
    # Developer Guide, "Permissions required for working with tags" (TagResource on create);
    # EC2 User Guide, "Grant permission to tag resources during creation" (ec2:CreateTags).
    ("iam", "CreateRole"): ["iam:TagRole"],
    ("iam", "CreateInstanceProfile"): ["iam:TagInstanceProfile"],
    ("sqs", "CreateQueue"): ["sqs:TagQueue"],
    ("logs", "CreateLogGroup"): ["logs:TagResource"],
    ("lambda", "CreateFunction"): ["lambda:TagResource", "iam:PassRole"],
    ("ec2", "CreateLaunchTemplate"): ["ec2:CreateTags"],
    ("ec2", "CreateSecurityGroup"): ["ec2:CreateTags"],
    # RunInstances with an instance profile passes its role (EC2 User Guide, "IAM roles for
    # Amazon EC2"), and the handler tags the instance and its volume on launch.
    ("ec2", "RunInstances"): ["iam:PassRole", "ec2:CreateTags"],
    # "The caller of this operation must be granted the PassRole permission on the IAM role"
    # (IAM API Reference, AddRoleToInstanceProfile).
    ("iam", "AddRoleToInstanceProfile"): ["iam:PassRole"],
    ("lambda", "UpdateFunctionConfiguration"): ["iam:PassRole"],
    # "Lambda returns tag data only if you have explicit allow permissions for
    # lambda:ListTags" (Lambda API Reference, GetFunction); deploy and status read them.
    ("lambda", "GetFunction"): ["lambda:ListTags"],
    # Teardown empties versioned buckets: every version and delete marker by VersionId.
    ("s3", "DeleteObjects"): ["s3:DeleteObjectVersion"],
    # The Batch engine: "If tags are specified in the resource-creating action, AWS performs
    # additional authorization on the batch:TagResource action" (AWS Batch User Guide, "Grant
    # permission to tag resources on creation"); a compute environment passes its instance
    # and service roles, a job definition its job role (iam:PassRole).
    ("batch", "CreateComputeEnvironment"): ["batch:TagResource", "iam:PassRole"],
    ("batch", "CreateJobQueue"): ["batch:TagResource"],
    ("batch", "RegisterJobDefinition"): ["batch:TagResource", "iam:PassRole"],
}
SESSION = botocore.session.get_session()
NAMES = deploy.derive_names("su2c", "123456789012", "us-east-1")
# Managed policies hold at most 6,144 characters, white space not counted (IAM User Guide,
# "IAM and AWS STS quotas").
MANAGED_POLICY_LIMIT = 6144
# A role's inline policies together (same quota): where a longer rendering still fits.
ROLE_POLICY_LIMIT = 10240
TEMPLATE_ID = "lt-0123456789abcdef0"
IMAGE_ID = "ami-0123456789abcdef0"
STACK_GROUP = "sg-0aaaaaaaaaaaaaaaa"  # the stack's own, tagged awsfun:stack
USER_GROUP = "sg-0bbbbbbbbbbbbbbbb"  # the user's (--security-groups): no tag of ours
OTHER_GROUP = "sg-0cccccccccccccccc"  # anyone else's
SUBNET = "subnet-0123456789abcdef0"
# EC2's service-linked role for spot (EC2 User Guide, "Service-linked role for Spot Instance
# requests").
SPOT_ROLE_ARN = (f"arn:aws:iam::{NAMES.account}:role/aws-service-role/spot.amazonaws.com/"
                 "AWSServiceRoleForEC2Spot")
# Batch's (AWS Batch User Guide, "Using service-linked roles for AWS Batch").
BATCH_ROLE_ARN = (f"arn:aws:iam::{NAMES.account}:role/aws-service-role/batch.amazonaws.com/"
                  "AWSServiceRoleForBatch")


def operations(service):
    """{python method name: API operation name} of a botocore service model."""
    return {xform_name(name): name for name in SESSION.get_service_model(service).operation_names}


def waiter_operation(service, name):
    model = SESSION.get_waiter_model(service)
    waiters = {xform_name(waiter): waiter for waiter in model.waiter_names}
    return model.get_waiter(waiters[name]).operation


def client_service(node):
    """The service of the client an attribute is looked up on, or None (not a client)."""
    if isinstance(node, ast.Name):
        return CLIENT_NAMES.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
            node.value.id == "self":
        return CLIENT_NAMES.get(node.attr)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
            node.func.id == "clients" and isinstance(node.args[0], ast.Constant):
        return node.args[0].value
    return None


def string_constants(tree):
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def scan_calls(paths=SCANNED):
    """Return {(service, API operation): [where]} of every client call in the files.

    A bound method passed on (`_get_or_none(s3.get_bucket_policy, ...)`) counts as a call. A
    waiter named by a variable counts as every waiter of that client named anywhere in the
    file. Any other attribute of a client fails the scan, so nothing slips past it.
    """
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        constants = string_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            service = client_service(node.value)
            if service is None:
                continue
            where = f"{path.name}:{node.lineno}"
            known = operations(service)
            if node.attr in known:
                found.setdefault((service, known[node.attr]), []).append(where)
                continue
            assert node.attr in HELPERS, f"{where}: {service} client has no {node.attr}"
            parent = [p for p in ast.walk(tree) if isinstance(p, ast.Call) and p.func is node]
            if node.attr not in ("get_paginator", "get_waiter") or not parent:
                continue
            argument = parent[0].args[0]
            if node.attr == "get_paginator":
                found.setdefault((service, known[argument.value]), []).append(where)
                continue
            model = SESSION.get_waiter_model(service)
            names = ([argument.value] if isinstance(argument, ast.Constant)
                     else sorted({xform_name(w) for w in model.waiter_names} & constants))
            assert names, f"{where}: no waiter of {service} named in {path.name}"
            for name in names:
                found.setdefault((service, waiter_operation(service, name)), []).append(where)
    return found


def iam_actions(service, operation):
    """The IAM actions AWS checks for one API operation (see S3_ACTIONS, ALSO_CHECKED)."""
    prefix = SESSION.get_service_model(service).signing_name
    primary = S3_ACTIONS.get((service, operation), f"{prefix}:{operation}")
    return [primary, *ALSO_CHECKED.get((service, operation), [])]


def required_actions():
    return {action for (service, operation) in scan_calls()
            for action in iam_actions(service, operation)}


def as_list(value):
    return value if isinstance(value, list) else [value]


def rendered(names=NAMES, groups=(), spot=False, batch=False):
    """The policy as `./deploy.sh deployer-policy` prints it (--security-groups `groups`,
    --spot `spot`, --engine batch `batch`)."""
    return deploy.render_policy("deployer-policy", deploy.policy_values(
        names, security_group_ids=groups, spot=spot, batch=batch))


def rendered_fully(names=NAMES):
    """With every optional statement: for spot, for a group of the user's, for Batch."""
    return rendered(names, groups=[USER_GROUP], spot=True, batch=True)


# What only the Batch engine calls (awsfun_deploy/batch.py), printed with --engine batch.
BATCH_ONLY = sorted({
    "batch:CreateComputeEnvironment", "batch:UpdateComputeEnvironment",
    "batch:DeleteComputeEnvironment", "batch:DescribeComputeEnvironments",
    "batch:CreateJobQueue", "batch:UpdateJobQueue", "batch:DeleteJobQueue",
    "batch:DescribeJobQueues", "batch:RegisterJobDefinition", "batch:DeregisterJobDefinition",
    "batch:DescribeJobDefinitions", "batch:DescribeJobs", "batch:ListJobs", "batch:SubmitJob", "batch:TagResource",
    "iam:AttachRolePolicy", "iam:ListRoles"})


def granted(document):
    """Every action pattern of the document's Allow statements."""
    return {pattern for statement in document["Statement"] if statement["Effect"] == "Allow"
            for pattern in as_list(statement["Action"])}


def known_action(action):
    prefix, name = action.split(":")
    return any(service["prefix"] == prefix and any(p["privilege"] == name
                                                   for p in service["privileges"])
               for service in iam_definition)


def expansion(pattern):
    return {f"{item['service']}:{item['action']}" for item in expand_action(pattern)}


def test_the_scan_finds_the_calls_deploy_makes():
    calls = scan_calls()
    assert len(calls) > 80, sorted(calls)  # the scan reads real code
    for expected in [("sts", "GetCallerIdentity"), ("ec2", "RunInstances"),
                     ("s3control", "GetPublicAccessBlock"), ("ec2", "GetEbsDefaultKmsKeyId"),
                     ("s3", "GetBucketPolicy"),  # passed to _get_or_none, not called there
                     ("ec2", "DescribeInstances"),  # a paginator and a waiter
                     ("lambda", "GetFunction"),  # _wait_for_function's waiter names
                     ("iam", "ListRolePolicies"), ("sqs", "ChangeMessageVisibility")]:
        assert expected in calls, expected


def test_every_action_is_one_aws_knows():
    assert [action for action in required_actions() if not known_action(action)] == []


def test_the_deployer_policy_allows_every_call_deploy_makes_and_nothing_else():
    required = required_actions()
    patterns = granted(rendered_fully())

    def missing_from(patterns):
        return sorted(action for action in required
                      if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower())
                                 for pattern in patterns))

    assert missing_from(patterns) == []
    # Printed without --spot it lacks spot's one action, which deploy calls only for spot (and
    # for Batch's role); without --engine batch, what only the Batch engine calls.
    assert missing_from(granted(rendered(spot=True))) == BATCH_ONLY
    assert missing_from(granted(rendered(batch=True))) == []
    assert missing_from(granted(rendered())) == sorted(
        [*BATCH_ONLY, "iam:CreateServiceLinkedRole"])
    # A wildcard is there only to keep the document under IAM's size limit: it must stand for
    # exactly actions deploy needs (per parliament's copy of AWS's action list).
    needed = {action.lower() for action in required}
    unused = sorted(pattern for pattern in patterns
                    if not {action.lower() for action in expansion(pattern)} <= needed)
    assert unused == []


def test_resource_star_only_where_aws_offers_no_resource_to_name():
    """EC2's Describe* and GetEbsDefaultKmsKeyId, logs:DescribeLogGroups, STS and the
    account's Block Public Access have no resource type (Service Authorization Reference)."""
    for statement in rendered_fully()["Statement"]:
        if "*" not in as_list(statement["Resource"]):
            continue
        for pattern in as_list(statement["Action"]):
            for item in expand_action(pattern):
                service = next(s for s in iam_definition if s["prefix"] == item["service"])
                privilege = next(p for p in service["privileges"]
                                 if p["privilege"] == item["action"])
                kinds = [r["resource_type"] for r in privilege["resource_types"]]
                assert kinds == [""], (pattern, kinds)


def test_roles_are_passed_only_the_worker_to_ec2_and_the_launcher_to_lambda():
    """And, for --engine batch, the three roles Batch is given: the instances' role, Batch's
    service-linked role, the worker role as the job role. Which service Batch names as
    iam:PassedToService for these is not documented, so that statement names the three ARNs
    exactly and no condition."""
    passing = [s for s in rendered_fully()["Statement"]
               if "iam:PassRole" in as_list(s["Action"])]
    (batch,) = [s for s in passing if s["Sid"] == "PassBatchRoles"]
    assert batch["Resource"] == [
        f"arn:aws:iam::{NAMES.account}:role/su2c-batch-instance-us-east-1",
        BATCH_ROLE_ARN, NAMES.worker_role_arn]
    assert "Condition" not in batch
    passing = [s for s in passing if s is not batch]
    assert {(s["Resource"], json.dumps(s["Condition"], sort_keys=True)) for s in passing} == {
        (NAMES.worker_role_arn, json.dumps(
            {"StringEqualsIfExists": {"iam:PassedToService": "ec2.amazonaws.com"}})),
        (NAMES.lambda_role_arn, json.dumps(
            {"StringEquals": {"iam:PassedToService": "lambda.amazonaws.com"}})),
    }
    assert all(as_list(s["Action"]) == ["iam:PassRole"] for s in passing)


def test_everything_it_changes_is_named_by_the_stack_or_carries_its_tag():
    """Writes on named resources name them exactly; EC2 resources, which have ids, not names,
    are scoped by the awsfun:stack tag (on create, aws:RequestTag; after, aws:ResourceTag).
    Besides: the user's own security groups by their ids, when it is rendered for them, and
    EC2's service-linked role for spot by its one ARN. A Batch job has an id, not a name, and
    SubmitJob (reconcile's, under --engine batch) authorizes `job/*` beside the stack's own
    queue and job definition (Service Authorization Reference, AWS Batch: SubmitJob)."""
    document = rendered_fully()
    named_group = f"arn:aws:ec2:us-east-1:{NAMES.account}:security-group/{USER_GROUP}"
    stacked = {"aws:RequestTag/awsfun:stack", "aws:ResourceTag/awsfun:stack"}
    for statement in document["Statement"]:
        for arn in as_list(statement["Resource"]):
            # lambda:FunctionArn: an event source mapping only of the stack's function.
            if arn == "*" or any(tag in json.dumps(statement.get("Condition", {}))
                                 for tag in stacked | {"ec2:CreateAction", "ec2:Owner",
                                                       "aws:ResourceTag/awsfun:bucket",
                                                       "lambda:FunctionArn"}):
                continue
            # Unconditioned: a name of this stack, or a part RunInstances creates.
            assert (NAMES.prefix in arn or arn.endswith(("instance/*", "volume/*",
                                                         "network-interface/*", "subnet/*",
                                                         "vpc/*", "key/*",
                                                         "spot-instances-request/*",
                                                         ":job/*"))
                    or "ami-amazon-linux-latest" in arn
                    or arn in (named_group, SPOT_ROLE_ARN, BATCH_ROLE_ARN)), (statement["Sid"], arn)


def test_the_deployer_policy_lints_clean_with_parliament():
    """parliament's own checks find nothing but the RunInstances and CreateSecurityGroup
    resources split across statements on purpose (each with the condition that applies to
    it). Its community auditors' findings are those of any deployer of IAM roles: see
    test_iam.JUSTIFIED. As printed, and with every optional statement."""
    for document in (rendered(), rendered_fully()):
        policy = analyze_policy_string(json.dumps(document))
        on_star = {action for statement in document["Statement"]
                   if statement["Resource"] == "*" for action in as_list(statement["Action"])}
        # lambda:*EventSourceMapping (on the stack's mappings) names Create too, whose only
        # resource is "*", where the NoResource statement grants it.
        findings = [(f.issue, f.detail) for f in policy.findings
                    if not (f.issue == "RESOURCE_MISMATCH"
                            and all(item["action"] in ("ec2:RunInstances",
                                                       "ec2:CreateSecurityGroup")
                                    or (item["required_format"] == "*"
                                        and item["action"] in on_star)
                                    for item in f.detail))]
        assert findings == []


@pytest.mark.parametrize("region", ["us-east-1", "ap-southeast-5", "eu-central-2"])
def test_the_default_prefix_fits_a_managed_policy_in_any_region(region):
    names = deploy.derive_names("su2c", "123456789012", region)
    assert len(deploy.canonical(rendered(names))) <= MANAGED_POLICY_LIMIT


@pytest.mark.parametrize("region", ["us-east-1", "ap-southeast-5", "eu-central-2"])
def test_for_spot_and_three_groups_it_still_fits_a_roles_inline_policy(region):
    """Spot's statements and the user's groups make it longer than a managed policy may be
    in some regions (the command says so, deployer_policy_fit); a role still holds it."""
    names = deploy.derive_names("su2c", "123456789012", region)
    document = rendered(names, groups=[USER_GROUP, OTHER_GROUP, STACK_GROUP], spot=True)
    assert len(deploy.canonical(document)) <= ROLE_POLICY_LIMIT


def test_deploy_sh_prints_it_for_the_account_and_says_where_it_fits(clients, capsys):
    assert deploy.main(["deployer-policy", "--prefix", "stage2", "--data-bucket",
                        "stage2-inputs"], clients=clients) == 0
    printed = capsys.readouterr()
    document = json.loads(printed.out[printed.out.index('{\n  "Version"'):])
    names = deploy.resolve_names(clients, "stage2", data_bucket="stage2-inputs")
    assert document == rendered(names)
    assert "arn:aws:s3:::stage2-inputs/*" in json.dumps(document)
    assert "fits a managed policy (6,144)" in printed.err


def test_a_policy_too_long_for_a_managed_policy_is_said_to_be_so():
    assert "fits a managed policy" in deploy.deployer_policy_fit(6144)
    assert "inline policy of a role (10,240)" in deploy.deployer_policy_fit(6145)
    assert "too long for any IAM policy" in deploy.deployer_policy_fit(10241)


# --- RunInstances as deploy and reconcile make it, matched to the policy ---------------------
# moto judges neither EC2's resource ARNs nor Conditions (tests/test_roles.py does the same for
# the launcher role): the request is turned into the resources EC2 authorizes it on, and each
# must be allowed by a statement of the rendered policy.


def condition_holds(condition, context):
    """Evaluate a statement's Condition against a request's condition keys, for the operators
    this policy uses (IAM User Guide, "IAM JSON policy elements: Condition operators"): a
    missing key fails the test unless the operator ends in IfExists or is ForAllValues (true
    for no values). Any other operator fails loudly, so none is judged by guess."""
    matchers = {"StringEquals": lambda value, wanted: value == wanted,
                "StringLike": fnmatch.fnmatchcase, "ArnLike": fnmatch.fnmatchcase}
    for operator, tests in (condition or {}).items():
        quantifier, _, base = operator.rpartition(":")
        if_exists = base.endswith("IfExists")
        match = matchers[base[:-len("IfExists")] if if_exists else base]
        for key, wanted in tests.items():
            if key not in context:
                if if_exists or quantifier == "ForAllValues":
                    continue
                return False
            hits = [any(match(value, one) for one in as_list(wanted))
                    for value in as_list(context[key])]
            if not (all(hits) if quantifier == "ForAllValues" else any(hits)):
                return False
    return True


def allows(document, action, arn, context):
    """True when an Allow statement grants `action` on `arn` given the request's `context`
    (the policy has no Deny)."""
    return any(statement["Effect"] == "Allow"
               and any(fnmatch.fnmatchcase(action.lower(), pattern.lower())
                       for pattern in as_list(statement["Action"]))
               and any(fnmatch.fnmatchcase(arn, resource)
                       for resource in as_list(statement["Resource"]))
               and condition_holds(statement.get("Condition"), context)
               for statement in document["Statement"])


def stack_tags(prefix):
    return {"aws:ResourceTag/awsfun:stack": prefix} if prefix else {}


def judged_resources(request, template_data, group_stacks, names=NAMES):
    """[(ARN, condition keys)] of each resource EC2 authorizes a RunInstances request on.

    Always the image, instance, network interface, security groups, subnet and volume; the
    launch template when one is named (Service Authorization Reference, Amazon EC2,
    RunInstances); the spot-instances-request when InstanceMarketOptions asks for spot ("For
    Resource, specify spot-instances-request. This allows users to create Spot Instance
    requests, which request Spot Instances": EC2 User Guide, "Tag Spot Instance requests");
    a key pair when KeyName is given. The request's network interface and groups replace the
    template's. group_stacks: {group id: the awsfun:stack tag it carries, or None}.
    """
    ec2_arn = f"arn:{names.partition}:ec2:{names.region}:{names.account}"
    template_arn = names.launch_template_arn(TEMPLATE_ID)
    common = {"ec2:LaunchTemplate": template_arn} if "LaunchTemplate" in request else {}
    interface = (request.get("NetworkInterfaces") or template_data.get("NetworkInterfaces")
                 or [{}])[0]
    groups = (request.get("SecurityGroupIds") or interface.get("Groups")
              or template_data.get("SecurityGroupIds"))
    found = [
        (f"arn:{names.partition}:ec2:{names.region}::image/{template_data['ImageId']}",
         {**common, "ec2:Owner": "amazon"}),
        (f"{ec2_arn}:instance/i-0new", common),
        (f"{ec2_arn}:volume/vol-0new", common),
        (f"{ec2_arn}:network-interface/eni-0new", common),
        (f"{ec2_arn}:subnet/{interface.get('SubnetId') or SUBNET}", common),
        *[(f"{ec2_arn}:security-group/{group}", {**common, **stack_tags(group_stacks[group])})
          for group in groups],
    ]
    if "LaunchTemplate" in request:
        found.append((template_arn, {**common, **stack_tags(names.prefix)}))
    if (request.get("InstanceMarketOptions") or {}).get("MarketType") == "spot":
        found.append((f"{ec2_arn}:spot-instances-request/sir-0new", common))
    if "KeyName" in request:
        found.append((f"{ec2_arn}:key-pair/{request['KeyName']}", common))
    return found


def refused(document, request, template_data, group_stacks):
    """The ARNs of a RunInstances request that the document does not allow."""
    return [arn for arn, context in judged_resources(request, template_data, group_stacks)
            if not allows(document, "ec2:RunInstances", arn, context)]


def template_data(groups, subnet=None):
    """The worker template's data as deploy writes it (ec2.worker_launch_template_data)."""
    return worker_launch_template_data(IMAGE_ID, "t3.small", NAMES.worker_instance_profile,
                                       "/dev/xvda", 8, NAMES.prefix, subnet_id=subnet,
                                       group_ids=groups)


class RecordingEc2:
    """Answers RunInstances as EC2 does (an instance, or DryRunOperation) and keeps each
    request's parameters."""

    def __init__(self):
        self.requests = []

    def run_instances(self, **params):
        self.requests.append(params)
        if params.get("DryRun"):
            raise ClientError({"Error": {"Code": "DryRunOperation", "Message": ""}},
                              "RunInstances")
        return {"Instances": [{"InstanceId": "i-0123456789abcdef0"}]}


def reconcile_request(environment):
    """The RunInstances reconcile makes for an input under the deployed function's settings
    (its environment, as function.capacity_environment writes it): the handler's own
    launch_with_fallback, first step."""
    ec2 = RecordingEc2()
    settings = lambda_function.load_settings(
        {"LAUNCH_TEMPLATE": NAMES.launch_template, **environment})
    obj = {"bucket": NAMES.data_bucket, "key": "in/a.csv", "version_id": None, "etag": "abc"}
    lambda_function.launch_with_fallback(ec2, obj, "#!/bin/bash\n", settings)
    return ec2.requests[0]


def deploy_dry_run_request():
    """The DryRun RunInstances deploy makes to wait for the instance profile."""
    ec2 = RecordingEc2()
    wait_until_ec2_accepts_profile(ec2, NAMES.launch_template, sleep=lambda _: None)
    (request,) = ec2.requests
    return request


def test_a_spot_launch_by_reconcile_is_allowed_on_its_spot_instances_request():
    """With --spot, reconcile launches spot under the deployer's credentials. Refused on the
    spot-instances-request, EC2 answers UnauthorizedOperation, which is no capacity refusal:
    the launch fails instead of falling back to on demand."""
    request = reconcile_request(capacity_environment(spot=True))
    assert request["InstanceMarketOptions"] == lambda_function.SPOT_OPTIONS
    data = template_data([STACK_GROUP])
    spot_request = f"arn:aws:ec2:us-east-1:{NAMES.account}:spot-instances-request/sir-0new"
    assert spot_request in [arn for arn, _ in judged_resources(
        request, data, {STACK_GROUP: NAMES.prefix})]
    # Printed for spot (deployer-policy --spot, or a spot route) it is allowed; else refused.
    assert refused(rendered(spot=True), request, data, {STACK_GROUP: NAMES.prefix}) == []
    assert refused(rendered(), request, data, {STACK_GROUP: NAMES.prefix}) == [spot_request]
    # The same request on demand, and deploy's DryRun check (no market options: on demand).
    assert refused(rendered(), reconcile_request({}), data, {STACK_GROUP: NAMES.prefix}) == []
    assert "InstanceMarketOptions" not in deploy_dry_run_request()
    assert refused(rendered(), deploy_dry_run_request(), data,
                   {STACK_GROUP: NAMES.prefix}) == []


def test_the_users_own_groups_are_allowed_only_as_named_and_only_to_launch_into():
    """--security-groups: the templates hold groups of the user's, which carry no awsfun:stack
    tag, so StackTagged does not cover them and deploy's DryRun check and reconcile's launches
    would be refused. Rendered for those groups (deployer-policy --security-groups), the
    policy allows both; another untagged group stays refused, and on the named groups only
    RunInstances from a launch template is granted, nothing that changes them."""
    data = template_data([USER_GROUP], SUBNET)
    stacks = {USER_GROUP: None, OTHER_GROUP: None, STACK_GROUP: NAMES.prefix}
    spot_in_subnet = reconcile_request(capacity_environment(
        spot=True, subnets=[SUBNET], security_groups=[USER_GROUP]))
    assert spot_in_subnet["NetworkInterfaces"][0]["Groups"] == [USER_GROUP]
    requests = [deploy_dry_run_request(), spot_in_subnet]
    arn = f"arn:aws:ec2:us-east-1:{NAMES.account}:security-group/{{}}".format
    for request in requests:
        assert refused(rendered(spot=True), request, data, stacks) == [arn(USER_GROUP)]
    named = rendered(groups=[USER_GROUP], spot=True)
    for request in requests:
        assert refused(named, request, data, stacks) == []
    # Another group of anyone's, put into the request, is refused as before.
    other = dict(spot_in_subnet, NetworkInterfaces=[
        dict(spot_in_subnet["NetworkInterfaces"][0], Groups=[OTHER_GROUP])])
    assert refused(named, other, data, stacks) == [arn(OTHER_GROUP)]
    # Without a launch template (whose own resource must carry the stack's tag) no launch.
    from_template = {"ec2:LaunchTemplate": NAMES.launch_template_arn(TEMPLATE_ID)}
    assert allows(named, "ec2:RunInstances", arn(USER_GROUP), from_template)
    assert not allows(named, "ec2:RunInstances", arn(USER_GROUP), {})
    for action in ("ec2:AuthorizeSecurityGroupEgress", "ec2:RevokeSecurityGroupEgress",
                   "ec2:RevokeSecurityGroupIngress", "ec2:DeleteSecurityGroup",
                   "ec2:AuthorizeSecurityGroupIngress", "ec2:ModifySecurityGroupRules"):
        assert not allows(named, action, arn(USER_GROUP), from_template), action
    # The stack's own group needs no naming, and naming groups changes nothing else.
    assert refused(rendered(), requests[0], template_data([STACK_GROUP]), stacks) == []
    assert [s for s in named["Statement"] if s.get("Sid") != "NamedSecurityGroups"] == \
        rendered(spot=True)["Statement"]


def test_deployer_policy_security_groups_prints_the_statement_for_them(clients, capsys):
    assert deploy.main(["deployer-policy", "--security-groups", f"{USER_GROUP},{OTHER_GROUP}"],
                       clients=clients) == 0
    printed = capsys.readouterr()
    document = json.loads(printed.out[printed.out.index('{\n  "Version"'):])
    names = deploy.resolve_names(clients)
    assert document == rendered(names, groups=[USER_GROUP, OTHER_GROUP])
    (statement,) = [s for s in document["Statement"] if s.get("Sid") == "NamedSecurityGroups"]
    assert statement["Resource"] == [
        f"arn:aws:ec2:{names.region}:{names.account}:security-group/{group}"
        for group in sorted([USER_GROUP, OTHER_GROUP])]
    # Without the option there is no such statement: a statement must name a resource.
    assert deploy.main(["deployer-policy"], clients=clients) == 0
    assert "NamedSecurityGroups" not in capsys.readouterr().out


def test_the_only_role_it_may_create_for_a_service_is_spots():
    """deploy --spot (or a route with "spot") creates EC2's service-linked role for Spot
    Instances, which must exist before a spot RunInstances (EC2 User Guide, "Service-linked
    role for Spot Instance requests"); the launcher may not create it. The deployer may
    create that one role, for that one service, and no other."""
    assert "iam:CreateServiceLinkedRole" not in granted(rendered())
    document = rendered(spot=True)
    (statement,) = [s for s in document["Statement"]
                    if "iam:CreateServiceLinkedRole" in as_list(s["Action"])]
    assert as_list(statement["Action"]) == ["iam:CreateServiceLinkedRole"]
    assert statement["Resource"] == SPOT_ROLE_ARN
    assert statement["Condition"] == {
        "StringEquals": {"iam:AWSServiceName": "spot.amazonaws.com"}}
    assert allows(document, "iam:CreateServiceLinkedRole", SPOT_ROLE_ARN,
                  {"iam:AWSServiceName": "spot.amazonaws.com"})
    autoscaling = (f"arn:aws:iam::{NAMES.account}:role/aws-service-role/"
                   "autoscaling.amazonaws.com/AWSServiceRoleForAutoScaling")
    assert not allows(document, "iam:CreateServiceLinkedRole", autoscaling,
                      {"iam:AWSServiceName": "autoscaling.amazonaws.com"})
    assert not allows(document, "iam:CreateServiceLinkedRole", SPOT_ROLE_ARN,
                      {"iam:AWSServiceName": "spotfleet.amazonaws.com"})


def spot_sids(document):
    return [s.get("Sid") for s in document["Statement"]
            if s.get("Sid") in ("SpotRequests", "SpotServiceLinkedRole")]


def test_deployer_policy_is_printed_for_spot_with_spot_or_a_spot_route(clients, capsys,
                                                                       tmp_path):
    """deploy creates the spot role when --spot or a route asks for spot (routes.uses_spot):
    deployer-policy adds spot's statements on the same terms, and only then."""
    def printed(*argv):
        assert deploy.main(["deployer-policy", *argv], clients=clients) == 0
        out = capsys.readouterr().out
        return json.loads(out[out.index('{\n  "Version"'):])

    both = ["SpotRequests", "SpotServiceLinkedRole"]
    assert spot_sids(printed()) == []
    assert spot_sids(printed("--spot")) == both
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"routes": [{"name": "big", "match": "big/*",
                                              "launch_template": "big_worker",
                                              "spot": True}]}), encoding="utf-8")
    assert spot_sids(printed("--routes", str(routes))) == both
    assert printed("--spot") == rendered(deploy.resolve_names(clients), spot=True)
