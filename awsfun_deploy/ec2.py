"""The worker launch templates, their AMI, and the workers they start."""

from __future__ import annotations

import logging
import os
import time

from botocore.exceptions import ClientError, WaiterError
from botocore.parsers import ResponseParserError

from .core import (
    CREATED, DELETED, DeployError, GONE, IN_PLACE, UPDATED, error_code, is_not_found,
    log_client_error, mismatches, retry_while, tag_list, wait_out_propagation,
)
from .names import BUCKET_TAG, STACK_TAG, TOKEN_TAG, WORKER_KEY_TAG, WORKER_TAG

logger = logging.getLogger("awsfun.deploy")
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
AMI_FALLBACK_NAME = "al2023-ami-2023.*-kernel-*-{arch}"
ROOT_VOLUME_MIN_GIB = 8


def instance_architecture(ec2, instance_type):
    """Return "arm64" or "x86_64" for an instance type, so the AMI matches it."""
    try:
        types = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    except ClientError as err:
        if error_code(err) in ("InvalidInstanceType", "InvalidParameterValue"):
            raise DeployError(f"--instance-type {instance_type}: not an instance type "
                              "this region offers") from None
        log_client_error(err, f"describing instance type {instance_type}")
        raise
    architectures = types[0]["ProcessorInfo"]["SupportedArchitectures"] if types else []
    return "arm64" if architectures and "x86_64" not in architectures else "x86_64"


def latest_worker_ami(ssm, ec2, architecture):
    """Return (image id, where it came from): the public SSM parameter for Amazon Linux 2023."""
    parameter = AMI_PARAMETER.format(arch=architecture)
    try:
        return ssm.get_parameter(Name=parameter)["Parameter"]["Value"], parameter
    except ClientError as err:
        if not is_not_found(err):
            log_client_error(err, f"reading SSM parameter {parameter}")
            raise
    # Some partitions and emulators lack the parameter: take Amazon's newest AL2023 image.
    pattern = AMI_FALLBACK_NAME.format(arch=architecture)
    logger.warning("SSM parameter %s not found; using the newest Amazon-owned image named %s",
                   parameter, pattern)
    images = ec2.describe_images(Owners=["amazon"], Filters=[
        {"Name": "name", "Values": [pattern]},
        {"Name": "architecture", "Values": [architecture]},
        {"Name": "state", "Values": ["available"]},
    ])["Images"]
    if not images:
        raise DeployError(f"no Amazon Linux 2023 image found: neither {parameter} nor an image "
                          f"named {pattern} exists in this region")
    newest = max(images, key=lambda image: image.get("CreationDate", ""))
    return newest["ImageId"], f"newest image named {pattern}"


def root_device(ec2, image_id):
    """Return (root device name, root volume GiB) of an image, with safe defaults."""
    try:
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    except (ClientError, IndexError) as err:
        logger.warning("cannot describe image %s (%s); assuming /dev/xvda, %s GiB",
                       image_id, err, ROOT_VOLUME_MIN_GIB)
        return "/dev/xvda", ROOT_VOLUME_MIN_GIB
    device = image.get("RootDeviceName", "/dev/xvda")
    size = ROOT_VOLUME_MIN_GIB
    for mapping in image.get("BlockDeviceMappings", []):
        if mapping.get("DeviceName") == device:
            size = max(size, int(mapping.get("Ebs", {}).get("VolumeSize") or 0))
    return device, size


