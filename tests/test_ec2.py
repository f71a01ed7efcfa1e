"""awsfun_deploy.ec2 on a moto server: launch templates, their image, the workers' security group,
and EC2's acceptance of a new instance profile.
"""

import pytest
from botocore.exceptions import ClientError

import deploy
from awsfun_deploy import ec2 as ec2_module
from deploy_helpers import ACCEPTED, BAD_PROFILE, changes, stubbed_ec2, template_data


def test_changed_instance_type_adds_one_version_and_makes_it_default(clients, names, deployed):
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, instance_type="t3.micro", progress=progress)
    # The launcher's policy names the instance types it may start, so it follows: widened to
    # both types before the template changes, narrowed to the new one after.
    assert [(s["what"], s["outcome"]) for s in changes(progress)] == \
        [("launcher role", deploy.UPDATED), ("launch template", deploy.UPDATED),
         ("launcher role", deploy.UPDATED)]
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


def test_an_unowned_template_of_the_stacks_name_is_claimed_before_it_is_changed(clients, names):
    """The deployer's policy (iam/deployer-policy.json) lets it add versions only to launch
    templates tagged awsfun:stack=PREFIX, so a template of the stack's name that carries no
    such tag is tagged first; changed first, the real account would refuse the version."""
    ec2 = clients("ec2")
    ec2.create_launch_template(LaunchTemplateName=names.launch_template,
                               LaunchTemplateData={"InstanceType": "t3.micro"})
    calls = []
    for operation in ("CreateTags", "CreateLaunchTemplateVersion", "ModifyLaunchTemplate"):
        ec2.meta.events.register(f"before-call.ec2.{operation}",
                                 lambda event_name, **_: calls.append(event_name.split(".")[-1]))
    deploy.ensure_launch_template(ec2, names, {"InstanceType": "t3.small"},
                                  deploy.Progress(echo=False))
    assert calls == ["CreateTags", "CreateLaunchTemplateVersion", "ModifyLaunchTemplate"]
    template_id = deploy.read_launch_template(ec2, names.launch_template)["id"]
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [template_id]}])["Tags"]
    assert [(t["Key"], t["Value"]) for t in tags] == [(deploy.STACK_TAG, names.prefix)]


def test_deploy_waits_out_a_launch_template_ec2_does_not_find_yet():
    """A launch template made seconds ago may not be found by the next call (EC2 Developer
    Guide, "Eventual consistency in the Amazon EC2 API"): the dry-run launch that follows its
    creation waits that out as it waits out the instance profile."""
    sleeps = []
    not_found = ("The specified launch template, with template name su2cw_worker, does not "
                 "exist.")
    ec2, stub = stubbed_ec2(("InvalidLaunchTemplateName.NotFoundException", not_found), ACCEPTED)
    assert deploy.wait_until_ec2_accepts_profile(ec2, "su2cw_worker", sleep=sleeps.append)
    stub.assert_no_pending_responses()
    assert sleeps == [deploy.PROFILE_WAIT_DELAY]


def test_a_new_security_group_ec2_does_not_find_yet_is_waited_for(clients, names):
    """CreateSecurityGroup, then at once a call naming the new group, may answer
    InvalidGroup.NotFound (EC2 Developer Guide, "Eventual consistency in the Amazon EC2 API",
    which names this very pair). moto finds it at once, so each first call by id is refused
    here as EC2 may; deploy waits (DescribeSecurityGroups by id, then retries the rule change)
    and ends with the same group: no inbound, HTTPS out."""
    from botocore.awsrequest import AWSResponse
    ec2 = clients("ec2")
    refused = []

    asked = {}
    ec2.meta.events.register("provide-client-params.ec2.DescribeSecurityGroups",
                             lambda params, **_: asked.update(by_id="GroupIds" in params))

    def not_yet(operation):
        def refuse(**_):
            if operation in refused or (operation == "DescribeSecurityGroups"
                                        and not asked["by_id"]):
                return None
            refused.append(operation)
            return (AWSResponse(None, 400, {}, None),
                    {"Error": {"Code": "InvalidGroup.NotFound",
                               "Message": "The security group does not exist"},
                     "ResponseMetadata": {"HTTPStatusCode": 400}})
        return refuse

    for operation in ("DescribeSecurityGroups", "AuthorizeSecurityGroupEgress"):
        ec2.meta.events.register(f"before-call.ec2.{operation}", not_yet(operation))
    sleeps = []
    vpc_id = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0][
        "VpcId"]
    group_id = ec2_module.ensure_security_group(ec2, names, vpc_id, deploy.Progress(echo=False),
                                                sleep=sleeps.append)
    assert refused == ["DescribeSecurityGroups", "AuthorizeSecurityGroupEgress"]
    assert sleeps == [3.0]
    (group,) = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"]
    assert group["IpPermissions"] == []
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in group["IpPermissionsEgress"]] \
        == [("tcp", 443, 443)]


def test_teardown_terminates_workers_in_batches_ec2_takes(clients, names):
    """TerminateInstances takes "up to 1000 instance IDs" (EC2 API Reference): teardown sends
    the workers in batches (here of 2, of 1,000 for real) and waits for each batch."""
    from support import record_calls, worker_image_id
    ec2 = clients("ec2")
    image = worker_image_id(clients("ssm"))
    ec2.run_instances(ImageId=image, MinCount=5, MaxCount=5, TagSpecifications=[{
        "ResourceType": "instance",
        "Tags": [{"Key": "awsfun:launch-template", "Value": names.launch_template}]}])
    calls = record_calls(ec2)
    ended = ec2_module.terminate_workers(ec2, names, deploy.Progress(echo=False), batch=2)
    batches = [params["InstanceIds"] for name, params in calls if name == "TerminateInstances"]
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert sorted(i for batch in batches for i in batch) == sorted(ended)
    assert len(ended) == 5
    waited = [params["InstanceIds"] for name, params in calls
              if name == "DescribeInstances" and "InstanceIds" in params]
    assert [len(batch) for batch in waited] == [2, 2, 1]
