"""awsfun_deploy.ec2 on a moto server: launch templates, their image, the workers' security group,
and EC2's acceptance of a new instance profile.
"""

import pytest
from botocore.exceptions import ClientError

import deploy
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
