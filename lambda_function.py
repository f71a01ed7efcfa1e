"""awsfun Lambda handler: launch one disposable EC2 worker per new S3 object.

One file, standard library plus boto3, so it can be pasted into the Lambda
console. The handler only wires together the small functions below; see
CONTRACT.md for the names and the result shape.
"""

import base64
import hashlib
import json
import logging
import os
import re
import unicodedata
from urllib.parse import unquote_plus

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

logger = logging.getLogger()
logger.setLevel(os.environ.get("LOG_LEVEL", "INFO"))

# EC2 refuses user-data above 16 KB (before base64); tag values stop at 256 chars.
USER_DATA_LIMIT = 16 * 1024
TAG_VALUE_LIMIT = 256
CLIENT_TOKEN_LIMIT = 64
JOB_MARKER = ": __AWSFUN_JOB__"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

DEFAULTS = {
    "LAUNCH_TEMPLATE": "su2cw_worker",
    "SOFTWARE_BUCKET": "su2csoftware",
    "BOOTSTRAP_KEY": "bootstrap/bootstrap.sh",
    "WORKER_KEY": "AwsS3.py",
    "SKIP_SUBSTRING": "analysis",
    "WATCHDOG_MINUTES": "120",
    "WORKER_TIMEOUT_SECONDS": "",
    "DRY_RUN": "",
}

_CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5})
_clients = {}
_template_cache = {}


class EventError(ValueError):
    """The event is not an S3 notification this handler can act on."""


class UserDataTooLarge(ValueError):
    """The rendered user-data would exceed EC2's 16 KB limit."""


class LaunchFailed(RuntimeError):
    """One or more records could not be launched; raised so Lambda retries."""


def load_settings(environ=None):
    """Return the handler's settings: CONTRACT defaults overridden by the environment."""
    environ = os.environ if environ is None else environ
    settings = {name: environ.get(name, default) for name, default in DEFAULTS.items()}
    settings["REGION"] = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION", "")
    settings["DRY_RUN"] = settings["DRY_RUN"].strip().lower() in ("1", "true", "yes")
    settings["WATCHDOG_MINUTES"] = int(settings["WATCHDOG_MINUTES"])
    if settings["WATCHDOG_MINUTES"] < 1:
        raise ValueError("WATCHDOG_MINUTES must be a whole number of minutes >= 1")
    timeout = settings["WORKER_TIMEOUT_SECONDS"]
    # The worker must stop (and report) before the watchdog powers the machine off.
    settings["WORKER_TIMEOUT_SECONDS"] = (
        int(timeout) if timeout else max(60, settings["WATCHDOG_MINUTES"] * 60 - 300)
    )
    return settings


def get_client(service):
    """Return a boto3 client for `service`, created once per warm container."""
    if service not in _clients:
        _clients[service] = boto3.client(service, config=_CLIENT_CONFIG)
    return _clients[service]


def parse_records(event):
    """Split an S3 event into (objects, skipped); raise EventError if it has no S3 records."""
    records = event.get("Records") if isinstance(event, dict) else None
    if not isinstance(records, list) or not records:
        raise EventError(
            "expected an S3 event notification: a JSON object with a non-empty "
            "'Records' list whose items have 'eventSource': 'aws:s3' "
            "(see lambda_test_event.json); got "
            + (f"keys {sorted(event)[:10]}" if isinstance(event, dict) else type(event).__name__)
        )
    objects, skipped = [], []
    for index, record in enumerate(records):
        try:
            objects.append(parse_record(record))
        except EventError as err:
            skipped.append(_skip_entry(record, f"malformed record #{index}: {err}"))
    return objects, skipped


def parse_record(record):
    """Return the object one S3 event record names, with its key decoded exactly once."""
    if not isinstance(record, dict):
        raise EventError(f"record is a {type(record).__name__}, not an object")
    if record.get("eventSource") != "aws:s3":
        raise EventError(f"eventSource is {record.get('eventSource')!r}, not 'aws:s3'")
    try:
        s3 = record["s3"]
        bucket = s3["bucket"]["name"]
        raw_key = s3["object"]["key"]
    except (KeyError, TypeError) as err:
        raise EventError(f"missing field {err}") from None
    if not isinstance(bucket, str) or not BUCKET_NAME.match(bucket):
        raise EventError(f"invalid bucket name {bucket!r} (placeholder left in a test event?)")
    if not isinstance(raw_key, str) or not raw_key:
        raise EventError("object key is missing or empty")
    obj = s3["object"]
    return {
        "bucket": bucket,
        "key": unquote_plus(raw_key),
        "event_name": str(record.get("eventName", "")),
        "etag": str(obj.get("eTag") or obj.get("etag") or "").strip('"'),
        "version_id": str(obj.get("versionId") or ""),
        "sequencer": str(obj.get("sequencer") or ""),
        "size": obj.get("size"),
    }


