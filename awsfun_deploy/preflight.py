"""Checks made before deploy changes anything: regions, owners, and every limit a setting can break."""

from __future__ import annotations

import os

from botocore.exceptions import ClientError

import AwsS3
import lambda_function

from .core import DeployError, canonical, error_code, log_client_error
from .names import STACK_TAG
from .artifacts import BOOTSTRAP_KEY, REPO
from .policies import policy_values, render_policy
from .s3 import (
    bucket_exists, bucket_region, created_by, data_notification, notification_config,
    overlapping_notifications, read_bucket_tags, used_by_tag,
)
from .ec2 import read_launch_template
from .function import (
    FUNCTION_TIMEOUT, MAX_EVENT_AGE_SECONDS, MAX_RETRY_ATTEMPTS, function_tags,
    handler_environment,
)


def check_preconditions(s3, ec2, names, plan):
    """Read (never change) what deploy would otherwise trip over halfway through; DeployError
    names the first problem: a bucket someone else owns or in another region, a bucket's tag
    limit, a notification S3 would refuse beside ours, a template of another deployment."""
    for option, bucket in (("--data-bucket", names.data_bucket),
                           ("--software-bucket", names.software_bucket)):
        if not bucket_exists(s3, bucket, names.account):
            continue
        region = bucket_region(s3, bucket)
        if region != names.region:
            raise DeployError(
                f"{option} {bucket} is in {region}, but this deployment is in {names.region}; "
                "S3 notifies only a function in its own region and the pipeline lives in one "
                f"region: deploy with AWS_REGION={region}, or use a bucket in {names.region}")
        tags = read_bucket_tags(s3, bucket)
        if not created_by(tags, names) and used_by_tag(names.prefix) not in tags and \
                len(tags) >= BUCKET_TAG_LIMIT:
            raise DeployError(f"{option} {bucket} already has {len(tags)} tags, S3's limit of "
                              f"{BUCKET_TAG_LIMIT}; deploy adds {used_by_tag(names.prefix)}")
        if option == "--data-bucket":
            wanted = data_notification(names, names.events_queue_arn)
            clash = overlapping_notifications(notification_config(s3, bucket), wanted)
            if clash:
                raise DeployError(
                    f"data bucket {bucket}: its {clash[0]} overlaps ours (s3:ObjectCreated:*, "
                    "every key) and S3 refuses overlapping notification configurations; "
                    "narrow or remove it, or use another --data-bucket")
    for name in plan:
        template = read_launch_template(ec2, name)
        owner = (template or {}).get("tags", {}).get(STACK_TAG)
        if owner and owner != names.prefix:
            hint = ("set LAUNCH_TEMPLATE to use another name" if name == names.launch_template
                    else "name another launch_template in the routing table")
            raise DeployError(f"launch template {name} belongs to deployment {owner!r}; {hint}")
def public_software_problems(s3control, account):
    """Return a message if the account's Block Public Access forbids --public-software (reads only).

    --public-software puts a bucket policy granting anonymous s3:GetObject. S3 refuses it
    (PutBucketPolicy, AccessDenied) under BlockPublicPolicy and ignores it for anonymous
    callers under RestrictPublicBuckets, when set for the account (s3control
    GetPublicAccessBlock), whatever the bucket's own settings (S3 User Guide, "Blocking
    public access to your Amazon S3 storage"). No configuration means none is set.
    ClientError (e.g. AccessDenied for s3:GetAccountPublicAccessBlock) is logged and raised.
    """
    try:
        block = s3control.get_public_access_block(AccountId=account)[
            "PublicAccessBlockConfiguration"]
    except ClientError as err:
        if error_code(err) == "NoSuchPublicAccessBlockConfiguration":
            return []
        log_client_error(err, f"reading account {account}'s Block Public Access settings")
        raise
    blocking = [setting for setting in ("BlockPublicPolicy", "RestrictPublicBuckets")
                if block.get(setting)]
    if not blocking:
        return []
    return [f"--public-software: account {account} has Block Public Access "
            f"{' and '.join(blocking)} on, so S3 would refuse or ignore the software bucket's "
            "public-read policy; deploy without --public-software (workers read the software "
            "with their role), or turn the account setting off (aws s3control "
            "put-public-access-block)"]


