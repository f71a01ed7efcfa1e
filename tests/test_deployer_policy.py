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
from conftest import REPO
from parliament import analyze_policy_string, expand_action, iam_definition

import deploy

SCANNED = [*sorted((REPO / "awsfun_deploy").glob("*.py")), REPO / "lambda_function.py"]
# The names the code gives its clients (awsfun_deploy/*: the client is the first parameter;
# reconcile's Reconciler keeps them on self), and `clients("service")` itself.
CLIENT_NAMES = {"s3": "s3", "iam": "iam", "ec2": "ec2", "lam": "lambda", "sqs": "sqs",
                "logs": "logs", "ssm": "ssm", "kms": "kms", "s3control": "s3control",
                "sts": "sts"}
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
}
SESSION = botocore.session.get_session()
NAMES = deploy.derive_names("su2c", "123456789012", "us-east-1")
# Managed policies hold at most 6,144 characters, white space not counted (IAM User Guide,
# "IAM and AWS STS quotas").
MANAGED_POLICY_LIMIT = 6144


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


def rendered(names=NAMES):
    return deploy.render_policy("deployer-policy", deploy.policy_values(names))


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
    patterns = granted(rendered())
    missing = sorted(action for action in required
                     if not any(fnmatch.fnmatchcase(action.lower(), pattern.lower())
                                for pattern in patterns))
    assert missing == []
    # A wildcard is there only to keep the document under IAM's size limit: it must stand for
    # exactly actions deploy needs (per parliament's copy of AWS's action list).
    needed = {action.lower() for action in required}
    unused = sorted(pattern for pattern in patterns
                    if not {action.lower() for action in expansion(pattern)} <= needed)
    assert unused == []


def test_resource_star_only_where_aws_offers_no_resource_to_name():
    """EC2's Describe* and GetEbsDefaultKmsKeyId, logs:DescribeLogGroups, STS and the
    account's Block Public Access have no resource type (Service Authorization Reference)."""
    for statement in rendered()["Statement"]:
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
    passing = [s for s in rendered()["Statement"] if "iam:PassRole" in as_list(s["Action"])]
    assert {(s["Resource"], json.dumps(s["Condition"], sort_keys=True)) for s in passing} == {
        (NAMES.worker_role_arn, json.dumps(
            {"StringEqualsIfExists": {"iam:PassedToService": "ec2.amazonaws.com"}})),
        (NAMES.lambda_role_arn, json.dumps(
            {"StringEquals": {"iam:PassedToService": "lambda.amazonaws.com"}})),
    }
    assert all(as_list(s["Action"]) == ["iam:PassRole"] for s in passing)


def test_everything_it_changes_is_named_by_the_stack_or_carries_its_tag():
    """Writes on named resources name them exactly; EC2 resources, which have ids, not names,
    are scoped by the awsfun:stack tag (on create, aws:RequestTag; after, aws:ResourceTag)."""
    document = rendered()
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
                                                         "vpc/*", "key/*"))
                    or "ami-amazon-linux-latest" in arn), (statement["Sid"], arn)


def test_the_deployer_policy_lints_clean_with_parliament():
    """parliament's own checks find nothing but the RunInstances and CreateSecurityGroup
    resources split across statements on purpose (each with the condition that applies to
    it). Its community auditors' findings are those of any deployer of IAM roles: see
    test_iam.JUSTIFIED."""
    document = rendered()
    policy = analyze_policy_string(json.dumps(document))
    on_star = {action for statement in document["Statement"] if statement["Resource"] == "*"
               for action in as_list(statement["Action"])}
    # lambda:*EventSourceMapping (on the stack's mappings) names Create too, whose only
    # resource is "*", where the NoResource statement grants it.
    findings = [(f.issue, f.detail) for f in policy.findings
                if not (f.issue == "RESOURCE_MISMATCH"
                        and all(item["action"] in ("ec2:RunInstances", "ec2:CreateSecurityGroup")
                                or (item["required_format"] == "*" and item["action"] in on_star)
                                for item in f.detail))]
    assert findings == []


@pytest.mark.parametrize("region", ["us-east-1", "ap-southeast-5", "eu-central-2"])
def test_the_default_prefix_fits_a_managed_policy_in_any_region(region):
    names = deploy.derive_names("su2c", "123456789012", region)
    assert len(deploy.canonical(rendered(names))) <= MANAGED_POLICY_LIMIT


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
