"""Deploy's capacity settings on moto: the events queue, the cap, spot, and network placement."""

import json

import pytest
from botocore.awsrequest import AWSResponse
from deploy_helpers import count_everything

import deploy
from awsfun_deploy import sqs as sqs_module
from awsfun_deploy.function import FUNCTION_TIMEOUT


def test_the_redrive_spans_a_day_and_the_visibility_follows_lambdas_advice():
    """Lambda: a queue's visibility timeout at least six times the function's timeout; the
    dead-letter queue only after receives spanning at least a day (the issue's rule)."""
    assert sqs_module.EVENTS_VISIBILITY_SECONDS >= 6 * FUNCTION_TIMEOUT
    assert sqs_module.MAX_RECEIVE_COUNT * sqs_module.EVENTS_VISIBILITY_SECONDS >= 24 * 3600
    assert 1 <= sqs_module.MAX_RECEIVE_COUNT <= 1000  # SQS's range for maxReceiveCount
    # SQS keeps a message's first enqueue time when it dead-letters it: the DLQ keeps longer.
    assert int(sqs_module.DLQ_ATTRIBUTES["MessageRetentionPeriod"]) > \
        sqs_module.EVENTS_RETENTION_SECONDS


def no_default_vpc(ec2):
    """Make DescribeVpcs (which deploy asks only for the default VPC) answer as in a region
    whose default VPC was deleted."""
    def answer(**_):
        return AWSResponse(None, 200, {}, None), {"Vpcs": []}

    ec2.meta.events.register_first("before-call.ec2.DescribeVpcs", answer)


def test_no_default_vpc_and_no_subnets_fails_naming_the_option_before_any_change(clients, names):
    no_default_vpc(clients("ec2"))
    before = count_buckets(clients)
    with pytest.raises(deploy.DeployError, match="--subnets") as raised:
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    assert "default VPC" in str(raised.value)
    assert count_buckets(clients) == before == 0


def count_buckets(clients):
    return len(clients("s3").list_buckets()["Buckets"])


def own_vpc(ec2):
    """A VPC of the user's with two subnets in two zones (no default VPC needed)."""
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{n}.0/24",
                                 AvailabilityZone=f"us-east-1{zone}")["Subnet"]["SubnetId"]
               for n, zone in ((1, "a"), (2, "b"))]
    return vpc, subnets


def test_subnets_spot_and_the_cap_reach_the_template_and_the_function(clients, names):
    """--subnets: the worker template's network interface is in the first subnet with the
    stack's group, made in that subnets' VPC; the function holds MAX_WORKERS, SPOT and the
    subnets and groups it falls back through. Re-running changes nothing; status sees no
    drift; teardown finds the group in that VPC."""
    ec2 = clients("ec2")
    no_default_vpc(ec2)
    vpc, subnets = own_vpc(ec2)
    options = {"max_workers": 5, "spot": True, "subnets": subnets}
    result = deploy.deploy(clients, names, progress=deploy.Progress(echo=False), **options)
    group = result["security_group_id"]
    assert ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["VpcId"] == vpc
    data = ec2.describe_launch_template_versions(
        LaunchTemplateName=names.launch_template, Versions=["$Latest"])[
        "LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert "SecurityGroupIds" not in data
    (interface,) = data["NetworkInterfaces"]
    assert (interface["DeviceIndex"], interface["SubnetId"], interface["Groups"]) == \
        (0, subnets[0], [group])
    env = clients("lambda").get_function_configuration(FunctionName=names.function_name)[
        "Environment"]["Variables"]
    assert (env["MAX_WORKERS"], env["SPOT"], env["SUBNET_IDS"], env["SECURITY_GROUP_IDS"]) == \
        ("5", "1", ",".join(subnets), group)
    # The first spot launch needs EC2's service-linked role for spot: deploy made it.
    spot_role = {"PathPrefix": "/aws-service-role/spot.amazonaws.com/"}
    assert len(clients("iam").list_roles(**spot_role)["Roles"]) == 1

    before = count_everything(clients)
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=again, **options)
    assert not again.changed(), [s for s in again.steps if s["outcome"] != deploy.IN_PLACE]
    assert count_everything(clients) == before
    assert deploy.collect_status(clients, names)["drift"] == []

    deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc]}, {
        "Name": "group-name", "Values": [names.worker_security_group]}])["SecurityGroups"] == []
    # Account-wide and AWS's: anything else asking for spot may rely on it.
    assert len(clients("iam").list_roles(**spot_role)["Roles"]) == 1


def test_subnets_of_two_vpcs_or_groups_of_another_are_refused_before_any_change(clients,
                                                                                  names):
    ec2 = clients("ec2")
    _, first = own_vpc(ec2)
    other = ec2.create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    stray = ec2.create_subnet(VpcId=other, CidrBlock="10.30.1.0/24")["Subnet"]["SubnetId"]
    with pytest.raises(deploy.DeployError, match="--subnets .*2 VPCs"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                      subnets=[first[0], stray])
    foreign = ec2.create_security_group(GroupName="theirs", Description="x", VpcId=other)[
        "GroupId"]
    with pytest.raises(deploy.DeployError, match=f"--security-groups: {foreign}"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False), subnets=first,
                      security_groups=[foreign])
    assert count_buckets(clients) == 0


def test_a_deployment_made_before_the_queue_moves_its_events_to_the_queue(clients, names,
                                                                           deployed):
    """An older deploy sent ObjectCreated to the function, with S3's invoke permission: a
    redeploy sends them to the queue instead and withdraws the permission."""
    s3, lam = clients("s3"), clients("lambda")
    config = deploy.notification_config(s3, names.data_bucket)
    config.pop("QueueConfigurations")
    config["LambdaFunctionConfigurations"] = [{
        "Id": names.notification_id, "LambdaFunctionArn": deployed[0]["function_arn"],
        "Events": ["s3:ObjectCreated:*"]}]
    s3.put_bucket_notification_configuration(Bucket=names.data_bucket,
                                             NotificationConfiguration=config)
    deploy.ensure_s3_invoke_permission(lam, names, deploy.Progress(echo=False))
    drift = deploy.collect_status(clients, names)["drift"]
    assert {"resource": "object-created event", "name": names.data_bucket,
            "problem": "missing"} in drift
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress)
    config = deploy.notification_config(s3, names.data_bucket)
    assert "LambdaFunctionConfigurations" not in config
    assert [c["Id"] for c in config["QueueConfigurations"]] == [names.notification_id]
    assert ("S3 invoke permission", deploy.DELETED) in {(s["what"], s["outcome"])
                                                        for s in progress.steps}


def test_status_shows_the_queue_depth_and_the_deferred(clients, names, deployed):
    sqs = clients("sqs")
    url = deployed[0]["events_queue_url"]
    sqs.purge_queue(QueueUrl=url)  # S3's s3:TestEvent from saving the notification
    for n in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"n": n}))
    # A deferred message: received, not deleted, hidden for its visibility timeout.
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, VisibilityTimeout=300)
    status = deploy.collect_status(clients, names)
    assert (status["events_waiting"], status["events_deferred"], status["max_workers"]) == \
        (2, 1, 16)
    assert status["events_queue"] == names.events_queue