def check_public_software(s3control, names):
    """Raise DeployError if --public-software cannot work in this account (see above)."""
    found = public_software_problems(s3control, names.account)
    if found:
        raise DeployError("; ".join(found))


# Service limits a setting can break. Sources: IAM User Guide "IAM and AWS STS quotas";
# Lambda Developer Guide "Lambda quotas" and the CreateFunction/PutFunctionEventInvokeConfig
# references; EC2 API Reference (CreateLaunchTemplate, RunInstances UserData); SQS Developer
# Guide (queue names); S3 User Guide (object keys, bucket tagging); CloudWatch Logs API.
NAME_LIMITS = (
    ("function name", "function_name", 64),
    ("launcher role name", "lambda_role", 64),
    ("worker role name", "worker_role", 64),
    ("worker instance profile name", "worker_instance_profile", 128),
    ("dead-letter queue name", "dlq_name", 80),
    ("log group name", "log_group", 512),
    ("worker policy name", "worker_policy_name", 128),
    ("launcher policy name", "lambda_policy_name", 128),
    ("S3 invoke permission statement id", "permission_sid", 100),
)
S3_KEY_LIMIT = lambda_function.S3_KEY_LIMIT
BUCKET_TAG_LIMIT = 50
TAG_KEY_LIMIT = 128
ENVIRONMENT_LIMIT = 4096
ROLE_POLICY_LIMIT = 10240
FUNCTION_TIMEOUT_LIMIT = 900
# `timeout -k 30` in bootstrap.sh: a worker past its time limit gets 30 s more before SIGKILL.
KILL_GRACE_SECONDS = lambda_function.KILL_GRACE_SECONDS
# systemd's `shutdown +N` adds N minutes (as microseconds) to the clock in a 64-bit counter
# with no bound check (parse_shutdown_time_spec); half the counter leaves room for the clock.
WATCHDOG_MAX_MINUTES = (2 ** 64 - 1) // 60_000_000 // 2
# One record's work in the handler: render, then one RunInstances of a second or two with
# botocore's retries; the handler stops DEADLINE_MARGIN_MS before the timeout.
ONE_RECORD_SECONDS = 5
# The longest eTag S3 gives: a multipart upload of 10,000 parts.
WORST_ETAG = "0" * 32 + "-10000"
# A template id as EC2 makes them (lt- and 17 hex digits), for sizing the launcher policy.
WORST_TEMPLATE_ID = "lt-" + "f" * 17
# An image id (ami- and 17 hex digits; one per architecture) and a long instance type name
# (u7in-32tb.224xlarge is 19 characters), for the same sizing.
WORST_IMAGE_ID = "ami-" + "f" * 16
WORST_INSTANCE_TYPE = "x" * 22


def name_problems(names, environ):
    """Return one message per name past its service's length limit (pure)."""
    found = []
    for what, field, limit in NAME_LIMITS:
        value = getattr(names, field)
        if len(value) > limit:
            found.append(f"--prefix {names.prefix!r} in region {names.region} makes the {what} "
                         f"{value!r} {len(value)} characters; the limit is {limit}")
    if not lambda_function.LAUNCH_TEMPLATE_NAME.match(names.launch_template):
        source = ("LAUNCH_TEMPLATE" if environ.get("LAUNCH_TEMPLATE") == names.launch_template
                  else "--prefix")
        found.append(f"{source} makes the launch template name {names.launch_template[:40]!r}"
                     f"{'...' if len(names.launch_template) > 40 else ''} "
                     f"({len(names.launch_template)} characters); EC2 allows 3-128 letters, "
                     "digits and ( ) . - / _")
    return found


