"""deploy.py on the real target (issue 10): buckets it did not create, preconditions checked
before the first change, IAM propagation waited out, and every limit a setting can break
checked at deploy time for the worst case."""

import json

import boto3
import pytest
from botocore.exceptions import ClientError

import AwsS3
import deploy
import lambda_function
from awsfun_deploy import preflight
from conftest import REPO
from support import fail_first

ACCOUNT = "123456789012"  # moto's default account


def write_routes(tmp_path, *routes, name="routes.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"routes": list(routes)}, indent=2) + "\n", encoding="utf-8")
    return path


def changes(progress):
    return [step for step in progress.steps if step["outcome"] in deploy.CHANGES]


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


class NoAws:
    """Stands in for deploy.Clients and fails the test on the first AWS client asked for."""

    region = "us-east-1"

    def __call__(self, service):
        pytest.fail(f"deploy asked for a {service} client before refusing the setting")


# --- 1. a data (or software) bucket deploy did not create -------------------------------

USER_TAGS = {"team": "genomics", "cost-center": "4711"}


def make_user_bucket(s3, bucket, tags=USER_TAGS):
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": deploy.tag_list(tags)})


def test_an_existing_data_bucket_keeps_its_tags_and_settings_and_teardown_removes_only_ours(
        clients):
    s3 = clients("s3")
    make_user_bucket(s3, "lab-inputs")
    # The owner's choices: ACLs enabled, no Block Public Access, versioning, lifecycle, CORS.
    s3.put_bucket_ownership_controls(Bucket="lab-inputs", OwnershipControls={
        "Rules": [{"ObjectOwnership": "ObjectWriter"}]})
    s3.put_bucket_versioning(Bucket="lab-inputs", VersioningConfiguration={"Status": "Enabled"})
    lifecycle = {"Rules": [{"ID": "old", "Status": "Enabled", "Filter": {"Prefix": "tmp/"},
                            "Expiration": {"Days": 7}}]}
    s3.put_bucket_lifecycle_configuration(Bucket="lab-inputs", LifecycleConfiguration=lifecycle)
    cors = {"CORSRules": [{"AllowedMethods": ["GET"], "AllowedOrigins": ["https://lab.example"]}]}
    s3.put_bucket_cors(Bucket="lab-inputs", CORSConfiguration=cors)
    s3.put_object(Bucket="lab-inputs", Key="runs/a.csv", Body=b"1\n")

    def settings():
        return {
            "ownership": s3.get_bucket_ownership_controls(Bucket="lab-inputs")[
                "OwnershipControls"],
            "block": deploy._get_or_none(s3.get_public_access_block, Bucket="lab-inputs"),
            "versioning": s3.get_bucket_versioning(Bucket="lab-inputs").get("Status"),
            "lifecycle": s3.get_bucket_lifecycle_configuration(Bucket="lab-inputs")["Rules"],
            "cors": s3.get_bucket_cors(Bucket="lab-inputs")["CORSRules"],
        }

    before = settings()
    names = deploy.resolve_names(clients, data_bucket="lab-inputs")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    tags = bucket_tags(s3, "lab-inputs")
    assert {k: tags[k] for k in USER_TAGS} == USER_TAGS  # the owner's tags are kept
    assert deploy.STACK_TAG not in tags  # awsfun did not create it
    assert tags[deploy.used_by_tag(names.prefix)] == names.function_name
    assert settings() == before

    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=again)
    assert changes(again) == []  # re-run: nothing to change

    # Even --delete-data does not delete a bucket awsfun did not create.
    progress = deploy.teardown(clients, names, delete_data=True,
                               progress=deploy.Progress(echo=False))
    assert ("data bucket", deploy.KEPT) in {(s["what"], s["outcome"]) for s in progress.steps}
    assert bucket_tags(s3, "lab-inputs") == USER_TAGS
    assert settings() == before
    assert s3.get_object(Bucket="lab-inputs", Key="runs/a.csv")["Body"].read() == b"1\n"


