"""deploy() and teardown(): the order in which the whole stack is created and removed."""

from __future__ import annotations

import json
import os
import time

from .core import DELETED, GONE, KEPT, UPDATED, Progress, canonical
from .names import DEFAULT_INSTANCE_TYPE
from .artifacts import (
    BOOTSTRAP_KEY, PUBLISHED_FILES, ROUTES_FILE, build_function_zip, software_sources,
)
from .routes import check_routing_table, template_volume_sizes
from .policies import policy_values, render_policy
from .s3 import (
    PRIVATE_BLOCK, PUBLIC_SOFTWARE_BLOCK, bucket_exists, created_by, delete_bucket, ensure_bucket,
    ensure_data_notification, ensure_software_access, publish_software, read_bucket_tags,
    release_foreign_bucket, release_software_bucket, remove_data_notification, remove_unpublished,
)
from .sqs import ensure_queue, find_queue
from .iam import (
    delete_instance_profile, delete_role, ensure_instance_profile, ensure_role, read_role,
)
from .ec2 import (
    default_ebs_key, default_vpc, delete_launch_template, delete_security_group,
    ensure_launch_templates, ensure_security_group, plan_images, plan_templates,
    read_launch_template, remove_unrouted_templates, stack_launch_templates, terminate_workers,
    wait_until_ec2_accepts_profile,
)
from .function import (
    delete_function, ensure_event_invoke_config, ensure_function, ensure_log_group,
    ensure_s3_invoke_permission, find_log_group,
)
from .preflight import check_limits, check_preconditions, check_public_software


# IAM is eventually consistent: a policy change takes a few seconds to reach every service
# (IAM User Guide, "Troubleshoot IAM": changes are not always immediately visible).
POLICY_PROPAGATION_SECONDS = 10.0


def policy_propagation_seconds(environ=None):
    """Seconds to let a policy change propagate: POLICY_PROPAGATION_SECONDS against AWS, 0
    against a local endpoint (AWS_ENDPOINT_URL: an emulator applies a policy at once)."""
    environ = os.environ if environ is None else environ
    return 0.0 if environ.get("AWS_ENDPOINT_URL") else POLICY_PROPAGATION_SECONDS


def launched_by(templates):
    """Return (image ids, instance types, security group ids) the templates launch now (pure).

    `templates` holds read_launch_template answers (None for one that does not exist).
    """
    data = [template["data"] for template in templates if template]
    return ({d["ImageId"] for d in data if d.get("ImageId")},
            {d["InstanceType"] for d in data if d.get("InstanceType")},
            {group for d in data for group in d.get("SecurityGroupIds", [])})


def widen_launcher_policy(iam, ec2, names, plan, images, security_group_id, ebs_key,
                          published_files, progress, sleep=time.sleep):
    """Before the templates change, let the launcher role start what they launch now and what
    they will launch (images, instance types, security group); return True if it changed.

    The handler launches from "$Latest", so a new template version is used at once; were the
    policy updated after it (or before, to the new images only), every launch in between would
    be refused. deploy narrows the policy to the new images once the templates are updated.
    A first deploy (no launcher role yet) has nothing to widen.
    """
    role = read_role(iam, names.lambda_role)
    current = (role or {}).get("inline", {}).get(names.lambda_policy_name)
    if current is None:
        return False
    existing = {name: read_launch_template(ec2, name)
                for name in sorted(set(stack_launch_templates(ec2, names)) | set(plan))}
    old_images, old_types, old_groups = launched_by(existing.values())
    values = policy_values(
        names, [t["id"] for t in existing.values() if t], published_files,
        image_ids=old_images | {image_id for image_id, _ in images.values()},
        instance_types=old_types | {kind for kind, _ in plan.values()},
        security_group_ids=old_groups | {security_group_id}, ebs_key_arn=ebs_key)
    widened = render_policy("lambda-policy", values)
    if canonical(widened) == canonical(current):
        return False
    iam.put_role_policy(RoleName=names.lambda_role, PolicyName=names.lambda_policy_name,
                        PolicyDocument=json.dumps(widened))
    progress.record(UPDATED, "launcher role", names.lambda_role,
                    "widened: today's and the new images and instance types, while the "
                    "templates change")
    sleep(policy_propagation_seconds())
    return True


