"""deploy.py on a moto server: every resource and property, idempotency, status, teardown,
the deployed pieces working together, and the worker role under moto's IAM enforcement."""

import base64
import io
import json
import os
import subprocess
import sys
import zipfile
from datetime import timedelta

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

import deploy
import lambda_function
from conftest import REPO
from support import moto_iam_enforced, run_user_data

ACCOUNT = "123456789012"  # moto's default account
# An anonymous refusal comes back as a bare 403 (no error body) from S3 and from moto.
DENIED = ("403", "AccessDenied")


@pytest.fixture
def deployed(clients, names):
    """One deploy on an empty endpoint; returns (result, progress, create_function params)."""
    captured = {}

    def capture(params, **_):
        captured.update(params)

    clients("lambda").meta.events.register("provide-client-params.lambda.CreateFunction", capture)
    progress = deploy.Progress(echo=False)
    result = deploy.deploy(clients, names, progress=progress)
    return result, progress, captured


def changes(progress):
    return [step for step in progress.steps if step["outcome"] in deploy.CHANGES]


def error_of(call, *args, **kwargs):
    """Return the AWS error code `call` fails with (the test fails if it succeeds)."""
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return caught.value.response["Error"]["Code"]


# --- names and pure helpers ----------------------------------------------------------


def test_names_come_from_prefix_account_and_region(monkeypatch):
    monkeypatch.delenv("LAUNCH_TEMPLATE", raising=False)
    names = deploy.derive_names("su2c", ACCOUNT, "eu-west-1")
    assert names.data_bucket == f"su2c-data-{ACCOUNT}-eu-west-1"
    assert names.software_bucket == f"su2c-software-{ACCOUNT}-eu-west-1"
    assert names.launch_template == "su2cw_worker"  # the contract's name for the default prefix
    assert names.function_name == "su2c-launcher"
    assert names.dlq_name == "su2c-launcher-dlq"
    assert names.worker_role == names.worker_instance_profile == "su2c-worker-eu-west-1"
    assert names.lambda_role == "su2c-launcher-eu-west-1"
    other = deploy.derive_names("stage2", ACCOUNT, "eu-west-1")
    # A second stage in the same account and region collides with nothing.
    clash = {v for v in dataclass_values(names)} & {v for v in dataclass_values(other)}
    assert clash == {ACCOUNT, "eu-west-1", "aws"}
    monkeypatch.setenv("LAUNCH_TEMPLATE", "custom_worker")
    assert deploy.derive_names("su2c", ACCOUNT, "eu-west-1").launch_template == "custom_worker"
    explicit = deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="my-data",
                                   software_bucket="su2csoftware")
    assert (explicit.data_bucket, explicit.software_bucket) == ("my-data", "su2csoftware")
    for bad in ("", "Su2c", "-x", "x-", "a" * 21, "a_b"):
        with pytest.raises(deploy.DeployError):
            deploy.derive_names(bad, ACCOUNT, "eu-west-1")
    with pytest.raises(deploy.DeployError):
        deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="Bad_Bucket")
    with pytest.raises(deploy.DeployError):
        deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="same-b",
                            software_bucket="same-b")


def dataclass_values(names):
    return [getattr(names, field) for field in names.__dataclass_fields__]


