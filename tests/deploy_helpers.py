"""Helpers shared by the deploy package's tests (test_stack, test_s3, test_preflight, ...)."""

import json

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

import deploy
import lambda_function
from conftest import REPO

ACCOUNT = "123456789012"  # moto's default account


# An anonymous refusal comes back as a bare 403 (no error body) from S3 and from moto.
DENIED = ("403", "AccessDenied")


def changes(progress):
    return [step for step in progress.steps if step["outcome"] in deploy.CHANGES]


def error_of(call, *args, **kwargs):
    """Return the AWS error code `call` fails with (the test fails if it succeeds)."""
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return caught.value.response["Error"]["Code"]


def dataclass_values(names):
    return [getattr(names, field) for field in names.__dataclass_fields__]


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
            Bucket=deploy.resolve_names(clients).data_bucket)["QueueConfigurations"],
        "event source mappings": [
            (m["UUID"], m["BatchSize"], m.get("FunctionResponseTypes"), m.get("ScalingConfig"))
            for m in clients("lambda").list_event_source_mappings()["EventSourceMappings"]],
        "queue attributes": [
            {k: v for k, v in clients("sqs").get_queue_attributes(
                QueueUrl=url, AttributeNames=["All"])["Attributes"].items()
             if k not in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                          "ApproximateNumberOfMessagesDelayed", "LastModifiedTimestamp")}
            for url in clients("sqs").list_queues().get("QueueUrls", [])],
    }


def anonymous_s3():
    return boto3.client("s3", config=Config(signature_version=UNSIGNED))


def as_list(value):
    return value if isinstance(value, list) else [value]


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
        pytest.fail(f"deploy asked for a {service} client before refusing its input")


def template_data(ec2, name):
    return ec2.describe_launch_template_versions(
        LaunchTemplateName=name, Versions=["$Default"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]


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
    assert lam.list_event_source_mappings()["EventSourceMappings"] == []
    assert error_of(clients("s3").head_bucket, Bucket=names.software_bucket) == "404"
    assert clients("logs").describe_log_groups(
        logGroupNamePrefix=names.log_group)["logGroups"] == []
    assert ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [names.worker_security_group]}])["SecurityGroups"] == []


def bucket_tags(s3, bucket):
    try:
        return {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    except ClientError as err:
        assert err.response["Error"]["Code"] == "NoSuchTagSet"
        return {}


def account_snapshot(clients):
    """Everything deploy could create or change, read back from moto."""
    s3 = clients("s3")
    buckets = sorted(b["Name"] for b in s3.list_buckets()["Buckets"])
    return {
        "buckets": buckets,
        "bucket tags": {b: bucket_tags(s3, b) for b in buckets},
        "notifications": {b: {k: v for k, v in s3.get_bucket_notification_configuration(
            Bucket=b).items() if k != "ResponseMetadata"} for b in buckets},
        "objects": {b: sorted(o["Key"] for o in s3.list_objects_v2(Bucket=b).get("Contents", []))
                    for b in buckets},
        "roles": [r["RoleName"] for r in clients("iam").list_roles()["Roles"]],
        "profiles": [p["InstanceProfileName"] for p in
                     clients("iam").list_instance_profiles()["InstanceProfiles"]],
        "templates": [t["LaunchTemplateName"] for t in
                      clients("ec2").describe_launch_templates()["LaunchTemplates"]],
        "functions": [f["FunctionName"] for f in clients("lambda").list_functions()["Functions"]],
        "queues": clients("sqs").list_queues().get("QueueUrls", []),
        "log groups": [g["logGroupName"] for g in
                       clients("logs").describe_log_groups()["logGroups"]],
    }


USER_TAGS = {"team": "genomics", "cost-center": "4711"}


def make_user_bucket(s3, bucket, tags=USER_TAGS):
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": deploy.tag_list(tags)})


def other_consumers(sqs, sns):
    queue = sqs.create_queue(QueueName="audit")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    topic_arn = sns.create_topic(Name="restores")["TopicArn"]
    return {
        "QueueConfigurations": [{"Id": "audit-deletes", "QueueArn": queue_arn,
                                 "Events": ["s3:ObjectRemoved:*"]}],
        "TopicConfigurations": [{"Id": "restores", "TopicArn": topic_arn,
                                 "Events": ["s3:ObjectRestore:Completed"]}],
    }


SEND_MESSAGE = ("The provided execution role does not have permissions to call SendMessage "
                "on SQS")


NETWORK_INTERFACE = ("The provided execution role does not have permissions to call "
                     "CreateNetworkInterface on EC2")


NOT_ASSUMABLE = "The role defined for the function cannot be assumed by Lambda."


BAD_PROFILE = ("Value (su2c-worker-us-east-1) for parameter iamInstanceProfile.name is invalid. "
               "Invalid IAM Instance Profile name")


def stubbed_ec2(*answers):
    """An EC2 client whose RunInstances answers are `answers` in order (error codes, messages)."""
    from botocore.stub import Stubber
    ec2 = boto3.client("ec2", region_name="us-east-1", aws_access_key_id="x",
                       aws_secret_access_key="x")
    stub = Stubber(ec2)
    for code, message in answers:
        stub.add_client_error("run_instances", code, message, 412 if code == "DryRunOperation"
                              else 400, expected_params={
                                  "LaunchTemplate": {"LaunchTemplateName": "su2cw_worker",
                                                     "Version": "$Latest"},
                                  "MinCount": 1, "MaxCount": 1, "DryRun": True})
    stub.activate()
    return ec2, stub


ACCEPTED = ("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")


WORST_KEY = "k" * 1024  # S3 keys go up to 1,024 bytes of UTF-8


def user_data_size(command, key):
    template = (REPO / deploy.BOOTSTRAP_KEY).read_text(encoding="utf-8")
    settings = dict(lambda_function.load_settings({"AWS_REGION": "us-east-1"}),
                    SOFTWARE_BUCKET=f"su2c-software-{ACCOUNT}-us-east-1", COMMAND=command)
    obj = {"bucket": f"su2c-data-{ACCOUNT}-us-east-1", "key": key, "etag": "0" * 32}
    return len(lambda_function.render_user_data(template, obj, settings).encode("utf-8"))
