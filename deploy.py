#!/usr/bin/env python3
"""awsfun deploy: create, inspect and remove the whole pipeline in one AWS account and region.

    ./deploy.sh [deploy] [options]     create or update everything; safe to re-run
                                       (--routes FILE: the routing table, default routes.json)
    ./deploy.sh status [--json]        names, running workers, reports, counts, dead letters, drift
    ./deploy.sh reconcile [--key-prefix K] [--dry-run] [--json]
                                       replay dead letters, launch every unprocessed input
    ./deploy.sh teardown [--yes]       remove what deploy created (data kept unless --delete-data)

Every command takes --prefix P (default su2c), the deployment's name prefix.

Uses the caller's usual AWS settings (AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION,
AWS_ENDPOINT_URL). Everything is plain boto3 and importable, so the tests drive it
against moto. The IAM policy documents live in iam/ as reviewable JSON templates.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import string
import sys
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, WaiterError

import AwsS3
import lambda_function

logger = logging.getLogger("awsfun.deploy")

REPO = Path(__file__).resolve().parent
IAM_DIR = REPO / "iam"

BOOTSTRAP_KEY = lambda_function.DEFAULTS["BOOTSTRAP_KEY"]
ROUTES_KEY = lambda_function.DEFAULTS["ROUTES_KEY"]
LAUNCHER_KEY = lambda_function.LAUNCHER_KEY
# The routing table deploy validates, publishes and packages unless --routes names another.
ROUTES_FILE = REPO / ROUTES_KEY
# What a worker fetches (and, with --public-software, what anyone may read).
WORKER_FILES = ("AwsS3.py", BOOTSTRAP_KEY)
# The one allowlist of files published to the software bucket, at their repository
# paths. Nothing else is ever uploaded (never anything under private/).
# The launcher is not a worker file: it reaches the machine inside the user-data.
PUBLISHED_FILES = WORKER_FILES + (LAUNCHER_KEY, ROUTES_KEY)
# What the Lambda may read from the software bucket: its user-data template and launcher, and
# the routing table.
LAUNCHER_SOFTWARE_KEYS = (BOOTSTRAP_KEY, LAUNCHER_KEY, ROUTES_KEY)
# Files packaged into the function's zip, at the paths read_software_file looks for first.
FUNCTION_FILES = ("lambda_function.py", BOOTSTRAP_KEY, LAUNCHER_KEY, ROUTES_KEY)

DEFAULT_PREFIX = "su2c"
DEFAULT_INSTANCE_TYPE = "t3.small"
STACK_TAG = "awsfun:stack"
WORKER_TAG = "awsfun:launch-template"
WORKER_KEY_TAG = "awsfun:key"
BUCKET_TAG = "awsfun:bucket"
TOKEN_TAG = "awsfun:token"
DATA_BUCKET_TAG = "awsfun:data-bucket"
SOFTWARE_BUCKET_TAG = "awsfun:software-bucket"
# On a bucket deploy did not create (--data-bucket/--software-bucket naming an existing one),
# STACK_TAG is never written: it means "created by this deployment", and only such a bucket
# is ever reconfigured or deleted. This tag, one per deployment, says who uses it.
USED_BY_TAG = "awsfun:used-by:"

AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
AMI_FALLBACK_NAME = "al2023-ami-2023.*-kernel-*-{arch}"
ROOT_VOLUME_MIN_GIB = 8

RUNTIME = "python3.13"
HANDLER = "lambda_function.lambda_handler"
# One S3 event usually carries one record, and each record is one RunInstances call
# of a second or two; 60 s leaves room for a batch and for EC2's own retries.
FUNCTION_TIMEOUT = 60
FUNCTION_MEMORY = 256
MAX_RETRY_ATTEMPTS = 2
MAX_EVENT_AGE_SECONDS = 6 * 3600
DLQ_ATTRIBUTES = {"MessageRetentionPeriod": str(14 * 24 * 3600), "SqsManagedSseEnabled": "true"}
LOG_RETENTION_DAYS = 30

PRIVATE_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}
# --public-software: only a bucket policy may make it public; ACLs stay blocked.
PUBLIC_SOFTWARE_BLOCK = dict(PRIVATE_BLOCK, BlockPublicPolicy=False, RestrictPublicBuckets=False)
PUBLIC_READ_SID = "AnonymousReadOfPublishedFilesOnly"

CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8})
NOT_FOUND = {
    "404", "NoSuchBucket", "NotFound", "NoSuchKey", "NoSuchEntity", "ResourceNotFoundException",
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
    "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound",
    "NoSuchBucketPolicy", "NoSuchPublicAccessBlockConfiguration",
    "ServerSideEncryptionConfigurationNotFoundError", "OwnershipControlsNotFoundError",
    "ParameterNotFound", "NoSuchTagSet",
}
PREFIX_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?$")

CREATED, UPDATED, IN_PLACE = "created", "updated", "already in place"
DELETED, GONE, KEPT = "deleted", "already gone", "kept"
CHANGES = (CREATED, UPDATED, DELETED)


class DeployError(RuntimeError):
    """Something the operator has to fix; the message says what."""


# --- small helpers -----------------------------------------------------------------


def error_code(err):
    """Return the AWS error code of a ClientError."""
    return err.response.get("Error", {}).get("Code", "")


def log_client_error(err, doing):
    """Log a ClientError's code and message with what we were doing (the caller re-raises)."""
    error = err.response.get("Error", {})
    logger.error("%s failed: %s %s", doing, error.get("Code"), error.get("Message"))


def is_not_found(err):
    """True when a ClientError says the thing asked about does not exist."""
    return error_code(err) in NOT_FOUND


def canonical(document):
    """Return a policy document as canonical JSON, so equal documents compare equal."""
    if isinstance(document, str):
        document = json.loads(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def tag_list(tags):
    """Turn {key: value} into AWS's [{"Key", "Value"}] list."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def mismatches(desired, actual, path=""):
    """Return the paths where `actual` differs from `desired`, looking only at what `desired` sets.

    Lists match when every desired item matches some actual item, so extra entries the
    service adds (default tags, echoed fields) are not reported as drift.
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [path or "."]
        found = []
        for key, value in desired.items():
            found += mismatches(value, actual.get(key), f"{path}.{key}" if path else key)
        return found
    if isinstance(desired, list):
        if not isinstance(actual, list):
            return [path or "."]
        return [
            f"{path}[{index}]"
            for index, item in enumerate(desired)
            if not any(not mismatches(item, candidate) for candidate in actual)
        ]
    return [] if desired == actual else [path or "."]


def retry_while(retryable, action, doing, timeout=90.0, delay=3.0, sleep=time.sleep):
    """Call action() until it stops failing with an error whose code or message contains one
    of the `retryable` fragments (eventual consistency), for at most `timeout` seconds
    (of the clock, and of the waits `sleep` was asked for); then re-raise the ClientError."""
    deadline = time.monotonic() + timeout
    waited = 0.0
    while True:
        try:
            return action()
        except ClientError as err:
            error = err.response.get("Error", {})
            text = f"{error.get('Code', '')} {error.get('Message', '')}"
            if not any(fragment in text for fragment in retryable) or \
                    time.monotonic() + delay > deadline or waited + delay > timeout:
                log_client_error(err, doing)
                raise
            logger.warning("%s: %s %s; retrying in %ss (IAM and SQS changes take a few "
                           "seconds to propagate)", doing, error.get("Code"), error.get("Message"),
                           delay)
            sleep(delay)
            waited += delay


# Refusals that only mean a role or instance profile made seconds ago has not reached the
# service yet (IAM is eventually consistent: "changes ... take time to become visible",
# IAM User Guide, troubleshooting), or that the function is still being updated. Lambda says
# "The role defined for the function cannot be assumed by Lambda." or "The provided execution
# role does not have permissions to call SendMessage on SQS" (or CreateNetworkInterface on
# EC2); EC2 "Value (...) for parameter iamInstanceProfile.name is invalid. Invalid IAM
# Instance Profile name"; Lambda's ResourceConflictException "An update is in progress".
PROPAGATION_REFUSALS = ("cannot be assumed", "does not have permissions to call",
                        "Invalid IAM Instance Profile", "An update is in progress")
PROPAGATION_TIMEOUT = 90.0
PROPAGATION_DELAY = 3.0


def wait_out_propagation(action, doing, sleep=time.sleep):
    """Return action(), waiting (at most PROPAGATION_TIMEOUT s) while AWS refuses it only
    because an IAM change has not propagated yet; any other refusal, or the last, is raised."""
    return retry_while(PROPAGATION_REFUSALS, action, doing, timeout=PROPAGATION_TIMEOUT,
                       delay=PROPAGATION_DELAY, sleep=sleep)


class Progress:
    """Prints each step as it happens and keeps the list, so callers and tests can read it back."""

    def __init__(self, echo=True, stream=None):
        self.steps = []
        self.echo = echo
        self.stream = stream

    def record(self, outcome, what, name, detail=""):
        """Remember one step's outcome and print it for the person at the terminal."""
        self.steps.append({"outcome": outcome, "what": what, "name": name, "detail": detail})
        if self.echo:
            extra = f"  ({detail})" if detail else ""
            print(f"  {outcome:<17} {what:<24} {name}{extra}", file=self.stream or sys.stdout,
                  flush=True)

    def count(self, outcome):
        """How many steps ended with `outcome`."""
        return sum(1 for step in self.steps if step["outcome"] == outcome)

    def changed(self):
        """True when any step created, updated or deleted something."""
        return any(step["outcome"] in CHANGES for step in self.steps)


class Clients:
    """boto3 clients for one account and region, each created on first use with standard retries."""

    def __init__(self, session=None, region=None):
        self.session = session or boto3.session.Session()
        # AWS_REGION wins over AWS_DEFAULT_REGION, as in the AWS CLI and the Lambda runtime.
        self.region = region or os.environ.get("AWS_REGION") or self.session.region_name
        if not self.region:
            raise DeployError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, "
                              "or a region in your AWS profile")
        self._cache = {}

    def __call__(self, service):
        if service not in self._cache:
            self._cache[service] = self.session.client(
                service, region_name=self.region, config=CLIENT_CONFIG)
        return self._cache[service]


# --- names ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Names:
    """Every name and ARN the pipeline uses, derived from prefix, account and region."""

    prefix: str
    account: str
    region: str
    partition: str
    data_bucket: str
    software_bucket: str
    launch_template: str
    function_name: str
    dlq_name: str
    worker_role: str
    worker_instance_profile: str
    lambda_role: str
    log_group: str

    @property
    def worker_role_arn(self):
        return f"arn:{self.partition}:iam::{self.account}:role/{self.worker_role}"

    @property
    def lambda_role_arn(self):
        return f"arn:{self.partition}:iam::{self.account}:role/{self.lambda_role}"

    @property
    def dlq_arn(self):
        return f"arn:{self.partition}:sqs:{self.region}:{self.account}:{self.dlq_name}"

    @property
    def function_arn(self):
        return f"arn:{self.partition}:lambda:{self.region}:{self.account}:function:{self.function_name}"

    @property
    def data_bucket_arn(self):
        return f"arn:{self.partition}:s3:::{self.data_bucket}"

    def launch_template_arn(self, template_id):
        return f"arn:{self.partition}:ec2:{self.region}:{self.account}:launch-template/{template_id}"

    @property
    def notification_id(self):
        return f"{self.function_name}-object-created"

    @property
    def permission_sid(self):
        return f"{self.prefix}-s3-invoke"

    @property
    def worker_policy_name(self):
        return f"{self.prefix}-worker"

    @property
    def lambda_policy_name(self):
        return f"{self.prefix}-launcher"


