"""deploy() and teardown(): the order in which the whole stack is created and removed."""

from __future__ import annotations

import json
import os
import time

from .core import DELETED, GONE, KEPT, UPDATED, DeployError, Progress, canonical
from .names import DEFAULT_INSTANCE_TYPE
from .artifacts import (
    BOOTSTRAP_KEY, PUBLISHED_FILES, ROUTES_FILE, build_function_zip, software_sources,
)
from .routes import check_routing_table, template_volume_sizes, uses_spot
from .policies import policy_values, render_policy
from .s3 import (
    PRIVATE_BLOCK, PUBLIC_SOFTWARE_BLOCK, bucket_exists, created_by, delete_bucket, ensure_bucket,
    ensure_data_notification, ensure_software_access, publish_software, read_bucket_tags,
    release_foreign_bucket, release_software_bucket, remove_data_notification, remove_unpublished,
)
from .sqs import delete_queue, ensure_events_queue, ensure_queue
from .iam import (
    delete_instance_profile, delete_role, ensure_instance_profile, ensure_role,
    ensure_spot_service_linked_role, read_role,
)
from .ec2 import (
    default_ebs_key, delete_launch_template, delete_security_group, workers_vpc,
    ensure_launch_templates, ensure_security_group, plan_images, plan_templates,
    read_launch_template, remove_unrouted_templates, stack_launch_templates, terminate_workers,
    wait_until_ec2_accepts_profile,
)
from .function import (
    DEFAULT_MAX_WORKERS, capacity_environment, engine_environment, watchdog_minutes, delete_event_source_mapping, delete_function,
    ensure_event_invoke_config, ensure_event_source_mapping, ensure_function, ensure_log_group,
    find_log_group, remove_s3_invoke_permission,
)
from .preflight import check_limits, check_preconditions, check_public_software
from .batch import (
    DEFAULT_ENGINE, DEFAULT_IMAGE, DEFAULT_MAX_VCPUS, ENGINES, batch_subnets, ensure_batch,
)
from .batch_teardown import teardown_batch


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
            {group for d in data for group in d.get("SecurityGroupIds", [])
             + [g for interface in d.get("NetworkInterfaces", [])
                for g in interface.get("Groups", [])]})