def worker_launch_template_data(image_id, instance_type, profile_name, device, size, prefix,
                                security_group_id=None, subnet_id=None, group_ids=None):
    """Return the LaunchTemplateData of the worker template (pure).

    Network: the security groups `group_ids` (default: [security_group_id]); with a subnet
    (./deploy.sh --subnets, its first), a network interface in that subnet holding them,
    which the handler's NetworkInterfaces override moves to another subnet; without one,
    the default VPC's default subnets.
    """
    tags = tag_list({STACK_TAG: prefix, "awsfun:role": "worker"})
    groups = list(group_ids or ([security_group_id] if security_group_id else []))
    if subnet_id:
        network = {"NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": subnet_id,
                                          **({"Groups": groups} if groups else {})}]}
    else:
        network = {"SecurityGroupIds": groups} if groups else {}
    return {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "IamInstanceProfile": {"Name": profile_name},
        **network,
        # Shutting down at the end of the job must end the bill, not leave a stopped machine.
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": [{
            "DeviceName": device,
            # The size is explicit (never below the image's) because EC2 needs one for gp3 here.
            "Ebs": {"VolumeSize": size, "VolumeType": "gp3", "Encrypted": True,
                    "DeleteOnTermination": True},
        }],
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags}
                              for kind in ("instance", "volume")],
    }


AWS_MANAGED_EBS_ALIAS = "alias/aws/ebs"


def default_ebs_key(ec2, kms):
    """Return the ARN of the account's default EBS key in this region when it is customer
    managed, else None (the AWS-managed aws/ebs key, which needs no grant).

    The worker templates encrypt the root volume without naming a key, so EC2 uses this one
    (GetEbsDefaultKmsKeyId). A customer-managed key needs the launcher to hold kms:CreateGrant
    and friends on it, or every instance goes pending -> terminated (Client.InternalError)
    (EC2 User Guide, "Required AWS KMS key policy for use with encrypted volumes"). A local
    endpoint (AWS_ENDPOINT_URL set) that cannot answer, as moto cannot, counts as aws/ebs.
    """
    try:
        key_id = ec2.get_ebs_default_kms_key_id()["KmsKeyId"]
    except (ClientError, ResponseParserError) as err:
        local = os.environ.get("AWS_ENDPOINT_URL")
        if local and (isinstance(err, ResponseParserError)
                      or error_code(err) in ("NotImplemented", "InvalidAction")):
            # moto answers an action it lacks with an HTML 500 page (botocore cannot parse
            # it): an emulator's gap, not the account's answer, so one line, and only with -v.
            logger.info("%s does not implement GetEbsDefaultKmsKeyId (%s); taking the "
                        "AWS-managed aws/ebs key", local,
                        "HTTP 500" if isinstance(err, ResponseParserError) else error_code(err))
            return None
        if isinstance(err, ClientError):
            log_client_error(err, "reading the default EBS encryption key")
        raise
    if key_id in (AWS_MANAGED_EBS_ALIAS, ""):
        return None
    metadata = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    return metadata["Arn"] if metadata.get("KeyManager") == "CUSTOMER" else None


def read_launch_template(ec2, name):
    """Return the template's id, versions, tags and latest data, or None."""
    try:
        template = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"][0]
    except ClientError as err:
        if is_not_found(err) or error_code(err) == "InvalidLaunchTemplateName.NotFound":
            return None
        log_client_error(err, f"reading launch template {name}")
        raise
    latest = ec2.describe_launch_template_versions(
        LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest"],
    )["LaunchTemplateVersions"][0]
    return {
        "id": template["LaunchTemplateId"],
        "default_version": template["DefaultVersionNumber"],
        "latest_version": template["LatestVersionNumber"],
        "tags": {t["Key"]: t["Value"] for t in template.get("Tags", [])},
        "data": latest["LaunchTemplateData"],
    }