def test_function_logging_keeps_lambdas_start_and_report_lines():
    """Lambda writes START, END and REPORT (duration, billed duration, max memory used) at
    system log level INFO; SystemLogLevel WARN drops them. Log levels need the JSON log
    format (Lambda Developer Guide, "Log-level filtering"). moto stores no LoggingConfig."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    logging_config = deploy.function_configuration(names)["LoggingConfig"]
    assert logging_config == {"LogFormat": "JSON", "SystemLogLevel": "INFO",
                              "ApplicationLogLevel": "INFO", "LogGroup": names.log_group}


def test_function_zip_is_reproducible_and_holds_handler_template_and_routes():
    first, second = deploy.build_function_zip(), deploy.build_function_zip()
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert sorted(archive.namelist()) == ["bootstrap/bootstrap.sh", "bootstrap/launcher.py",
                                              "lambda_function.py", "routes.json"]
        for name in archive.namelist():
            assert archive.read(name) == (REPO / name).read_bytes()


def test_retry_while_retries_only_what_it_is_told_and_is_bounded():
    def failing(code, message):
        return ClientError({"Error": {"Code": code, "Message": message}}, "CreateFunction")

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise failing("InvalidParameterValueException", "The role defined for the function "
                                                            "cannot be assumed by Lambda.")
        return "ok"

    assert deploy.retry_while(("cannot be assumed",), flaky, "test", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [3.0, 3.0]

    def other():
        raise failing("InvalidParameterValueException", "Unsupported runtime")

    with pytest.raises(ClientError):
        deploy.retry_while(("cannot be assumed",), other, "test", sleep=sleeps.append)
    assert len(sleeps) == 2  # not retried

    def always():
        raise failing("InvalidParameterValueException", "cannot be assumed")

    with pytest.raises(ClientError):
        deploy.retry_while(("cannot be assumed",), always, "test", timeout=0, sleep=sleeps.append)
    assert len(sleeps) == 2  # no time left: gives up at once


def test_publish_refuses_anything_off_the_allowlist(local_aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="software-test")
    for key in ("private/notes.txt", "README.md"):
        with pytest.raises(deploy.DeployError):
            deploy.publish_software(s3, "software-test", (key,))
    assert "Contents" not in s3.list_objects_v2(Bucket="software-test")


def test_mismatches_reads_only_what_is_wanted():
    wanted = {"A": 1, "L": [{"K": "x"}], "D": {"E": True}}
    assert deploy.mismatches(wanted, {"A": 1, "L": [{"K": "y"}, {"K": "x", "Z": 0}],
                                      "D": {"E": True, "F": 2}, "extra": 1}) == []
    assert deploy.mismatches(wanted, {"A": 2, "L": [], "D": {}}) == ["A", "L[0]", "D.E"]


# --- deploy on an empty endpoint -----------------------------------------------------


def test_deploy_creates_every_resource_with_its_properties(clients, names, deployed):
    result, progress, create_params = deployed
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    assert all(step["outcome"] == deploy.CREATED for step in progress.steps), progress.steps

    # Data bucket: private, encrypted, events to the function.
    for bucket in (names.data_bucket, names.software_bucket):
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        assert block == deploy.PRIVATE_BLOCK
        rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        assert rule["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        owner = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
        assert owner == [{"ObjectOwnership": "BucketOwnerEnforced"}]
        assert error_of(s3.get_bucket_policy, Bucket=bucket) == "NoSuchBucketPolicy"
    notification = s3.get_bucket_notification_configuration(Bucket=names.data_bucket)
    (config,) = notification["LambdaFunctionConfigurations"]
    assert config["LambdaFunctionArn"] == result["function_arn"]
    assert config["Events"] == ["s3:ObjectCreated:*"]

    # Software bucket: exactly the published files, byte for byte.
    objects = s3.list_objects_v2(Bucket=names.software_bucket)["Contents"]
    assert sorted(o["Key"] for o in objects) == sorted(deploy.PUBLISHED_FILES)
    for key in deploy.PUBLISHED_FILES:
        body = s3.get_object(Bucket=names.software_bucket, Key=key)["Body"].read()
        assert body == (REPO / key).read_bytes()

    # Roles: exactly one inline policy each, the rendered documents, nothing attached.
    documents = deploy.policy_documents(names, result["launch_template_id"], [result["image_id"]],
                                        [deploy.DEFAULT_INSTANCE_TYPE],
                                        [result["security_group_id"]])
    for role, trust, policy_name, policy in (
        (names.worker_role, "worker-trust", names.worker_policy_name, "worker-policy"),
        (names.lambda_role, "lambda-trust", names.lambda_policy_name, "lambda-policy"),
    ):
        got = iam.get_role(RoleName=role)["Role"]
        assert deploy.canonical(got["AssumeRolePolicyDocument"]) == \
            deploy.canonical(documents[trust])
        assert iam.list_role_policies(RoleName=role)["PolicyNames"] == [policy_name]
        inline = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
        assert deploy.canonical(inline) == deploy.canonical(documents[policy])
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    profile = iam.get_instance_profile(InstanceProfileName=names.worker_instance_profile)
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [names.worker_role]

    # Launch template: AL2023 from SSM, small burstable type, the profile, safe defaults.
    (template,) = ec2.describe_launch_templates(
        LaunchTemplateNames=["su2cw_worker"])["LaunchTemplates"]
    assert template["LaunchTemplateId"] == result["launch_template_id"]
    assert template["DefaultVersionNumber"] == template["LatestVersionNumber"] == 1
    data = ec2.describe_launch_template_versions(
        LaunchTemplateName="su2cw_worker", Versions=["$Default"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    ami = ssm.get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
    assert data["ImageId"] == ami["Parameter"]["Value"] == result["image_id"]
    assert data["InstanceType"] == "t3.small"
    assert data["IamInstanceProfile"] == {"Name": names.worker_instance_profile}
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
    tagged = {spec["ResourceType"] for spec in data["TagSpecifications"]}
    assert {"instance", "volume"} <= tagged

    # Function: runtime, handler, role, timeout, the contract's environment, the code.
    config = lam.get_function(FunctionName=names.function_name)["Configuration"]
    assert config["FunctionArn"] == result["function_arn"]
    assert config["Runtime"] in ("python3.12", "python3.13")
    assert config["Handler"] == "lambda_function.lambda_handler"
    assert config["Role"] == iam.get_role(RoleName=names.lambda_role)["Role"]["Arn"]
    assert 30 <= config["Timeout"] <= 300
    assert config["Environment"]["Variables"] == {
        "LAUNCH_TEMPLATE": "su2cw_worker",
        "SOFTWARE_BUCKET": names.software_bucket,
        "BOOTSTRAP_KEY": "bootstrap/bootstrap.sh",
        "SKIP_SUBSTRING": "analysis",
        "WATCHDOG_MINUTES": "120",
    }
    assert config["CodeSha256"] == deploy.code_sha256(deploy.build_function_zip())
    # moto stores neither LoggingConfig nor DeadLetterConfig, so check what was sent.
    assert create_params["LoggingConfig"]["LogFormat"] == "JSON"
    assert create_params["LoggingConfig"]["LogGroup"] == names.log_group
    dlq_url = sqs.get_queue_url(QueueName=names.dlq_name)["QueueUrl"]
    assert dlq_url == result["dlq_url"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    assert create_params["DeadLetterConfig"] == {"TargetArn": dlq_arn}
    retry = lam.get_function_event_invoke_config(FunctionName=names.function_name)
    assert retry["MaximumRetryAttempts"] == deploy.MAX_RETRY_ATTEMPTS
    (statement,) = json.loads(lam.get_policy(FunctionName=names.function_name)["Policy"])[
        "Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Condition"]["ArnLike"]["AWS:SourceArn"] == \
        f"arn:aws:s3:::{names.data_bucket}"
    assert statement["Condition"]["StringEquals"]["AWS:SourceAccount"] == ACCOUNT
    (group,) = logs.describe_log_groups(logGroupNamePrefix=names.log_group)["logGroups"]
    assert group["retentionInDays"] == deploy.LOG_RETENTION_DAYS


def count_everything(clients):
    """How many of each resource kind exist on the endpoint (duplicates would show here)."""
    ec2 = clients("ec2")
    templates = ec2.describe_launch_templates()["LaunchTemplates"]
    return {
        "buckets": len(clients("s3").list_buckets()["Buckets"]),
        "roles": len(clients("iam").list_roles()["Roles"]),
        "profiles": len(clients("iam").list_instance_profiles()["InstanceProfiles"]),
        "templates": [(t["LaunchTemplateName"], t["LatestVersionNumber"],
                       t["DefaultVersionNumber"]) for t in templates],
        "functions": [f["FunctionArn"] for f in clients("lambda").list_functions()["Functions"]],
        "queues": clients("sqs").list_queues().get("QueueUrls", []),
        "log groups": len(clients("logs").describe_log_groups()["logGroups"]),
        "notifications": clients("s3").get_bucket_notification_configuration(
            Bucket=deploy.resolve_names(clients).data_bucket)["LambdaFunctionConfigurations"],
    }


def test_second_deploy_changes_nothing(clients, names, deployed, capsys):
    before = count_everything(clients)
    assert deploy.main(["deploy"], clients=clients) == 0
    out = capsys.readouterr().out
    assert "Nothing to change: everything already in place." in out
    assert " created " not in out and " updated " not in out
    assert count_everything(clients) == before


def test_changed_instance_type_adds_one_version_and_makes_it_default(clients, names, deployed):
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, instance_type="t3.micro", progress=progress)
    # The launcher's policy names the instance types it may start, so it follows.
    assert [(s["what"], s["outcome"]) for s in changes(progress)] == \
        [("launch template", deploy.UPDATED), ("launcher role", deploy.UPDATED)]
    ec2 = clients("ec2")
    (template,) = ec2.describe_launch_templates(LaunchTemplateNames=["su2cw_worker"])[
        "LaunchTemplates"]
    assert template["LatestVersionNumber"] == template["DefaultVersionNumber"] == 2
    default = ec2.describe_launch_template_versions(
        LaunchTemplateName="su2cw_worker", Versions=["$Default"])["LaunchTemplateVersions"][0]
    assert default["LaunchTemplateData"]["InstanceType"] == "t3.micro"
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, instance_type="t3.micro", progress=again)
    assert changes(again) == []
    (template,) = ec2.describe_launch_templates(LaunchTemplateNames=["su2cw_worker"])[
        "LaunchTemplates"]
    assert template["LatestVersionNumber"] == 2


def test_arm_instance_type_gets_the_arm_image(clients, names):
    result = deploy.deploy(clients, names, instance_type="t4g.small",
                           progress=deploy.Progress(echo=False))
    arm = clients("ssm").get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64")
    assert result["image_id"] == arm["Parameter"]["Value"]


def test_workers_get_the_stacks_own_security_group_no_inbound_https_out(clients, names,
                                                                       deployed):
    """Without a group of its own a worker gets the default VPC's default group, which lets
    in everything from its other members and out everything (VPC User Guide, "Default
    security groups"). Workers need no inbound and only HTTPS out (S3, the package
    repository); moto never applies groups to traffic, so the rules are read back."""
    result = deployed[0]
    ec2 = clients("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    (group,) = ec2.describe_security_groups(GroupIds=[result["security_group_id"]])[
        "SecurityGroups"]
    assert (group["GroupName"], group["VpcId"]) == ("su2c-worker", vpc["VpcId"])
    assert {"Key": deploy.STACK_TAG, "Value": "su2c"} in group["Tags"]
    assert group["IpPermissions"] == []
    (egress,) = group["IpPermissionsEgress"]
    assert (egress["IpProtocol"], egress["FromPort"], egress["ToPort"]) == ("tcp", 443, 443)
    assert [r["CidrIp"] for r in egress["IpRanges"]] == ["0.0.0.0/0"]
    assert not egress.get("Ipv6Ranges") and not egress.get("UserIdGroupPairs")
    data = template_data(ec2, names.launch_template)
    assert data["SecurityGroupIds"] == [group["GroupId"]]

    # Hand edits are drift, and deploy repairs them.
    ec2.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    ec2.authorize_security_group_egress(GroupId=group["GroupId"], IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    found = {(d["resource"], d["problem"]) for d in deploy.collect_status(clients, names)["drift"]}
    assert found == {("worker security group", "changed: inbound rules"),
                     ("worker security group", "changed: outbound rules")}
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress)
    assert [(s["what"], s["outcome"]) for s in changes(progress)] == \
        [("worker security group", deploy.UPDATED)]
    assert deploy.collect_status(clients, names)["drift"] == []


def test_drift_is_reported_by_status_and_repaired_by_deploy(clients, names, deployed):
    iam, lam, s3, sqs = clients("iam"), clients("lambda"), clients("s3"), clients("sqs")
    # Hand edits of the kind that happen in a console.
    iam.delete_role_policy(RoleName=names.worker_role, PolicyName=names.worker_policy_name)
    extra = iam.create_policy(PolicyName="too-much", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]}))
    iam.attach_role_policy(RoleName=names.lambda_role, PolicyArn=extra["Policy"]["Arn"])
    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    lam.update_function_configuration(FunctionName=names.function_name, Environment={
        "Variables": dict(env["Variables"], DRY_RUN="1")})
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=names.dlq_name)["QueueUrl"])
    s3.put_object(Bucket=names.software_bucket, Key="private/secret.txt", Body=b"no")

    drift = deploy.collect_status(clients, names)["drift"]
    found = {(d["resource"], d["problem"]) for d in drift}
    assert ("worker role", f"changed: policy {names.worker_policy_name} missing") in found
    assert ("launcher role", f"changed: attached policy {extra['Policy']['Arn']}") in found
    assert ("function", "changed: Environment") in found
    assert ("dead-letter queue", "missing") in found
    assert ("software file", "not on the published allowlist") in found

    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress)
    assert deploy.collect_status(clients, names)["drift"] == []
    assert iam.list_attached_role_policies(RoleName=names.lambda_role)["AttachedPolicies"] == []
    assert "DRY_RUN" not in lam.get_function_configuration(
        FunctionName=names.function_name)["Environment"]["Variables"]
    assert error_of(s3.head_object, Bucket=names.software_bucket, Key="private/secret.txt") \
        == "404"


def test_status_on_an_empty_account_says_not_deployed(clients, names):
    status = deploy.collect_status(clients, names)
    assert status["deployed"] is False
    missing = {d["resource"] for d in status["drift"] if d["problem"] == "missing"}
    assert {"data bucket", "software bucket", "function", "launch template", "worker role",
            "launcher role", "dead-letter queue"} <= missing


def test_explicit_bucket_names_are_found_again_by_status_and_teardown(clients):
    names = deploy.resolve_names(clients, "stage2", data_bucket="stage2-inputs",
                                 software_bucket="stage2-tools")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    derived = deploy.resolve_names(clients, "stage2")
    found = deploy.discover_names(clients("lambda"), derived)
    assert (found.data_bucket, found.software_bucket) == ("stage2-inputs", "stage2-tools")
    assert found.launch_template == "stage2w_worker"
    assert deploy.main(["teardown", "--prefix", "stage2", "--yes"], clients=clients) == 0
    assert error_of(clients("s3").head_bucket, Bucket="stage2-tools") == "404"
    clients("s3").head_bucket(Bucket="stage2-inputs")  # data kept


# --- --public-software ---------------------------------------------------------------


def anonymous_s3():
    return boto3.client("s3", config=Config(signature_version=UNSIGNED))


def test_public_software_opens_only_the_published_keys(clients, names):
    s3 = clients("s3")
    deploy.deploy(clients, names, public_software=True, progress=deploy.Progress(echo=False))
    block = s3.get_public_access_block(Bucket=names.software_bucket)[
        "PublicAccessBlockConfiguration"]
    assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True,
                     "BlockPublicPolicy": False, "RestrictPublicBuckets": False}
    assert s3.get_public_access_block(Bucket=names.data_bucket)[
        "PublicAccessBlockConfiguration"] == deploy.PRIVATE_BLOCK
    (statement,) = json.loads(s3.get_bucket_policy(Bucket=names.software_bucket)["Policy"])[
        "Statement"]
    assert statement["Principal"] == "*" and statement["Action"] == "s3:GetObject"
    # The worker's files only; the routing table stays private (it may name internal tools).
    assert sorted(statement["Resource"]) == sorted(
        f"arn:aws:s3:::{names.software_bucket}/{key}" for key in deploy.WORKER_FILES)

    anonymous = anonymous_s3()
    assert anonymous.get_object(Bucket=names.software_bucket, Key="AwsS3.py")["Body"].read() == \
        (REPO / "AwsS3.py").read_bytes()
    s3.put_object(Bucket=names.software_bucket, Key="private/secret.txt", Body=b"no")
    s3.put_object(Bucket=names.data_bucket, Key="input.txt", Body=b"no")
    assert error_of(anonymous.get_object, Bucket=names.software_bucket,
                    Key="private/secret.txt") in DENIED
    assert error_of(anonymous.get_object, Bucket=names.software_bucket,
                    Key="routes.json") in DENIED
    assert error_of(anonymous.get_object, Bucket=names.data_bucket,
                    Key="input.txt") in DENIED

    # Back to private: policy withdrawn, Block Public Access restored, stray key removed.
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress)
    assert error_of(s3.get_bucket_policy, Bucket=names.software_bucket) == "NoSuchBucketPolicy"
    assert s3.get_public_access_block(Bucket=names.software_bucket)[
        "PublicAccessBlockConfiguration"] == deploy.PRIVATE_BLOCK
    assert error_of(anonymous.get_object, Bucket=names.software_bucket,
                    Key="AwsS3.py") in DENIED
    assert ("unpublished file", deploy.DELETED) in {(s["what"], s["outcome"])
                                                     for s in progress.steps}


# --- the deployed pieces work together -----------------------------------------------


def test_object_in_deployed_bucket_becomes_a_report(clients, names, deployed, monkeypatch,
                                                    tmp_path, shutdown_stub):
    s3, sqs, ec2, lam = clients("s3"), clients("sqs"), clients("ec2"), clients("lambda")
    result = deployed[0]
    # moto cannot run the Lambda, so a queue beside it catches the very same event.
    queue_url = sqs.create_queue(QueueName="test-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    config = s3.get_bucket_notification_configuration(Bucket=names.data_bucket)
    config.pop("ResponseMetadata")
    config["QueueConfigurations"] = [{"Id": "test", "QueueArn": queue_arn,
                                      "Events": ["s3:ObjectCreated:*"]}]
    s3.put_bucket_notification_configuration(Bucket=names.data_bucket,
                                             NotificationConfiguration=config)
    key = "runs/2024 batch/sample+1.csv"
    s3.put_object(Bucket=names.data_bucket, Key=key, Body=b"id,value\n1,2\n3,4\n")
    event = None
    for _ in range(5):
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(message["Body"])
            if "Records" in body:
                event = body
        if event:
            break
    assert event and event["Records"][0]["s3"]["bucket"]["name"] == names.data_bucket

    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    for name, value in env["Variables"].items():
        monkeypatch.setenv(name, value)
    launched = lambda_function.lambda_handler(event, None)
    (entry,) = launched["launched"]
    assert entry["key"] == key
    (instance,) = ec2.describe_instances(InstanceIds=[entry["instance_id"]])["Reservations"][0][
        "Instances"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["aws:ec2launchtemplate:id"] == result["launch_template_id"]
    assert tags["awsfun:key"] == key

    status = deploy.collect_status(clients, names,
                                   now=instance["LaunchTime"] + timedelta(seconds=90))
    (worker,) = status["workers"]
    assert (worker["instance_id"], worker["key"], worker["age_seconds"]) == \
        (entry["instance_id"], key, 90)

    user_data = ec2.describe_instance_attribute(InstanceId=entry["instance_id"],
                                                Attribute="userData")["UserData"]["Value"]
    venv_path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    run = run_user_data(base64.b64decode(user_data).decode("utf-8"), tmp_path, shutdown_stub,
                        path=venv_path)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    report = json.loads(s3.get_object(Bucket=names.data_bucket,
                                      Key=f"analysis/{key}.json")["Body"].read())
    assert report["input"]["key"] == key and report["lines"] == 3
    assert shutdown_stub.calls()[-1] == "-h now"
    status = deploy.collect_status(clients, names)
    assert f"analysis/{key}.json" in [r["key"] for r in status["reports"]]
    assert status["reports"][0]["input_key"] == key


def test_handler_launch_request_is_what_the_launcher_policy_allows(clients, names, deployed,
                                                                  monkeypatch):
    """moto cannot judge resource ARNs or Conditions for EC2 and IAM: match request to policy."""
    template_id = deployed[0]["launch_template_id"]
    env = clients("lambda").get_function_configuration(
        FunctionName=names.function_name)["Environment"]["Variables"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    requests = []
    ec2 = lambda_function.get_client("ec2")
    ec2.meta.events.register("provide-client-params.ec2.RunInstances",
                             lambda params, **_: requests.append(dict(params)))
    event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": names.data_bucket},
                                 "object": {"key": "x.txt", "eTag": "abc"}}}]}
    lambda_function.lambda_handler(event, None)
    (request,) = requests
    policy = clients("iam").get_role_policy(RoleName=names.lambda_role,
                                            PolicyName=names.lambda_policy_name)["PolicyDocument"]
    statements = policy["Statement"]
    by_action = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert "*" not in action
            by_action.setdefault(action, []).append(statement)
    assert sorted(by_action) == ["ec2:CreateTags", "ec2:RunInstances", "iam:PassRole",
                                 "logs:CreateLogStream", "logs:PutLogEvents", "s3:GetObject",
                                 "sqs:SendMessage"]

    template_arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:launch-template/{template_id}"
    run, sized, imaged = by_action["ec2:RunInstances"]
    assert request["LaunchTemplate"] == {"LaunchTemplateName": "su2cw_worker",
                                         "Version": "$Latest"}
    # The request overrides neither image, type nor key: the template's are what is judged.
    assert not {"ImageId", "InstanceType", "KeyName", "SecurityGroupIds"} & set(request)
    data = clients("ec2").describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    resources = as_list(run["Resource"])
    assert template_arn in resources
    for kind in ("volume", "network-interface", "subnet"):
        assert f"arn:aws:ec2:us-east-1:{ACCOUNT}:{kind}/*" in resources
    # Only the stack's own security group, the one the template names.
    assert [arn for arn in resources if ":security-group/" in arn] == \
        [f"arn:aws:ec2:us-east-1:{ACCOUNT}:security-group/{group}"
         for group in data["SecurityGroupIds"]]
    assert run["Condition"] == {"ArnLike": {"ec2:LaunchTemplate": [template_arn]}}
    assert sized["Resource"] == f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/*"
    assert sized["Condition"]["ArnLike"] == run["Condition"]["ArnLike"]
    assert data["InstanceType"] in sized["Condition"]["StringEquals"]["ec2:InstanceType"]
    assert as_list(imaged["Resource"]) == [f"arn:aws:ec2:us-east-1::image/{data['ImageId']}"]
    assert imaged["Condition"]["ArnLike"] == run["Condition"]["ArnLike"]

    (tag,) = by_action["ec2:CreateTags"]
    assert tag["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    tagged = {spec["ResourceType"] for spec in request["TagSpecifications"]}
    assert {f"arn:aws:ec2:us-east-1:{ACCOUNT}:{kind}/*" for kind in tagged} == \
        set(as_list(tag["Resource"]))

    (pass_role,) = by_action["iam:PassRole"]
    assert pass_role["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/{names.worker_role}"
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService":
                                                       "ec2.amazonaws.com"}}
    (read,) = by_action["s3:GetObject"]
    assert sorted(as_list(read["Resource"])) == [
        f"arn:aws:s3:::{names.software_bucket}/bootstrap/bootstrap.sh",
        f"arn:aws:s3:::{names.software_bucket}/bootstrap/launcher.py",
        f"arn:aws:s3:::{names.software_bucket}/routes.json"]
    (send,) = by_action["sqs:SendMessage"]
    assert send["Resource"] == f"arn:aws:sqs:us-east-1:{ACCOUNT}:{names.dlq_name}"
    for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
        (logs,) = by_action[action]
        assert logs["Resource"] == \
            f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:{names.log_group}:*"


def as_list(value):
    return value if isinstance(value, list) else [value]


# --- the worker role under moto's IAM enforcement ------------------------------------


def test_worker_role_credentials_do_its_job_and_nothing_else(clients, names, deployed,
                                                             local_aws):
    s3 = clients("s3")
    s3.put_object(Bucket=names.data_bucket, Key="inputs/a.csv", Body=b"a,b\n")
    s3.create_bucket(Bucket="someone-elses-bucket")
    s3.put_object(Bucket="someone-elses-bucket", Key="secret.txt", Body=b"secret")
    worker_arn = clients("iam").get_role(RoleName=names.worker_role)["Role"]["Arn"]
    credentials = clients("sts").assume_role(RoleArn=worker_arn,
                                             RoleSessionName="worker-test")["Credentials"]
    session = boto3.session.Session(aws_access_key_id=credentials["AccessKeyId"],
                                    aws_secret_access_key=credentials["SecretAccessKey"],
                                    aws_session_token=credentials["SessionToken"],
                                    region_name="us-east-1")
    worker = session.client("s3")
    with moto_iam_enforced(local_aws):
        # Its job: read the input and the published worker, write under analysis/.
        assert worker.get_object(Bucket=names.data_bucket, Key="inputs/a.csv")["Body"].read() \
            == b"a,b\n"
        worker.head_object(Bucket=names.data_bucket, Key="inputs/a.csv")
        worker.get_object(Bucket=names.software_bucket, Key="AwsS3.py")
        worker.put_object(Bucket=names.data_bucket, Key="analysis/x", Body=b"report")
        # Everything else is refused.
        denied = [
            error_of(worker.put_object, Bucket=names.data_bucket, Key="inputs/a.csv",
                     Body=b"overwritten"),
            error_of(worker.delete_object, Bucket=names.data_bucket, Key="inputs/a.csv"),
            error_of(worker.delete_object, Bucket=names.data_bucket, Key="analysis/x"),
            error_of(worker.get_object, Bucket="someone-elses-bucket", Key="secret.txt"),
            error_of(worker.put_object, Bucket=names.software_bucket, Key="AwsS3.py",
                     Body=b"evil"),
            error_of(session.client("iam").list_roles),
            error_of(session.client("ec2").describe_instances),
        ]
        batch = worker.delete_objects(Bucket=names.data_bucket,
                                      Delete={"Objects": [{"Key": "inputs/a.csv"}]})
    assert set(denied) == {"AccessDenied"}, denied
    assert [e["Code"] for e in batch.get("Errors", [])] == ["AccessDenied"]
    assert s3.get_object(Bucket=names.data_bucket, Key="inputs/a.csv")["Body"].read() == b"a,b\n"
    assert s3.get_object(Bucket=names.software_bucket, Key="AwsS3.py")["Body"].read() == \
        (REPO / "AwsS3.py").read_bytes()


def test_worker_policy_grants_only_its_job():
    """What moto does not judge: no delete, no other bucket, no IAM or EC2, ListBucket for 404s."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    policy = deploy.policy_documents(names, "lt-0123456789abcdef0")["worker-policy"]
    grants = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        for action in as_list(statement["Action"]):
            grants.setdefault(action, set()).update(as_list(statement["Resource"]))
    data = f"arn:aws:s3:::{names.data_bucket}"
    software = f"arn:aws:s3:::{names.software_bucket}"
    assert grants == {
        "s3:ListBucket": {data},
        # Not routes.json: a worker's route arrives in its user-data.
        "s3:GetObject": {f"{data}/*", f"{software}/AwsS3.py", f"{software}/bootstrap/bootstrap.sh"},
        "s3:PutObject": {f"{data}/analysis/*"},
    }