def environment_problems(environment):
    """Return a message if the function's environment passes Lambda's 4 KB total (pure)."""
    size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in environment.items())
    if size <= ENVIRONMENT_LIMIT:
        return []
    largest = max(environment, key=lambda k: len(environment[k].encode("utf-8")))
    return [f"the function's environment variables total {size:,} bytes; Lambda allows 4 KB "
            f"({ENVIRONMENT_LIMIT:,} bytes) in all; the largest is {largest}"]


def tag_problems(tags, where):
    """Return one message per tag key or value past AWS's 128/256-character limits (pure)."""
    found = []
    for key, value in tags.items():
        if len(key) > TAG_KEY_LIMIT:
            found.append(f"{where}: tag key {key[:40]!r}... is {len(key)} characters; "
                         f"the limit is {TAG_KEY_LIMIT}")
        if len(value) > lambda_function.TAG_VALUE_LIMIT:
            found.append(f"{where}: tag {key} is {len(value)} characters for the worst case; "
                         f"the limit is {lambda_function.TAG_VALUE_LIMIT}")
    return found


def report_key_problems(skip_substring, key="k" * S3_KEY_LIMIT):
    """Return a message per report key of the longest input key that breaks the report rule (pure):
    within S3's 1,024 bytes, and holding SKIP_SUBSTRING, or every report would launch a worker."""
    found = []
    for suffix in (".json", ".error.json", ".log"):
        report = AwsS3.report_key(key, suffix)
        if len(report.encode("utf-8")) > S3_KEY_LIMIT:
            found.append(f"the report key {report[:40]}... of a 1,024-byte key is "
                         f"{len(report.encode('utf-8')):,} bytes; S3 allows {S3_KEY_LIMIT:,}")
        if not skip_substring or skip_substring not in report:
            found.append(f"SKIP_SUBSTRING {skip_substring!r} is not in the report key "
                         f"{report[:40]}...: every report under {AwsS3.REPORT_PREFIX} "
                         "would launch another worker")
            break
    return found


def time_limit_problems(where, launch, route=None):
    """Return a message if a worker's watchdog or time limit is out of range (pure): the time
    limit plus `timeout`'s kill grace must end before the watchdog's `shutdown -h +N`."""
    watchdog, timeout = int(launch["WATCHDOG_MINUTES"]), int(launch["WORKER_TIMEOUT_SECONDS"])
    watchdog_label = (f"watchdog_minutes {watchdog}" if "watchdog_minutes" in (route or {})
                      else f"WATCHDOG_MINUTES={watchdog}")
    timeout_label = (f"worker_timeout_seconds {timeout}"
                     if "worker_timeout_seconds" in (route or {})
                     else f"the worker time limit {timeout} s (derived from the watchdog)")
    if not 1 <= watchdog <= WATCHDOG_MAX_MINUTES:
        return [f"{where}{watchdog_label}: `shutdown -h +N` takes 1 to "
                f"{WATCHDOG_MAX_MINUTES:,} minutes"]
    if timeout + KILL_GRACE_SECONDS >= watchdog * 60:
        return [f"{where}{timeout_label} plus {KILL_GRACE_SECONDS} s kill grace does not end "
                f"before the watchdog ({watchdog_label}: {watchdog * 60} s), so the worker "
                "could never report its own time limit"]
    return []


def function_limit_problems():
    """Return messages for function settings outside Lambda's ranges or too short for one record."""
    found = []
    margin = lambda_function.DEADLINE_MARGIN_MS // 1000
    if not margin + ONE_RECORD_SECONDS <= FUNCTION_TIMEOUT <= FUNCTION_TIMEOUT_LIMIT:
        found.append(f"function timeout {FUNCTION_TIMEOUT} s: the handler stops {margin} s before "
                     f"its end (DEADLINE_MARGIN_MS) and one record takes up to "
                     f"{ONE_RECORD_SECONDS} s, so it needs {margin + ONE_RECORD_SECONDS} to "
                     f"{FUNCTION_TIMEOUT_LIMIT} s")
    if not 60 <= MAX_EVENT_AGE_SECONDS <= 21600:
        found.append(f"MAX_EVENT_AGE_SECONDS {MAX_EVENT_AGE_SECONDS}: Lambda allows 60 to 21600")
    if not 0 <= MAX_RETRY_ATTEMPTS <= 2:
        found.append(f"MAX_RETRY_ATTEMPTS {MAX_RETRY_ATTEMPTS}: Lambda allows 0 to 2")
    return found