def ensure_launch_template(ec2, names, data, progress, name=None, sleep=time.sleep):
    """Create the template (default: the worker template), or add a version only when `data`
    changed; keep the newest version the default. Return the template's id."""
    name = name or names.launch_template
    template = read_launch_template(ec2, name)
    if template is None:
        # The instance profile in `data` may have been created seconds ago.
        created = wait_out_propagation(lambda: ec2.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data,
            VersionDescription="deploy.sh",
            TagSpecifications=[{"ResourceType": "launch-template",
                                "Tags": tag_list({STACK_TAG: names.prefix})}],
        ), f"creating launch template {name}", sleep)["LaunchTemplate"]
        progress.record(CREATED, "launch template", name,
                        f"version 1, {data['InstanceType']}")
        return created["LaunchTemplateId"]
    owner = template["tags"].get(STACK_TAG)
    if owner and owner != names.prefix:
        hint = ("set LAUNCH_TEMPLATE to use another name" if name == names.launch_template
                else "name another launch_template in the routing table")
        raise DeployError(f"launch template {name} belongs to deployment {owner!r}; {hint}")
    if not owner:
        # Claimed first: the deployer's policy lets it change only templates carrying the
        # stack's tag (iam/deployer-policy.json).
        ec2.create_tags(Resources=[template["id"]], Tags=tag_list({STACK_TAG: names.prefix}))
    differences = mismatches(data, template["data"])
    version = template["latest_version"]
    if differences:
        version = wait_out_propagation(lambda: ec2.create_launch_template_version(
            LaunchTemplateId=template["id"], LaunchTemplateData=data,
            VersionDescription="deploy.sh",
        ), f"adding a version to launch template {name}", sleep)[
            "LaunchTemplateVersion"]["VersionNumber"]
    if differences or template["default_version"] != version:
        ec2.modify_launch_template(LaunchTemplateId=template["id"], DefaultVersion=str(version))
        if differences:
            detail = f"version {version}: " + ", ".join(differences)
        else:
            detail = f"default version {version}"
        progress.record(UPDATED, "launch template", name, detail)
    else:
        progress.record(IN_PLACE, "launch template", name, f"version {version}")
    return template["id"]


# How EC2 refuses an instance profile it does not know yet: InvalidParameterValue, "Value (...)
# for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name".
PROFILE_NOT_YET = ("Invalid IAM Instance Profile", "iamInstanceProfile")
# A resource made seconds ago may not be found yet by the next call (EC2 Developer Guide,
# "Eventual consistency in the Amazon EC2 API"): a launch template, a security group.
TEMPLATE_NOT_YET = ("InvalidLaunchTemplateName.NotFoundException",
                    "InvalidLaunchTemplateId.NotFound")
GROUP_NOT_YET = ("InvalidGroup.NotFound",)
PROFILE_WAIT_SECONDS = 120.0
PROFILE_WAIT_DELAY = 5.0


def wait_until_ec2_accepts_profile(ec2, name, sleep=time.sleep, timeout=PROFILE_WAIT_SECONDS,
                                   delay=PROFILE_WAIT_DELAY):
    """Return once a DryRun RunInstances from launch template `name` is accepted.

    An instance profile made (or re-made) seconds ago is refused by RunInstances for a while
    (IAM is eventually consistent; EC2 User Guide, "IAM roles for Amazon EC2": "it can take a
    few seconds" before a new profile can be used), so the first uploads after a deploy would
    fail. DryRunOperation means accepted; a refusal naming the instance profile, or a template
    EC2 does not find yet (eventual consistency, TEMPLATE_NOT_YET), is waited out (at most
    `timeout` s); any other refusal (e.g. UnauthorizedOperation, no default VPC) and the last
    are logged and raised as ClientError.
    """
    def dry_run():
        try:
            ec2.run_instances(LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
                              MinCount=1, MaxCount=1, DryRun=True)
        except ClientError as err:
            if error_code(err) == "DryRunOperation":
                return True
            raise
        return True

    return retry_while(PROFILE_NOT_YET + TEMPLATE_NOT_YET, dry_run,
                       f"checking that EC2 accepts the instance profile of {name}",
                       timeout=timeout, delay=delay, sleep=sleep)