def test_a_created_data_bucket_keeps_tags_its_owner_adds_later(clients, names):
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    s3 = clients("s3")
    tags = bucket_tags(s3, names.data_bucket)
    s3.put_bucket_tagging(Bucket=names.data_bucket,
                          Tagging={"TagSet": deploy.tag_list(dict(tags, owner="lab"))})
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=again)
    assert changes(again) == []
    assert bucket_tags(s3, names.data_bucket) == dict(tags, owner="lab")


def test_an_existing_software_bucket_keeps_its_objects_policy_and_tags(clients):
    s3 = clients("s3")
    make_user_bucket(s3, "lab-tools")
    s3.put_object(Bucket="lab-tools", Key="other/tool.sh", Body=b"#!/bin/sh\n")
    theirs = {"Sid": "PartnerReadsTools", "Effect": "Allow",
              "Principal": {"AWS": "arn:aws:iam::210987654321:root"}, "Action": "s3:GetObject",
              "Resource": "arn:aws:s3:::lab-tools/other/*"}
    s3.put_bucket_policy(Bucket="lab-tools", Policy=json.dumps(
        {"Version": "2012-10-17", "Statement": [theirs]}))

    def statements():
        return json.loads(s3.get_bucket_policy(Bucket="lab-tools")["Policy"])["Statement"]

    names = deploy.resolve_names(clients, software_bucket="lab-tools")
    deploy.deploy(clients, names, public_software=True, progress=deploy.Progress(echo=False))
    assert sorted(s["Sid"] for s in statements()) == sorted(["PartnerReadsTools",
                                                             deploy.PUBLIC_READ_SID])
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, public_software=True, progress=again)
    assert changes(again) == []
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))  # private again
    assert [s["Sid"] for s in statements()] == ["PartnerReadsTools"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="lab-tools")["Contents"]}
    assert keys == {"other/tool.sh", *deploy.PUBLISHED_FILES}  # nothing of theirs deleted

    deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="lab-tools")["Contents"]] == \
        ["other/tool.sh"]
    assert [s["Sid"] for s in statements()] == ["PartnerReadsTools"]
    assert bucket_tags(s3, "lab-tools") == USER_TAGS


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


def test_other_consumers_notifications_are_kept_by_deploy_and_teardown(clients):
    s3 = clients("s3")
    make_user_bucket(s3, "lab-inputs")
    theirs = other_consumers(clients("sqs"), boto3.client("sns"))
    s3.put_bucket_notification_configuration(Bucket="lab-inputs",
                                             NotificationConfiguration=theirs)
    names = deploy.resolve_names(clients, data_bucket="lab-inputs")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    config = deploy.notification_config(s3, "lab-inputs")
    for kind in ("QueueConfigurations", "TopicConfigurations"):
        assert [c["Id"] for c in config[kind]] == [theirs[kind][0]["Id"]]
    assert [c["Id"] for c in config["LambdaFunctionConfigurations"]] == [names.notification_id]
    deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    config = deploy.notification_config(s3, "lab-inputs")
    assert "LambdaFunctionConfigurations" not in config
    assert [c["Id"] for c in config["QueueConfigurations"]] == ["audit-deletes"]


def test_eventbridge_delivery_is_kept_beside_ours():
    """moto does not store EventBridgeConfiguration; S3 does, so the merge must keep it."""
    ours = {"Id": "su2c-launcher-object-created", "LambdaFunctionArn": "arn:fn",
            "Events": ["s3:ObjectCreated:*"]}
    theirs = {"EventBridgeConfiguration": {},
              "QueueConfigurations": [{"Id": "q", "QueueArn": "arn:q",
                                       "Events": ["s3:ObjectRemoved:*"]}]}
    merged = deploy.with_notification(theirs, ours)
    assert merged == dict(theirs, LambdaFunctionConfigurations=[ours])
    assert deploy.without_notification(merged, ours["Id"]) == theirs


