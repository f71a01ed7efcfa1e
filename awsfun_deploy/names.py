"""What every resource of one deployment is called, derived from a prefix, account and region."""

from __future__ import annotations

import dataclasses
import os
import re

from botocore.exceptions import ClientError

import lambda_function

from .core import DeployError, is_not_found, log_client_error

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
PREFIX_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?$")


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
    # The handler's engine, as the deployed function's ENGINE says ("ec2" when it says none).
    engine: str = "ec2"

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
    def events_queue(self):
        """The queue S3 sends the data bucket's ObjectCreated events to; the function reads it."""
        return f"{self.prefix}-events"

    @property
    def events_queue_arn(self):
        return f"arn:{self.partition}:sqs:{self.region}:{self.account}:{self.events_queue}"

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
    def worker_security_group(self):
        # Security group names are per VPC, and a VPC is in one region.
        return f"{self.prefix}-worker"

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


def deployed_names(clients, prefix=DEFAULT_PREFIX, data_bucket=None, software_bucket=None):
    """Return the Names of the deployment a command acts on: derived for this account and
    region (resolve_names), then the bucket names its function records (discover_names)."""
    names = resolve_names(clients, prefix, data_bucket, software_bucket)
    return discover_names(clients("lambda"), names, data_bucket, software_bucket)


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
    if config.get("TagsError") and not explicit_data:
        # Without lambda:ListTags GetFunction answers no tags (Lambda API Reference,
        # GetFunction), and the data bucket's name is only there: guessing it could make
        # status, reconcile or teardown act on another bucket.
        raise DeployError(
            f"cannot read the tags of {names.function_name} "
            f"({config['TagsError'].get('ErrorCode')}), which name its data bucket: grant "
            "lambda:ListTags (./deploy.sh deployer-policy), or pass --data-bucket")
    env = (config["Configuration"].get("Environment") or {}).get("Variables") or {}
    return dataclasses.replace(
        names,
        data_bucket=explicit_data or tags.get(DATA_BUCKET_TAG) or names.data_bucket,
        software_bucket=(explicit_software or tags.get(SOFTWARE_BUCKET_TAG)
                         or env.get("SOFTWARE_BUCKET") or names.software_bucket),
        launch_template=env.get("LAUNCH_TEMPLATE") or names.launch_template,
        engine=env.get("ENGINE") or "ec2",
    )