# --- routing: routes.json validated, published, packaged, its launch templates made ---------

BIG = {"name": "big-reads", "match": "*.fastq.gz", "launch_template": "su2cw_worker_big",
       "instance_type": "m7i.large", "watchdog_minutes": 240}
ARM = {"name": "arm-tables", "match": "tables/*", "launch_template": "su2cw_worker_arm",
       "instance_type": "m7g.large"}
PLAIN = {"name": "plain", "match": "misc/*", "launch_template": "su2cw_worker_misc"}
COPY = {"name": "copy", "match": "tools/*", "launch_template": "su2cw_worker",
        "command": ["cp", "{input}", "{output_dir}"]}


def write_routes(tmp_path, *routes, name="routes.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"routes": list(routes)}, indent=2) + "\n", encoding="utf-8")
    return path


class NoAws:
    """Stands in for deploy.Clients and fails the test on the first AWS client asked for."""

    region = "us-east-1"

    def __call__(self, service):
        pytest.fail(f"deploy asked for a {service} client before refusing the routing table")


@pytest.mark.parametrize("routes, text, message", [
    (None, "{not json", "is not valid JSON"),
    ([dict(BIG, instance_type="large")], None, "route #0: instance_type 'large' is not like"),
    ([BIG, BIG], None, "route #1: the name 'big-reads' is used twice"),
    ([dict(BIG, command="seqkit stats {input}")], None, "never a shell string"),
    ([BIG, dict(BIG, name="other", instance_type="m7i.xlarge")], None,
     "route 'other' wants launch template su2cw_worker_big as m7i.xlarge, but route "
     "'big-reads' makes it m7i.large"),
    ([dict(COPY, instance_type="m7i.large")], None,
     "route 'copy' wants launch template su2cw_worker as m7i.large, but --instance-type "
     "makes it t3.small"),
])
def test_a_bad_routing_table_stops_deploy_before_any_aws_call(tmp_path, capsys, routes, text,
                                                               message):
    path = tmp_path / "routes.json"
    if routes is None:
        path.write_text(text, encoding="utf-8")
    else:
        write_routes(tmp_path, *routes)
    assert deploy.main(["deploy", "--routes", str(path)], clients=NoAws()) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy.sh deploy: ") and str(path) in err
    assert message in err


def test_a_bad_routing_table_leaves_the_account_untouched(clients, names, tmp_path):
    bad = write_routes(tmp_path, dict(BIG, launch_template="has space"))
    with pytest.raises(deploy.DeployError, match="route #0: 'has space' is not a launch template"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False), routes_file=bad)
    assert clients("s3").list_buckets()["Buckets"] == []
    assert clients("ec2").describe_launch_templates()["LaunchTemplates"] == []
    assert clients("iam").list_roles()["Roles"] == []