def find_workers(ec2, launch_templates, states=("pending", "running")):
    """Return the workers launched from the template(s) (by the handler's tag) in the given states."""
    if isinstance(launch_templates, str):
        launch_templates = [launch_templates]
    workers = []
    paginator = ec2.get_paginator("describe_instances")
    for page in paginator.paginate(Filters=[
        {"Name": f"tag:{WORKER_TAG}", "Values": sorted(set(launch_templates))},
        {"Name": "instance-state-name", "Values": list(states)},
    ]):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                workers.append({
                    "instance_id": instance["InstanceId"],
                    "state": instance["State"]["Name"],
                    "bucket": tags.get(BUCKET_TAG, ""),
                    "key": tags.get(WORKER_KEY_TAG, ""),
                    "token": tags.get(TOKEN_TAG, ""),
                    "launch_template": tags.get(WORKER_TAG, ""),
                    "launch_time": instance["LaunchTime"],
                })
    return workers


# TerminateInstances takes "up to 1000 instance IDs" (EC2 API Reference), and so does the
# waiter's DescribeInstances here.
TERMINATE_BATCH = 1000


def terminate_workers(ec2, names, progress, wait=True, templates=None, batch=TERMINATE_BATCH):
    """Terminate every worker still alive so teardown orphans none; wait (bounded) for it."""
    templates = templates or [names.launch_template]
    workers = find_workers(ec2, templates, states=("pending", "running", "stopping", "stopped"))
    if not workers:
        progress.record(GONE, "running workers", ", ".join(templates), "none")
        return []
    ids = [w["instance_id"] for w in workers]
    batches = [ids[start:start + batch] for start in range(0, len(ids), batch)]
    for some in batches:
        ec2.terminate_instances(InstanceIds=some)
    if wait:
        try:
            for some in batches:
                ec2.get_waiter("instance_terminated").wait(
                    InstanceIds=some, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
        except WaiterError as err:
            # Termination is already requested and cannot be taken back; carry on.
            logger.warning("workers still terminating after 5 minutes: %s", err)
    for worker in workers:
        progress.record(DELETED, "worker", worker["instance_id"], worker["key"])
    return ids


def delete_launch_template(ec2, names, progress, name=None):
    """Delete a launch template (default: the worker template); tolerate it being gone."""
    name = name or names.launch_template
    template = read_launch_template(ec2, name)
    if template is None:
        progress.record(GONE, "launch template", name)
        return
    ec2.delete_launch_template(LaunchTemplateId=template["id"])
    progress.record(DELETED, "launch template", name)


def stack_launch_templates(ec2, names):
    """Return the names of the launch templates tagged as this deployment's, the worker template first."""
    found = []
    for page in ec2.get_paginator("describe_launch_templates").paginate(
            Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [names.prefix]}]):
        found += [t["LaunchTemplateName"] for t in page["LaunchTemplates"]]
    return [names.launch_template] + sorted(set(found) - {names.launch_template})


def remove_unrouted_templates(ec2, names, wanted, progress):
    """Delete this deployment's launch templates that the routing table no longer names."""
    for name in stack_launch_templates(ec2, names):
        if name not in wanted:
            # Running workers keep running; only new launches from it stop being possible.
            delete_launch_template(ec2, names, progress, name)


def plan_templates(ec2, types):
    """Return {launch template: (instance type, architecture)}, checking every type before anything is made."""
    architectures = {kind: instance_architecture(ec2, kind) for kind in sorted(set(types.values()))}
    return {name: (kind, architectures[kind]) for name, kind in types.items()}


def plan_images(ec2, ssm, plan):
    """Return {architecture: (image id, (root device, GiB))} for the planned templates (reads only)."""
    images = {}
    for architecture in sorted({arch for _, arch in plan.values()}):
        image_id, source = latest_worker_ami(ssm, ec2, architecture)
        logger.info("worker image %s (%s) from %s", image_id, architecture, source)
        images[architecture] = (image_id, root_device(ec2, image_id))
    return images