def test_an_overlapping_notification_stops_deploy_before_any_change(clients):
    """S3 refuses overlapping configurations ("Configurations overlap"); moto accepts them, so
    deploy must find the overlap itself, before it changes anything."""
    s3, sqs = clients("s3"), clients("sqs")
    make_user_bucket(s3, "lab-inputs")
    queue = sqs.create_queue(QueueName="ingest")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket="lab-inputs", NotificationConfiguration={
        "QueueConfigurations": [{"Id": "ingest-uploads", "QueueArn": queue_arn,
                                 "Events": ["s3:ObjectCreated:Put"],
                                 "Filter": {"Key": {"FilterRules": [
                                     {"Name": "prefix", "Value": "uploads/"}]}}}]})
    before = account_snapshot(clients)
    names = deploy.resolve_names(clients, data_bucket="lab-inputs")
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    message = str(caught.value)
    assert "ingest-uploads" in message and "lab-inputs" in message and "\n" not in message
    assert account_snapshot(clients) == before


@pytest.mark.parametrize("other, overlaps", [
    ({"Events": ["s3:ObjectCreated:*"]}, True),
    ({"Events": ["s3:ObjectCreated:Put"]}, True),
    ({"Events": ["s3:ObjectCreated:CompleteMultipartUpload"],
      "Filter": {"Key": {"FilterRules": [{"Name": "Suffix", "Value": ".csv"}]}}}, True),
    ({"Events": ["s3:ObjectRemoved:*"]}, False),
    ({"Events": ["s3:ObjectRestore:Post", "s3:ObjectTagging:*"]}, False),
])
def test_notification_overlap_follows_s3s_rule_for_an_unfiltered_configuration(other, overlaps):
    ours = {"Events": ["s3:ObjectCreated:*"]}
    assert deploy.notifications_overlap(ours, other) is overlaps


@pytest.mark.parametrize("a, b, overlaps", [
    (("in/", ""), ("out/", ""), False),
    (("in/", ""), ("in/sub/", ""), True),
    (("", ".csv"), ("", ".tsv"), False),
    (("", ".csv"), ("", "a.csv"), True),
    (("in/", ".csv"), ("", ".tsv"), False),
    (("in/", ""), ("", ".tsv"), True),
])
def test_notification_filters_overlap_when_prefixes_and_suffixes_both_can_match(a, b, overlaps):
    def config(prefix, suffix):
        rules = [{"Name": "prefix", "Value": prefix}] if prefix else []
        rules += [{"Name": "suffix", "Value": suffix}] if suffix else []
        return {"Events": ["s3:ObjectCreated:*"], "Filter": {"Key": {"FilterRules": rules}}}

    assert deploy.notifications_overlap(config(*a), config(*b)) is overlaps
    assert deploy.notifications_overlap(config(*b), config(*a)) is overlaps


# --- 2. preconditions checked before the first change -----------------------------------


@pytest.mark.parametrize("location, region", [
    (None, "us-east-1"), ("", "us-east-1"), ("EU", "eu-west-1"), ("eu-central-1", "eu-central-1"),
])
def test_bucket_location_quirks_become_region_names(location, region):
    """GetBucketLocation answers None for us-east-1 and the legacy "EU" for eu-west-1."""
    assert deploy.location_region(location) == region


@pytest.mark.parametrize("which", ["data_bucket", "software_bucket"])
def test_a_bucket_in_another_region_stops_deploy_before_any_change(clients, which):
    far = boto3.client("s3", region_name="eu-west-1")
    far.create_bucket(Bucket="far-bucket",
                      CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    before = account_snapshot(clients)
    names = deploy.resolve_names(clients, **{which: "far-bucket"})
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    message = str(caught.value)
    assert "far-bucket" in message and "eu-west-1" in message and "us-east-1" in message
    assert account_snapshot(clients) == before


@pytest.mark.parametrize("setting", ["BlockPublicPolicy", "RestrictPublicBuckets"])
def test_public_software_in_an_account_that_blocks_public_policies_stops_before_any_change(
        clients, names, setting):
    """The account's Block Public Access (s3control) wins over the bucket's own: S3 refuses a
    public bucket policy under BlockPublicPolicy and ignores it under RestrictPublicBuckets.
    Deploy used to make both buckets and publish before PutBucketPolicy failed."""
    clients("s3control").put_public_access_block(
        AccountId=ACCOUNT, PublicAccessBlockConfiguration={setting: True})
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match=f"--public-software: .*{setting}"):
        deploy.deploy(clients, names, public_software=True, progress=deploy.Progress(echo=False))
    assert account_snapshot(clients) == before


