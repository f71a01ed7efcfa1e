"""The IAM documents in iam/: every one renders completely and lints clean with parliament."""

import json
import logging

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.parsers import ResponseParserError
from botocore.stub import Stubber
from parliament import analyze_policy_string

import deploy
from awsfun_deploy import ec2 as ec2_module
from awsfun_deploy import iam as iam_module
from awsfun_deploy.core import CREATED, IN_PLACE, Progress

# Findings accepted, each with the reason. Nothing else may be reported.
JUSTIFIED = {
    # Community auditors flag every iam:PassRole. Passing the worker role to EC2 is the one
    # thing the launcher must do (it is why the original needed admin rights); the statement
    # names that single role and carries iam:PassedToService = ec2.amazonaws.com, which
    # test_roles asserts. Nothing else here touches IAM.
    ("lambda-policy", "PRIVILEGE_ESCALATION"),
    ("lambda-policy", "PERMISSIONS_MANAGEMENT_ACTIONS"),
    # Community auditors flag sts:AssumeRole as returning credentials. In a trust policy that
    # is its definition: it lets only the EC2 (worker) or Lambda (launcher) service principal
    # take the role. Reported only because the trust statement is linted as an identity
    # statement (see lintable).
    ("worker-trust", "CREDENTIALS_EXPOSURE"),
    ("lambda-trust", "CREDENTIALS_EXPOSURE"),
    # The person who deploys creates and edits the two roles, passes them (the worker role to
    # EC2, the launcher role to Lambda) and updates the function's code: what any deployer of
    # IAM roles can do, and why it is a policy for a person and never for a service. Every
    # write names this stack's resources or carries its tag (tests/test_deployer_policy.py).
    ("deployer-policy", "PRIVILEGE_ESCALATION"),
    ("deployer-policy", "PERMISSIONS_MANAGEMENT_ACTIONS"),
}
TEMPLATES = sorted(path.stem for path in deploy.IAM_DIR.glob("*.json"))
# What deploy applies to the stack's own roles and buckets; the deployer's policy (for the
# person running ./deploy.sh) is checked in tests/test_deployer_policy.py.
DEPLOYED = [template for template in TEMPLATES if template != "deployer-policy"]
NAMES = deploy.derive_names("su2c", "123456789012", "us-east-1")
TEMPLATE_ID = "lt-0123456789abcdef0"
IMAGE_ID = "ami-0123456789abcdef0"
INSTANCE_TYPES = ["t3.small", "c7g.large"]


SECURITY_GROUP_ID = "sg-0123456789abcdef0"


def rendered(template, names=NAMES):
    return deploy.render_policy(template, deploy.policy_values(
        names, [TEMPLATE_ID], image_ids=[IMAGE_ID], instance_types=INSTANCE_TYPES,
        security_group_ids=[SECURITY_GROUP_ID], spot=True, batch=True))


def run_instances_resources(document):
    """Every resource any ec2:RunInstances statement of the document grants."""
    return [resource for statement in document["Statement"]
            if "ec2:RunInstances" in as_list(statement["Action"])
            for resource in as_list(statement["Resource"])]


def split_on_purpose(finding, document):
    """True for parliament's RESOURCE_MISMATCH on a statement whose missing resource types
    another statement of the same document grants for the same action: the launcher policy
    gives the instance and the image their own RunInstances statements, each with the
    condition that applies to it, as AWS's examples do (ec2:InstanceType exists only for the
    instance); the deployer's does the same for RunInstances and CreateSecurityGroup."""
    if finding.issue != "RESOURCE_MISMATCH":
        return False

    def kinds(action):
        return {arn.split(":")[5].split("/")[0] for statement in document["Statement"]
                if action in as_list(statement["Action"])
                for arn in as_list(statement["Resource"])}

    def granted_on_star(action):
        # The deployer's lambda:*EventSourceMapping (on mappings) also names Create, whose
        # only resource is "*": another statement grants it there.
        return any(action in as_list(statement["Action"]) and statement["Resource"] == "*"
                   for statement in document["Statement"])

    return all((item["action"] in ("ec2:RunInstances", "ec2:CreateSecurityGroup")
                and item["required_format"].split(":")[5].split("/")[0] in kinds(item["action"]))
               or (item["required_format"] == "*" and granted_on_star(item["action"]))
               for item in finding.detail)


