"""awsfun_deploy.s3 on a moto server: published files, public access, buckets deploy did not
create, and the data bucket's event notifications beside other consumers'.
"""

import json

import boto3
import pytest

import deploy
from conftest import REPO
from deploy_helpers import (
    DENIED, USER_TAGS, account_snapshot, anonymous_s3, bucket_tags, changes, error_of,
    make_user_bucket, other_consumers,
)


def test_publish_refuses_anything_off_the_allowlist(local_aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="software-test")
    for key in ("private/notes.txt", "README.md"):
        with pytest.raises(deploy.DeployError):
            deploy.publish_software(s3, "software-test", (key,))
    assert "Contents" not in s3.list_objects_v2(Bucket="software-test")


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


def test_other_consumers_notifications_are_kept_by_deploy_and_teardown(clients):
    s3 = clients("s3")
    make_user_bucket(s3, "lab-inputs")
    theirs = other_consumers(clients("sqs"), boto3.client("sns"))
    s3.put_bucket_notification_configuration(Bucket="lab-inputs",
                                             NotificationConfiguration=theirs)
    names = deploy.resolve_names(clients, data_bucket="lab-inputs")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    config = deploy.notification_config(s3, "lab-inputs")
    assert [c["Id"] for c in config["TopicConfigurations"]] == \
        [theirs["TopicConfigurations"][0]["Id"]]
    assert [c["Id"] for c in config["QueueConfigurations"]] == \
        [theirs["QueueConfigurations"][0]["Id"], names.notification_id]
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


@pytest.mark.parametrize("location, region", [
    (None, "us-east-1"), ("", "us-east-1"), ("EU", "eu-west-1"), ("eu-central-1", "eu-central-1"),
])
def test_bucket_location_quirks_become_region_names(location, region):
    """GetBucketLocation answers None for us-east-1 and the legacy "EU" for eu-west-1."""
    assert deploy.location_region(location) == region
