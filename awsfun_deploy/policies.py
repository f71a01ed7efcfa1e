"""The IAM policy documents of iam/, rendered for one deployment."""

from __future__ import annotations

import json
import re
import string

from .artifacts import LAUNCHER_SOFTWARE_KEYS, PUBLISHED_FILES, REPO, WORKER_FILES
from .batch import batch_arn, batch_names, ecs_instance_policy_arn

IAM_DIR = REPO / "iam"
_WHOLE_PLACEHOLDER = re.compile(r"^\$\{(\w+)\}$")
# (template, value that must be non-empty, file under iam/optional/ whose statements it adds).
OPTIONAL_STATEMENTS = (
    ("lambda-policy", "EbsKeyArn", "lambda-ebs-key"),
    ("deployer-policy", "SecurityGroupArns", "deployer-security-groups"),
    ("deployer-policy", "Spot", "deployer-spot"),
    ("lambda-policy", "Batch", "lambda-batch"),
    ("deployer-policy", "Batch", "deployer-batch"),
)


def _render_value(value, values):
    if isinstance(value, dict):
        return {key: _render_value(item, values) for key, item in value.items()}
    if isinstance(value, list):
        rendered = []
        for item in value:
            item = _render_value(item, values)
            # A list item that is a list-valued placeholder splices its items in place.
            rendered.extend(item if isinstance(item, list) else [item])
        return rendered
    if isinstance(value, str):
        whole = _WHOLE_PLACEHOLDER.match(value)
        if whole and isinstance(values.get(whole.group(1)), (list, tuple)):
            return list(values[whole.group(1)])
        return string.Template(value).substitute(values)
    return value