def default_launch_template(prefix, environ=None):
    """Name the worker template: LAUNCH_TEMPLATE if set, else `{prefix}w_worker` (su2cw_worker)."""
    environ = os.environ if environ is None else environ
    # The default prefix gives the contract's su2cw_worker; other prefixes get their own
    # template, so two stages in one region never rewrite each other's launches.
    return environ.get("LAUNCH_TEMPLATE") or f"{prefix}w_worker"


def derive_names(prefix, account, region, partition="aws", data_bucket=None,
                 software_bucket=None, launch_template=None):
    """Return the Names for a prefix in an account and region; buckets may be given explicitly."""
    if not PREFIX_PATTERN.match(prefix or ""):
        raise DeployError(f"--prefix {prefix!r}: use 1-20 lowercase letters, digits or hyphens, "
                          "not starting or ending with a hyphen")
    names = Names(
        prefix=prefix,
        account=account,
        region=region,
        partition=partition,
        data_bucket=data_bucket or f"{prefix}-data-{account}-{region}",
        software_bucket=software_bucket or f"{prefix}-software-{account}-{region}",
        launch_template=launch_template or default_launch_template(prefix),
        function_name=f"{prefix}-launcher",
        dlq_name=f"{prefix}-launcher-dlq",
        # IAM is global to the account, so its names carry the region as well.
        worker_role=f"{prefix}-worker-{region}",
        worker_instance_profile=f"{prefix}-worker-{region}",
        lambda_role=f"{prefix}-launcher-{region}",
        log_group=f"/aws/lambda/{prefix}-launcher",
    )
    for option, bucket in (("--data-bucket", names.data_bucket),
                           ("--software-bucket", names.software_bucket)):
        # The handler refuses bucket names outside this pattern, so deploy does too.
        if not lambda_function.BUCKET_NAME.match(bucket) or ".." in bucket:
            raise DeployError(f"{option} {bucket!r} is not a valid S3 bucket name "
                              "(3-63 lowercase letters, digits, dots or hyphens)")
    if names.data_bucket == names.software_bucket:
        raise DeployError("the data and software buckets must be different buckets")
    return names


def resolve_names(clients, prefix=DEFAULT_PREFIX, data_bucket=None, software_bucket=None):
    """Ask STS who we are and derive the Names for that account and the client region."""
    identity = clients("sts").get_caller_identity()
    partition = identity["Arn"].split(":")[1]
    return derive_names(prefix, identity["Account"], clients.region, partition,
                        data_bucket, software_bucket)


def discover_names(lam, names, explicit_data=None, explicit_software=None):
    """Prefer the bucket names the deployed function records over the derived defaults."""
    try:
        config = lam.get_function(FunctionName=names.function_name)
    except ClientError as err:
        if is_not_found(err):
            return names
        log_client_error(err, "reading the deployed function")
        raise
    tags = config.get("Tags") or {}
    env = (config["Configuration"].get("Environment") or {}).get("Variables") or {}
    return dataclasses.replace(
        names,
        data_bucket=explicit_data or tags.get(DATA_BUCKET_TAG) or names.data_bucket,
        software_bucket=(explicit_software or tags.get(SOFTWARE_BUCKET_TAG)
                         or env.get("SOFTWARE_BUCKET") or names.software_bucket),
        launch_template=env.get("LAUNCH_TEMPLATE") or names.launch_template,
    )


# --- IAM documents -------------------------------------------------------------------


_WHOLE_PLACEHOLDER = re.compile(r"^\$\{(\w+)\}$")


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
    """Render iam/NAME.json: `${Name}` placeholders from values; list values splice into lists."""
    template = json.loads((IAM_DIR / f"{name}.json").read_text(encoding="utf-8"))
    return _render_value(template, values)


def policy_values(names, launch_template_ids=(), published_files=PUBLISHED_FILES):
    """Return the values the iam/ templates are rendered with."""
    software = f"arn:{names.partition}:s3:::{names.software_bucket}"
    # Workers never read the routing table: their route arrives in the user-data.
    worker_files = [key for key in published_files if key in WORKER_FILES]
    return {
        "Partition": names.partition,
        "Region": names.region,
        "AccountId": names.account,
        "DataBucket": names.data_bucket,
        "SoftwareBucket": names.software_bucket,
        "LogGroup": names.log_group,
        "WorkerRoleArn": names.worker_role_arn,
        "DeadLetterQueueArn": names.dlq_arn,
        "LaunchTemplateArns": [names.launch_template_arn(i) for i in launch_template_ids],
        "WorkerSoftwareObjectArns": [f"{software}/{key}" for key in worker_files],
        "LauncherSoftwareObjectArns": [f"{software}/{key}" for key in LAUNCHER_SOFTWARE_KEYS],
    }


def policy_documents(names, launch_template_ids):
    """Return every rendered policy document by template name (what deploy applies)."""
    if isinstance(launch_template_ids, str):
        launch_template_ids = [launch_template_ids]
    values = policy_values(names, launch_template_ids)
    return {
        name: render_policy(name, values)
        for name in ("worker-trust", "worker-policy", "lambda-trust", "lambda-policy",
                     "software-public-read")
    }


# --- S3 ------------------------------------------------------------------------------


def bucket_exists(s3, bucket, account):
    """True if we own `bucket`; False if it does not exist; DeployError if someone else owns it."""
    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
        return True
    except ClientError as err:
        if is_not_found(err):
            return False
        if error_code(err) in ("403", "AccessDenied", "Forbidden"):
            raise DeployError(
                f"bucket {bucket} exists but is not this account's (or these credentials cannot "
                "read it); bucket names are global, so pick another with --data-bucket or "
                "--software-bucket") from None
        log_client_error(err, f"checking bucket {bucket}")
        raise


def create_bucket(s3, bucket, region):
    """Create a bucket in `region` (us-east-1 takes no location constraint)."""
    params = {"Bucket": bucket}
    if region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**params)
    except ClientError as err:
        if error_code(err) == "BucketAlreadyOwnedByYou":
            return
        if error_code(err) == "BucketAlreadyExists":
            raise DeployError(f"bucket name {bucket} is taken by another account; "
                              "choose another with --data-bucket / --software-bucket") from None
        log_client_error(err, f"creating bucket {bucket}")
        raise


def _get_or_none(call, **params):
    try:
        return call(**params)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, call.__name__)
        raise


def read_bucket_settings(s3, bucket):
    """Return the bucket's ownership, Block Public Access and default encryption settings."""
    ownership = _get_or_none(s3.get_bucket_ownership_controls, Bucket=bucket)
    block = _get_or_none(s3.get_public_access_block, Bucket=bucket)
    encryption = _get_or_none(s3.get_bucket_encryption, Bucket=bucket)
    rules = (encryption or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
    return {
        "ownership": ((ownership or {}).get("OwnershipControls", {}).get("Rules") or [{}])[0]
        .get("ObjectOwnership"),
        "block": (block or {}).get("PublicAccessBlockConfiguration"),
        "sse": (rules[0].get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
                if rules else None),
    }


def bucket_setting_differences(settings, block):
    """Return which bucket settings differ from what deploy wants (pure)."""
    found = []
    if settings["ownership"] != "BucketOwnerEnforced":
        found.append("object ownership")
    if settings["block"] != block:
        found.append("block public access")
    # SSE-S3: the roles hold no KMS permissions, so a KMS default would lock them out.
    if settings["sse"] != "AES256":
        found.append("default encryption")
    return found


def used_by_tag(prefix):
    """The tag key deploy puts on a bucket it uses but did not create (pure)."""
    return f"{USED_BY_TAG}{prefix}"


def read_bucket_tags(s3, bucket):
    """Return the bucket's tags as {key: value} ({} when it has none)."""
    tagging = _get_or_none(s3.get_bucket_tagging, Bucket=bucket)
    return {t["Key"]: t["Value"] for t in (tagging or {}).get("TagSet", [])}


def created_by(tags, names):
    """True when a bucket's tags say this deployment created it (pure)."""
    return tags.get(STACK_TAG) == names.prefix


def put_bucket_tags(s3, bucket, tags):
    """Set the bucket's whole tag set (PutBucketTagging replaces it); none deletes it."""
    if tags:
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(tags)})
    else:
        s3.delete_bucket_tagging(Bucket=bucket)


def merge_bucket_tags(s3, bucket, current, ours):
    """Add or update only our tags, keeping the owner's; return True if anything changed."""
    merged = dict(current, **ours)
    if merged == current:
        return False
    put_bucket_tags(s3, bucket, merged)
    return True


def ensure_bucket(s3, bucket, names, block, progress, what):
    """Create the bucket if needed and apply ownership, Block Public Access and SSE-S3; a bucket
    deploy did not create only gets our tag beside its own (and, for --public-software, the
    two Block Public Access settings a public policy needs). Return True if deploy created it."""
    existed = bucket_exists(s3, bucket, names.account)
    if not existed:
        create_bucket(s3, bucket, names.region)
    tags = read_bucket_tags(s3, bucket) if existed else {}
    if existed and not created_by(tags, names):
        differences = adopt_foreign_bucket(s3, bucket, names, block, tags)
        progress.record(UPDATED if differences else IN_PLACE, what, bucket,
                        ", ".join(differences))
        return False
    differences = bucket_setting_differences(read_bucket_settings(s3, bucket), block)
    if "object ownership" in differences:
        # ACLs disabled: every object belongs to the bucket owner, whoever wrote it.
        s3.put_bucket_ownership_controls(
            Bucket=bucket,
            OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    if "block public access" in differences:
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=block)
    if "default encryption" in differences:
        s3.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    if merge_bucket_tags(s3, bucket, tags, {STACK_TAG: names.prefix}) and existed:
        differences.append("tags")
    if not existed:
        progress.record(CREATED, what, bucket)
    elif differences:
        progress.record(UPDATED, what, bucket, ", ".join(differences))
    else:
        progress.record(IN_PLACE, what, bucket)
    return True


