"""The function's and the workers' roles and the workers' instance profile."""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from .core import (
    CREATED, DELETED, GONE, IN_PLACE, UPDATED, DeployError, _get_or_none, canonical,
    log_client_error, tag_list,
)
from .names import STACK_TAG


def read_role(iam, role_name):
    """Return the role's trust policy, inline policies and attached policies, or None."""
    found = _get_or_none(iam.get_role, f"reading role {role_name}", RoleName=role_name)
    if found is None:
        return None
    role = found["Role"]
    inline = {}
    for page in iam.get_paginator("list_role_policies").paginate(RoleName=role_name):
        for name in page["PolicyNames"]:
            inline[name] = iam.get_role_policy(RoleName=role_name, PolicyName=name)["PolicyDocument"]
    attached = []
    for page in iam.get_paginator("list_attached_role_policies").paginate(RoleName=role_name):
        attached += [p["PolicyArn"] for p in page["AttachedPolicies"]]
    return {"arn": role["Arn"], "trust": role["AssumeRolePolicyDocument"], "inline": inline,
            "attached": attached}


def role_differences(role, trust, policy_name, policy):
    """Return how a role read by read_role differs from its documents (pure)."""
    if role is None:
        return ["missing"]
    found = []
    if canonical(role["trust"]) != canonical(trust):
        found.append("trust policy")
    if policy_name not in role["inline"]:
        found.append(f"policy {policy_name} missing")
    elif canonical(role["inline"][policy_name]) != canonical(policy):
        found.append(f"policy {policy_name}")
    found += [f"extra policy {name}" for name in role["inline"] if name != policy_name]
    found += [f"attached policy {arn}" for arn in role["attached"]]
    return found


def create_stack_role(iam, role_name, trust, names, what):
    """Create a role of this stack (tagged, described as `what`) with `trust` as its trust
    policy, and wait until IAM answers for it."""
    iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(trust),
                    Description=f"awsfun {what} ({names.prefix}, {names.region}); "
                                "managed by deploy.sh",
                    Tags=tag_list({STACK_TAG: names.prefix}))
    iam.get_waiter("role_exists").wait(RoleName=role_name,
                                       WaiterConfig={"Delay": 2, "MaxAttempts": 30})


def ensure_role(iam, role_name, trust, policy_name, policy, names, progress, what):
    """Create or correct a role so it holds exactly one inline policy; return its ARN."""
    role = read_role(iam, role_name)
    if role is None:
        create_stack_role(iam, role_name, trust, names, what)
        iam.put_role_policy(RoleName=role_name, PolicyName=policy_name,
                            PolicyDocument=json.dumps(policy))
        progress.record(CREATED, what, role_name)
        return iam.get_role(RoleName=role_name)["Role"]["Arn"]
    differences = role_differences(role, trust, policy_name, policy)
    if "trust policy" in differences:
        iam.update_assume_role_policy(RoleName=role_name, PolicyDocument=json.dumps(trust))
    if any(d.startswith(f"policy {policy_name}") for d in differences):
        iam.put_role_policy(RoleName=role_name, PolicyName=policy_name,
                            PolicyDocument=json.dumps(policy))
    # Least privilege means nothing but our policy: drop what someone added by hand.
    for name in role["inline"]:
        if name != policy_name:
            iam.delete_role_policy(RoleName=role_name, PolicyName=name)
    for arn in role["attached"]:
        iam.detach_role_policy(RoleName=role_name, PolicyArn=arn)
    progress.record(UPDATED if differences else IN_PLACE, what, role_name, ", ".join(differences))
    return role["arn"]


def read_instance_profile(iam, name):
    """Return the instance profile (with its roles), or None."""
    found = _get_or_none(iam.get_instance_profile, f"reading instance profile {name}",
                         InstanceProfileName=name)
    return None if found is None else found["InstanceProfile"]


def ensure_instance_profile(iam, names, progress):
    """Create the worker instance profile holding exactly the worker role; return its ARN."""
    return ensure_profile_of(iam, names.worker_instance_profile, names.worker_role,
                             names.prefix, progress, "worker instance profile")


def ensure_profile_of(iam, name, role, prefix, progress, what):
    """Create instance profile `name` (tagged with the stack) holding exactly `role`; return
    its ARN. An instance profile holds at most one role (IAM User Guide, "Use instance
    profiles"): any other is removed first."""
    profile = read_instance_profile(iam, name)
    created = profile is None
    if created:
        iam.create_instance_profile(InstanceProfileName=name,
                                    Tags=tag_list({STACK_TAG: prefix}))
        iam.get_waiter("instance_profile_exists").wait(
            InstanceProfileName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 30})
        profile = read_instance_profile(iam, name)
    roles = [r["RoleName"] for r in profile.get("Roles", [])]
    for other in roles:
        if other != role:
            iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=other)
    if role not in roles:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role)
    outcome = CREATED if created else (UPDATED if roles != [role] else IN_PLACE)
    progress.record(outcome, what, name)
    return profile["Arn"]