def test_the_wrapper_refuses_a_missing_table_with_exit_status_2(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    done = subprocess.run([str(REPO / "deploy.sh"), "--routes", str(tmp_path / "nope.json")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"cannot read the routing table {tmp_path / 'nope.json'}" in done.stderr


def template_data(ec2, name):
    return ec2.describe_launch_template_versions(
        LaunchTemplateName=name, Versions=["$Default"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]


def test_routes_get_their_launch_templates_policy_publication_and_package(clients, names,
                                                                         tmp_path, monkeypatch):
    routes_file = write_routes(tmp_path, BIG, ARM, PLAIN, COPY, dict(PLAIN, name="plain2",
                                                                     match="misc2/*"))
    result = deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                           routes_file=routes_file)
    s3, ec2, iam, lam, ssm = (clients(n) for n in ("s3", "ec2", "iam", "lambda", "ssm"))

    # One template per distinct name (the worker template too), each with its type and image.
    ids = result["launch_templates"]
    assert sorted(ids) == ["su2cw_worker", "su2cw_worker_arm", "su2cw_worker_big",
                           "su2cw_worker_misc"]
    images = {arch: ssm.get_parameter(Name=deploy.AMI_PARAMETER.format(arch=arch))[
        "Parameter"]["Value"] for arch in ("x86_64", "arm64")}
    expected = {"su2cw_worker": ("t3.small", "x86_64"), "su2cw_worker_big": ("m7i.large", "x86_64"),
                "su2cw_worker_arm": ("m7g.large", "arm64"),
                "su2cw_worker_misc": ("t3.small", "x86_64")}
    for name, (kind, arch) in expected.items():
        (template,) = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
        assert template["LaunchTemplateId"] == ids[name]
        assert {"Key": deploy.STACK_TAG, "Value": "su2c"} in template["Tags"]
        data = template_data(ec2, name)
        assert (data["InstanceType"], data["ImageId"]) == (kind, images[arch])
        assert data["IamInstanceProfile"] == {"Name": names.worker_instance_profile}
        assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        (root,) = data["BlockDeviceMappings"]
        assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
        assert {spec["ResourceType"] for spec in data["TagSpecifications"]} >= {"instance",
                                                                                 "volume"}

    # The launcher may launch from exactly these templates.
    policy = iam.get_role_policy(RoleName=names.lambda_role,
                                 PolicyName=names.lambda_policy_name)["PolicyDocument"]
    run, sized, imaged = [st for st in policy["Statement"] if st["Action"] == "ec2:RunInstances"]
    arns = sorted(f"arn:aws:ec2:us-east-1:{ACCOUNT}:launch-template/{i}" for i in ids.values())
    assert sorted(a for a in run["Resource"] if ":launch-template/" in a) == arns
    for statement in (run, sized, imaged):
        assert sorted(statement["Condition"]["ArnLike"]["ec2:LaunchTemplate"]) == arns
    # ... and only their instance types and images.
    assert sized["Condition"]["StringEquals"]["ec2:InstanceType"] == \
        sorted({kind for kind, _ in expected.values()})
    assert sorted(imaged["Resource"]) == sorted(f"arn:aws:ec2:us-east-1::image/{image}"
                                                for image in images.values())

    # The table is published (private to the launcher) and packaged beside the handler.
    assert s3.get_object(Bucket=names.software_bucket, Key="routes.json")["Body"].read() == \
        routes_file.read_bytes()
    zip_bytes = deploy.build_function_zip(sources=deploy.software_sources(routes_file))
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        assert archive.read("routes.json") == routes_file.read_bytes()
    assert lam.get_function(FunctionName=names.function_name)["Configuration"]["CodeSha256"] \
        == deploy.code_sha256(zip_bytes)

    # Status lists the templates with the routes they serve, and sees no drift.
    status = deploy.collect_status(clients, names, routes_file=routes_file)
    assert status["drift"] == []
    serving = {t["name"]: (t["instance_type"], t["routes"]) for t in status["launch_templates"]}
    assert serving == {"su2cw_worker": ("t3.small", ["default", "copy"]),
                       "su2cw_worker_big": ("m7i.large", ["big-reads"]),
                       "su2cw_worker_arm": ("m7g.large", ["arm-tables"]),
                       "su2cw_worker_misc": ("t3.small", ["plain", "plain2"])}

    # The deployed handler launches a matching key from its route's template.
    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    for name, value in env["Variables"].items():
        monkeypatch.setenv(name, value)
    s3.put_object(Bucket=names.data_bucket, Key="run1/reads.fastq.gz", Body=b"@r\nAC\n+\n!!\n")
    etag = s3.head_object(Bucket=names.data_bucket, Key="run1/reads.fastq.gz")["ETag"]
    obj = {"bucket": names.data_bucket, "key": "run1/reads.fastq.gz", "etag": etag.strip('"'),
           "version_id": "", "sequencer": "", "event_name": "ObjectCreated:Put", "size": 10}
    instance_id = lambda_function.launch_object(obj, lambda_function.load_settings(),
                                                ec2=ec2, s3=s3, local_dir="")
    (instance,) = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["awsfun:launch-template"] == "su2cw_worker_big"
    assert instance["InstanceType"] == "m7i.large"


def test_a_route_s_root_volume_size_reaches_its_launch_template(clients, names, tmp_path):
    """AWS fact: on Amazon Linux 2023 /tmp is RAM (tmpfs, half of memory), so a route's copy
    of a large input lives on the root volume: its template gets the route's
    root_volume_gib, the others keep the image's size, and status sees no drift."""
    routes_file = write_routes(tmp_path, dict(BIG, root_volume_gib=200), PLAIN)
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False), routes_file=routes_file)
    ec2 = clients("ec2")
    sizes = {name: template_data(ec2, name)["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
             for name in ("su2cw_worker", "su2cw_worker_big", "su2cw_worker_misc")}
    assert sizes["su2cw_worker_big"] == 200
    assert sizes["su2cw_worker"] == sizes["su2cw_worker_misc"] < 200
    assert deploy.collect_status(clients, names, routes_file=routes_file)["drift"] == []


def test_two_routes_giving_one_template_different_root_volumes_are_refused(tmp_path):
    routes_file = write_routes(tmp_path, dict(BIG, root_volume_gib=200),
                               dict(BIG, name="other", match="x/*", root_volume_gib=50))
    with pytest.raises(deploy.DeployError, match="200 GiB"):
        deploy.deploy(NoAws(), deploy.derive_names("su2c", ACCOUNT, "us-east-1"),
                      progress=deploy.Progress(echo=False), routes_file=routes_file)


def test_a_route_dropped_from_the_table_loses_its_template_and_permission(clients, names,
                                                                         tmp_path):
    first = write_routes(tmp_path, BIG, PLAIN, name="first.json")
    ids = deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                        routes_file=first)["launch_templates"]
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=again, routes_file=first)
    assert changes(again) == []  # re-run: nothing to change

    second = write_routes(tmp_path, PLAIN, name="second.json")
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress, routes_file=second)
    assert ("launch template", "su2cw_worker_big", deploy.DELETED) in {
        (s["what"], s["name"], s["outcome"]) for s in progress.steps}
    ec2 = clients("ec2")
    assert sorted(t["LaunchTemplateName"] for t in ec2.describe_launch_templates()[
        "LaunchTemplates"]) == ["su2cw_worker", "su2cw_worker_misc"]
    policy = json.dumps(clients("iam").get_role_policy(
        RoleName=names.lambda_role, PolicyName=names.lambda_policy_name)["PolicyDocument"])
    assert ids["su2cw_worker_big"] not in policy and ids["su2cw_worker_misc"] in policy

    # Status against the first table reports the missing template; teardown removes the rest.
    drift = deploy.collect_status(clients, names, routes_file=first)["drift"]
    assert {"resource": "launch template", "name": "su2cw_worker_big", "problem": "missing"} \
        in drift
    routed_worker = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": "su2cw_worker_misc", "Version": "$Latest"},
        MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "awsfun:launch-template", "Value": "su2cw_worker_misc"}]}],
    )["Instances"][0]["InstanceId"]
    deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    (state,) = [i["State"]["Name"] for r in ec2.describe_instances(
        InstanceIds=[routed_worker])["Reservations"] for i in r["Instances"]]
    assert state in ("shutting-down", "terminated")  # no routed worker is orphaned