def adopt_foreign_bucket(s3, bucket, names, block, tags):
    """Use a bucket deploy did not create without undoing its owner's settings; return what changed.

    Its ownership, encryption, versioning, lifecycle and CORS stay as they are (a warning
    names what differs from deploy's defaults). Only a relaxed `block` (--public-software)
    is merged into its Block Public Access, since S3 refuses a public policy otherwise.
    """
    changed = []
    settings = read_bucket_settings(s3, bucket)
    current_block = settings["block"] or dict.fromkeys(PRIVATE_BLOCK, False)
    relaxed = {k: False for k, v in block.items() if v is False}
    if relaxed and dict(current_block, **relaxed) != current_block:
        s3.put_public_access_block(Bucket=bucket,
                                   PublicAccessBlockConfiguration=dict(current_block, **relaxed))
        changed.append("block public access")
    kept = [d for d in bucket_setting_differences(settings, dict(current_block, **relaxed))
            if d not in changed]
    if kept:
        logger.warning("bucket %s was not created by deploy: its %s left as its owner set them",
                       bucket, ", ".join(kept))
    if merge_bucket_tags(s3, bucket, tags, {used_by_tag(names.prefix): names.function_name}):
        changed.append("tags")
    return changed


def release_foreign_bucket(s3, bucket, names, progress, what):
    """Teardown of a bucket deploy did not create: remove only our tag; record it as kept."""
    tags = read_bucket_tags(s3, bucket)
    key = used_by_tag(names.prefix)
    if key in tags:
        put_bucket_tags(s3, bucket, {k: v for k, v in tags.items() if k != key})
    progress.record(KEPT, what, bucket, "not created by deploy: only its awsfun tag removed")


def file_sha256(path):
    """Hex SHA-256 of a local file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def published_digest(s3, bucket, key):
    """Return the sha256 recorded on a published object, or None if it is absent."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading s3://{bucket}/{key}")
        raise
    return head.get("Metadata", {}).get("sha256", "")


def software_sources(routes_file=ROUTES_FILE, repo=REPO):
    """Return {published key: local file}: the repository files, the routing table from routes_file."""
    sources = {key: Path(repo) / key for key in set(PUBLISHED_FILES) | set(FUNCTION_FILES)}
    sources[ROUTES_KEY] = Path(routes_file)
    return sources


def publish_software(s3, bucket, files=PUBLISHED_FILES, progress=None, repo=REPO, sources=None):
    """Upload the published files to the software bucket at their repo paths, if changed."""
    for key in files:
        if key.startswith("private/") or key not in PUBLISHED_FILES:
            raise DeployError(f"{key} is not on the published-files allowlist PUBLISHED_FILES")
        path = (sources or {}).get(key) or Path(repo) / key
        digest = file_sha256(path)
        current = published_digest(s3, bucket, key)
        if current == digest:
            if progress:
                progress.record(IN_PLACE, "software file", f"s3://{bucket}/{key}")
            continue
        content_type = {".py": "text/x-python", ".sh": "text/x-shellscript",
                        ".json": "application/json"}.get(Path(key).suffix,
                                                         "application/octet-stream")
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(),
                      ContentType=content_type, Metadata={"sha256": digest})
        if progress:
            progress.record(CREATED if current is None else UPDATED, "software file",
                            f"s3://{bucket}/{key}", "published")


def list_keys(s3, bucket, prefix="", limit=None):
    """Return the bucket's objects (dicts from ListObjectsV2), at most `limit` of them."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend(page.get("Contents", []))
        if limit is not None and len(found) >= limit:
            return found[:limit]
    return found


def remove_unpublished(s3, bucket, files, progress):
    """Delete objects in the software bucket that are not on the allowlist, so it holds exactly it."""
    for obj in list_keys(s3, bucket):
        if obj["Key"] not in files:
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
            progress.record(DELETED, "unpublished file", f"s3://{bucket}/{obj['Key']}")


def read_bucket_policy(s3, bucket):
    """Return the bucket policy as a dict, or None."""
    policy = _get_or_none(s3.get_bucket_policy, Bucket=bucket)
    return json.loads(policy["Policy"]) if policy else None


def ensure_software_access(s3, names, public, published_files, progress):
    """Grant (public) or withdraw (private) anonymous read of exactly the published keys."""
    current = read_bucket_policy(s3, names.software_bucket)
    statements = (current or {}).get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    # Other statements are the bucket owner's: kept beside ours, never replaced.
    others = [s for s in statements if s.get("Sid") != PUBLIC_READ_SID]
    ours = len(others) != len(statements)
    if public:
        rendered = render_policy("software-public-read",
                                 policy_values(names, published_files=published_files))
        wanted = dict(current or rendered, Statement=others + rendered["Statement"])
        if current is not None and canonical(current) == canonical(wanted):
            progress.record(IN_PLACE, "public read policy", names.software_bucket)
            return
        # Block Public Access was relaxed by ensure_bucket first; S3 refuses a public policy before.
        s3.put_bucket_policy(Bucket=names.software_bucket, Policy=json.dumps(wanted))
        progress.record(UPDATED if ours else CREATED, "public read policy",
                        names.software_bucket, "anonymous s3:GetObject on published keys")
    elif ours:
        if others:
            s3.put_bucket_policy(Bucket=names.software_bucket,
                                 Policy=json.dumps(dict(current, Statement=others)))
        else:
            s3.delete_bucket_policy(Bucket=names.software_bucket)
        progress.record(DELETED, "public read policy", names.software_bucket, "bucket is private")
    elif current is not None:
        logger.warning("software bucket %s has a bucket policy deploy did not write; left as is",
                       names.software_bucket)


def notification_config(s3, bucket):
    """Return the bucket's notification configuration without response metadata."""
    config = s3.get_bucket_notification_configuration(Bucket=bucket)
    config.pop("ResponseMetadata", None)
    return config


def with_notification(config, wanted):
    """Return the notification configuration with `wanted` (a Lambda configuration) in place of
    any of the same Id; every other consumer's configuration is kept as it is (pure)."""
    lambdas = [c for c in config.get("LambdaFunctionConfigurations", [])
               if c.get("Id") != wanted["Id"]]
    return dict(config, LambdaFunctionConfigurations=lambdas + [wanted])


def without_notification(config, notification_id):
    """Return the notification configuration without our Lambda configuration (pure)."""
    kept = [c for c in config.get("LambdaFunctionConfigurations", [])
            if c.get("Id") != notification_id]
    config = {k: v for k, v in config.items() if k != "LambdaFunctionConfigurations"}
    return dict(config, LambdaFunctionConfigurations=kept) if kept else config


def _events_overlap(first, second):
    """True when two S3 event types share an event (s3:ObjectCreated:* covers :Put) (pure)."""
    if first == second:
        return True
    return any(a.endswith(":*") and b.startswith(a[:-1]) for a, b in
               ((first, second), (second, first)))


def _filter_values(config):
    rules = config.get("Filter", {}).get("Key", {}).get("FilterRules", [])
    values = {rule.get("Name", "").lower(): rule.get("Value", "") for rule in rules}
    return values.get("prefix", ""), values.get("suffix", "")


def notifications_overlap(first, second):
    """True when S3 would refuse two notification configurations side by side (pure).

    "Configurations overlap" (Amazon S3 User Guide, event notifications, "Examples of valid
    and invalid configurations"): they share an event type, and one key could match both
    filters: each prefix starts the other (or is empty), and each suffix ends the other.
    """
    if not any(_events_overlap(a, b) for a in first.get("Events", [])
               for b in second.get("Events", [])):
        return False
    (prefix_a, suffix_a), (prefix_b, suffix_b) = _filter_values(first), _filter_values(second)
    prefixes = prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a)
    suffixes = suffix_a.endswith(suffix_b) or suffix_b.endswith(suffix_a)
    return prefixes and suffixes


NOTIFICATION_KINDS = ("LambdaFunctionConfigurations", "QueueConfigurations",
                      "TopicConfigurations")


def overlapping_notifications(config, wanted):
    """Return "Kind Id" of each other configuration S3 would refuse beside `wanted` (pure)."""
    found = []
    for kind in NOTIFICATION_KINDS:
        for other in config.get(kind, []):
            if other.get("Id") != wanted["Id"] and notifications_overlap(wanted, other):
                found.append(f"{kind[:-len('Configurations')]} configuration "
                             f"{other.get('Id') or '(no id)'}")
    return found


def data_notification(names, function_arn):
    """Our Lambda notification configuration on the data bucket (pure)."""
    return {"Id": names.notification_id, "LambdaFunctionArn": function_arn,
            "Events": ["s3:ObjectCreated:*"]}


def ensure_data_notification(s3, names, function_arn, progress):
    """Send the data bucket's ObjectCreated events to the function, keeping other notifications."""
    config = notification_config(s3, names.data_bucket)
    wanted = data_notification(names, function_arn)
    current = [c for c in config.get("LambdaFunctionConfigurations", [])
               if c.get("Id") == names.notification_id]
    if current and not mismatches(wanted, current[0]) and "Filter" not in current[0]:
        progress.record(IN_PLACE, "object-created event", names.data_bucket)
        return
    config = with_notification(config, wanted)
    # S3 test-sends to the function when the configuration is saved; right after the
    # invoke permission is added that can fail for a few seconds.
    retry_while(("Unable to validate",),
                lambda: s3.put_bucket_notification_configuration(
                    Bucket=names.data_bucket, NotificationConfiguration=config),
                f"setting the notification on {names.data_bucket}")
    progress.record(UPDATED if current else CREATED, "object-created event", names.data_bucket,
                    f"-> {names.function_name}")


def remove_data_notification(s3, names, progress):
    """Remove only deploy's notification from the data bucket, keeping any others."""
    if not bucket_exists(s3, names.data_bucket, names.account):
        progress.record(GONE, "object-created event", names.data_bucket)
        return
    config = notification_config(s3, names.data_bucket)
    if not any(c.get("Id") == names.notification_id
               for c in config.get("LambdaFunctionConfigurations", [])):
        progress.record(GONE, "object-created event", names.data_bucket)
        return
    config = without_notification(config, names.notification_id)
    s3.put_bucket_notification_configuration(Bucket=names.data_bucket,
                                             NotificationConfiguration=config)
    progress.record(DELETED, "object-created event", names.data_bucket)


def delete_bucket(s3, bucket, account, progress, what):
    """Empty (every version and delete marker) and delete a bucket; tolerate it being gone."""
    if not bucket_exists(s3, bucket, account):
        progress.record(GONE, what, bucket)
        return
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket):
        batch = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                 for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        # DeleteObjects takes at most 1,000 keys; a page holds at most 1,000 versions
        # plus delete markers, so send it in slices.
        for start in range(0, len(batch), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": batch[start:start + 1000],
                                                     "Quiet": True})
    s3.delete_bucket(Bucket=bucket)
    progress.record(DELETED, what, bucket)


# --- SQS and CloudWatch Logs --------------------------------------------------------


def find_queue(sqs, name):
    """Return (url, attributes) of the queue, or None if it does not exist."""
    try:
        url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"looking up queue {name}")
        raise
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return url, attributes