def ensure_launch_templates(ec2, ssm, names, plan, progress, images=None, security_group_id=None,
                            volume_sizes=None, subnet_id=None, group_ids=None):
    """Create or update each planned launch template; return ({name: id}, {architecture: image id}).

    volume_sizes: {name: GiB} from the routes' root_volume_gib; never below the image's own.
    subnet_id, group_ids: the network (worker_launch_template_data).
    """
    images, ids = images or plan_images(ec2, ssm, plan), {}
    for name, (kind, architecture) in plan.items():
        image_id, (device, size) = images[architecture]
        size = max(size, (volume_sizes or {}).get(name, 0))
        data = worker_launch_template_data(image_id, kind, names.worker_instance_profile,
                                           device, size, names.prefix, security_group_id,
                                           subnet_id, group_ids)
        ids[name] = ensure_launch_template(ec2, names, data, progress, name)
    return ids, {arch: image_id for arch, (image_id, _) in images.items()}


# --- the workers' own security group ---------------------------------------------------------

# Workers take no connection and make only HTTPS ones: to S3 and the Amazon Linux package
# repository. DNS (the VPC resolver), NTP (169.254.169.123) and the instance metadata service
# are not filtered by security groups (VPC User Guide, "Security group rules").
WORKER_EGRESS = [{"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443,
                  "IpRanges": [{"CidrIp": "0.0.0.0/0",
                                "Description": "HTTPS to S3 and the package repository"}]}]


def default_vpc(ec2):
    """Return the region's default VPC id, where the templates launch without --subnets."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise DeployError("this region has no default VPC, where workers launch unless told "
                          "otherwise: name the subnets to launch them in with --subnets "
                          "subnet-a,subnet-b (or create a default VPC: aws ec2 "
                          "create-default-vpc)")
    return vpcs[0]["VpcId"]


def workers_vpc(ec2, subnets=(), security_groups=()):
    """Return the VPC the workers launch in: the subnets' one (--subnets), else the default
    VPC. DeployError, before any change, for a subnet or group that does not exist, subnets
    of two VPCs, or groups of another VPC (EC2 refuses a network interface whose groups
    belong to another VPC than its subnet)."""
    if not subnets:
        vpc_id = default_vpc(ec2)
    else:
        try:
            found = ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
        except ClientError as err:
            if error_code(err).startswith("InvalidSubnet"):
                raise DeployError(f"--subnets {','.join(subnets)}: {err.response['Error'].get('Message')}") from None
            raise
        vpcs = sorted({subnet["VpcId"] for subnet in found})
        if len(vpcs) != 1:
            raise DeployError(f"--subnets {','.join(subnets)}: the subnets are in {len(vpcs)} "
                              f"VPCs ({', '.join(vpcs)}); name subnets of one VPC")
        vpc_id = vpcs[0]
    if security_groups:
        try:
            groups = ec2.describe_security_groups(GroupIds=list(security_groups))[
                "SecurityGroups"]
        except ClientError as err:
            if error_code(err).startswith("InvalidGroup"):
                raise DeployError(f"--security-groups {','.join(security_groups)}: "
                                  f"{err.response['Error'].get('Message')}") from None
            raise
        elsewhere = sorted(g["GroupId"] for g in groups if g.get("VpcId") != vpc_id)
        if elsewhere:
            raise DeployError(f"--security-groups: {', '.join(elsewhere)} not in the workers' "
                              f"VPC {vpc_id}" + (" (the default VPC; name --subnets of "
                                                 "theirs)" if not subnets else ""))
    return vpc_id


def read_security_group(ec2, names, vpc_id):
    """Return the workers' security group in the VPC (its id, tags and rules), or None."""
    groups = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [names.worker_security_group]},
        {"Name": "vpc-id", "Values": [vpc_id]},
    ])["SecurityGroups"]
    return groups[0] if groups else None