def test_status_reports_an_invalid_checkout_table_as_drift(clients, names, deployed, tmp_path):
    bad = tmp_path / "routes.json"
    bad.write_text('{"routes": [{"name": "x"}]}', encoding="utf-8")
    drift = deploy.collect_status(clients, names, routes_file=bad)["drift"]
    assert ("routing table", "invalid: routing table " + str(bad) +
            ": route #0: 'match' must be a non-empty string") in {
        (d["resource"], d["problem"]) for d in drift}


# --- status and teardown -------------------------------------------------------------


def test_wrapper_runs_status_json(clients, names, deployed):
    s3 = clients("s3")
    s3.put_object(Bucket=names.data_bucket, Key="analysis/a.csv.json", Body=b"{}")
    s3.put_object(Bucket=names.data_bucket, Key="analysis/b.csv.error.json", Body=b"{}")
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run([str(REPO / "deploy.sh"), "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    for field in ("data_bucket", "software_bucket", "function_name", "function_arn",
                  "launch_template", "worker_role", "worker_instance_profile", "lambda_role",
                  "dlq_url", "region", "account", "workers", "reports", "error_reports",
                  "dlq_depth", "drift"):
        assert field in status, field
    assert status["deployed"] is True and status["drift"] == []
    assert status["function_arn"] == deployed[0]["function_arn"]
    assert status["dlq_depth"] == 0 and status["workers"] == []
    assert [r["input_key"] for r in status["reports"]] == ["a.csv"]
    assert [r["input_key"] for r in status["error_reports"]] == ["b.csv"]
    text = subprocess.run([str(REPO / "deploy.sh"), "status"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert text.returncode == 0 and "drift: none" in text.stdout


def test_teardown_asks_first(clients, names, deployed, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert deploy.main(["teardown"], clients=clients) == 1
    assert "Nothing removed." in capsys.readouterr().out
    clients("lambda").get_function(FunctionName=names.function_name)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal, no answer: no
    assert deploy.main(["teardown"], clients=clients) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    assert deploy.main(["teardown"], clients=clients) == 0
    assert error_of(clients("lambda").get_function, FunctionName=names.function_name) == \
        "ResourceNotFoundException"


def test_teardown_removes_everything_and_orphans_no_worker(clients, names, deployed):
    s3, ec2 = clients("s3"), clients("ec2")
    s3.put_object(Bucket=names.data_bucket, Key="inputs/keep.csv", Body=b"1\n")
    worker = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": names.launch_template, "Version": "$Latest"},
        MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "awsfun:launch-template", "Value": names.launch_template},
            {"Key": "awsfun:key", "Value": "inputs/keep.csv"}]}],
    )["Instances"][0]["InstanceId"]
    unrelated = ec2.run_instances(ImageId=deployed[0]["image_id"], MinCount=1,
                                  MaxCount=1)["Instances"][0]["InstanceId"]

    progress = deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert ("worker", deploy.DELETED) in {(s["what"], s["outcome"]) for s in progress.steps}
    states = {i["InstanceId"]: i["State"]["Name"]
              for r in ec2.describe_instances(InstanceIds=[worker, unrelated])["Reservations"]
              for i in r["Instances"]}
    assert states[worker] in ("shutting-down", "terminated")
    assert states[unrelated] == "running"
    assert_nothing_left(clients, names)
    # The data stays, without the notification to a function that no longer exists.
    assert s3.get_object(Bucket=names.data_bucket, Key="inputs/keep.csv")["Body"].read() == b"1\n"
    assert "LambdaFunctionConfigurations" not in s3.get_bucket_notification_configuration(
        Bucket=names.data_bucket)

    # Again: everything already gone, no error; then the data too when asked.
    again = deploy.teardown(clients, names, progress=deploy.Progress(echo=False))
    assert changes(again) == []
    deploy.teardown(clients, names, delete_data=True, progress=deploy.Progress(echo=False))
    assert error_of(s3.head_bucket, Bucket=names.data_bucket) == "404"