def ensure_queue(sqs, names, progress):
    """Create the dead-letter queue (encrypted, 14 days' retention) if needed; return its URL."""
    found = find_queue(sqs, names.dlq_name)
    if found is None:
        # SQS refuses a name deleted less than 60 s ago (teardown then deploy).
        url = retry_while(
            ("QueueDeletedRecently",),
            lambda: sqs.create_queue(QueueName=names.dlq_name, Attributes=DLQ_ATTRIBUTES,
                                     tags={STACK_TAG: names.prefix})["QueueUrl"],
            f"creating queue {names.dlq_name}", timeout=75, delay=10)
        progress.record(CREATED, "dead-letter queue", names.dlq_name)
        return url
    url, attributes = found
    changed = {k: v for k, v in DLQ_ATTRIBUTES.items() if attributes.get(k) != v}
    if changed:
        sqs.set_queue_attributes(QueueUrl=url, Attributes=changed)
        progress.record(UPDATED, "dead-letter queue", names.dlq_name, ", ".join(changed))
    else:
        progress.record(IN_PLACE, "dead-letter queue", names.dlq_name)
    return url


def find_log_group(logs, name):
    """Return the log group's description, or None."""
    for page in logs.get_paginator("describe_log_groups").paginate(logGroupNamePrefix=name):
        for group in page.get("logGroups", []):
            if group["logGroupName"] == name:
                return group
    return None


def ensure_log_group(logs, names, progress):
    """Create the function's log group with a retention limit (the role may not create it)."""
    group = find_log_group(logs, names.log_group)
    if group is None:
        logs.create_log_group(logGroupName=names.log_group, tags={STACK_TAG: names.prefix})
    if group is None or group.get("retentionInDays") != LOG_RETENTION_DAYS:
        logs.put_retention_policy(logGroupName=names.log_group,
                                  retentionInDays=LOG_RETENTION_DAYS)
        progress.record(CREATED if group is None else UPDATED, "log group", names.log_group,
                        f"{LOG_RETENTION_DAYS} days' retention")
    else:
        progress.record(IN_PLACE, "log group", names.log_group)


# --- IAM -----------------------------------------------------------------------------


def read_role(iam, role_name):
    """Return the role's trust policy, inline policies and attached policies, or None."""
    try:
        role = iam.get_role(RoleName=role_name)["Role"]
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading role {role_name}")
        raise
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


def ensure_role(iam, role_name, trust, policy_name, policy, names, progress, what):
    """Create or correct a role so it holds exactly one inline policy; return its ARN."""
    role = read_role(iam, role_name)
    if role is None:
        iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(trust),
                        Description=f"awsfun {what} ({names.prefix}, {names.region}); "
                                    "managed by deploy.sh",
                        Tags=tag_list({STACK_TAG: names.prefix}))
        iam.get_waiter("role_exists").wait(RoleName=role_name,
                                           WaiterConfig={"Delay": 2, "MaxAttempts": 30})
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
    try:
        return iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading instance profile {name}")
        raise


def ensure_instance_profile(iam, names, progress):
    """Create the worker instance profile holding exactly the worker role; return its ARN."""
    name, role = names.worker_instance_profile, names.worker_role
    profile = read_instance_profile(iam, name)
    created = profile is None
    if created:
        iam.create_instance_profile(InstanceProfileName=name,
                                    Tags=tag_list({STACK_TAG: names.prefix}))
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
    progress.record(outcome, "worker instance profile", name)
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
        profiles = iam.list_instance_profiles_for_role(RoleName=role_name)["InstanceProfiles"]
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


# --- routing table -------------------------------------------------------------------


def load_routes_file(path=ROUTES_FILE):
    """Return the routes of a routing table file, validated as the handler would; DeployError names the problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise DeployError(f"cannot read the routing table {path}: {err.strerror}") from None
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise DeployError(f"routing table {path} is not valid JSON: {err}") from None
    try:
        return lambda_function.validate_routes(table)
    except lambda_function.RoutesError as err:
        raise DeployError(f"routing table {path}: {err}") from None


def template_instance_types(routes, default_template, default_type):
    """Return {launch template: instance type}: the worker template, then each one the routes name (pure).

    A route without instance_type takes the default; two routes that give one template
    different types, or a route that gives the worker template another type than
    --instance-type, are refused, since one template has one instance type.
    """
    chosen = {default_template: (default_type, "--instance-type")}
    for route in routes:
        wanted = route.get("instance_type")
        if wanted is None:
            continue
        name = route["launch_template"]
        have, source = chosen.setdefault(name, (wanted, f"route {route['name']!r}"))
        if have != wanted:
            raise DeployError(
                f"route {route['name']!r} wants launch template {name} as {wanted}, but "
                f"{source} makes it {have}; give the route its own launch_template")
    types = {name: chosen[name][0] for name in chosen}
    for route in routes:
        types.setdefault(route["launch_template"], default_type)
    return types


def check_routing_table(routes_file, default_template, default_type):
    """Return (routes, {launch template: instance type}) of a routing table file; DeployError names the file and problem."""
    routes = load_routes_file(routes_file)
    try:
        return routes, template_instance_types(routes, default_template, default_type)
    except DeployError as err:
        raise DeployError(f"routing table {routes_file}: {err}") from None


def routes_by_template(routes, default_template):
    """Return {launch template: [route names]}; the worker template also serves unmatched keys (pure)."""
    found = {default_template: ["default"]}
    for route in routes:
        found.setdefault(route["launch_template"], []).append(route["name"])
    return found


# --- EC2 launch template -------------------------------------------------------------


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


def worker_launch_template_data(image_id, instance_type, profile_name, device, size, prefix):
    """Return the LaunchTemplateData of the worker template (pure)."""
    tags = tag_list({STACK_TAG: prefix, "awsfun:role": "worker"})
    return {
        "ImageId": image_id,
        "InstanceType": instance_type,
        "IamInstanceProfile": {"Name": profile_name},
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
    if not owner:
        ec2.create_tags(Resources=[template["id"]], Tags=tag_list({STACK_TAG: names.prefix}))
    return template["id"]


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


def terminate_workers(ec2, names, progress, wait=True, templates=None):
    """Terminate every worker still alive so teardown orphans none; wait (bounded) for it."""
    templates = templates or [names.launch_template]
    workers = find_workers(ec2, templates, states=("pending", "running", "stopping", "stopped"))
    if not workers:
        progress.record(GONE, "running workers", ", ".join(templates), "none")
        return []
    ids = [w["instance_id"] for w in workers]
    ec2.terminate_instances(InstanceIds=ids)
    if wait:
        try:
            ec2.get_waiter("instance_terminated").wait(
                InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 60})
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


# --- Lambda --------------------------------------------------------------------------


def build_function_zip(repo=REPO, files=FUNCTION_FILES, sources=None):
    """Return the function's zip: the handler with the bootstrap template and routes beside it, reproducibly."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in files:
            # Fixed timestamps and modes: the same sources give the same bytes, so a
            # re-run can tell from CodeSha256 that nothing changed.
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, ((sources or {}).get(name) or Path(repo) / name).read_bytes())
    return buffer.getvalue()


def code_sha256(zip_bytes):
    """Lambda's CodeSha256 of a zip: base64 of its SHA-256."""
    return base64.b64encode(hashlib.sha256(zip_bytes).digest()).decode("ascii")


def handler_environment(names, environ=None):
    """Return the function's environment variables (the contract's names)."""
    environ = os.environ if environ is None else environ
    return {
        "LAUNCH_TEMPLATE": names.launch_template,
        "SOFTWARE_BUCKET": names.software_bucket,
        "BOOTSTRAP_KEY": BOOTSTRAP_KEY,
        # Fixed, never from the environment: workers write under analysis/, and a skip
        # substring that misses those keys would make every report launch a new worker.
        "SKIP_SUBSTRING": lambda_function.DEFAULTS["SKIP_SUBSTRING"],
        "WATCHDOG_MINUTES": watchdog_minutes(environ),
    }


def watchdog_minutes(environ):
    """WATCHDOG_MINUTES from the caller's environment (whole minutes >= 1), else the contract's."""
    value = environ.get("WATCHDOG_MINUTES") or lambda_function.DEFAULTS["WATCHDOG_MINUTES"]
    if not value.isdigit() or int(value) < 1:
        raise DeployError(f"WATCHDOG_MINUTES={value!r}: expected whole minutes >= 1")
    return str(int(value))


def function_configuration(names, environ=None):
    """Return the function's configuration parameters, shared by create and update (pure)."""
    return {
        "FunctionName": names.function_name,
        "Role": names.lambda_role_arn,
        "Runtime": RUNTIME,
        "Handler": HANDLER,
        "Description": f"awsfun launcher: one EC2 worker per new object in {names.data_bucket}",
        "Timeout": FUNCTION_TIMEOUT,
        "MemorySize": FUNCTION_MEMORY,
        "Environment": {"Variables": handler_environment(names, environ)},
        "DeadLetterConfig": {"TargetArn": names.dlq_arn},
        "LoggingConfig": {"LogFormat": "JSON", "ApplicationLogLevel": "INFO",
                          "SystemLogLevel": "WARN", "LogGroup": names.log_group},
    }


def function_tags(names):
    """Tags on the function; they also let status and teardown find explicitly named buckets."""
    return {STACK_TAG: names.prefix, DATA_BUCKET_TAG: names.data_bucket,
            SOFTWARE_BUCKET_TAG: names.software_bucket}


def read_function(lam, name):
    """Return the function's configuration and tags, or None."""
    try:
        response = lam.get_function(FunctionName=name)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading function {name}")
        raise
    config = response["Configuration"]
    config["Tags"] = response.get("Tags") or {}
    return config


def function_differences(desired, config, zip_sha):
    """Return which reported settings of a deployed function differ from `desired` (pure).

    Settings the service does not report are not judged (moto omits LoggingConfig and
    DeadLetterConfig); AWS reports both.
    """
    found = ["code"] if config.get("CodeSha256") != zip_sha else []
    for key, value in desired.items():
        if key == "FunctionName" or config.get(key) is None:
            continue
        if key == "Environment":
            # Exactly: a stray DRY_RUN=1 left from a permission check must count as drift.
            if (config[key].get("Variables") or {}) != value["Variables"]:
                found.append(key)
        elif mismatches(value, config[key]):
            found.append(key)
    return found


def _wait_for_function(lam, name, waiter):
    lam.get_waiter(waiter).wait(FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 60})


def ensure_function(lam, names, zip_bytes, progress, environ=None, sleep=time.sleep):
    """Create the function, or update its code and configuration only where they changed."""
    desired = function_configuration(names, environ)
    config = read_function(lam, names.function_name)
    if config is None:
        params = dict(desired, Code={"ZipFile": zip_bytes}, Tags=function_tags(names),
                      Architectures=["x86_64"], PackageType="Zip")
        # A role created seconds ago may not be assumable by Lambda yet.
        created = wait_out_propagation(lambda: lam.create_function(**params),
                                       f"creating function {names.function_name}", sleep)
        _wait_for_function(lam, names.function_name, "function_active_v2")
        progress.record(CREATED, "function", names.function_name, RUNTIME)
        return created["FunctionArn"]
    differences = function_differences(desired, config, code_sha256(zip_bytes))
    if "code" in differences:
        lam.update_function_code(FunctionName=names.function_name, ZipFile=zip_bytes)
        _wait_for_function(lam, names.function_name, "function_updated_v2")
    if any(d != "code" for d in differences):
        wait_out_propagation(lambda: lam.update_function_configuration(**desired),
                             f"updating function {names.function_name}", sleep)
        _wait_for_function(lam, names.function_name, "function_updated_v2")
    wanted_tags = function_tags(names)
    if any(config["Tags"].get(k) != v for k, v in wanted_tags.items()):
        lam.tag_resource(Resource=config["FunctionArn"], Tags=wanted_tags)
    progress.record(UPDATED if differences else IN_PLACE, "function", names.function_name,
                    ", ".join(differences))
    return config["FunctionArn"]