def render_policy(name, values):
    """Render iam/NAME.json: `${Name}` placeholders from values; list values splice into lists.

    The launcher's policy gets iam/optional/lambda-ebs-key.json's statements only when the
    account's default EBS key is customer managed (values["EbsKeyArn"]; ec2.default_ebs_key).
    The deployer's gets iam/optional/deployer-security-groups.json's only when it is rendered
    for groups of the user's (./deploy.sh deployer-policy --security-groups): a statement
    must name at least one resource, and without them the stack's own group, found by its
    tag, is all the deployer launches into. It gets iam/optional/deployer-spot.json's only
    for spot workers (values["Spot"]): who never launches spot needs neither the
    spot-instances-request nor the right to create EC2's service-linked role for spot, and
    the document without them stays within a managed policy's 6,144 characters. Both get
    iam/optional/lambda-batch.json's and deployer-batch.json's only for the Batch engine
    (values["Batch"]; --engine batch): the launcher submits jobs only then, and the
    deployer's policy without Batch is already at a managed policy's limit.
    """
    template = json.loads((IAM_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for wanted, key, optional in OPTIONAL_STATEMENTS:
        if name == wanted and values.get(key):
            template["Statement"] += json.loads(
                (IAM_DIR / "optional" / f"{optional}.json").read_text(encoding="utf-8"))[
                "Statement"]
    return _render_value(template, values)


def ec2_service_principal(partition):
    """Return the service principal(s) EC2 presents in a partition: a string, or a list.

    In the China regions (aws-cn) EC2 is ec2.amazonaws.com.cn, both when it assumes an
    instance profile's role and as iam:PassedToService (Amazon Web Services in China,
    "IAM: differences"); IAM there also accepts ec2.amazonaws.com, which some of its docs
    still show, so both are named. Elsewhere it is ec2.amazonaws.com alone, kept a string so
    documents already deployed do not change.
    """
    if partition == "aws-cn":
        return ["ec2.amazonaws.com", "ec2.amazonaws.com.cn"]
    return "ec2.amazonaws.com"


def policy_values(names, launch_template_ids=(), published_files=PUBLISHED_FILES, image_ids=(),
                  instance_types=(), security_group_ids=(), ebs_key_arn=None, spot=False,
                  batch=False):
    """Return the values the iam/ templates are rendered with.

    The launcher may start only the images and instance types deploy put in its templates:
    RunInstances lets the caller override both (and add a key pair) even when it names a
    launch template, and ec2:LaunchTemplate only proves a template was named (EC2 User Guide,
    "Example policies to control access to the Amazon EC2 API", launch templates).
    """
    software = f"arn:{names.partition}:s3:::{names.software_bucket}"
    parts = batch_names(names)
    iam_arn = f"arn:{names.partition}:iam::{names.account}"
    # Workers never read the routing table: their route arrives in the user-data.
    worker_files = [key for key in published_files if key in WORKER_FILES]
    return {
        "Partition": names.partition,
        "Ec2ServicePrincipal": ec2_service_principal(names.partition),
        "Region": names.region,
        # EBS calls KMS on the launcher's behalf through EC2 (kms:ViaService).
        "Ec2ViaService": f"ec2.{names.region}.amazonaws.com"
                         + (".cn" if names.partition == "aws-cn" else ""),
        "EbsKeyArn": ebs_key_arn or "",
        "AccountId": names.account,
        "DataBucket": names.data_bucket,
        "SoftwareBucket": names.software_bucket,
        "LogGroup": names.log_group,
        "WorkerRoleArn": names.worker_role_arn,
        # For iam/deployer-policy.json: what the person running ./deploy.sh may touch.
        "Prefix": names.prefix,
        # Whether it launches spot workers (./deploy.sh deployer-policy --spot, or spot routes).
        "Spot": bool(spot),
        "LauncherRoleArn": names.lambda_role_arn,
        "WorkerInstanceProfileArn": (f"arn:{names.partition}:iam::{names.account}:"
                                     f"instance-profile/{names.worker_instance_profile}"),
        "FunctionArn": names.function_arn,
        "DeadLetterQueueArn": names.dlq_arn,
        "EventsQueueArn": names.events_queue_arn,
        "LaunchTemplateArns": [names.launch_template_arn(i) for i in launch_template_ids],
        # An AMI's ARN has no account: public images belong to none of ours.
        "ImageArns": [f"arn:{names.partition}:ec2:{names.region}::image/{image}"
                      for image in sorted(set(image_ids))],
        "InstanceTypes": sorted(set(instance_types)),
        "SecurityGroupArns": [
            f"arn:{names.partition}:ec2:{names.region}:{names.account}:security-group/{group}"
            for group in sorted(set(security_group_ids))],
        "WorkerSoftwareObjectArns": [f"{software}/{key}" for key in worker_files],
        "LauncherSoftwareObjectArns": [f"{software}/{key}" for key in LAUNCHER_SOFTWARE_KEYS],
        # The Batch engine (--engine batch): its queue, job definition (without a revision;
        # `:*` adds every revision), environments and roles.
        "Batch": bool(batch),
        "JobQueueArn": batch_arn(names, "job-queue", parts["queue"]),
        "JobDefinitionArn": batch_arn(names, "job-definition", parts["definition"]),
        "BatchComputeEnvironmentArns": [batch_arn(names, "compute-environment", parts[kind])
                                        for kind in ("spot", "ondemand")],
        "BatchInstanceRoleArn": f"{iam_arn}:role/{parts['instance_role']}",
        "BatchInstanceProfileArn": f"{iam_arn}:instance-profile/{parts['instance_role']}",
        # AWS's name (AWS Batch User Guide, "Using service-linked roles for AWS Batch").
        "BatchServiceRoleArn": (f"{iam_arn}:role/aws-service-role/batch.amazonaws.com/"
                                "AWSServiceRoleForBatch"),
        "EcsInstancePolicyArn": ecs_instance_policy_arn(names.partition),
    }


def policy_documents(names, launch_template_ids, image_ids=(), instance_types=(),
                     security_group_ids=()):
    """Return every rendered policy document by template name (what deploy applies)."""
    if isinstance(launch_template_ids, str):
        launch_template_ids = [launch_template_ids]
    values = policy_values(names, launch_template_ids, image_ids=image_ids,
                           instance_types=instance_types, security_group_ids=security_group_ids)
    return {
        name: render_policy(name, values)
        for name in ("worker-trust", "worker-policy", "lambda-trust", "lambda-policy",
                     "software-public-read", "events-queue-policy")
    }