def assert_nothing_left(clients, names):
    iam, ec2, lam = clients("iam"), clients("ec2"), clients("lambda")
    assert error_of(iam.get_role, RoleName=names.worker_role) == "NoSuchEntity"
    assert error_of(iam.get_role, RoleName=names.lambda_role) == "NoSuchEntity"
    assert error_of(iam.get_instance_profile,
                    InstanceProfileName=names.worker_instance_profile) == "NoSuchEntity"
    assert error_of(ec2.describe_launch_templates,
                    LaunchTemplateNames=[names.launch_template]).startswith(
        "InvalidLaunchTemplateName")
    assert error_of(lam.get_function, FunctionName=names.function_name) == \
        "ResourceNotFoundException"
    assert clients("sqs").list_queues().get("QueueUrls", []) == []
    assert error_of(clients("s3").head_bucket, Bucket=names.software_bucket) == "404"
    assert clients("logs").describe_log_groups(
        logGroupNamePrefix=names.log_group)["logGroups"] == []
    assert ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [names.worker_security_group]}])["SecurityGroups"] == []


# --- command line -----------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    ([], ["deploy"]),
    (["--prefix", "dev"], ["deploy", "--prefix", "dev"]),
    (["status", "--json"], ["status", "--json"]),
    (["--prefix", "dev", "status"], ["status", "--prefix", "dev"]),
    (["--prefix", "status", "teardown"], ["teardown", "--prefix", "status"]),
    (["--prefix=dev", "teardown", "--yes"], ["teardown", "--prefix=dev", "--yes"]),
    (["--key-prefix", "status", "reconcile"], ["reconcile", "--key-prefix", "status"]),
    (["--routes", "deploy", "status"], ["status", "--routes", "deploy"]),
    (["--help"], ["--help"]),
])
def test_options_may_come_before_the_command(argv, expected):
    assert deploy.command_first(argv) == expected


def test_help_names_every_command():
    done = subprocess.run(["bash", str(REPO / "deploy.sh"), "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for command in deploy.COMMANDS:
        assert command in done.stdout