def read_event_invoke_config(lam, name):
    """Return the function's asynchronous-invocation settings, or None."""
    return _get_or_none(lam.get_function_event_invoke_config, FunctionName=name)


def ensure_event_invoke_config(lam, names, progress, sleep=time.sleep):
    """Bound Lambda's retries and event age; what still fails goes to the dead-letter queue."""
    wanted = {"MaximumRetryAttempts": MAX_RETRY_ATTEMPTS,
              "MaximumEventAgeInSeconds": MAX_EVENT_AGE_SECONDS}
    current = read_event_invoke_config(lam, names.function_name)
    if current is not None and not mismatches(wanted, current):
        progress.record(IN_PLACE, "async retry settings", names.function_name)
        return
    wait_out_propagation(
        lambda: lam.put_function_event_invoke_config(FunctionName=names.function_name, **wanted),
        f"setting the retry settings of {names.function_name}", sleep)
    progress.record(CREATED if current is None else UPDATED, "async retry settings",
                    names.function_name, f"{MAX_RETRY_ATTEMPTS} retries")


def s3_permission_statement(lam, names):
    """Return the function policy's statement that lets S3 invoke it, or None."""
    policy = _get_or_none(lam.get_policy, FunctionName=names.function_name)
    if not policy:
        return None
    for statement in json.loads(policy["Policy"]).get("Statement", []):
        if statement.get("Sid") == names.permission_sid:
            return statement
    return None


def permission_matches(statement, names):
    """True when the S3 invoke statement names our bucket and account (pure)."""
    if not statement:
        return False
    condition = statement.get("Condition", {})
    return (
        statement.get("Principal", {}).get("Service") == "s3.amazonaws.com"
        and statement.get("Action") == "lambda:InvokeFunction"
        and condition.get("ArnLike", {}).get("AWS:SourceArn") == names.data_bucket_arn
        and condition.get("StringEquals", {}).get("AWS:SourceAccount") == names.account
    )


def ensure_s3_invoke_permission(lam, names, progress, sleep=time.sleep):
    """Let S3 invoke the function for the data bucket of this account only."""
    statement = s3_permission_statement(lam, names)
    if permission_matches(statement, names):
        progress.record(IN_PLACE, "S3 invoke permission", names.function_name)
        return
    if statement:
        lam.remove_permission(FunctionName=names.function_name, StatementId=names.permission_sid)
    # SourceAccount too: a bucket name freed by its owner could be re-created elsewhere.
    wait_out_propagation(
        lambda: lam.add_permission(FunctionName=names.function_name,
                                   StatementId=names.permission_sid,
                                   Action="lambda:InvokeFunction", Principal="s3.amazonaws.com",
                                   SourceArn=names.data_bucket_arn, SourceAccount=names.account),
        f"letting S3 invoke {names.function_name}", sleep)
    progress.record(UPDATED if statement else CREATED, "S3 invoke permission",
                    names.function_name, names.data_bucket)


def delete_function(lam, names, progress):
    """Delete the function (its permission and retry settings go with it)."""
    try:
        lam.delete_function(FunctionName=names.function_name)
    except ClientError as err:
        if is_not_found(err):
            progress.record(GONE, "function", names.function_name)
            return
        log_client_error(err, f"deleting function {names.function_name}")
        raise
    progress.record(DELETED, "function", names.function_name)


# --- reconcile: nothing lost ---------------------------------------------------------

REPORTED, FAILED, RUNNING, UNPROCESSED = "reported", "error-reported", "running", "unprocessed"
DLQ_VISIBILITY_SECONDS = 300
# How often reconcile relaunches an input whose workers all ended without a report (each
# attempt its own deterministic ClientToken) before it reports the input as failed.
MAX_RELAUNCHES = 3
# Every worker carries its object version's tag (lambda_function.object_version_tag), whichever
# event, scan or attempt launched it; reconcile cannot know an event's token (no sequencer).
OBJECT_TAG = "awsfun:object"
# EC2's states of an instance that will still write its report.
LIVE_STATES = ("pending", "running")


def worker_tokens(obj):
    """Every ClientToken reconcile may launch this upload with: attempt 0, then each relaunch's (pure)."""
    return [lambda_function.client_token(obj, attempt) for attempt in range(MAX_RELAUNCHES + 1)]


def running_worker(obj, running):
    """Return the instance id of a running worker for this object version, or None (pure).

    `running` maps awsfun:object tag values to instance ids (see running_tokens).
    """
    return running.get(lambda_function.object_version_tag(obj))


def deployed_settings(lam, names):
    """Return the handler's settings exactly as the deployed function has them (its environment)."""
    config = read_function(lam, names.function_name)
    if config is None:
        raise DeployError(f"{names.function_name} is not deployed (run ./deploy.sh --prefix "
                          f"{names.prefix} deploy first)")
    env = dict((config.get("Environment") or {}).get("Variables") or {}, AWS_REGION=names.region)
    # Reconcile launches for real even if a permission check left DRY_RUN on the function.
    env.pop("DRY_RUN", None)
    return lambda_function.load_settings(env)


def object_from_head(bucket, key, head):
    """Describe an object as parse_record does, from HeadObject (pure).

    There is no event, so no sequencer: LastModified names this upload instead, which keeps
    the ClientToken the same on every reconcile run and apart from any event's token.
    """
    modified = head.get("LastModified")
    return {"bucket": bucket, "key": key, "event_name": "ObjectCreated:Put",
            "etag": head["ETag"].strip('"'), "version_id": head.get("VersionId") or "",
            "sequencer": "", "size": head.get("ContentLength"),
            "last_modified": modified.isoformat() if isinstance(modified, datetime)
            else str(modified or "")}


def head_input(s3, bucket, key):
    """Return the object as object_from_head describes it, or None if it no longer exists."""
    try:
        return object_from_head(bucket, key, s3.head_object(Bucket=bucket, Key=key))
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading s3://{bucket}/{key}")
        raise


def recorded_input_etag(s3, bucket, report):
    """Return the input eTag a report records, "" if it records none, or None if there is no report."""
    try:
        head = s3.head_object(Bucket=bucket, Key=report)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading s3://{bucket}/{report}")
        raise
    metadata = head.get("Metadata", {})
    if "input-etag" in metadata:
        return metadata["input-etag"]
    # bootstrap.sh writes its error reports without metadata; the body names the eTag.
    body = s3.get_object(Bucket=bucket, Key=report)["Body"].read()
    try:
        return str((json.loads(body).get("input") or {}).get("etag") or "")
    except (ValueError, AttributeError):
        return ""


def settled_state(etag, report_etag, error_etag):
    """Return REPORTED or FAILED when an input needs no worker, else None (pure).

    A report counts only for the input's current eTag. An error report is a visible
    failure (not re-launched) unless it names another eTag; one that names none is
    taken as current, since re-launching a failure nobody looked at helps no one.
    """
    if report_etag is not None and report_etag == etag:
        return REPORTED
    if error_etag is not None and error_etag in ("", etag):
        return FAILED
    return None


def report_etags(s3, bucket, key, present=None):
    """Return (report eTag, error report eTag) of an input; `present` (listed report keys) saves HEADs."""
    found = []
    for suffix in (".json", ".error.json"):
        target = AwsS3.report_key(key, suffix)
        found.append(None if present is not None and target not in present
                     else recorded_input_etag(s3, bucket, target))
    return tuple(found)


def running_tokens(ec2, bucket):
    """Return {awsfun:object tag: instance id} of the workers pending or running for the bucket's objects."""
    running = {}
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{BUCKET_TAG}", "Values": [bucket]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if tags.get(OBJECT_TAG):
                    running[tags[OBJECT_TAG]] = instance["InstanceId"]
    return running


def instance_by_token(ec2, token):
    """Return (instance id, state) of the worker launched with this ClientToken, or (None, None).

    By the handler's awsfun:token tag: the one that lives, if any does.
    """
    found = (None, None)
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": f"tag:{TOKEN_TAG}", "Values": [token]}]):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                found = (instance["InstanceId"], instance["State"]["Name"])
                if found[1] in LIVE_STATES:
                    return found
    return found


def instance_state(ec2, instance_id):
    """Return an instance's state name, or "gone" when EC2 no longer shows it."""
    try:
        # A new instance may take seconds to show (eventual consistency); a worker that
        # ended long ago never shows again.
        ec2.get_waiter("instance_exists").wait(InstanceIds=[instance_id],
                                               WaiterConfig={"Delay": 2, "MaxAttempts": 10})
    except WaiterError:
        return "gone"
    reservations = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
    return reservations[0]["Instances"][0]["State"]["Name"]


def is_input(key, skip_substring, key_prefix="", size=None):
    """True for a key the handler would launch a worker for, under key_prefix (pure).

    A console folder marker (zero-byte, ending in '/') is no input.
    """
    return (key.startswith(key_prefix) and not (skip_substring and skip_substring in key)
            and not lambda_function.is_folder_marker(key, size))


def scan_inputs(s3, bucket, skip_substring, tokens, key_prefix=""):
    """Return one entry per input under key_prefix: key, state and, unless settled, its object and token.

    `tokens` maps awsfun:object tag values to running instance ids (running_tokens).
    """
    listing = [o for o in list_keys(s3, bucket, prefix=key_prefix)
               if is_input(o["Key"], skip_substring, key_prefix, o.get("Size"))]
    present = {o["Key"] for o in list_keys(s3, bucket, prefix=AwsS3.REPORT_PREFIX)}
    scanned = []
    for listed in listing:
        key, etag = listed["Key"], listed["ETag"].strip('"')
        state = settled_state(etag, *report_etags(s3, bucket, key, present))
        entry = {"key": key, "etag": etag, "state": state}
        if state is None:
            # HeadObject gives the VersionId and LastModified the scan's token is made of.
            obj = head_input(s3, bucket, key)
            if obj is None:
                continue  # deleted since the listing
            running = running_worker(obj, tokens)
            entry.update(obj=obj, token=lambda_function.client_token(obj), instance_id=running,
                         state=RUNNING if running else UNPROCESSED)
        scanned.append(entry)
    return scanned


def state_counts(scanned):
    """Count scanned inputs by state (pure)."""
    counts = {"inputs": len(scanned), "reports": 0, "error_reports": 0, "running": 0,
              "unprocessed": 0}
    field = {REPORTED: "reports", FAILED: "error_reports", RUNNING: "running",
             UNPROCESSED: "unprocessed"}
    for entry in scanned:
        counts[field[entry["state"]]] += 1
    return counts