def _skip_entry(record, reason):
    bucket = key = ""
    try:
        bucket = str(record["s3"]["bucket"]["name"])
        key = unquote_plus(str(record["s3"]["object"]["key"]))
    except (KeyError, TypeError):
        pass
    return {"bucket": bucket, "key": key, "reason": reason}


def should_process(obj, skip_substring):
    """Return None if the object should get a worker, else the reason to skip it."""
    if not obj["event_name"].startswith("ObjectCreated"):
        return f"event {obj['event_name'] or '(none)'} is not ObjectCreated"
    if skip_substring and skip_substring in obj["key"]:
        return f"key contains {skip_substring!r} (worker output)"
    return None


def client_token(obj):
    """Derive RunInstances' ClientToken: one launch per bucket, key and object version."""
    version = obj["version_id"] + "/" + (obj["etag"] or obj["sequencer"])
    material = json.dumps([obj["bucket"], obj["key"], version], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()[:CLIENT_TOKEN_LIMIT]


def shorten_tag_value(value, limit=TAG_VALUE_LIMIT):
    """Make `value` a printable tag value of at most `limit` characters, keeping both ends."""
    printable = "".join(
        "?" if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in value
    )
    if len(printable) <= limit:
        return printable
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    middle = f"...[{digest}]..."
    head = (limit - len(middle)) // 2
    tail = limit - len(middle) - head
    return printable[:head] + middle + printable[-tail:]


def build_tags(obj, token, settings):
    """Return the TagSpecifications that let an operator find an object's worker."""
    tags = [
        {"Key": "Name", "Value": shorten_tag_value("awsfun: " + obj["key"])},
        {"Key": "awsfun:bucket", "Value": obj["bucket"]},
        {"Key": "awsfun:key", "Value": shorten_tag_value(obj["key"])},
        {"Key": "awsfun:token", "Value": token},
        {"Key": "awsfun:launch-template", "Value": settings["LAUNCH_TEMPLATE"]},
    ]
    return [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")]


def _b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def render_user_data(template, obj, settings):
    """Render the bootstrap template for one object; values travel as base64 data, never code."""
    if JOB_MARKER not in template:
        raise ValueError(f"bootstrap template has no line {JOB_MARKER!r} to render into")
    job = {
        "JOB_BUCKET_B64": _b64(obj["bucket"]),
        "JOB_KEY_B64": _b64(obj["key"]),
        "JOB_ETAG_B64": _b64(obj["etag"]),
        "JOB_SOFTWARE_BUCKET_B64": _b64(settings["SOFTWARE_BUCKET"]),
        "JOB_WORKER_KEY_B64": _b64(settings["WORKER_KEY"]),
        "JOB_REGION_B64": _b64(settings["REGION"]),
        "JOB_WATCHDOG_MINUTES": str(int(settings["WATCHDOG_MINUTES"])),
        "JOB_TIMEOUT_SECONDS": str(int(settings["WORKER_TIMEOUT_SECONDS"])),
    }
    # base64 and decimal digits hold no quote, so single quotes keep them inert.
    block = "\n".join(f"{name}='{value}'" for name, value in job.items())
    user_data = template.replace(JOB_MARKER, block, 1)
    size = len(user_data.encode("utf-8"))
    if size > USER_DATA_LIMIT:
        raise UserDataTooLarge(
            f"rendered user-data is {size} bytes; EC2 allows at most {USER_DATA_LIMIT}"
        )
    return user_data


def load_bootstrap_template(settings, s3=None, local_dir=None):
    """Return the bootstrap template: packaged beside the handler if present, else from S3, cached."""
    local_dir = os.path.dirname(os.path.abspath(__file__)) if local_dir is None else local_dir
    cache_key = (local_dir, settings["SOFTWARE_BUCKET"], settings["BOOTSTRAP_KEY"])
    if cache_key in _template_cache:
        return _template_cache[cache_key]
    local_path = os.path.join(local_dir, settings["BOOTSTRAP_KEY"])
    if os.path.isfile(local_path):
        with open(local_path, encoding="utf-8") as handle:
            template = handle.read()
    else:
        s3 = s3 or get_client("s3")
        try:
            body = s3.get_object(Bucket=settings["SOFTWARE_BUCKET"], Key=settings["BOOTSTRAP_KEY"])
        except ClientError as err:
            logger.error(
                "cannot read s3://%s/%s: %s %s",
                settings["SOFTWARE_BUCKET"],
                settings["BOOTSTRAP_KEY"],
                err.response["Error"]["Code"],
                err.response["Error"]["Message"],
            )
            raise
        template = body["Body"].read().decode("utf-8")
    _template_cache[cache_key] = template
    return template


def launch_worker(ec2, obj, user_data, settings, dry_run=False):
    """Call RunInstances once for one object and return the new instance id."""
    token = client_token(obj)
    response = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": settings["LAUNCH_TEMPLATE"], "Version": "$Latest"},
        MinCount=1,
        MaxCount=1,
        UserData=user_data,
        ClientToken=token,
        # Repeated here so a hand-made template can never leave a stopped (billed)
        # machine behind or expose IMDSv1.
        InstanceInitiatedShutdownBehavior="terminate",
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
        TagSpecifications=build_tags(obj, token, settings),
        DryRun=dry_run,
    )
    return response["Instances"][0]["InstanceId"]


def check_launch_permission(ec2, obj, user_data, settings):
    """Ask EC2 (DryRun) whether this role may launch the worker; return a result entry."""
    entry = {"bucket": obj["bucket"], "key": obj["key"]}
    try:
        launch_worker(ec2, obj, user_data, settings, dry_run=True)
    except ClientError as err:
        code = err.response["Error"]["Code"]
        entry.update(allowed=code == "DryRunOperation", code=code,
                     message=err.response["Error"]["Message"])
        if code not in ("DryRunOperation", "UnauthorizedOperation"):
            raise
        return entry
    entry.update(allowed=True, code="", message="")
    return entry


def lambda_handler(event, context):
    """Launch one worker per new object in the event; raise if any launch failed."""
    settings = load_settings()
    objects, skipped = parse_records(event)
    result = {"launched": [], "skipped": skipped}
    for entry in skipped:
        logger.warning("skipped s3://%s/%s: %s", entry["bucket"], entry["key"], entry["reason"])
    failures = []
    for obj in objects:
        reason = should_process(obj, settings["SKIP_SUBSTRING"])
        if reason:
            logger.info("skipped s3://%s/%s: %s", obj["bucket"], obj["key"], reason)
            result["skipped"].append({"bucket": obj["bucket"], "key": obj["key"], "reason": reason})
            continue
        try:
            template = load_bootstrap_template(settings)
            user_data = render_user_data(template, obj, settings)
            if settings["DRY_RUN"]:
                entry = check_launch_permission(get_client("ec2"), obj, user_data, settings)
                logger.info("dry run for s3://%s/%s: %s %s", obj["bucket"], obj["key"],
                            entry["code"] or "allowed", entry["message"])
                result.setdefault("dry_run", []).append(entry)
                continue
            instance_id = launch_worker(get_client("ec2"), obj, user_data, settings)
        except ClientError as err:
            code, message = err.response["Error"]["Code"], err.response["Error"]["Message"]
            logger.error("failed s3://%s/%s: %s %s", obj["bucket"], obj["key"], code, message)
            failures.append(f"{obj['key']!r}: {code}")
            continue
        except UserDataTooLarge as err:
            logger.error("failed s3://%s/%s: %s", obj["bucket"], obj["key"], err)
            failures.append(f"{obj['key']!r}: {err}")
            continue
        logger.info("launched %s for s3://%s/%s", instance_id, obj["bucket"], obj["key"])
        result["launched"].append(
            {"bucket": obj["bucket"], "key": obj["key"], "instance_id": instance_id}
        )
    if failures:
        # Raising (not returning) lets Lambda's retries and on-failure destination act;
        # the retry re-uses the ClientTokens, so records that did launch do not launch twice.
        raise LaunchFailed(f"{len(failures)} of {len(objects)} records failed: " + "; ".join(failures))
    return result