def deploy(clients, names, instance_type=DEFAULT_INSTANCE_TYPE, public_software=False,
           progress=None, environ=None, published_files=PUBLISHED_FILES, routes_file=ROUTES_FILE,
           sleep=time.sleep):
    """Create or update every part of the pipeline; return what was deployed (names and ARNs)."""
    progress = progress or Progress()
    # A bad routing table fails here, before anything is made, not later in the handler.
    routes, types = check_routing_table(routes_file, names.launch_template, instance_type)
    volume_sizes = template_volume_sizes(routes)
    sources = software_sources(routes_file)
    # So does every limit a setting can break, for the worst case it allows.
    check_limits(names, routes, environ,
                 sources[BOOTSTRAP_KEY].read_text(encoding="utf-8"))
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    plan = plan_templates(ec2, types)
    images = plan_images(ec2, ssm, plan)
    vpc_id = default_vpc(ec2)
    ebs_key = default_ebs_key(ec2, clients("kms"))
    check_preconditions(s3, ec2, names, plan)
    if public_software:
        check_public_software(clients("s3control"), names)

    ensure_bucket(s3, names.data_bucket, names, PRIVATE_BLOCK, progress, "data bucket")
    software_is_ours = ensure_bucket(
        s3, names.software_bucket, names,
        PUBLIC_SOFTWARE_BLOCK if public_software else PRIVATE_BLOCK, progress, "software bucket")
    publish_software(s3, names.software_bucket, published_files, progress, sources=sources)
    if software_is_ours:
        # Only in a bucket deploy created: anyone else's objects are theirs.
        remove_unpublished(s3, names.software_bucket, published_files, progress)
    ensure_software_access(s3, names, public_software, published_files, progress)

    dlq_url = ensure_queue(sqs, names, progress)
    ensure_log_group(logs, names, progress)

    values = policy_values(names, published_files=published_files)
    ensure_role(iam, names.worker_role, render_policy("worker-trust", values),
                names.worker_policy_name, render_policy("worker-policy", values), names,
                progress, "worker role")
    ensure_instance_profile(iam, names, progress)

    security_group_id = ensure_security_group(ec2, names, vpc_id, progress)
    # The launcher may start only the images and types its policy names: let it start both
    # what the templates launch now and what they will, before they change (then narrow).
    widen_launcher_policy(iam, ec2, names, plan, images, security_group_id, ebs_key,
                          published_files, progress, sleep)
    template_ids, images = ensure_launch_templates(ec2, ssm, names, plan, progress, images,
                                                   security_group_id, volume_sizes)
    # Every template names the one worker instance profile: once EC2 accepts it for one, the
    # first uploads after this deploy will not be refused it.
    wait_until_ec2_accepts_profile(ec2, names.launch_template)

    # The launcher's policy names the templates' ids, images and instance types, so it follows
    # the templates: exactly the worker template and those the routing table names (this
    # narrows what widen_launcher_policy allowed while they changed).
    values = policy_values(names, list(template_ids.values()), published_files,
                           image_ids=images.values(),
                           instance_types=[kind for kind, _ in plan.values()],
                           security_group_ids=[security_group_id], ebs_key_arn=ebs_key)
    ensure_role(iam, names.lambda_role, render_policy("lambda-trust", values),
                names.lambda_policy_name, render_policy("lambda-policy", values), names,
                progress, "launcher role")
    remove_unrouted_templates(ec2, names, template_ids, progress)

    function_arn = ensure_function(lam, names, build_function_zip(sources=sources), progress,
                                   environ)
    ensure_event_invoke_config(lam, names, progress)
    ensure_s3_invoke_permission(lam, names, progress)
    ensure_data_notification(s3, names, function_arn, progress)
    return {
        "function_arn": function_arn,
        "launch_template_id": template_ids[names.launch_template],
        "launch_templates": template_ids,
        "dlq_url": dlq_url,
        "image_id": images[plan[names.launch_template][1]],
        "security_group_id": security_group_id,
    }


def teardown(clients, names, delete_data=False, progress=None, wait=True):
    """Remove everything deploy created, in dependency order, tolerating parts already gone."""
    progress = progress or Progress()
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs = clients("lambda"), clients("sqs"), clients("logs")

    # Stop new launches first, then end the workers already running.
    remove_data_notification(s3, names, progress)
    delete_function(lam, names, progress)
    # By tag, not by the routing table: a template a table named once is found too.
    templates = stack_launch_templates(ec2, names)
    terminate_workers(ec2, names, progress, wait=wait, templates=templates)
    for name in templates:
        delete_launch_template(ec2, names, progress, name)
    delete_security_group(ec2, names, progress)
    delete_role(iam, names.lambda_role, progress, "launcher role")
    delete_instance_profile(iam, names, progress)
    delete_role(iam, names.worker_role, progress, "worker role")
    found = find_queue(sqs, names.dlq_name)
    if found:
        sqs.delete_queue(QueueUrl=found[0])
        progress.record(DELETED, "dead-letter queue", names.dlq_name)
    else:
        progress.record(GONE, "dead-letter queue", names.dlq_name)
    if find_log_group(logs, names.log_group):
        logs.delete_log_group(logGroupName=names.log_group)
        progress.record(DELETED, "log group", names.log_group)
    else:
        progress.record(GONE, "log group", names.log_group)
    release_software_bucket(s3, names, progress)
    data_exists = bucket_exists(s3, names.data_bucket, names.account)
    if data_exists and not created_by(read_bucket_tags(s3, names.data_bucket), names):
        # Never deleted, not even with --delete-data: deploy did not create it.
        release_foreign_bucket(s3, names.data_bucket, names, progress, "data bucket")
    elif delete_data:
        delete_bucket(s3, names.data_bucket, names.account, progress, "data bucket")
    else:
        progress.record(KEPT, "data bucket", names.data_bucket, "--delete-data removes it")
    return progress