def count_inputs(clients, names):
    """Return status's counts of inputs by state (see state_counts); None without a data bucket."""
    s3 = clients("s3")
    if not bucket_exists(s3, names.data_bucket, names.account):
        return None
    scanned = scan_inputs(s3, names.data_bucket, lambda_function.DEFAULTS["SKIP_SUBSTRING"],
                          running_tokens(clients("ec2"), names.data_bucket))
    return state_counts(scanned)


def dead_letter_event(body):
    """Return the S3 event in a dead-letter message (the body, or a destination's requestPayload)."""
    try:
        event = json.loads(body)
    except ValueError:
        raise lambda_function.EventError("the message body is not JSON") from None
    if isinstance(event, dict) and isinstance(event.get("requestPayload"), dict):
        event = event["requestPayload"]
    return event


def receive_dead_letters(sqs, queue_url):
    """Yield every message in the queue once, each hidden from others while this run handles it."""
    seen = set()
    while True:
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
            VisibilityTimeout=DLQ_VISIBILITY_SECONDS, MessageAttributeNames=["All"],
        ).get("Messages", [])
        fresh = [m for m in messages if m["MessageId"] not in seen]
        if not fresh:
            return
        for message in fresh:
            seen.add(message["MessageId"])
            yield message


def dead_letter_summary(entry):
    """One line for a person: each record's key and outcome, or why the message was kept (pure)."""
    records = ", ".join(f"{r['key']}: {r['outcome']}" + (f" {r['detail']}" if r["detail"] else "")
                        for r in entry["records"])
    return "; ".join(part for part in (records, entry.get("reason", "")) if part) or "no records"


class Reconciler:
    """One reconcile run: what it knows of running workers, what it launched, what it found."""

    def __init__(self, clients, names, settings, key_prefix, dry_run, progress):
        self.s3, self.ec2, self.sqs = clients("s3"), clients("ec2"), clients("sqs")
        self.names, self.settings = names, settings
        self.key_prefix, self.dry_run, self.progress = key_prefix, dry_run, progress
        self.tokens = running_tokens(self.ec2, names.data_bucket)
        self.refused = {}  # object version -> error: a refused launch is not tried twice a run
        self.queue_url = None
        self.result = {"dry_run": dry_run, "key_prefix": key_prefix, "unprocessed": [],
                       "launched": [], "failed": [], "replayed": [], "dlq_failed": [],
                       "dlq_kept": []}

    def launch(self, obj):
        """Launch one object's worker through the handler's path; return (instance id, None) or (None, error).

        Attempt 0 is the token of the object's event (a dead letter) or of the scan. EC2
        (since January 2025) answers a token already used with IdempotentInstanceTerminated
        when its worker has ended, which, with no report (or the scan would not be here),
        means it was lost; and with IdempotentParameterMismatch when it was launched with
        other settings: that worker is kept if it lives, else it ended like the first. Only
        an ended worker moves on to the next attempt's token, MAX_RELAUNCHES times at most.
        An older EC2 returned the ended instance itself: its state says the same.
        """
        # By object version: a refused launch is not tried again in this run, event or scan.
        token = lambda_function.object_version_tag(obj)
        if token in self.refused:
            return None, self.refused[token]
        running = running_worker(obj, self.tokens)
        if running:
            return running, None
        ended = []
        for attempt, attempt_token in enumerate(worker_tokens(obj)):
            try:
                # local_dir "": render and route with what deploy published, like the function.
                instance_id = lambda_function.launch_object(obj, self.settings, ec2=self.ec2,
                                                            s3=self.s3, local_dir="",
                                                            attempt=attempt)
            except lambda_function.LAUNCH_ERRORS as err:
                code, message = lambda_function.describe_failure(err)
                if code == lambda_function.IDEMPOTENT_MISMATCH:
                    instance_id, state = instance_by_token(self.ec2, attempt_token)
                elif code == lambda_function.IDEMPOTENT_TERMINATED:
                    instance_id, state = None, "terminated"
                else:
                    logger.error("launch for s3://%s/%s failed: %s %s", obj["bucket"],
                                 obj["key"], code, message)
                    self.refused[token] = f"{code}: {message}"
                    return None, self.refused[token]
                logger.info("s3://%s/%s: ClientToken attempt %d answered %s", obj["bucket"],
                            obj["key"], attempt, code)
            else:
                state = instance_state(self.ec2, instance_id)
            if state in LIVE_STATES:
                self.tokens[lambda_function.object_version_tag(obj)] = instance_id
                return instance_id, None
            logger.warning("s3://%s/%s: ClientToken attempt %d is %s's, which is %s with no "
                           "report; relaunching", obj["bucket"], obj["key"], attempt,
                           instance_id or "a worker", state or "gone")
            ended.append(f"{instance_id or 'attempt ' + str(attempt)} ({state or 'gone'})")
        self.refused[token] = (f"every ClientToken is used by a worker that ended without a "
                               f"report: {', '.join(ended)}; see their console output")
        logger.error("s3://%s/%s: %s", obj["bucket"], obj["key"], self.refused[token])
        return None, self.refused[token]

    def replay_record(self, obj):
        """Return (outcome, instance id or error) for one dead-lettered record."""
        if not obj["key"].startswith(self.key_prefix):
            return "outside --key-prefix", None
        running = running_worker(obj, self.tokens)
        if running:
            return "worker running", running
        current = head_input(self.s3, obj["bucket"], obj["key"])
        if current is None:
            return "object deleted", None
        if current["etag"] != obj["etag"] or (obj["version_id"] and
                                              obj["version_id"] != current["version_id"]):
            # The current version is the scan's to launch; this event's is gone.
            return "superseded by a newer version", None
        state = settled_state(obj["etag"], *report_etags(self.s3, obj["bucket"], obj["key"]))
        if state:
            return state, None
        if self.dry_run:
            return "would launch", None
        instance_id, error = self.launch(obj)
        if not instance_id:
            return "failed", error
        self.result["launched"].append({"key": obj["key"], "instance_id": instance_id,
                                        "source": "dead-letter queue"})
        return "launched", instance_id

    def replay_message(self, message):
        """Replay one dead-letter message's records; delete it only when none of them failed."""
        entry = {"message_id": message["MessageId"], "records": []}
        try:
            objects, skipped = lambda_function.parse_records(dead_letter_event(message["Body"]))
        except lambda_function.EventError as err:
            entry["reason"] = f"not an S3 event: {err}"
            self.result["dlq_failed"].append(entry)
            self.progress.record("kept", "dead letter", message["MessageId"], entry["reason"])
            return False
        for obj in objects:
            reason = lambda_function.should_process(obj, self.settings["SKIP_SUBSTRING"])
            outcome, detail = (reason, None) if reason else self.replay_record(obj)
            entry["records"].append({"key": obj["key"], "outcome": outcome,
                                     "detail": detail})
        outcomes = {r["outcome"] for r in entry["records"]}
        if "failed" in outcomes:
            entry["reason"] = "a launch failed"
            self.result["dlq_failed"].append(entry)
        elif self.dry_run or "outside --key-prefix" in outcomes:
            entry["reason"] = "dry run" if self.dry_run else "outside --key-prefix"
            self.result["dlq_kept"].append(entry)
        else:
            # Only now: every record launched (or needs no launch), so nothing is lost.
            self.sqs.delete_message(QueueUrl=self.queue_url,
                                    ReceiptHandle=message["ReceiptHandle"])
            self.result["replayed"].append(entry)
        replayed = "reason" not in entry
        self.progress.record("replayed" if replayed else "kept", "dead letter",
                             message["MessageId"], dead_letter_summary(entry))
        return replayed

    def replay_dead_letters(self):
        """Replay the dead-letter queue; messages kept become visible again at the end."""
        found = find_queue(self.sqs, self.names.dlq_name)
        if found is None:
            self.progress.record(GONE, "dead-letter queue", self.names.dlq_name)
            return
        self.queue_url = found[0]
        if not int(found[1].get("ApproximateNumberOfMessages", 0)):
            # Saves a long poll on an empty queue; a letter that lands meanwhile waits for the next run.
            self.progress.record("checked", "dead-letter queue", self.names.dlq_name, "empty")
            return
        kept = [message for message in receive_dead_letters(self.sqs, self.queue_url)
                if not self.replay_message(message)]
        for message in kept:
            # Visible again at once, for the next reconcile or a person to inspect.
            self.sqs.change_message_visibility(QueueUrl=self.queue_url,
                                               ReceiptHandle=message["ReceiptHandle"],
                                               VisibilityTimeout=0)

    def launch_unprocessed(self):
        """Scan the data bucket and launch every unprocessed input."""
        scanned = scan_inputs(self.s3, self.names.data_bucket, self.settings["SKIP_SUBSTRING"],
                              self.tokens, self.key_prefix)
        self.result["counts"] = state_counts(scanned)
        for entry in scanned:
            if entry["state"] != UNPROCESSED:
                continue
            self.result["unprocessed"].append(entry["key"])
            if self.dry_run:
                self.progress.record("would launch", "unprocessed input", entry["key"])
                continue
            instance_id, error = self.launch(entry["obj"])
            if instance_id:
                self.result["launched"].append({"key": entry["key"], "instance_id": instance_id,
                                                "source": "scan"})
                self.progress.record("launched", "unprocessed input", entry["key"], instance_id)
            else:
                self.result["failed"].append({"key": entry["key"], "error": error})
                self.progress.record("failed", "unprocessed input", entry["key"], error)


def reconcile(clients, names, key_prefix="", dry_run=False, progress=None):
    """Replay the dead-letter queue, then launch a worker for every input with no report,
    error report or running worker; return what was found and done."""
    progress = progress or Progress()
    settings = deployed_settings(clients("lambda"), names)
    run = Reconciler(clients, names, settings, key_prefix, dry_run, progress)
    # Dead letters first: their events' own tokens, so the scan then sees those workers running.
    run.replay_dead_letters()
    run.launch_unprocessed()
    return run.result


# --- the commands --------------------------------------------------------------------


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


def ensure_launch_templates(ec2, ssm, names, plan, progress, images=None):
    """Create or update each planned launch template; return ({name: id}, {architecture: image id})."""
    images, ids = images or plan_images(ec2, ssm, plan), {}
    for name, (kind, architecture) in plan.items():
        image_id, (device, size) = images[architecture]
        data = worker_launch_template_data(image_id, kind, names.worker_instance_profile,
                                           device, size, names.prefix)
        ids[name] = ensure_launch_template(ec2, names, data, progress, name)
    return ids, {arch: image_id for arch, (image_id, _) in images.items()}


def location_region(constraint):
    """Return the region GetBucketLocation's LocationConstraint names (pure).

    It answers None (or "") for us-east-1 and the legacy "EU" for eu-west-1 (S3 API
    Reference, GetBucketLocation).
    """
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(constraint, constraint)