def lintable(template, document):
    """The document as parliament can read it.

    parliament reads identity and resource policies but not trust policies, which have no
    Resource (its statement.py says so and reports MALFORMED). A trust statement is linted
    as the same statement on the role it belongs to, so its action, principal and any
    condition are still checked.
    """
    if template.endswith("-trust"):
        role = NAMES.worker_role_arn if template.startswith("worker") else NAMES.lambda_role_arn
        document = json.loads(json.dumps(document))
        for statement in document["Statement"]:
            statement.setdefault("Resource", role)
    return json.dumps(document, indent=2)


def test_every_template_is_checked():
    assert TEMPLATES == ["deployer-policy", "events-queue-policy", "lambda-policy", "lambda-trust",
                         "software-public-read", "worker-policy", "worker-trust"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_every_placeholder(template):
    text = json.dumps(rendered(template))
    assert "${" not in text and "$" not in text
    # Lists of ARNs were spliced in, not nested.
    for statement in rendered(template)["Statement"]:
        for value in statement.get("Resource", []) if isinstance(statement.get("Resource"),
                                                                 list) else []:
            assert isinstance(value, str)


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_lints_clean_with_parliament(template):
    policy = analyze_policy_string(lintable(template, rendered(template)),
                                   include_community_auditors=True)
    findings = [(f.issue, f.detail) for f in policy.findings
                if (template, f.issue) not in JUSTIFIED
                and not split_on_purpose(f, rendered(template))]
    assert findings == []


def test_no_star_actions_and_no_managed_policies_anywhere():
    # The deployer's few wildcards each stand for exactly the actions deploy calls
    # (tests/test_deployer_policy.py), to keep it within a managed policy's 6,144 characters.
    for template in DEPLOYED:
        for statement in rendered(template)["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) \
                else [statement["Action"]]
            assert all("*" not in action for action in actions), (template, actions)
            assert "NotAction" not in statement and "NotResource" not in statement
            assert statement["Effect"] == "Allow"
    # deploy attaches no managed policy to its own roles: they get exactly one inline policy
    # (see test_stack). The one exception is AWS's own role for ECS container instances, which
    # the Batch engine's instances need (AWS Batch User Guide, "Amazon ECS instance role"):
    # AWS keeps AmazonEC2ContainerServiceforEC2Role current with what the ECS agent calls.
    sources = [deploy.REPO / "deploy.py", *sorted((deploy.REPO / "awsfun_deploy").glob("*.py"))]
    assert len(sources) > 10, sources  # the package is there: the check reads real code
    assert [path.name for path in sources if "attach_role_policy" in path.read_text()] == [
        "batch.py"]
    from awsfun_deploy.batch import ECS_INSTANCE_POLICY
    assert ECS_INSTANCE_POLICY == "service-role/AmazonEC2ContainerServiceforEC2Role"


def test_parliament_would_catch_a_broken_document():
    """The lint is live: a wildcard resource on a write action is reported."""
    bad = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-1"}]}
    issues = {f.issue for f in analyze_policy_string(json.dumps(bad),
                                                     include_community_auditors=True).findings}
    assert "RESOURCE_MISMATCH" in issues


# --- what moto cannot judge: iam:PassRole and Conditions, read from the documents ------------


def as_list(value):
    return value if isinstance(value, list) else [value]


def statements_moto_cannot_judge():
    """{(template, Sid): statement} of every statement with a Condition or iam:PassRole."""
    return {(template, statement.get("Sid")): statement
            for template in DEPLOYED if not template.endswith("-trust")
            for statement in rendered(template)["Statement"]
            if "Condition" in statement or "iam:PassRole" in as_list(statement["Action"])}


def test_pass_role_and_every_condition_are_exactly_the_reviewed_ones():
    """moto grants iam:PassRole unasked and ignores Conditions, so the documents must carry them."""
    region, account = "us-east-1", "123456789012"
    template_arn = NAMES.launch_template_arn(TEMPLATE_ID)
    found = statements_moto_cannot_judge()
    assert set(found) == {("events-queue-policy", "OnlyTheDataBucketSendsItsEvents"),
                          ("lambda-policy", "PassOnlyTheWorkerRoleOnlyToEc2"),
                          ("lambda-policy", "LaunchWorkersOnlyFromTheirTemplate"),
                          ("lambda-policy", "LaunchOnlyTheDeployedInstanceTypes"),
                          ("lambda-policy", "LaunchOnlyTheDeployedImagesFromTheTemplate"),
                          ("lambda-policy", "TagWorkersOnlyWhileLaunchingThem")}

    pass_role = found["lambda-policy", "PassOnlyTheWorkerRoleOnlyToEc2"]
    assert as_list(pass_role["Action"]) == ["iam:PassRole"]
    assert pass_role["Resource"] == NAMES.worker_role_arn == \
        f"arn:aws:iam::{account}:role/{NAMES.worker_role}"
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}

    run = found["lambda-policy", "LaunchWorkersOnlyFromTheirTemplate"]
    assert as_list(run["Action"]) == ["ec2:RunInstances"]
    assert run["Condition"] == {"ArnLike": {"ec2:LaunchTemplate": [template_arn]}}
    launch_templates = [arn for arn in run["Resource"] if ":launch-template/" in arn]
    assert launch_templates == [template_arn] and "*" not in template_arn
    sized = found["lambda-policy", "LaunchOnlyTheDeployedInstanceTypes"]
    assert sized["Condition"] == {"ArnLike": {"ec2:LaunchTemplate": [template_arn]},
                                  "StringEquals": {"ec2:InstanceType": sorted(INSTANCE_TYPES)}}
    imaged = found["lambda-policy", "LaunchOnlyTheDeployedImagesFromTheTemplate"]
    assert imaged["Condition"] == {"ArnLike": {"ec2:LaunchTemplate": [template_arn]},
                                   "Bool": {"ec2:IsLaunchTemplateResource": "true"}}

    tag = found["lambda-policy", "TagWorkersOnlyWhileLaunchingThem"]
    assert as_list(tag["Action"]) == ["ec2:CreateTags"]
    assert tag["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    assert sorted(tag["Resource"]) == [f"arn:aws:ec2:{region}:{account}:instance/*",
                                       f"arn:aws:ec2:{region}:{account}:volume/*"]


def test_launcher_cannot_start_another_image_size_or_ssh_key_with_the_worker_role():
    """RunInstances with a launch template still takes ImageId, InstanceType, KeyName and
    SecurityGroupIds from the caller, each overriding the template's; ec2:LaunchTemplate only
    proves a template was named (EC2 User Guide, "Launch templates" in the IAM policy
    examples; Service Authorization Reference, RunInstances). So whoever holds the launcher's
    credentials could start any AMI at any size with their SSH key and the worker role, unless
    the policy grants the image resource only for the AMIs deploy resolved, the instance
    resource only for the deployed types, and no key-pair resource at all (a request with
    KeyName needs ec2:RunInstances on the key pair). moto judges none of this."""
    run_statements = [statement for statement in rendered("lambda-policy")["Statement"]
                      if "ec2:RunInstances" in as_list(statement["Action"])]
    granted = run_instances_resources(rendered("lambda-policy"))
    assert not [arn for arn in granted if ":key-pair/" in arn]
    assert [arn for arn in granted if ":image/" in arn] == \
        [f"arn:aws:ec2:us-east-1::image/{IMAGE_ID}"]
    # SecurityGroupIds is overridable too: only the stack's own group (no inbound) is granted.
    assert [arn for arn in granted if ":security-group/" in arn] == \
        [f"arn:aws:ec2:us-east-1:{NAMES.account}:security-group/{SECURITY_GROUP_ID}"]
    for statement in run_statements:
        resources = as_list(statement["Resource"])
        conditions = statement["Condition"]
        assert conditions["ArnLike"] == {"ec2:LaunchTemplate": [
            NAMES.launch_template_arn(TEMPLATE_ID)]}
        if any(":instance/" in arn for arn in resources):
            assert resources == [f"arn:aws:ec2:us-east-1:{NAMES.account}:instance/*"]
            assert conditions["StringEquals"]["ec2:InstanceType"] == sorted(INSTANCE_TYPES)
        if any(":image/" in arn for arn in resources):
            assert conditions["Bool"] == {"ec2:IsLaunchTemplateResource": "true"}
            assert all(":image/" in arn for arn in resources)


def test_no_statement_grants_anything_on_every_resource():
    """A Resource "*" would be judged by moto only for some services; forbid it everywhere."""
    buckets = (NAMES.data_bucket, NAMES.software_bucket)
    for template in DEPLOYED:
        for statement in rendered(template)["Statement"]:
            if as_list(statement["Action"]) in (["ec2:DescribeInstances"], ["batch:ListJobs"]):
                # The cap's count of live workers: EC2's Describe* actions take no resource
                # (Service Authorization Reference, Amazon EC2), so "*" is the only one. So
                # for the Batch engine's ListJobs (a repeated event's job, by name): AWS Batch
                # lists no resource type for it (Service Authorization Reference, AWS Batch).
                assert (template, statement["Resource"]) == ("lambda-policy", "*")
                continue
            for resource in as_list(statement.get("Resource", [])):
                assert resource != "*" and not resource.endswith(":*:*"), (template, resource)
                if resource.startswith("arn:aws:s3:::"):
                    assert resource[len("arn:aws:s3:::"):].split("/")[0] in buckets, resource


def test_trust_policies_let_only_their_service_assume_the_role():
    (lambda_trust,) = rendered("lambda-trust")["Statement"]
    assert lambda_trust["Effect"] == "Allow" and lambda_trust["Action"] == "sts:AssumeRole"
    assert lambda_trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    # The worker role: EC2 instances, and the Batch engine's containers (ECS tasks: "the
    # ecs-tasks.amazonaws.com service principal", AWS Batch User Guide, IAM roles for jobs),
    # the latter only for tasks of this account (aws:SourceAccount, as AWS's own ECS trust
    # policies do against the confused deputy: IAM User Guide, "The confused deputy problem").
    ec2, ecs = rendered("worker-trust")["Statement"]
    assert all(s["Effect"] == "Allow" and s["Action"] == "sts:AssumeRole" for s in (ec2, ecs))
    assert ec2["Principal"] == {"Service": "ec2.amazonaws.com"} and "Condition" not in ec2
    assert ecs["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert ecs["Condition"] == {"StringEquals": {"aws:SourceAccount": NAMES.account}}


def test_china_partition_documents_accept_ec2s_own_service_principal_there():
    """In the aws-cn partition EC2 presents itself as ec2.amazonaws.com.cn, to STS when an
    instance assumes the worker role and to IAM as iam:PassedToService when the launcher
    passes it (Amazon Web Services in China, IAM differences). Documents naming only
    ec2.amazonaws.com leave every worker there without credentials, or no launch allowed."""
    china = deploy.derive_names("su2c", "123456789012", "cn-north-1", partition="aws-cn")
    trust = rendered("worker-trust", china)["Statement"][0]
    assert "ec2.amazonaws.com.cn" in as_list(trust["Principal"]["Service"])
    (pass_role,) = [statement for statement in rendered("lambda-policy", china)["Statement"]
                    if statement["Sid"] == "PassOnlyTheWorkerRoleOnlyToEc2"]
    assert pass_role["Resource"] == f"arn:aws-cn:iam::123456789012:role/{china.worker_role}"
    assert "ec2.amazonaws.com.cn" in as_list(
        pass_role["Condition"]["StringEquals"]["iam:PassedToService"])
    # Lambda keeps its global principal there; every ARN names the partition.
    (lambda_trust,) = rendered("lambda-trust", china)["Statement"]
    assert lambda_trust["Principal"] == {"Service": "lambda.amazonaws.com"}
    for template in TEMPLATES:
        text = json.dumps(rendered(template, china))
        assert "arn:aws:" not in text and ("arn:aws-cn:" in text or template.endswith("-trust"))


def test_only_the_public_read_document_names_everyone():
    for template in TEMPLATES:
        for statement in rendered(template)["Statement"]:
            if statement.get("Principal") == "*" or "*" in as_list(
                    statement.get("Principal", {}).get("AWS", []) if isinstance(
                        statement.get("Principal"), dict) else []):
                assert template == "software-public-read"
                assert as_list(statement["Action"]) == ["s3:GetObject"]
                assert all(resource.startswith(f"arn:aws:s3:::{NAMES.software_bucket}/")
                           and "*" not in resource for resource in statement["Resource"])


# --- a customer-managed default EBS key (the templates encrypt without naming a key) ---------

KMS_KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0123abcd-4567-89ab-cdef-0123456789ab"


def test_a_customer_managed_default_ebs_key_is_granted_to_the_launcher_through_ec2_only():
    """AWS fact: an encrypted volume without a named key uses the account's default EBS key;
    when that key is customer managed, the caller of RunInstances needs kms:CreateGrant
    (kms:GrantIsForAWSResource true), kms:Decrypt, kms:GenerateDataKeyWithoutPlaintext,
    kms:ReEncrypt* and kms:DescribeKey on it, via EC2 (kms:ViaService), or every instance goes
    pending -> terminated with Client.InternalError (EC2 User Guide, "Required AWS KMS key
    policy for use with encrypted volumes"). moto checks no KMS permission at all."""
    document = deploy.render_policy("lambda-policy", deploy.policy_values(
        NAMES, [TEMPLATE_ID], image_ids=[IMAGE_ID], instance_types=INSTANCE_TYPES,
        security_group_ids=[SECURITY_GROUP_ID], ebs_key_arn=KMS_KEY_ARN))
    kms = [s for s in document["Statement"]
           if any(a.startswith("kms:") for a in as_list(s["Action"]))]
    via = {"kms:ViaService": "ec2.us-east-1.amazonaws.com"}
    assert [(as_list(s["Action"]), s["Resource"], s["Condition"]) for s in kms] == [
        (["kms:CreateGrant"], KMS_KEY_ARN,
         {"Bool": {"kms:GrantIsForAWSResource": "true"}, "StringEquals": via}),
        (["kms:Decrypt", "kms:GenerateDataKeyWithoutPlaintext", "kms:ReEncryptFrom",
          "kms:ReEncryptTo", "kms:DescribeKey"], KMS_KEY_ARN, {"StringEquals": via}),
    ]
    policy = analyze_policy_string(json.dumps(document), include_community_auditors=True)
    assert [f.issue for f in policy.findings if ("lambda-policy", f.issue) not in JUSTIFIED
            and not split_on_purpose(f, document)] == []
    # With the AWS-managed aws/ebs key (no ebs_key_arn), no KMS permission at all.
    assert not [s for s in rendered("lambda-policy")["Statement"]
                if any(a.startswith("kms:") for a in as_list(s["Action"]))]
    china = deploy.derive_names("su2c", "123456789012", "cn-north-1", partition="aws-cn")
    text = json.dumps(deploy.render_policy("lambda-policy", deploy.policy_values(
        china, ebs_key_arn=KMS_KEY_ARN.replace(":aws:", ":aws-cn:"))))
    assert "ec2.cn-north-1.amazonaws.com.cn" in text


def _ebs_clients(answer, key_manager=None):
    """EC2 and KMS clients whose GetEbsDefaultKmsKeyId (and DescribeKey) answer as AWS does."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    kms = boto3.client("kms", region_name="us-east-1")
    ec2_stub, kms_stub = Stubber(ec2), Stubber(kms)
    ec2_stub.add_response("get_ebs_default_kms_key_id", {"KmsKeyId": answer})
    if key_manager:
        kms_stub.add_response("describe_key", {"KeyMetadata": {
            "KeyId": KMS_KEY_ARN.rsplit("/", 1)[1], "Arn": KMS_KEY_ARN,
            "KeyManager": key_manager}}, {"KeyId": answer})
    ec2_stub.activate()
    kms_stub.activate()
    return ec2, kms


@pytest.mark.parametrize("answer, key_manager, expected", [
    ("alias/aws/ebs", None, None),  # the account never chose a key
    ("alias/team-ebs", "CUSTOMER", KMS_KEY_ARN),
    (KMS_KEY_ARN, "CUSTOMER", KMS_KEY_ARN),
    ("arn:aws:kms:us-east-1:123456789012:alias/aws/ebs", "AWS", None),
])
def test_the_default_ebs_key_is_read_from_ec2_and_kms(answer, key_manager, expected):
    """AWS fact: GetEbsDefaultKmsKeyId names the default EBS key as an alias, key id or ARN;
    only a customer-managed key (DescribeKey: KeyManager CUSTOMER) needs the launcher's grant."""
    ec2, kms = _ebs_clients(answer, key_manager)
    assert ec2_module.default_ebs_key(ec2, kms) == expected


def test_a_local_endpoint_that_cannot_answer_for_the_default_ebs_key_means_aws_ebs(monkeypatch,
                                                                                   caplog):
    """moto does not implement GetEbsDefaultKmsKeyId (its server answers with an HTML 500
    page): with AWS_ENDPOINT_URL set that reads as the AWS-managed key, said in one short
    line at INFO (status on the local cloud printed the whole page as a warning); against
    AWS the same failure is raised."""
    class Unparseable:
        def get_ebs_default_kms_key_id(self):
            raise ResponseParserError(
                "Unable to parse response (syntax error: line 1, column 0), invalid XML "
                "received:\nb'<!doctype html>\n<title>500 Internal Server Error</title>'")

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    with caplog.at_level(logging.INFO, logger="awsfun.deploy"):
        assert ec2_module.default_ebs_key(Unparseable(), kms=None) is None
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.INFO, ("http://127.0.0.1:5000 does not implement GetEbsDefaultKmsKeyId "
                        "(HTTP 500); taking the AWS-managed aws/ebs key"))]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    with pytest.raises(ResponseParserError):
        ec2_module.default_ebs_key(Unparseable(), kms=None)


# --- EC2's service-linked role for Spot Instances ---------------------------------------------

def _iam_answering(code, message):
    """An IAM client whose CreateServiceLinkedRole refuses as AWS does."""
    iam = boto3.client("iam", region_name="us-east-1")
    stub = Stubber(iam)
    stub.add_client_error("create_service_linked_role", code, message, 400,
                          expected_params={"AWSServiceName": "spot.amazonaws.com"})
    stub.activate()
    return iam


def test_the_spot_service_linked_role_is_made_once_and_then_found_in_place(clients):
    """deploy with spot makes AWSServiceRoleForEC2Spot, which must exist before a spot
    RunInstances (EC2 User Guide, "Service-linked role for Spot Instance requests") and which
    the launcher may not create; a second deploy finds it (moto answers EntityAlreadyExists)."""
    iam = clients("iam")
    first, second = Progress(echo=False), Progress(echo=False)
    iam_module.ensure_spot_service_linked_role(iam, first)
    iam_module.ensure_spot_service_linked_role(iam, second)
    assert [step["outcome"] for step in first.steps + second.steps] == [CREATED,
                                                                       IN_PLACE]
    (role,) = iam.list_roles(PathPrefix="/aws-service-role/spot.amazonaws.com/")["Roles"]
    # By its path: moto names it AWSServiceRoleForspot, AWS AWSServiceRoleForEC2Spot.
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == \
        {"Service": ["spot.amazonaws.com"]}


def test_an_existing_spot_role_is_in_place_and_other_answers_are_raised():
    """IAM's answer for a role already there: InvalidInput, "Service role name
    AWSServiceRoleForEC2Spot has been taken in this account, please try a different suffix"
    (AWS Batch User Guide, creating the Spot roles with the CLI)."""
    progress = Progress(echo=False)
    iam_module.ensure_spot_service_linked_role(_iam_answering(
        "InvalidInput", "Service role name AWSServiceRoleForEC2Spot has been taken in this "
        "account, please try a different suffix."), progress)
    assert [step["outcome"] for step in progress.steps] == [IN_PLACE]
    # Not allowed to: the one thing to do is said (the deployer policy printed for spot).
    with pytest.raises(deploy.DeployError, match="deployer-policy --spot"):
        iam_module.ensure_spot_service_linked_role(_iam_answering(
            "AccessDenied", "not authorized to perform: iam:CreateServiceLinkedRole"),
            Progress(echo=False))
    with pytest.raises(ClientError, match="InvalidInput"):
        iam_module.ensure_spot_service_linked_role(_iam_answering(
            "InvalidInput", "Invalid service name"), Progress(echo=False))