def launcher_policy_problems(names, template_names):
    """Return a message if the launcher role's policy, naming every launch template, passes
    IAM's 10,240 characters (white space not counted) for a role's inline policies (pure).

    Sized as a redeploy widens it while the templates change (stack.widen_launcher_policy):
    today's and the new image per architecture, instance type per template, security group.
    """
    values = policy_values(names, [WORST_TEMPLATE_ID] * len(template_names),
                           image_ids=[f"{WORST_IMAGE_ID}{arch}" for arch in range(4)],
                           instance_types=[f"{WORST_INSTANCE_TYPE}{index}"
                                           for index in range(2 * len(template_names))],
                           security_group_ids=["sg-" + "f" * 16 + str(n) for n in range(2)],
                           ebs_key_arn=f"arn:{names.partition}:kms:{names.region}:"
                                       f"{names.account}:key/{'f' * 36}")
    size = len(canonical(render_policy("lambda-policy", values)))
    if size <= ROLE_POLICY_LIMIT:
        return []
    return [f"routing table: the launcher role's policy for {len(template_names)} launch "
            f"templates is {size:,} characters; IAM allows {ROLE_POLICY_LIMIT:,} for a role's "
            "inline policies: let routes share launch templates"]


def limit_problems(names, routes, environ, template=None):
    """Return one message per service limit a setting breaks in its worst case (pure).

    Worst case: a 1,024-byte key (S3's longest) with the longest eTag, each route's settings
    and command, every launch template the table names. DeployError for a malformed
    WATCHDOG_MINUTES.
    """
    environ = os.environ if environ is None else environ
    template = template if template is not None else \
        (REPO / BOOTSTRAP_KEY).read_text(encoding="utf-8")
    environment = handler_environment(names, environ)
    settings = lambda_function.load_settings(dict(environment, AWS_REGION=names.region))
    found = name_problems(names, environ) + environment_problems(environment)
    found += function_limit_problems() + report_key_problems(environment["SKIP_SUBSTRING"])
    found += tag_problems(function_tags(names), "function tags")
    found += tag_problems({used_by_tag(names.prefix): names.function_name}, "bucket tags")
    worst = {"bucket": names.data_bucket, "key": "k" * S3_KEY_LIMIT, "etag": WORST_ETAG,
             "version_id": "v" * 32, "sequencer": "0" * 18}
    for route in [None] + list(routes):
        where = f"route {route['name']!r}: " if route else ""
        launch = lambda_function.apply_route(settings, route)
        if route is None or {"watchdog_minutes", "worker_timeout_seconds"} & set(route):
            # A route that sets neither shares the default's limits (checked once).
            found += time_limit_problems(where, launch, route)
        try:
            lambda_function.render_user_data(template, worst, launch)
        except lambda_function.UserDataTooLarge as err:
            found.append(f"{where or 'default route: '}{err} for a worst-case 1,024-byte key "
                         "(EC2's limit: 16,384 bytes before base64)"
                         + ("; shorten its command" if launch.get("COMMAND") else ""))
        for spec in lambda_function.build_tags(worst, "t" * lambda_function.CLIENT_TOKEN_LIMIT,
                                               launch)[:1]:
            found += tag_problems({t["Key"]: t["Value"] for t in spec["Tags"]},
                                  f"{where}worker tags")
    templates = {names.launch_template} | {route["launch_template"] for route in routes}
    found += launcher_policy_problems(names, templates)
    return found


def check_limits(names, routes, environ, template=None):
    """Raise DeployError naming every limit a setting breaks (see limit_problems); no AWS call."""
    found = limit_problems(names, routes, environ, template)
    if found:
        raise DeployError("; ".join(found))