def test_an_account_block_on_acls_only_leaves_public_software_possible(clients):
    s3control = clients("s3control")
    assert deploy.public_software_problems(s3control, ACCOUNT) == []  # none set
    s3control.put_public_access_block(AccountId=ACCOUNT, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True})
    assert deploy.public_software_problems(s3control, ACCOUNT) == []


def test_a_launch_template_of_another_deployment_stops_deploy_before_any_change(clients, names):
    clients("ec2").create_launch_template(
        LaunchTemplateName=names.launch_template, LaunchTemplateData={"InstanceType": "t3.small"},
        TagSpecifications=[{"ResourceType": "launch-template",
                            "Tags": [{"Key": deploy.STACK_TAG, "Value": "other"}]}])
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match="belongs to deployment 'other'"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    assert account_snapshot(clients) == before


def test_a_bad_watchdog_setting_stops_deploy_before_any_change(clients, names):
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match="WATCHDOG_MINUTES"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                      environ={"WATCHDOG_MINUTES": "0"})
    assert account_snapshot(clients) == before


# --- 3. IAM propagation -----------------------------------------------------------------

SEND_MESSAGE = ("The provided execution role does not have permissions to call SendMessage "
                "on SQS")
NETWORK_INTERFACE = ("The provided execution role does not have permissions to call "
                     "CreateNetworkInterface on EC2")
NOT_ASSUMABLE = "The role defined for the function cannot be assumed by Lambda."
BAD_PROFILE = ("Value (su2c-worker-us-east-1) for parameter iamInstanceProfile.name is invalid. "
               "Invalid IAM Instance Profile name")