def bucket_region(s3, bucket):
    """Return the region a bucket lives in."""
    return location_region(s3.get_bucket_location(Bucket=bucket).get("LocationConstraint"))


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
            wanted = data_notification(names, names.function_arn)
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
S3_KEY_LIMIT = 1024
BUCKET_TAG_LIMIT = 50
TAG_KEY_LIMIT = 128
ENVIRONMENT_LIMIT = 4096
ROLE_POLICY_LIMIT = 10240
FUNCTION_TIMEOUT_LIMIT = 900
# `timeout -k 30` in bootstrap.sh: a worker past its time limit gets 30 s more before SIGKILL.
KILL_GRACE_SECONDS = 30
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
    IAM's 10,240 characters (white space not counted) for a role's inline policies (pure)."""
    values = policy_values(names, [WORST_TEMPLATE_ID] * len(template_names))
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


def deploy(clients, names, instance_type=DEFAULT_INSTANCE_TYPE, public_software=False,
           progress=None, environ=None, published_files=PUBLISHED_FILES, routes_file=ROUTES_FILE):
    """Create or update every part of the pipeline; return what was deployed (names and ARNs)."""
    progress = progress or Progress()
    # A bad routing table fails here, before anything is made, not later in the handler.
    routes, types = check_routing_table(routes_file, names.launch_template, instance_type)
    sources = software_sources(routes_file)
    # So does every limit a setting can break, for the worst case it allows.
    check_limits(names, routes, environ,
                 sources[BOOTSTRAP_KEY].read_text(encoding="utf-8"))
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    plan = plan_templates(ec2, types)
    images = plan_images(ec2, ssm, plan)
    check_preconditions(s3, ec2, names, plan)

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

    template_ids, images = ensure_launch_templates(ec2, ssm, names, plan, progress, images)

    # The launcher's policy names the templates' ids, so it follows the templates: exactly
    # the worker template and those the routing table names.
    values = policy_values(names, list(template_ids.values()), published_files)
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


def release_software_bucket(s3, names, progress):
    """Delete the software bucket if deploy created it; else remove only what deploy put there."""
    bucket = names.software_bucket
    if not bucket_exists(s3, bucket, names.account) or \
            created_by(read_bucket_tags(s3, bucket), names):
        delete_bucket(s3, bucket, names.account, progress, "software bucket")
        return
    for key in PUBLISHED_FILES:
        if published_digest(s3, bucket, key) is not None:
            s3.delete_object(Bucket=bucket, Key=key)
            progress.record(DELETED, "software file", f"s3://{bucket}/{key}")
    ensure_software_access(s3, names, False, PUBLISHED_FILES, progress)
    release_foreign_bucket(s3, bucket, names, progress, "software bucket")


def _iso(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def input_key_of(report_key):
    """Map analysis/KEY.json or .error.json back to KEY (hashed long keys stay as they are)."""
    key = report_key[len("analysis/"):]
    for suffix in (".error.json", ".json"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def recent_reports(s3, bucket, limit=10, scan_limit=10000):
    """Return (reports, error reports, how many listed): the newest under analysis/."""
    objects = list_keys(s3, bucket, prefix="analysis/", limit=scan_limit)
    objects.sort(key=lambda o: o["LastModified"], reverse=True)

    def entry(obj):
        return {"key": obj["Key"], "input_key": input_key_of(obj["Key"]),
                "last_modified": _iso(obj["LastModified"]), "size": obj["Size"]}

    errors = [entry(o) for o in objects if o["Key"].endswith(".error.json")][:limit]
    reports = [entry(o) for o in objects
               if o["Key"].endswith(".json") and not o["Key"].endswith(".error.json")][:limit]
    return reports, errors, len(objects)


def routed_templates(ec2, names, instance_type=None, routes_file=ROUTES_FILE):
    """Return ({launch template: its template or None}, {name: wanted instance type}, problem or None)
    for the worker template and those the routing table names."""
    default = read_launch_template(ec2, names.launch_template)
    default_type = (instance_type or (default or {}).get("data", {}).get("InstanceType")
                    or DEFAULT_INSTANCE_TYPE)
    try:
        _, types = check_routing_table(routes_file, names.launch_template, default_type)
        problem = None
    except DeployError as err:
        types, problem = {names.launch_template: default_type}, str(err)
    templates = {name: default if name == names.launch_template
                 else read_launch_template(ec2, name) for name in types}
    return templates, types, problem


def template_drift(ec2, ssm, names, name, template, instance_type):
    """Return the problems of one launch template against what deploy would make of it."""
    if template is None:
        return ["missing"]
    image_id, _ = latest_worker_ami(ssm, ec2, instance_architecture(ec2, instance_type))
    device, size = root_device(ec2, image_id)
    wanted = worker_launch_template_data(image_id, instance_type, names.worker_instance_profile,
                                         device, size, names.prefix)
    return [f"changed: {problem}" + (" (a newer Amazon Linux 2023 image is out)"
                                     if problem == "ImageId" else "")
            for problem in mismatches(wanted, template["data"])]


def find_drift(clients, names, instance_type=None, routes_file=ROUTES_FILE):
    """Return each missing or changed resource as {"resource", "name", "problem"}."""
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    drift = []

    def note(resource, name, problem):
        drift.append({"resource": resource, "name": name, "problem": problem})

    for what, bucket in (("data bucket", names.data_bucket),
                         ("software bucket", names.software_bucket)):
        if not bucket_exists(s3, bucket, names.account):
            note(what, bucket, "missing")
            continue
        settings = read_bucket_settings(s3, bucket)
        # The software bucket may be public on purpose (--public-software); ACLs never.
        block = (PUBLIC_SOFTWARE_BLOCK if what == "software bucket"
                 and settings["block"] == PUBLIC_SOFTWARE_BLOCK else PRIVATE_BLOCK)
        for problem in bucket_setting_differences(settings, block):
            note(what, bucket, f"changed: {problem}")
    sources = software_sources(routes_file)
    if not any(d["name"] == names.software_bucket for d in drift):
        present = {o["Key"] for o in list_keys(s3, names.software_bucket)}
        for key in PUBLISHED_FILES:
            digest = published_digest(s3, names.software_bucket, key)
            if digest is None:
                note("software file", key, "missing")
            elif digest != file_sha256(sources[key]):
                note("software file", key, "changed: differs from this checkout")
        for key in sorted(present - set(PUBLISHED_FILES)):
            note("software file", key, "not on the published allowlist")
    if not any(d["name"] == names.data_bucket for d in drift):
        lambdas = notification_config(s3, names.data_bucket).get("LambdaFunctionConfigurations", [])
        if not any(c.get("Id") == names.notification_id
                   and c.get("LambdaFunctionArn") == names.function_arn for c in lambdas):
            note("object-created event", names.data_bucket, "missing")

    if find_queue(sqs, names.dlq_name) is None:
        note("dead-letter queue", names.dlq_name, "missing")
    if find_log_group(logs, names.log_group) is None:
        note("log group", names.log_group, "missing")

    routed, types, routes_problem = routed_templates(ec2, names, instance_type, routes_file)
    if routes_problem:
        note("routing table", str(routes_file), f"invalid: {routes_problem}")
    values = policy_values(names, [t["id"] for t in routed.values() if t])
    for what, role, trust, policy_name, policy in (
        ("worker role", names.worker_role, "worker-trust", names.worker_policy_name,
         "worker-policy"),
        ("launcher role", names.lambda_role, "lambda-trust", names.lambda_policy_name,
         "lambda-policy"),
    ):
        for problem in role_differences(read_role(iam, role), render_policy(trust, values),
                                        policy_name, render_policy(policy, values)):
            note(what, role, problem if problem == "missing" else f"changed: {problem}")
    profile = read_instance_profile(iam, names.worker_instance_profile)
    if profile is None:
        note("worker instance profile", names.worker_instance_profile, "missing")
    elif [r["RoleName"] for r in profile.get("Roles", [])] != [names.worker_role]:
        note("worker instance profile", names.worker_instance_profile,
             "changed: does not hold exactly the worker role")

    for name, template in routed.items():
        for problem in template_drift(ec2, ssm, names, name, template, types[name]):
            note("launch template", name, problem)
    for name in stack_launch_templates(ec2, names):
        if name not in routed and read_launch_template(ec2, name):
            note("launch template", name, "not named by the routing table")

    config = read_function(lam, names.function_name)
    if config is None:
        note("function", names.function_name, "missing")
    else:
        for problem in function_differences(function_configuration(names), config,
                                            code_sha256(build_function_zip(sources=sources))):
            note("function", names.function_name, f"changed: {problem}")
        if not permission_matches(s3_permission_statement(lam, names), names):
            note("S3 invoke permission", names.function_name, "missing or changed")
        retry = read_event_invoke_config(lam, names.function_name)
        if retry is None or mismatches({"MaximumRetryAttempts": MAX_RETRY_ATTEMPTS}, retry):
            note("async retry settings", names.function_name, "missing or changed")
    return drift


def collect_status(clients, names, now=None, instance_type=None, routes_file=ROUTES_FILE):
    """Return the deployment's status as one JSON-ready dict (see `status --json`)."""
    now = now or datetime.now(timezone.utc)
    s3, ec2, lam, sqs = clients("s3"), clients("ec2"), clients("lambda"), clients("sqs")
    templates, _, _ = routed_templates(ec2, names, instance_type, routes_file)
    template = templates[names.launch_template]
    config = read_function(lam, names.function_name)
    queue = find_queue(sqs, names.dlq_name)
    all_templates = sorted(set(templates) | set(stack_launch_templates(ec2, names)))
    workers = []
    for worker in find_workers(ec2, all_templates):
        worker["age_seconds"] = int((now - worker["launch_time"]).total_seconds())
        worker["launch_time"] = _iso(worker["launch_time"])
        workers.append(worker)
    reports, errors, listed = [], [], 0
    if bucket_exists(s3, names.data_bucket, names.account):
        reports, errors, listed = recent_reports(s3, names.data_bucket)
    policy = (read_bucket_policy(s3, names.software_bucket)
              if bucket_exists(s3, names.software_bucket, names.account) else None)
    return {
        "deployed": config is not None,
        "prefix": names.prefix,
        "account": names.account,
        "region": names.region,
        "data_bucket": names.data_bucket,
        "software_bucket": names.software_bucket,
        "public_software": bool(policy and any(
            s.get("Sid") == PUBLIC_READ_SID for s in policy.get("Statement", []))),
        "function_name": names.function_name,
        "function_arn": config["FunctionArn"] if config else None,
        "launch_template": names.launch_template,
        "launch_template_id": template["id"] if template else None,
        "launch_template_version": template["default_version"] if template else None,
        "launch_templates": template_summaries(templates, load_routes_or_none(routes_file),
                                               names.launch_template),
        "worker_role": names.worker_role,
        "worker_instance_profile": names.worker_instance_profile,
        "lambda_role": names.lambda_role,
        "log_group": names.log_group,
        "dlq_name": names.dlq_name,
        "dlq_url": queue[0] if queue else None,
        "dlq_depth": int(queue[1].get("ApproximateNumberOfMessages", 0)) if queue else None,
        "dlq_in_flight": (int(queue[1].get("ApproximateNumberOfMessagesNotVisible", 0))
                          if queue else None),
        "workers": workers,
        "reports": reports,
        "error_reports": errors,
        "analysis_objects_listed": listed,
        "counts": count_inputs(clients, names),
        "drift": find_drift(clients, names, instance_type, routes_file),
    }