def _rule_keys(permissions):
    """The (protocol, from, to, CIDR) of each rule, comparable across what AWS answers."""
    return {(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"), r["CidrIp"])
            for p in permissions for r in p.get("IpRanges", [])} | \
        {(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"), r["CidrIpv6"])
         for p in permissions for r in p.get("Ipv6Ranges", [])} | \
        {(p.get("IpProtocol"), p.get("FromPort"), p.get("ToPort"), g["GroupId"])
         for p in permissions for g in p.get("UserIdGroupPairs", [])}


def security_group_differences(group):
    """Return how the workers' security group differs from no inbound and HTTPS out (pure)."""
    if group is None:
        return ["missing"]
    found = ["inbound rules"] if group.get("IpPermissions") else []
    if _rule_keys(group.get("IpPermissionsEgress", [])) != _rule_keys(WORKER_EGRESS):
        found.append("outbound rules")
    return found


def ensure_security_group(ec2, names, vpc_id, progress, sleep=time.sleep):
    """Create or correct the workers' security group (no inbound; HTTPS out); return its id."""
    group = read_security_group(ec2, names, vpc_id)
    created = group is None
    if created:
        group_id = ec2.create_security_group(
            GroupName=names.worker_security_group, VpcId=vpc_id,
            Description=f"awsfun workers ({names.prefix}): no inbound, HTTPS out; deploy.sh",
            TagSpecifications=[{"ResourceType": "security-group",
                                "Tags": tag_list({STACK_TAG: names.prefix})}],
        )["GroupId"]
        # By id, until EC2 finds it (InvalidGroup.NotFound: eventual consistency); a search
        # by name could come back empty meanwhile.
        ec2.get_waiter("security_group_exists").wait(
            GroupIds=[group_id], WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    else:
        owner = {t["Key"]: t["Value"] for t in group.get("Tags", [])}.get(STACK_TAG)
        if owner != names.prefix:
            raise DeployError(f"security group {names.worker_security_group} in {vpc_id} was "
                              f"not made by this deployment (tag {STACK_TAG}={owner!r})")
        group_id = group["GroupId"]
    differences = security_group_differences(group)

    def change(call, **params):
        retry_while(GROUP_NOT_YET, lambda: call(GroupId=group_id, **params),
                    f"changing the rules of {names.worker_security_group}", timeout=60.0,
                    delay=3.0, sleep=sleep)

    if group.get("IpPermissions"):
        change(ec2.revoke_security_group_ingress, IpPermissions=group["IpPermissions"])
    if "outbound rules" in differences:
        # A new group allows all outbound traffic: replace that with HTTPS only.
        if group.get("IpPermissionsEgress"):
            change(ec2.revoke_security_group_egress, IpPermissions=group["IpPermissionsEgress"])
        change(ec2.authorize_security_group_egress, IpPermissions=WORKER_EGRESS)
    outcome = CREATED if created else (UPDATED if differences else IN_PLACE)
    progress.record(outcome, "worker security group", names.worker_security_group,
                    group_id if created else ", ".join(differences))
    return group_id


def find_stack_security_group(ec2, names):
    """Return the workers' security group this deployment made, in whichever VPC, or None."""
    groups = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [names.worker_security_group]},
        {"Name": f"tag:{STACK_TAG}", "Values": [names.prefix]},
    ])["SecurityGroups"]
    return groups[0] if groups else None


def delete_security_group(ec2, names, progress, sleep=time.sleep):
    """Delete the workers' security group (after the workers are gone); tolerate it being gone."""
    group = find_stack_security_group(ec2, names)
    if group is None:
        progress.record(GONE, "worker security group", names.worker_security_group)
        return
    # A terminated worker's network interface holds the group for a little while.
    retry_while(("DependencyViolation",),
                lambda: ec2.delete_security_group(GroupId=group["GroupId"]),
                f"deleting security group {names.worker_security_group}", timeout=300.0,
                delay=10.0, sleep=sleep)
    progress.record(DELETED, "worker security group", names.worker_security_group)