def test_every_propagation_refusal_is_waited_out_once_then_succeeds(clients, names):
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    lam, ec2 = clients("lambda"), clients("ec2")
    sleeps = []

    lam.delete_function(FunctionName=names.function_name)
    calls = fail_first(lam, "CreateFunction", "InvalidParameterValueException", SEND_MESSAGE)
    zip_bytes = deploy.build_function_zip()
    deploy.ensure_function(lam, names, zip_bytes, deploy.Progress(echo=False),
                           sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 1

    calls = fail_first(lam, "UpdateFunctionConfiguration", "InvalidParameterValueException",
                       NETWORK_INTERFACE)
    deploy.ensure_function(lam, names, zip_bytes, deploy.Progress(echo=False),
                           environ={"WATCHDOG_MINUTES": "90"}, sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 2

    # Re-creating the function dropped its retry settings and permission (if moto kept them).
    deploy._get_or_none(lam.delete_function_event_invoke_config, FunctionName=names.function_name)
    calls = fail_first(lam, "PutFunctionEventInvokeConfig", "InvalidParameterValueException",
                       SEND_MESSAGE)
    deploy.ensure_event_invoke_config(lam, names, deploy.Progress(echo=False),
                                      sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 3

    deploy._get_or_none(lam.remove_permission, FunctionName=names.function_name,
                        StatementId=names.permission_sid)
    calls = fail_first(lam, "AddPermission", "InvalidParameterValueException", NOT_ASSUMABLE)
    deploy.ensure_s3_invoke_permission(lam, names, deploy.Progress(echo=False),
                                       sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 4

    data = deploy.read_launch_template(ec2, names.launch_template)["data"]
    calls = fail_first(ec2, "CreateLaunchTemplate", "InvalidParameterValue", BAD_PROFILE)
    deploy.ensure_launch_template(ec2, names, data, deploy.Progress(echo=False),
                                  name="su2cw_other", sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 5
    calls = fail_first(ec2, "CreateLaunchTemplateVersion", "InvalidParameterValue", BAD_PROFILE)
    deploy.ensure_launch_template(ec2, names, dict(data, InstanceType="t3.micro"),
                                  deploy.Progress(echo=False), sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 6


def test_a_propagation_refusal_that_never_ends_is_reraised_after_a_bounded_wait():
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        assert len(sleeps) < 1000, "the wait is not bounded"

    def refuse():
        raise ClientError({"Error": {"Code": "InvalidParameterValueException",
                                     "Message": SEND_MESSAGE}}, "CreateFunction")

    with pytest.raises(ClientError):
        deploy.wait_out_propagation(refuse, "creating", sleep=sleep)
    assert 0 < sum(sleeps) <= deploy.PROPAGATION_TIMEOUT

    def other():
        raise ClientError({"Error": {"Code": "InvalidParameterValueException",
                                     "Message": "Unsupported runtime"}}, "CreateFunction")

    with pytest.raises(ClientError):
        deploy.wait_out_propagation(other, "creating", sleep=sleep)
    assert sum(sleeps) <= deploy.PROPAGATION_TIMEOUT  # not waited for


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


def test_deploy_waits_until_ec2_accepts_a_new_instance_profile():
    """Right after an instance profile is made, EC2 refuses it in RunInstances for a while
    (InvalidParameterValue, "Invalid IAM Instance Profile name"; IAM is eventually
    consistent), so the first uploads after a deploy would fail. moto accepts at once."""
    sleeps = []
    ec2, stub = stubbed_ec2(("InvalidParameterValue", BAD_PROFILE),
                            ("InvalidParameterValue", BAD_PROFILE), ACCEPTED)
    assert deploy.wait_until_ec2_accepts_profile(ec2, "su2cw_worker", sleep=sleeps.append)
    stub.assert_no_pending_responses()
    assert sleeps == [deploy.PROFILE_WAIT_DELAY] * 2

    # Any other refusal is not waited for; a profile never accepted stops after a bounded wait.
    ec2, stub = stubbed_ec2(("UnauthorizedOperation", "You are not authorized"))
    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        deploy.wait_until_ec2_accepts_profile(ec2, "su2cw_worker", sleep=sleeps.append)
    assert len(sleeps) == 2
    ec2, stub = stubbed_ec2(*[("InvalidParameterValue", BAD_PROFILE)] * 100)
    with pytest.raises(ClientError, match="Invalid IAM Instance Profile"):
        deploy.wait_until_ec2_accepts_profile(ec2, "su2cw_worker", sleep=sleeps.append)
    assert 0 < sum(sleeps) <= deploy.PROFILE_WAIT_SECONDS + 2 * deploy.PROFILE_WAIT_DELAY


def test_deploy_asks_ec2_with_a_dry_run_launch_from_the_worker_template(clients, names):
    from support import record_calls
    calls = record_calls(clients("ec2"))
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    dry_runs = [params for name, params in calls if name == "RunInstances"]
    assert dry_runs == [{"LaunchTemplate": {"LaunchTemplateName": names.launch_template,
                                            "Version": "$Latest"},
                         "MinCount": 1, "MaxCount": 1, "DryRun": True}]


# --- 4. limits checked for the worst case at deploy time --------------------------------

WORST_KEY = "k" * 1024  # S3 keys go up to 1,024 bytes of UTF-8


def user_data_size(command, key):
    template = (REPO / deploy.BOOTSTRAP_KEY).read_text(encoding="utf-8")
    settings = dict(lambda_function.load_settings({"AWS_REGION": "us-east-1"}),
                    SOFTWARE_BUCKET=f"su2c-software-{ACCOUNT}-us-east-1", COMMAND=command)
    obj = {"bucket": f"su2c-data-{ACCOUNT}-us-east-1", "key": key, "etag": "0" * 32}
    return len(lambda_function.render_user_data(template, obj, settings).encode("utf-8"))


def test_a_route_whose_user_data_fits_a_short_key_but_not_the_longest_is_refused(tmp_path):
    # A command that leaves room for a short key but not for a 1,024-byte one.
    base = user_data_size(["x"], "a.csv")
    command = ["x" * ((lambda_function.USER_DATA_LIMIT - base - 200) * 3 // 4)]  # base64: 4/3
    assert user_data_size(command, "a.csv") <= lambda_function.USER_DATA_LIMIT
    routes = write_routes(tmp_path, {"name": "long-command", "match": "tools/*",
                                     "launch_template": "su2cw_worker", "command": command})
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False), routes_file=routes)
    message = str(caught.value)
    assert "'long-command'" in message and "16,384" in message and "1,024-byte key" in message


def test_the_shipped_routes_and_defaults_pass_every_limit():
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    routes = deploy.load_routes_file(deploy.ROUTES_FILE)
    assert deploy.limit_problems(names, routes, environ={}) == []


@pytest.mark.parametrize("route, environ, words", [
    ({"watchdog_minutes": 10, "worker_timeout_seconds": 3600}, {},
     ["'timed'", "worker_timeout_seconds 3600", "600 s"]),
    ({"worker_timeout_seconds": 7200}, {}, ["'timed'", "worker_timeout_seconds 7200", "7200 s"]),
    ({"watchdog_minutes": 10 ** 12}, {}, ["'timed'", "watchdog_minutes"]),
    ({}, {"WATCHDOG_MINUTES": "1"}, ["WATCHDOG_MINUTES=1", "60 s"]),
])
def test_a_worker_time_limit_that_cannot_end_before_the_watchdog_is_refused(route, environ, words):
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    routes = [dict({"name": "timed", "match": "t/*", "launch_template": "su2cw_worker"}, **route)]
    problems = deploy.limit_problems(names, routes, environ)
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0]


def test_a_function_timeout_too_short_for_one_record_is_refused(monkeypatch):
    monkeypatch.setattr(preflight, "FUNCTION_TIMEOUT", 12)  # where limit_problems reads it
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    (problem,) = deploy.limit_problems(names, [], {})
    assert "function timeout 12 s" in problem and "10 s" in problem


def test_names_past_their_service_limits_are_refused_before_any_call(tmp_path):
    long_region = "xx-" + "y" * 30 + "-1"  # 35 characters: role names pass 64
    names = deploy.derive_names("a" * 20, ACCOUNT, long_region, data_bucket="d-b",
                                software_bucket="s-b")
    problems = deploy.limit_problems(names, [], {})
    assert any("role name" in p and "64" in p and names.lambda_role in p for p in problems)
    with pytest.raises(deploy.DeployError, match="64"):
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path))


def test_a_launch_template_name_from_the_environment_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("LAUNCH_TEMPLATE", "t" * 129)
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError, match="LAUNCH_TEMPLATE.*128"):
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path))