def widen_launcher_policy(iam, ec2, names, plan, images, security_group_ids, ebs_key,
                          published_files, progress, sleep=time.sleep, batch=False):
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
        security_group_ids=old_groups | set(security_group_ids), ebs_key_arn=ebs_key,
        batch=batch)
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
           sleep=time.sleep, max_workers=DEFAULT_MAX_WORKERS, spot=False, subnets=(),
           security_groups=(), engine=DEFAULT_ENGINE, max_vcpus=DEFAULT_MAX_VCPUS,
           image=DEFAULT_IMAGE):
    """Create or update every part of the pipeline; return what was deployed (names and ARNs).

    max_workers, spot, subnets and security_groups are the handler's capacity settings
    (./deploy.sh --max-workers, --spot, --subnets, --security-groups). engine "batch"
    (--engine batch, --max-vcpus, --image) adds the Batch pieces (batch.py) and points the
    handler at them. The EC2 launch templates stay deployed under batch as well: the handler
    ignores them there, they cost nothing, and switching engines is then only the function's
    environment (and, for batch, its policy).
    """
    if engine not in ENGINES:
        raise DeployError(f"--engine {engine!r}: one of {', '.join(ENGINES)}")
    use_batch = engine == "batch"
    subnets, security_groups = list(subnets or []), list(security_groups or [])
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
    # No default VPC and no --subnets, a subnet or group that is not there: said now.
    vpc_id = workers_vpc(ec2, subnets, security_groups)
    capacity_environment(max_workers)  # a bad --max-workers, too
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
    # Before the notification: S3 checks that it may send to the queue when it is saved.
    events_url = ensure_events_queue(sqs, names, render_policy(
        "events-queue-policy", policy_values(names, published_files=published_files)), progress)
    ensure_log_group(logs, names, progress)

    values = policy_values(names, published_files=published_files)
    ensure_role(iam, names.worker_role, render_policy("worker-trust", values),
                names.worker_policy_name, render_policy("worker-policy", values), names,
                progress, "worker role")
    ensure_instance_profile(iam, names, progress)
    if uses_spot(spot, routes):
        # Before any spot launch: the launcher may not create it (iam.py).
        ensure_spot_service_linked_role(iam, progress)

    # The user's groups (--security-groups), else the stack's own: no inbound, HTTPS out.
    group_ids = security_groups or [ensure_security_group(ec2, names, vpc_id, progress)]
    # The launcher may start only the images and types its policy names: let it start both
    # what the templates launch now and what they will, before they change (then narrow).
    widen_launcher_policy(iam, ec2, names, plan, images, group_ids, ebs_key,
                          published_files, progress, sleep, batch=use_batch)
    template_ids, images = ensure_launch_templates(
        ec2, ssm, names, plan, progress, images, volume_sizes=volume_sizes,
        subnet_id=subnets[0] if subnets else None, group_ids=group_ids)
    # Every template names the one worker instance profile: once EC2 accepts it for one, the
    # first uploads after this deploy will not be refused it.
    wait_until_ec2_accepts_profile(ec2, names.launch_template)
    batch_settings = {}
    if use_batch:
        # Before the function names them (JOB_QUEUE, JOB_DEFINITION).
        batch_settings = ensure_batch(
            clients("batch"), iam, names, batch_subnets(ec2, subnets, vpc_id), group_ids,
            progress, max_vcpus=max_vcpus, image=image,
            watchdog_minutes=watchdog_minutes(os.environ if environ is None else environ),
            sources=sources, sleep=sleep)

    # The launcher's policy names the templates' ids, images and instance types, so it follows
    # the templates: exactly the worker template and those the routing table names (this
    # narrows what widen_launcher_policy allowed while they changed).
    values = policy_values(names, list(template_ids.values()), published_files,
                           image_ids=images.values(),
                           instance_types=[kind for kind, _ in plan.values()],
                           security_group_ids=group_ids, ebs_key_arn=ebs_key, batch=use_batch)
    ensure_role(iam, names.lambda_role, render_policy("lambda-trust", values),
                names.lambda_policy_name, render_policy("lambda-policy", values), names,
                progress, "launcher role")
    remove_unrouted_templates(ec2, names, template_ids, progress)

    # The groups are restated by the handler only where it moves a worker to another subnet.
    capacity = {**capacity_environment(max_workers, spot, subnets,
                                       security_groups or (group_ids if subnets else [])),
                **engine_environment(engine, batch_settings.get("job_queue"),
                                     batch_settings.get("job_definition"))}
    function_arn = ensure_function(lam, names, build_function_zip(sources=sources), progress,
                                   environ, capacity=capacity)
    # Asynchronous invocations (a person's, or a deployment older than the queue) keep their
    # retries and dead-letter queue; S3 itself no longer invokes the function.
    ensure_event_invoke_config(lam, names, progress)
    remove_s3_invoke_permission(lam, names, progress)
    ensure_event_source_mapping(lam, names, progress, sleep)
    ensure_data_notification(s3, names, names.events_queue_arn, progress)
    return {
        "events_queue_url": events_url,
        "function_arn": function_arn,
        "launch_template_id": template_ids[names.launch_template],
        "launch_templates": template_ids,
        "dlq_url": dlq_url,
        "image_id": images[plan[names.launch_template][1]],
        "security_group_id": group_ids[0],
        "security_group_ids": group_ids,
        "engine": engine,
        **batch_settings,
    }


def teardown(clients, names, delete_data=False, progress=None, wait=True, sleep=time.sleep):
    """Remove everything deploy created, in dependency order, tolerating parts already gone.

    The Batch pieces go after the function (nothing submits any more) whatever the engine:
    a deployment switched back to ec2 leaves them behind otherwise (teardown_batch)."""
    progress = progress or Progress()
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs = clients("lambda"), clients("sqs"), clients("logs")

    # Stop new launches first, then end the workers already running. Deleting a function
    # leaves its event source mappings (Lambda API Reference, DeleteFunction).
    remove_data_notification(s3, names, progress)
    delete_event_source_mapping(lam, names, progress)
    delete_function(lam, names, progress)
    # By tag, not by the routing table: a template a table named once is found too.
    templates = stack_launch_templates(ec2, names)
    terminate_workers(ec2, names, progress, wait=wait, templates=templates)
    for name in templates:
        delete_launch_template(ec2, names, progress, name)
    # Before the security group, which the compute environments' instances use.
    teardown_batch(clients("batch"), iam, names, progress, sleep,
                   required=names.engine == "batch")
    delete_security_group(ec2, names, progress)
    delete_role(iam, names.lambda_role, progress, "launcher role")
    delete_instance_profile(iam, names, progress)
    delete_role(iam, names.worker_role, progress, "worker role")
    delete_queue(sqs, names.events_queue, progress, "events queue")
    delete_queue(sqs, names.dlq_name, progress, "dead-letter queue")
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