def load_routes_or_none(routes_file):
    """Return the routing table's routes, or [] when it is invalid (status reports that as drift)."""
    try:
        return load_routes_file(routes_file)
    except DeployError:
        return []


def template_summaries(templates, routes, default_template):
    """Return one status entry per launch template: id, default version, instance type, routes (pure)."""
    serving = routes_by_template(routes, default_template)
    return [{"name": name,
             "id": template["id"] if template else None,
             "version": template["default_version"] if template else None,
             "instance_type": template["data"].get("InstanceType") if template else None,
             "routes": serving.get(name, [])}
            for name, template in templates.items()]


def _age(seconds):
    minutes, seconds = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def print_status(status, stream=None):
    """Print a status dict for people."""
    out = stream or sys.stdout

    def say(text=""):
        print(text, file=out)

    say(f"awsfun {status['prefix']} in account {status['account']}, region {status['region']}: "
        + ("deployed" if status["deployed"] else "NOT deployed"))
    for label, key in (("data bucket", "data_bucket"), ("software bucket", "software_bucket"),
                       ("function", "function_name"), ("launch template", "launch_template"),
                       ("worker role", "worker_role"), ("launcher role", "lambda_role"),
                       ("dead-letter queue", "dlq_name")):
        say(f"  {label:<18} {status[key]}")
    if status["public_software"]:
        say("  software bucket is PUBLIC: anyone may read the published files")
    say(f"  dead letters       {status['dlq_depth'] if status['dlq_depth'] is not None else '-'}")
    for template in status["launch_templates"]:
        say(f"  template           {template['name']}: {template['instance_type'] or 'MISSING'}"
            f" (routes: {', '.join(template['routes']) or '-'})")
    counts = status["counts"]
    if counts is not None:
        say(f"inputs: {counts['inputs']}  reported: {counts['reports']}  error-reported: "
            f"{counts['error_reports']}  running: {counts['running']}  unprocessed: "
            f"{counts['unprocessed']}" + ("  (./deploy.sh reconcile launches them)"
                                          if counts["unprocessed"] else ""))
    say(f"running workers: {len(status['workers'])}")
    for worker in status["workers"]:
        say(f"  {worker['instance_id']}  {worker['state']:<8} {_age(worker['age_seconds']):>7}  "
            f"{worker['key']}")
    for title, entries in (("last reports", status["reports"]),
                           ("last error reports", status["error_reports"])):
        say(f"{title}: {len(entries)}")
        for entry in entries:
            say(f"  {entry['last_modified']}  {entry['key']}")
    if status["drift"]:
        say(f"drift: {len(status['drift'])} (./deploy.sh deploy puts it right)")
        for item in status["drift"]:
            say(f"  {item['resource']} {item['name']}: {item['problem']}")
    else:
        say("drift: none")


def confirm(question, stdin=None, stream=None):
    """Ask a yes/no question on the terminal; anything but yes (or end of input) is no."""
    print(f"{question} [y/N] ", end="", file=stream or sys.stdout, flush=True)
    answer = (stdin or sys.stdin).readline()
    return answer.strip().lower() in ("y", "yes")


# --- command line --------------------------------------------------------------------


def run_deploy(args, clients):
    """`deploy`: create or update everything."""
    # Before any AWS call: a bad routing table is the operator's to fix now, not the handler's later.
    check_routing_table(args.routes, default_launch_template(args.prefix), args.instance_type)
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    print(f"awsfun deploy: prefix {names.prefix}, account {names.account}, "
          f"region {names.region}")
    progress = Progress()
    result = deploy(clients, names, args.instance_type, args.public_software, progress,
                    routes_file=args.routes)
    if progress.changed():
        print(f"Deployed: {progress.count(CREATED)} created, {progress.count(UPDATED)} updated, "
              f"{progress.count(DELETED)} removed, {progress.count(IN_PLACE)} already in place.")
    else:
        print("Nothing to change: everything already in place.")
    print(f"Upload inputs to s3://{names.data_bucket}/ ; reports appear under analysis/. "
          f"Function {result['function_arn']}")
    return 0


def run_status(args, clients):
    """`status`: what is deployed, running and reported, and any drift."""
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    names = discover_names(clients("lambda"), names, args.data_bucket, args.software_bucket)
    status = collect_status(clients, names, instance_type=args.instance_type,
                            routes_file=args.routes)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status)
    return 0


def run_reconcile(args, clients):
    """`reconcile`: replay dead letters and launch every input nothing has processed."""
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    names = discover_names(clients("lambda"), names, args.data_bucket, args.software_bucket)
    if not args.json:
        print(f"awsfun reconcile: s3://{names.data_bucket}/{args.key_prefix}"
              + (" (dry run: nothing is launched or deleted)" if args.dry_run else ""))
    result = reconcile(clients, names, args.key_prefix, args.dry_run,
                       Progress(echo=not args.json))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(reconcile_summary(result))
    launch_failed = result["failed"] or any(
        entry.get("reason") == "a launch failed" for entry in result["dlq_failed"])
    return 1 if launch_failed else 0


def reconcile_summary(result):
    """The closing lines of `reconcile` for a person (pure)."""
    counts = result["counts"]
    lines = [f"Inputs: {counts['inputs']}: {counts['reports']} reported, "
             f"{counts['error_reports']} error-reported, {counts['running']} with a running "
             f"worker, {counts['unprocessed']} unprocessed."]
    if result["dry_run"]:
        lines.append(f"Dry run: would launch {len(result['unprocessed'])}; "
                     f"{len(result['dlq_kept'])} dead letters looked at, none deleted.")
    else:
        lines.append(f"Launched {len(result['launched'])}, failed {len(result['failed'])}; "
                     f"dead letters replayed {len(result['replayed'])}, kept "
                     f"{len(result['dlq_failed']) + len(result['dlq_kept'])}.")
    return "\n".join(lines)


def run_teardown(args, clients):
    """`teardown`: remove everything deploy created (the data bucket only with --delete-data)."""
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    names = discover_names(clients("lambda"), names, args.data_bucket, args.software_bucket)
    data = (f"and the data bucket {names.data_bucket} with ALL its objects" if args.delete_data
            else f"(the data bucket {names.data_bucket} is kept)")
    print(f"This removes the awsfun deployment {names.prefix!r} from account {names.account}, "
          f"region {names.region}: function, workers, launch template {names.launch_template}, "
          f"roles, queue, logs, software bucket {names.software_bucket} {data}.")
    if not args.yes and not confirm("Continue?"):
        print("Nothing removed.")
        return 1
    progress = teardown(clients, names, args.delete_data)
    print(f"Removed {progress.count(DELETED)}; {progress.count(GONE)} already gone.")
    return 0


# Subcommands by name, registered with add_command.
COMMANDS = {}


def add_command(name, run, help_text, add_arguments=None):
    """Register a subcommand: run(args, clients) -> exit status; add_arguments(parser) adds options."""
    COMMANDS[name] = {"run": run, "help": help_text, "add_arguments": add_arguments}


def _common_options():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="short name for this deployment (default: %(default)s); names are "
                             "PREFIX plus account and region")
    common.add_argument("--data-bucket", help="data bucket name "
                        "(default: PREFIX-data-ACCOUNT-REGION)")
    common.add_argument("--software-bucket", help="software bucket name "
                        "(default: PREFIX-software-ACCOUNT-REGION)")
    common.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    return common


def _routes_option(parser):
    parser.add_argument("--routes", default=str(ROUTES_FILE), metavar="FILE",
                        help="routing table to validate, publish and make launch templates for "
                             "(default: routes.json beside deploy.py)")


def _deploy_options(parser):
    parser.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                        help="worker instance type (default: %(default)s)")
    _routes_option(parser)
    parser.add_argument("--public-software", action="store_true",
                        help="let anyone read the published files (relaxes Block Public Access "
                             "on the software bucket only); private by default")


def _status_options(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--instance-type", default=None,
                        help="report drift against this instance type (default: the deployed one)")
    _routes_option(parser)


def _reconcile_options(parser):
    parser.add_argument("--key-prefix", default="", metavar="K",
                        help="only inputs (and dead letters) whose keys start with K")
    parser.add_argument("--dry-run", action="store_true",
                        help="only print what would be launched and replayed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _teardown_options(parser):
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--delete-data", action="store_true",
                        help="also empty and delete the data bucket (inputs and reports)")


add_command("deploy", run_deploy, "create or update everything (the default; safe to re-run)",
            _deploy_options)
add_command("status", run_status, "show names, running workers, reports, dead letters, drift",
            _status_options)
add_command("reconcile", run_reconcile,
            "launch every input with no report, error report or running worker; replay the "
            "dead-letter queue", _reconcile_options)
add_command("teardown", run_teardown, "remove what deploy created (asks first)",
            _teardown_options)


# Options that take a value, so a value that happens to be a command name stays a value.
VALUE_OPTIONS = ("--prefix", "--data-bucket", "--software-bucket", "--instance-type",
                 "--routes", "--key-prefix")


def command_first(argv):
    """Return argv with its command moved first (`--prefix p status` works); `deploy` if none."""
    index = 0
    while index < len(argv):
        if argv[index] in COMMANDS:
            return [argv[index]] + argv[:index] + argv[index + 1:]
        index += 2 if argv[index] in VALUE_OPTIONS else 1
    if argv[:1] in (["-h"], ["--help"]):
        return argv
    return ["deploy"] + argv


def build_parser():
    """Return the argument parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog="deploy.sh",
        description="Deploy the awsfun pipeline (S3 -> Lambda -> one EC2 worker per object) "
                    "with least-privilege IAM, show its status, or tear it down. Uses your "
                    "usual AWS settings: AWS_PROFILE, AWS_REGION/AWS_DEFAULT_REGION, "
                    "AWS_ENDPOINT_URL.",
        epilog="Without a command, deploy. Run `deploy.sh COMMAND --help` for its options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, parents=[common], help=command["help"],
                                  description=command["help"])
        if command["add_arguments"]:
            command["add_arguments"](sub)
    return parser


def main(argv=None, clients=None):
    """Command-line entry point; returns the exit status."""
    argv = command_first(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    if not args.verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        clients = clients or Clients()
        return COMMANDS[args.command]["run"](args, clients)
    except DeployError as err:
        print(f"deploy.sh {args.command}: {err}", file=sys.stderr)
        return 2
    except (NoCredentialsError, NoRegionError) as err:
        print(f"deploy.sh {args.command}: {err}; configure AWS credentials and a region "
              "(AWS_PROFILE or AWS_ACCESS_KEY_ID..., AWS_REGION)", file=sys.stderr)
        return 2
    except ClientError as err:
        error = err.response.get("Error", {})
        print(f"deploy.sh {args.command}: AWS refused {err.operation_name}: "
              f"{error.get('Code')} {error.get('Message')}", file=sys.stderr)
        return 1
    except WaiterError as err:
        print(f"deploy.sh {args.command}: gave up waiting: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