def test_a_routing_table_whose_launcher_policy_passes_iams_size_limit_is_refused(tmp_path):
    routes = [{"name": f"r{i}", "match": f"r{i}/*", "launch_template": f"su2cw_worker_{i}"}
              for i in range(120)]
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path, *routes))
    assert "10,240" in str(caught.value) and "121 launch templates" in str(caught.value)


def test_environment_and_tag_limits_name_the_setting():
    big = {"LAUNCH_TEMPLATE": "t" * 128, "PADDING": "p" * 4000}
    (problem,) = deploy.environment_problems(big)
    assert "4 KB" in problem and "PADDING" in problem
    (problem,) = deploy.tag_problems({"awsfun:launch-template": "t" * 257}, "instance tags")
    assert "awsfun:launch-template" in problem and "256" in problem


def test_report_keys_of_the_longest_key_stay_within_s3s_limit_and_are_skipped():
    for suffix in (".json", ".error.json", ".log"):
        report = AwsS3.report_key(WORST_KEY, suffix)
        assert len(report.encode("utf-8")) <= 1024
    assert deploy.report_key_problems(lambda_function.DEFAULTS["SKIP_SUBSTRING"]) == []
    (problem,) = deploy.report_key_problems("reports")
    assert "SKIP_SUBSTRING" in problem and "analysis/" in problem