def delete_role(iam, role_name, progress, what):
    """Delete a role with its inline and attached policies; tolerate it being gone."""
    role = read_role(iam, role_name)
    if role is None:
        progress.record(GONE, what, role_name)
        return
    for name in role["inline"]:
        iam.delete_role_policy(RoleName=role_name, PolicyName=name)
    for arn in role["attached"]:
        iam.detach_role_policy(RoleName=role_name, PolicyArn=arn)
    try:
        # Paged (IsTruncated, Marker; IAM API Reference): a role left in a profile of a later
        # page would make DeleteRole fail with DeleteConflict.
        profiles = [profile for page in iam.get_paginator(
            "list_instance_profiles_for_role").paginate(RoleName=role_name)
            for profile in page["InstanceProfiles"]]
    except ClientError as err:
        log_client_error(err, f"listing instance profiles of {role_name}")
        raise
    for profile in profiles:
        iam.remove_role_from_instance_profile(
            InstanceProfileName=profile["InstanceProfileName"], RoleName=role_name)
    iam.delete_role(RoleName=role_name)
    progress.record(DELETED, what, role_name)


def delete_instance_profile(iam, names, progress):
    """Delete the worker instance profile (after removing its roles); tolerate it being gone."""
    profile = read_instance_profile(iam, names.worker_instance_profile)
    if profile is None:
        progress.record(GONE, "worker instance profile", names.worker_instance_profile)
        return
    for role in profile.get("Roles", []):
        iam.remove_role_from_instance_profile(
            InstanceProfileName=names.worker_instance_profile, RoleName=role["RoleName"])
    iam.delete_instance_profile(InstanceProfileName=names.worker_instance_profile)
    progress.record(DELETED, "worker instance profile", names.worker_instance_profile)


# EC2's service-linked role for Spot Instances: one per account, AWS's own, shared by everything
# in the account that asks for spot (EC2 User Guide, "Service-linked role for Spot Instance
# requests"). Teardown leaves it.
SPOT_SERVICE = "spot.amazonaws.com"
SPOT_ROLE = "AWSServiceRoleForEC2Spot"


def spot_role_exists_answer(err):
    """True when CreateServiceLinkedRole refused because the role is there already (pure):
    IAM answers InvalidInput "Service role name AWSServiceRoleForEC2Spot has been taken in
    this account" (AWS Batch User Guide, "Create Amazon EC2 spot fleet roles with the AWS
    CLI"); moto answers EntityAlreadyExists."""
    error = err.response.get("Error", {})
    return error.get("Code") == "EntityAlreadyExists" or (
        error.get("Code") == "InvalidInput" and "has been taken" in error.get("Message", ""))


def ensure_spot_service_linked_role(iam, progress):
    """Create the account's service-linked role for Spot Instances unless it exists.

    "If you use the AWS CLI or an API to request a Spot Instance, you must first ensure that
    this role exists" (EC2 User Guide, "Service-linked role for Spot Instance requests"). EC2
    would create it on a first spot RunInstances only for a caller holding
    iam:CreateServiceLinkedRole, which the launcher role must not hold; refused so, its spot
    launch fails outright (an authorization refusal is not a capacity refusal, so there is no
    on-demand fallback). deploy makes it once, with the deployer's narrow permission for
    exactly this role (iam/optional/deployer-spot.json, SpotServiceLinkedRole); refused
    that, it says how to get it (DeployError).
    """
    try:
        iam.create_service_linked_role(AWSServiceName=SPOT_SERVICE)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") == "AccessDenied":
            # The deployer policy holds it only when printed for spot.
            raise DeployError(
                f"spot workers need EC2's service-linked role {SPOT_ROLE}, which you may not "
                "create (AccessDenied): attach the deployer policy printed for spot, "
                "./deploy.sh deployer-policy --spot, which also lets reconcile launch spot"
            ) from None
        if not spot_role_exists_answer(err):
            log_client_error(err, f"creating the service-linked role {SPOT_ROLE}")
            raise
        progress.record(IN_PLACE, "spot service-linked role", SPOT_ROLE)
        return
    progress.record(CREATED, "spot service-linked role", SPOT_ROLE,
                    "account-wide, for spot workers; teardown keeps it")
