"""awsfun Lambda handler: launch one disposable EC2 worker (or, with ENGINE=batch, submit one
AWS Batch job) per new S3 object.

One file, standard library plus boto3, so it can be pasted into the Lambda
console. The handler only wires together the small functions below; see
CONTRACT.md for the names and the result shape.
"""

import base64
import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import re
import string
import unicodedata
import zipfile
from urllib.parse import unquote_plus

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger()
logger.setLevel(os.environ.get("LOG_LEVEL", "INFO"))

# EC2 refuses user-data above 16 KB (before base64); tag values stop at 256 chars.
USER_DATA_LIMIT = 16 * 1024
TAG_VALUE_LIMIT = 256
CLIENT_TOKEN_LIMIT = 64
# Room left for one last RunInstances (retries included) before Lambda's timeout.
DEADLINE_MARGIN_MS = 10_000
JOB_MARKER = ": __AWSFUN_JOB__"
# The program bootstrap.sh runs once per job; rendered into the user-data as a zip (zipapp).
LAUNCHER_KEY = "bootstrap/launcher.py"
# The worker's report keys (AwsS3.report_key): under analysis/, hashed past S3's key limit.
REPORT_PREFIX = "analysis/"
S3_KEY_LIMIT = 1024
# bootstrap.sh's `timeout -k 30`, and the time a timed-out job needs to write its report and
# upload its log while the network is still up: both must pass before the watchdog fires.
KILL_GRACE_SECONDS = 30
REPORT_SECONDS = 30
# What EC2 answers (since January 2025) to a ClientToken already used: its instance has
# terminated, or the token came with other parameters. Either way this upload was launched.
IDEMPOTENT_TERMINATED = "IdempotentInstanceTerminated"
IDEMPOTENT_MISMATCH = "IdempotentParameterMismatch"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
LAUNCH_TEMPLATE_NAME = re.compile(r"^[a-zA-Z0-9().\-/_]{3,128}$")
INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
ROUTE_FIELDS = {"name", "match", "launch_template", "instance_type", "watchdog_minutes",
                "worker_timeout_seconds", "command", "root_volume_gib", "spot"}
# A route's root volume (gp3): at least Amazon Linux 2023's 8 GiB image, at most EBS's 16 TiB
# for gp3 (EBS User Guide, "Amazon EBS volume types").
ROOT_VOLUME_GIB = (8, 16384)
COMMAND_PLACEHOLDERS = {"input", "output_dir"}

DEFAULTS = {
    "LAUNCH_TEMPLATE": "su2cw_worker",
    "SOFTWARE_BUCKET": "su2csoftware",
    "BOOTSTRAP_KEY": "bootstrap/bootstrap.sh",
    "WORKER_KEY": "AwsS3.py",
    "ROUTES_KEY": "routes.json",
    "SKIP_SUBSTRING": "analysis",
    "WATCHDOG_MINUTES": "120",
    "WORKER_TIMEOUT_SECONDS": "",
    "DRY_RUN": "",
    "MAX_WORKERS": "16",
    "SPOT": "",
    "SUBNET_IDS": "",
    "SECURITY_GROUP_IDS": "",
    "ENGINE": "ec2",
    "JOB_QUEUE": "",
    "JOB_DEFINITION": "",
}
ENGINES = ("ec2", "batch")
# Batch's throttle answer (TooManyRequestsException, HTTP 429: AWS Batch throttles every API per
# account and Region; https://repost.aws/knowledge-center/aws-batch-requests-error) and the
# other codes botocore's standard retry mode takes for throttling
# (botocore.retries.standard.ThrottledRetryableChecker). Met once botocore's retries are spent,
# a record is deferred, and so is the rest of the invocation: the rate is regional.
BATCH_THROTTLES = frozenset({
    "TooManyRequestsException", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottledException", "RequestLimitExceeded", "RequestThrottled", "SlowDown",
    "PriorRequestNotComplete", "LimitExceededException",
})
# Route fields Batch does not use: its compute environment chooses instances and market.
EC2_ONLY_ROUTE_FIELDS = ("launch_template", "instance_type", "spot", "root_volume_gib")

# EC2's answers that mean "not now": no capacity, a quota reached, or throttling once botocore's
# own retries are spent (EC2 API Reference, "Error codes": InsufficientInstanceCapacity,
# VcpuLimitExceeded, InstanceLimitExceeded, MaxSpotInstanceCountExceeded, SpotMaxPriceTooLow,
# RequestLimitExceeded). A record refused so is deferred (tried again later), not failed.
CAPACITY_REFUSALS = frozenset({
    "InsufficientInstanceCapacity", "VcpuLimitExceeded", "InstanceLimitExceeded",
    "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "RequestLimitExceeded",
})
# Of those, the ones that hold in one Availability Zone only: another subnet may have capacity.
# A quota or a throttle holds for the whole region, so another subnet cannot help.
ZONAL_REFUSALS = frozenset({"InsufficientInstanceCapacity"})
# Refusals of spot that another subnet cannot lift either: the region's spot quota, the price.
SPOT_REGIONAL_REFUSALS = frozenset({"MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow"})
# A one-time spot request whose instance terminates when EC2 reclaims it (RunInstances,
# InstanceMarketOptions; "Spot Instance interruptions"): the worker's SIGTERM path leaves its
# error report, and reconcile or the next retry relaunches the object.
SPOT_OPTIONS = {"MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time",
                                "InstanceInterruptionBehavior": "terminate"}}
# The workers the cap counts, as EC2 states them (DescribeInstances, instance-state-name).
ALIVE_STATES = ["pending", "running"]

_CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5})
_clients = {}
_template_cache = {}


class EventError(ValueError):
    """The event is not an S3 notification this handler can act on."""


class UserDataTooLarge(ValueError):
    """The rendered user-data would exceed EC2's 16 KB limit."""


class LaunchFailed(RuntimeError):
    """One or more records could not be launched; raised so Lambda retries."""


class RoutesError(ValueError):
    """The routing table (routes.json) is invalid."""


# What one record's launch may fail with and still leave the other records to launch:
# AWS refusals, network trouble after botocore's retries, and oversized user-data.
LAUNCH_ERRORS = (ClientError, BotoCoreError, UserDataTooLarge)


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
    settings["WORKER_TIMEOUT_SECONDS"] = (
        int(timeout) if timeout else default_worker_timeout(settings["WATCHDOG_MINUTES"])
    )
    settings["COMMAND"] = None
    settings["ROUTE"] = "default"
    settings["MAX_WORKERS"] = int(settings["MAX_WORKERS"])
    if settings["MAX_WORKERS"] < 1:
        raise ValueError("MAX_WORKERS must be a whole number of workers >= 1")
    settings["SPOT"] = str(settings["SPOT"]).strip().lower() in ("1", "true", "yes")
    settings["SUBNET_IDS"] = id_list(settings["SUBNET_IDS"])
    settings["SECURITY_GROUP_IDS"] = id_list(settings["SECURITY_GROUP_IDS"])
    settings["ENGINE"] = str(settings["ENGINE"]).strip().lower() or "ec2"
    if settings["ENGINE"] not in ENGINES:
        raise ValueError(f"ENGINE {settings['ENGINE']!r} is not one of {', '.join(ENGINES)}")
    if settings["ENGINE"] == "batch" and not (settings["JOB_QUEUE"] and settings["JOB_DEFINITION"]):
        raise ValueError("ENGINE=batch needs JOB_QUEUE and JOB_DEFINITION (deploy sets both)")
    return settings


def id_list(text):
    """Return the ids in a comma-separated list, in order, blanks dropped (pure)."""
    return [part.strip() for part in str(text or "").split(",") if part.strip()]


def default_worker_timeout(watchdog_minutes):
    """Return the worker's time limit: it must stop (and report) before the watchdog fires."""
    return max(60, watchdog_minutes * 60 - 300)


def ordered_time_limit(watchdog_minutes, timeout_seconds):
    """Return the worker time limit to render: `timeout_seconds`, lowered where it (plus the
    shell's `timeout -k` grace and the time to write a report and upload the log) would reach
    the watchdog; never below the 60 s floor of default_worker_timeout.

    Why: cloud-init's final stage runs with KillMode=process, so when `shutdown -h +N` fires
    the script is signalled only after networking has stopped; a report written then never
    reaches S3. The worker's own limit must always fire first. deploy refuses such values
    (preflight.time_limit_problems); this keeps a handler pasted alone with bad settings safe.
    """
    ceiling = max(60, int(watchdog_minutes) * 60 - KILL_GRACE_SECONDS - REPORT_SECONDS)
    return min(int(timeout_seconds), ceiling)


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
    except KeyError as err:
        raise EventError(f"missing field {err}") from None
    except TypeError:
        raise EventError("'s3', 's3.bucket' and 's3.object' must be JSON objects") from None
    if not isinstance(bucket, str) or not BUCKET_NAME.match(bucket):
        raise EventError(f"invalid bucket name {bucket!r} (placeholder left in a test event?)")
    if not isinstance(raw_key, str) or not raw_key:
        raise EventError("object key is missing or empty")
    try:
        # strict: a bad escape must not become U+FFFD, the name of another object.
        key = unquote_plus(raw_key, errors="strict")
    except UnicodeDecodeError:
        raise EventError("object key is not valid percent-encoded UTF-8") from None
    # No S3 object has such a key; bash would drop a NUL and so hand the worker another object.
    if re.search("[\0\ud800-\udfff]", key) or len(key.encode("utf-8", "surrogatepass")) > S3_KEY_LIMIT:
        raise EventError("object key holds a NUL or a lone surrogate, or passes S3's 1,024 bytes")
    obj = s3["object"]
    return {
        "bucket": bucket,
        "key": key,
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
    if is_folder_marker(obj["key"], obj.get("size")):
        return ("folder marker (a zero-byte key ending in '/', as the S3 console's "
                "Create folder makes): no input to analyse")
    if skip_substring and skip_substring in obj["key"]:
        return f"key contains {skip_substring!r} (worker output)"
    return None


def is_folder_marker(key, size):
    """True for a zero-byte key ending in '/': what the S3 console's "Create folder" writes (pure)."""
    return key.endswith("/") and size == 0


def client_token(obj, attempt=0):
    """Derive RunInstances' ClientToken: one launch per upload (and relaunch attempt); pure.

    An upload is its bucket, key, versionId and eTag plus, from an S3 event, the event's
    `sequencer`, or, from reconcile's scan (no event), the object's LastModified. The
    sequencer tells two PUTs of the same bytes to an unversioned bucket apart, so a new
    upload is always a new job, while a duplicate delivery of one event (same sequencer)
    keeps its token. An event's and a scan's tokens never collide: each names its field.
    """
    material = {"bucket": obj["bucket"], "key": obj["key"], "version_id": obj["version_id"],
                "etag": obj["etag"], "sequencer": obj.get("sequencer") or "",
                "last_modified": obj.get("last_modified") or ""}
    if attempt:
        # Only after EC2 answered an earlier attempt's token with a worker that ended
        # without a report; attempt 0 is the token of the event (or of the scan).
        material["relaunch"] = int(attempt)
    text = json.dumps(material, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:CLIENT_TOKEN_LIMIT]


def object_version_tag(obj):
    """Return the awsfun:object tag value: bucket, key, versionId and eTag hashed (pure).

    Every worker for the same object contents carries it, whichever event, scan or attempt
    launched it, so reconcile finds a running worker without knowing the event's token.
    """
    fields = [obj["bucket"], obj["key"], obj["version_id"], obj["etag"]]
    text = json.dumps(fields, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def report_key(key, suffix=".json"):
    """Return the worker's report key for an input key, as AwsS3.report_key does (pure)."""
    candidate = REPORT_PREFIX + key + suffix
    if len(candidate.encode("utf-8")) <= S3_KEY_LIMIT:
        return candidate
    return f"{REPORT_PREFIX}_long/{hashlib.sha256(key.encode('utf-8')).hexdigest()}{suffix}"


def long_report_key(key, suffix):
    """Return report_key(key, suffix) if it is hashed under _long/, else "" (pure).

    Rendered into the user-data: the shell then needs no hashing of its own, and writes
    analysis/KEY.SUFFIX when it is given "", so a key is rendered once, not three times, and
    the longest key (1,024 bytes) stays the largest user-data.
    """
    target = report_key(key, suffix)
    return target if target != REPORT_PREFIX + key + suffix else ""


def already_launched_reason(obj, err):
    """Return why a refused launch means this upload was already launched, or None (pure).

    EC2 (since January 2025) answers a ClientToken already used with
    IdempotentInstanceTerminated when its instance has terminated, and with
    IdempotentParameterMismatch when the token came with other parameters (the user-data or
    route changed by a redeploy since); see RunInstances' ClientToken in the EC2 API
    reference. Both mean this upload has had its worker. The launcher role may read neither
    reports nor instances (least privilege), so the reason names where the result lands;
    a worker lost without a report is reconcile's to relaunch.
    """
    if not isinstance(err, ClientError):
        return None
    code = err.response.get("Error", {}).get("Code", "")
    reports = f"{report_key(obj['key'])} or {report_key(obj['key'], '.error.json')}"
    if code == IDEMPOTENT_TERMINATED:
        return (f"already processed: report {reports}; this upload's worker has ended "
                f"(EC2 {code}); if neither report is there the worker was lost, and "
                "./deploy.sh reconcile relaunches it")
    if code == IDEMPOTENT_MISMATCH:
        return (f"already launched: this upload's worker was launched with other settings "
                f"(EC2 {code}, e.g. after a redeploy) and writes report {reports}; "
                "./deploy.sh reconcile relaunches it if it ends without one")
    return None


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
        {"Key": "awsfun:object", "Value": object_version_tag(obj)},
        {"Key": "awsfun:launch-template", "Value": settings["LAUNCH_TEMPLATE"]},
    ]
    return [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")]


#: The job's text fields, in the order bootstrap.sh's decode_job reads them.
JOB_FIELDS = ("BUCKET", "KEY", "ETAG", "ERROR_KEY", "LOG_KEY", "REGION", "SOFTWARE_BUCKET",
              "WORKER_KEY", "COMMAND")


def job_fields_b64(fields):
    """Return {name: text} for every name in JOB_FIELDS as one base64 value (pure).

    Each field is UTF-8 and ends with a NUL, which no field can hold (decode_s3_key refuses
    a key with one, and bash could not keep it): bash splits them with one `base64 -d` and
    `mapfile -d ''`, byte for byte, trailing line feeds included, instead of one decoding
    process per field.
    """
    joined = b"".join(fields[name].encode("utf-8") + b"\0" for name in JOB_FIELDS)
    return base64.b64encode(joined).decode("ascii")


def decode_job_fields(text):
    """Return {field name from JOB_FIELDS: text} of a JOB_FIELDS_B64 value (pure; the inverse
    of job_fields_b64). ValueError (binascii.Error among them) when it is not one."""
    fields = base64.b64decode(text, validate=True).split(b"\0")
    if len(fields) != len(JOB_FIELDS) + 1 or fields[-1]:
        raise ValueError(f"the job holds {len(fields) - 1} fields, not {len(JOB_FIELDS)}")
    return {name: field.decode("utf-8") for name, field in zip(JOB_FIELDS, fields)}


def decode_job(user_data):
    """Return the job rendered into user-data (pure; for the local cloud and the tests).

    {field name from JOB_FIELDS: text, "WATCHDOG_MINUTES": text, "TIMEOUT_SECONDS": text,
    "LAUNCHER": the launcher's zip as bytes}. ValueError when the user-data holds no job.
    """
    values = dict(re.findall(r"^JOB_([A-Z0-9_]+)='([A-Za-z0-9+/=]*)'$", user_data, re.M))
    if "FIELDS_B64" not in values:
        raise ValueError("user-data carries no awsfun job")
    job = decode_job_fields(values.pop("FIELDS_B64"))
    job["LAUNCHER"] = base64.b64decode(values.pop("LAUNCHER_B64"), validate=True)
    job.update(values)
    return job


@functools.lru_cache(maxsize=4)
def launcher_archive(source):
    """Return the launcher's source as a zip python3 runs directly, base64 (pure, cached).

    python3 runs a zip holding __main__.py (https://docs.python.org/3/library/zipapp.html);
    deflated, the launcher takes a third of its size in the 16 KB of user-data. A fixed
    timestamp keeps the bytes, and so the ClientToken's user-data, the same on every render.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        member = zipfile.ZipInfo("__main__.py", date_time=(1980, 1, 1, 0, 0, 0))
        archive.writestr(member, source.encode("utf-8"), compress_type=zipfile.ZIP_DEFLATED,
                         compresslevel=9)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=4)
def without_comment_lines(script):
    """Return a bash script with each whole-line comment emptied, the shebang kept (pure,
    cached: every record of an invocation renders the same template).

    The comments are a quarter of bootstrap.sh and EC2 allows 16 KB of user-data; emptied
    rather than dropped, lines keep their numbers for bash's messages. Only for scripts
    with no heredoc and no quoted string spanning lines (bootstrap.sh has neither; a test
    checks), where a line starting with # can only be a comment.
    """
    lines = script.split("\n")
    return "\n".join(line if number == 0 or not line.lstrip().startswith("#") else ""
                     for number, line in enumerate(lines))


def job_values(obj, settings, time_limit):
    """Return {variable: text} of one object's job: JOB_FIELDS_B64, JOB_WATCHDOG_MINUTES and
    JOB_TIMEOUT_SECONDS (pure; base64 and digits only). EC2 carries them in user-data, Batch
    in the container's environment; the bootstrap reads them the same way from either.
    `time_limit` is the worker's limit in seconds (ordered_time_limit's answer)."""
    return {
        "JOB_FIELDS_B64": job_fields_b64({
            "BUCKET": obj["bucket"], "KEY": obj["key"], "ETAG": obj["etag"],
            "ERROR_KEY": long_report_key(obj["key"], ".error.json"),
            "LOG_KEY": long_report_key(obj["key"], ".log"),
            "REGION": settings["REGION"], "SOFTWARE_BUCKET": settings["SOFTWARE_BUCKET"],
            "WORKER_KEY": settings["WORKER_KEY"],
            "COMMAND": json.dumps(settings["COMMAND"]) if settings.get("COMMAND") else ""}),
        "JOB_WATCHDOG_MINUTES": str(int(settings["WATCHDOG_MINUTES"])),
        "JOB_TIMEOUT_SECONDS": str(int(time_limit)),
    }


def batch_job_script(template, launcher):
    """Return the script a Batch job definition runs as `bash -c SCRIPT` (pure).

    bootstrap.sh with only the launcher rendered in: the job's own values arrive as container
    environment (batch_environment), so one job definition serves every object. AWS Batch
    allows a job definition of 24 KiB (AWS Batch User Guide, "AWS Batch service quotas").
    """
    if JOB_MARKER not in template:
        raise ValueError(f"bootstrap template has no line {JOB_MARKER!r} to render into")
    block = f"JOB_LAUNCHER_B64='{launcher_archive(launcher)}'"
    return without_comment_lines(template).replace(JOB_MARKER, block, 1)


def batch_environment(obj, settings):
    """Return SubmitJob's containerOverrides.environment for one object (pure): job_values
    as [{"name", "value"}], in order. Values are base64 and digits, never code."""
    limit = ordered_time_limit(int(settings["WATCHDOG_MINUTES"]),
                               settings["WORKER_TIMEOUT_SECONDS"])
    return [{"name": name, "value": value}
            for name, value in job_values(obj, settings, limit).items()]


def batch_job_name(token):
    """Return the Batch job name of one upload's job: "awsfun-" and its client_token (pure).

    Batch has no client token; ListJobs filtered by this name tells a repeated event from a
    new upload. Names hold up to 128 letters, digits, hyphens and underscores (SubmitJob).
    """
    return f"awsfun-{token}"


def submit_job_params(obj, settings, token):
    """Return SubmitJob's parameters for one object's job (pure; `settings` with its route applied).

    The attempt's timeout is the route's watchdog: Batch stops the attempt then and does not
    retry a job stopped for its timeout; the minimum is 60 s (AWS Batch API Reference, SubmitJob
    `timeout`, JobTimeout). No tags: the name already is the upload's token, and tags on
    creation need batch:TagResource besides SubmitJob, or the job is not created (AWS Batch
    User Guide, "Tag your resources"), a grant the launcher role does not have.
    """
    return {
        "jobName": batch_job_name(token), "jobQueue": settings["JOB_QUEUE"],
        "jobDefinition": settings["JOB_DEFINITION"],
        "containerOverrides": {"environment": batch_environment(obj, settings)},
        "timeout": {"attemptDurationSeconds": max(60, int(settings["WATCHDOG_MINUTES"]) * 60)},
    }


def find_batch_job(batch, queue, name):
    """Return the id of the newest job named `name` in `queue`, or None (one ListJobs call).

    With `filters`, ListJobs ignores jobStatus and returns jobs of every status, newest first;
    JOB_NAME matches case-insensitively, as a prefix only for a value ending in '*', which
    batch_job_name never does (AWS Batch API Reference, ListJobs).
    """
    page = batch.list_jobs(jobQueue=queue, filters=[{"name": "JOB_NAME", "values": [name]}])
    ids = [job["jobId"] for job in page.get("jobSummaryList", [])
           if str(job.get("jobName", "")).lower() == name.lower()]
    return ids[0] if ids else None


@functools.lru_cache(maxsize=64)
def note_ec2_only_fields(route_name, fields):
    """Say once per warm container (debug) which of a route's fields Batch does not use."""
    logger.debug("route %s: %s do not apply under ENGINE=batch (the compute environment chooses "
                 "instances)", route_name, ", ".join(fields))


def submit_object_detail(obj, settings, batch=None, s3=None, local_dir=None, attempt=0,
                         dry_run=False):
    """Route one object and submit its Batch job unless ListJobs finds one of its name; return
    {"engine": "batch", "job_id", "job_name", "route", "submitted"}. submitted is False when
    the job existed (Batch has no client token: the name is the upload's) or with dry_run,
    which submits nothing (Batch has no DryRun) and gives job_id None for a job not found.

    The name check is the cheap one, not a guarantee: two deliveries of one event handled at
    the same moment, or a SubmitJob botocore sends again after its answer was lost, can submit
    two jobs. Both write the same report keys for the same eTag (the worker checks it), so the
    second report replaces the first and the upload still has one."""
    route = choose_route(obj["key"], load_routes(settings, s3, local_dir))
    launch = apply_route(settings, route)
    ignored = tuple(field for field in EC2_ONLY_ROUTE_FIELDS[1:] if route and field in route)
    if ignored:
        note_ec2_only_fields(route["name"], ignored)
    batch = batch or get_client("batch")
    token = client_token(obj, attempt)
    params = submit_job_params(obj, launch, token)
    detail = {"engine": "batch", "job_name": params["jobName"], "route": launch["ROUTE"]}
    job_id = find_batch_job(batch, params["jobQueue"], params["jobName"])
    if job_id or dry_run:
        return dict(detail, job_id=job_id, submitted=False)
    job_id = batch.submit_job(**params)["jobId"]
    logger.info("submitted job %s (%s) for s3://%s/%s (route %s)", job_id, params["jobName"],
                printable(obj["bucket"]), printable(obj["key"]), launch["ROUTE"])
    return dict(detail, job_id=job_id, submitted=True)


def submit_object(obj, settings, batch=None, s3=None, local_dir=None, attempt=0):
    """Route and submit one object's Batch job, once per upload and attempt; return its job id
    (reconcile: attempt > 0 names a new job, from client_token(obj, attempt))."""
    return submit_object_detail(obj, settings, batch, s3, local_dir, attempt)["job_id"]


def batch_dry_run_entry(obj, detail, settings):
    """Return DRY_RUN's result entry for a Batch job: what would be submitted (pure)."""
    found = detail["job_id"]
    return {"bucket": obj["bucket"], "key": obj["key"], "allowed": True,
            "code": "AlreadySubmitted" if found else "",
            "message": (f"job {detail['job_name']} exists ({found}): nothing to submit" if found
                        else f"would submit {detail['job_name']} to {settings['JOB_QUEUE']} "
                        f"({settings['JOB_DEFINITION']}); Batch has no DryRun, so SubmitJob's "
                        "permission is not checked"),
            "job_name": detail["job_name"], "job_id": found}


def render_user_data(template, obj, settings, launcher=None):
    """Render the bootstrap template for one object; values travel as base64 data, never code.

    `launcher` is the launcher's source (default: read_software_file(LAUNCHER_KEY), beside
    the handler if packaged there). UserDataTooLarge past EC2's 16 KB.
    """
    if JOB_MARKER not in template:
        raise ValueError(f"bootstrap template has no line {JOB_MARKER!r} to render into")
    if launcher is None:
        launcher = read_software_file(LAUNCHER_KEY, settings)
    watchdog = int(settings["WATCHDOG_MINUTES"])
    limit = ordered_time_limit(watchdog, settings["WORKER_TIMEOUT_SECONDS"])
    if limit != int(settings["WORKER_TIMEOUT_SECONDS"]):
        logger.warning("worker time limit %s s lowered to %s s: it must end (and report) "
                       "before the %s-minute watchdog", settings["WORKER_TIMEOUT_SECONDS"],
                       limit, watchdog)
    job = dict(job_values(obj, settings, limit),
               JOB_LAUNCHER_B64=launcher_archive(launcher))
    # base64 and decimal digits hold no quote, so single quotes keep them inert.
    block = "\n".join(f"{name}='{value}'" for name, value in job.items())
    user_data = without_comment_lines(template).replace(JOB_MARKER, block, 1)
    size = len(user_data.encode("utf-8"))
    if size > USER_DATA_LIMIT:
        raise UserDataTooLarge(
            f"rendered user-data is {size} bytes; EC2 allows at most {USER_DATA_LIMIT}"
        )
    return user_data


def read_software_file(key, settings, s3=None, local_dir=None, missing_ok=False):
    """Return a published file: from local_dir (default: beside the handler; "": none) if there, else S3; cached.

    With missing_ok, None for a key S3 says is missing (NoSuchKey) or refuses (AccessDenied,
    which is how a missing key looks to a role without s3:ListBucket); otherwise those raise.
    """
    local_dir = os.path.dirname(os.path.abspath(__file__)) if local_dir is None else local_dir
    cache_key = (local_dir, settings["SOFTWARE_BUCKET"], key)
    if cache_key in _template_cache:
        return _template_cache[cache_key]
    local_path = os.path.join(local_dir, key) if local_dir else ""
    if local_path and os.path.isfile(local_path):
        with open(local_path, encoding="utf-8") as handle:
            text = handle.read()
    else:
        s3 = s3 or get_client("s3")
        try:
            body = s3.get_object(Bucket=settings["SOFTWARE_BUCKET"], Key=key)
            text = body["Body"].read().decode("utf-8")
        except ClientError as err:
            code = err.response["Error"]["Code"]
            if missing_ok and code == "NoSuchKey":
                text = None
            elif missing_ok and code == "AccessDenied":
                # S3 answers 403, not 404, for a missing key when the caller may not list
                # the bucket (S3 API Reference, GetObject): the launcher may not. Cached, so
                # said once per container.
                logger.warning("cannot read s3://%s/%s (%s %s): taken as absent; without "
                               "s3:ListBucket a missing key looks the same",
                               settings["SOFTWARE_BUCKET"], key, code,
                               err.response["Error"]["Message"])
                text = None
            else:
                logger.error("cannot read s3://%s/%s: %s %s", settings["SOFTWARE_BUCKET"], key,
                             code, err.response["Error"]["Message"])
                raise
    _template_cache[cache_key] = text
    return text


def load_bootstrap_template(settings, s3=None, local_dir=None):
    """Return the bootstrap template: packaged beside the handler if present, else from S3, cached."""
    return read_software_file(settings["BOOTSTRAP_KEY"], settings, s3, local_dir)


def load_launcher(settings, s3=None, local_dir=None):
    """Return the launcher's source (bootstrap/launcher.py), as load_bootstrap_template does."""
    return read_software_file(LAUNCHER_KEY, settings, s3, local_dir)


def load_routes(settings, s3=None, local_dir=None):
    """Return the validated routes of routes.json (packaged or in S3); none if it is absent."""
    text = read_software_file(settings["ROUTES_KEY"], settings, s3, local_dir, missing_ok=True)
    if text is None:
        return []
    try:
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise RoutesError(f"{settings['ROUTES_KEY']} is not valid JSON: {err}") from None
    return validate_routes(table)


def validate_routes(table):
    """Return the routing table's routes, or raise RoutesError naming the first problem."""
    if not isinstance(table, dict) or not isinstance(table.get("routes"), list):
        raise RoutesError('the routing table must be a JSON object {"routes": [...]}')
    unknown = set(table) - {"routes", "comment"}
    if unknown:
        raise RoutesError(f"unknown top-level field(s) {sorted(unknown)}; expected 'routes'")
    names = set()
    for index, route in enumerate(table["routes"]):
        _validate_route(route, f"route #{index}", names)
    return table["routes"]


def _validate_route(route, where, names):
    if not isinstance(route, dict):
        raise RoutesError(f"{where} must be an object")
    unknown = set(route) - ROUTE_FIELDS
    if unknown:
        raise RoutesError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(ROUTE_FIELDS)}")
    for field in ("name", "match", "launch_template"):
        if not isinstance(route.get(field), str) or not route[field]:
            raise RoutesError(f"{where}: '{field}' must be a non-empty string")
    if route["name"] in names:
        raise RoutesError(f"{where}: the name {route['name']!r} is used twice")
    names.add(route["name"])
    if not LAUNCH_TEMPLATE_NAME.match(route["launch_template"]):
        raise RoutesError(f"{where}: {route['launch_template']!r} is not a launch template name")
    if "instance_type" in route and not (
            isinstance(route["instance_type"], str) and INSTANCE_TYPE.match(route["instance_type"])):
        raise RoutesError(f"{where}: instance_type {route.get('instance_type')!r} is not like 't3.small'")
    for field in ("watchdog_minutes", "worker_timeout_seconds"):
        value = route.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RoutesError(f"{where}: '{field}' must be a whole number >= 1")
    if "spot" in route and not isinstance(route["spot"], bool):
        raise RoutesError(f"{where}: 'spot' must be true or false")
    size = route.get("root_volume_gib", ROOT_VOLUME_GIB[0])
    if isinstance(size, bool) or not isinstance(size, int) or \
            not ROOT_VOLUME_GIB[0] <= size <= ROOT_VOLUME_GIB[1]:
        raise RoutesError(f"{where}: 'root_volume_gib' must be a whole number of GiB from "
                          f"{ROOT_VOLUME_GIB[0]} to {ROOT_VOLUME_GIB[1]}")
    if "command" in route:
        _validate_command(route["command"], where)


def _validate_command(command, where):
    if not isinstance(command, list) or not command or not all(
            isinstance(arg, str) and arg for arg in command):
        raise RoutesError(f"{where}: 'command' must be a non-empty list of strings (an argument "
                          "list, never a shell string)")
    for arg in command:
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(arg) if field is not None}
        except ValueError as err:
            raise RoutesError(f"{where}: command argument {arg!r}: {err}") from None
        if fields - COMMAND_PLACEHOLDERS:
            raise RoutesError(f"{where}: command argument {arg!r} uses {sorted(fields - COMMAND_PLACEHOLDERS)}; "
                              "only {input} and {output_dir} are filled in")


def choose_route(key, routes):
    """Return the first route whose glob matches the whole key, or None for the default."""
    for route in routes:
        if fnmatch.fnmatchcase(key, route["match"]):
            return route
    return None


def apply_route(settings, route):
    """Return the settings for one launch: the route's template, limits and command over the defaults."""
    if route is None:
        return settings
    merged = dict(settings, LAUNCH_TEMPLATE=route["launch_template"], ROUTE=route["name"],
                  COMMAND=route.get("command"))
    if "watchdog_minutes" in route:
        merged["WATCHDOG_MINUTES"] = route["watchdog_minutes"]
        merged["WORKER_TIMEOUT_SECONDS"] = default_worker_timeout(route["watchdog_minutes"])
    if "worker_timeout_seconds" in route:
        merged["WORKER_TIMEOUT_SECONDS"] = route["worker_timeout_seconds"]
    if "spot" in route:
        merged["SPOT"] = route["spot"]
    return merged


def launch_worker(ec2, obj, user_data, settings, dry_run=False, attempt=0, market="on-demand",
                  subnet=None):
    """Call RunInstances once for one object and return the new instance id.

    `market` "spot" asks for a one-time spot instance (SPOT_OPTIONS); `subnet` puts the
    network interface in that subnet, with the template's security groups
    (SECURITY_GROUP_IDS) restated, since a request's NetworkInterfaces replace the
    template's. The ClientToken is launch_token's for this market and subnet; the
    awsfun:token tag is always the upload's own token, whichever step launched it.
    """
    token = client_token(obj, attempt)
    params = {
        "LaunchTemplate": {"LaunchTemplateName": settings["LAUNCH_TEMPLATE"],
                           "Version": "$Latest"},
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": user_data,
        "ClientToken": launch_token(token, market, subnet, settings),
        # Repeated here so a hand-made template can never leave a stopped (billed)
        # machine behind or expose IMDSv1. Every metadata option is stated: this structure
        # overrides the template's, and an option left out falls to the account's or the
        # AMI's default (a hop limit of 2 on Amazon Linux 2023, which lets containers reach
        # the worker role's credentials).
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled",
                            "HttpPutResponseHopLimit": 1},
        "TagSpecifications": build_tags(obj, token, settings),
        "DryRun": dry_run,
    }
    if market == "spot":
        params["InstanceMarketOptions"] = SPOT_OPTIONS
    if subnet:
        interface = {"DeviceIndex": 0, "SubnetId": subnet}
        if settings.get("SECURITY_GROUP_IDS"):
            interface["Groups"] = list(settings["SECURITY_GROUP_IDS"])
        params["NetworkInterfaces"] = [interface]
    response = ec2.run_instances(**params)
    return response["Instances"][0]["InstanceId"]


def launch_steps(settings):
    """Return the (market, subnet) of each RunInstances one record may take, in order (pure).

    Spot in every subnet first (the cheap way), then on demand in every subnet; without
    SUBNET_IDS the template's own placement (subnet None).
    """
    subnets = list(settings.get("SUBNET_IDS") or []) or [None]
    markets = (["spot"] if settings.get("SPOT") else []) + ["on-demand"]
    return [(market, subnet) for market in markets for subnet in subnets]


def launch_token(token, market, subnet, settings):
    """Return the ClientToken of one launch step: the upload's token for the first step, a
    token derived from it for each later one (pure).

    EC2 binds a token to the parameters of the request that succeeded with it, and answers
    the same token with other parameters (another market, another subnet) with
    IdempotentParameterMismatch (EC2 Developer Guide, "Ensuring idempotency"). A refused
    request binds nothing, so each step needs its own token, and a deterministic one: a
    redelivered message walks the same steps with the same tokens, so a step that did launch
    returns that instance instead of a second one.
    """
    if (market, subnet) == launch_steps(settings)[0]:
        return token
    text = json.dumps([token, market, subnet or ""])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:CLIENT_TOKEN_LIMIT]


def refusal_code(err):
    """Return the EC2 error code of a refused launch, "" for anything else (pure)."""
    if not isinstance(err, ClientError):
        return ""
    return err.response.get("Error", {}).get("Code", "")


def is_capacity_refusal(err):
    """True when a launch failed for want of capacity, quota or request rate (pure)."""
    return refusal_code(err) in CAPACITY_REFUSALS


def launch_with_fallback(ec2, obj, user_data, settings, attempt=0, on_step=None):
    """Launch one object's worker through launch_steps; return the instance id.

    A capacity refusal moves on: spot refused in one subnet tries spot in the next, then on
    demand; InsufficientInstanceCapacity on demand tries the next subnet. A regional refusal
    (a quota, throttling) ends the walk at once. The last capacity refusal, or any other
    error, is raised as it came. on_step(market, subnet) is told the step that launched.
    """
    spot_refused = False
    last = None
    for market, subnet in launch_steps(settings):
        if market == "spot" and spot_refused:
            continue
        try:
            instance_id = launch_worker(ec2, obj, user_data, settings, attempt=attempt,
                                        market=market, subnet=subnet)
        except ClientError as err:
            code = refusal_code(err)
            if code not in CAPACITY_REFUSALS:
                raise
            last = err
            logger.warning("s3://%s/%s: %s%s refused: %s %s", obj["bucket"], obj["key"], market,
                           f" in {subnet}" if subnet else "", code,
                           err.response.get("Error", {}).get("Message", ""))
            if market == "spot" and code != "RequestLimitExceeded":
                spot_refused = spot_refused or code in SPOT_REGIONAL_REFUSALS
                continue
            if code not in ZONAL_REFUSALS:
                raise
            continue
        if on_step:
            on_step(market, subnet)
        return instance_id
    raise last


def count_workers(ec2, templates):
    """Return {awsfun:token: instance id} of the stack's pending and running workers.

    One DescribeInstances (with its pages), filtered by the awsfun:launch-template tag every
    worker carries and by state, once per invocation: the cap's count, and which uploads
    already have a live worker (a redelivered message whose earlier try launched at a later
    step must not launch again at the first).
    """
    found, params = {}, {"Filters": [
        {"Name": "tag:awsfun:launch-template", "Values": sorted(set(templates))},
        {"Name": "instance-state-name", "Values": ALIVE_STATES}], "MaxResults": 1000}
    while True:
        page = ec2.describe_instances(**params)
        for reservation in page.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                found[tags.get("awsfun:token") or instance["InstanceId"]] = instance["InstanceId"]
        if not page.get("NextToken"):
            return found
        params["NextToken"] = page["NextToken"]


def stack_templates(settings, s3=None, local_dir=None):
    """Return the launch templates this handler may launch: the worker's and each route's."""
    routes = load_routes(settings, s3, local_dir)
    return [settings["LAUNCH_TEMPLATE"]] + [route["launch_template"] for route in routes]


def check_launch_permission(ec2, obj, user_data, settings):
    """Ask EC2 (DryRun) whether this role may launch the worker; return a result entry."""
    entry = {"bucket": obj["bucket"], "key": obj["key"]}
    try:
        market, subnet = launch_steps(settings)[0]
        launch_worker(ec2, obj, user_data, settings, dry_run=True, market=market, subnet=subnet)
    except ClientError as err:
        code = err.response["Error"]["Code"]
        entry.update(allowed=code == "DryRunOperation", code=code,
                     message=err.response["Error"]["Message"])
        if code not in ("DryRunOperation", "UnauthorizedOperation"):
            raise
        return entry
    entry.update(allowed=True, code="", message="")
    return entry


def prepare_launch(obj, settings, s3=None, local_dir=None):
    """Return (launch settings, user-data) for one object: its route applied, the template rendered."""
    template = load_bootstrap_template(settings, s3, local_dir)
    launch = route_settings(obj, settings, s3, local_dir)
    launcher = load_launcher(settings, s3, local_dir)
    return launch, render_user_data(template, obj, launch, launcher)


def route_settings(obj, settings, s3=None, local_dir=None):
    """Return the settings for one object: its route (routes.json) applied over `settings`."""
    return apply_route(settings, choose_route(obj["key"], load_routes(settings, s3, local_dir)))


def launch_object(obj, settings, ec2=None, s3=None, local_dir=None, attempt=0, on_demand=False):
    """Route, render and launch one object's worker; return the instance id (handler and
    reconcile). on_demand: never spot, whatever the settings and route say (reconcile's
    relaunch of a worker EC2 reclaimed)."""
    return launch_object_detail(obj, settings, ec2, s3, local_dir, attempt,
                                on_demand=on_demand)["instance_id"]


def launch_object_detail(obj, settings, ec2=None, s3=None, local_dir=None, attempt=0,
                         prepared=None, on_demand=False):
    """launch_object, returning {"instance_id", "route", "market", "subnet"}; `prepared` is
    prepare_launch's answer when the caller has it already."""
    launch, user_data = prepared or prepare_launch(obj, settings, s3, local_dir)
    if on_demand:
        launch = dict(launch, SPOT=False)
    step = {}

    def note(market, subnet):
        step.update(market=market, subnet=subnet)

    instance_id = launch_with_fallback(ec2 or get_client("ec2"), obj, user_data, launch,
                                       attempt=attempt, on_step=note)
    logger.info("launched %s for s3://%s/%s (route %s, template %s, %s%s)", instance_id,
                obj["bucket"], obj["key"], launch["ROUTE"], launch["LAUNCH_TEMPLATE"],
                step["market"], f" in {step['subnet']}" if step["subnet"] else "")
    return {"instance_id": instance_id, "route": launch["ROUTE"], **step}


def check_object_permission(obj, settings, ec2=None, s3=None, local_dir=None):
    """DRY_RUN: ask EC2 whether this object's worker could be launched; return a result entry."""
    launch, user_data = prepare_launch(obj, settings, s3, local_dir)
    entry = check_launch_permission(ec2 or get_client("ec2"), obj, user_data, launch)
    logger.info("dry run for s3://%s/%s: %s %s", obj["bucket"], obj["key"],
                entry["code"] or "allowed", entry["message"])
    return entry


def route_name(obj, settings, s3=None, local_dir=None):
    """Return the name of the route an object takes ("default" when no route matches)."""
    route = choose_route(obj["key"], load_routes(settings, s3, local_dir))
    return route["name"] if route else "default"


def describe_failure(err):
    """Return (code, message) of a failed launch, whatever kind of error it was."""
    if isinstance(err, ClientError):
        error = err.response.get("Error", {})
        return error.get("Code", "") or "ClientError", error.get("Message", "")
    return type(err).__name__, str(err)


def printable(text):
    """Return `text` as a str that encodes to UTF-8: a lone surrogate (a key no S3 object can
    have, in a hand-made test event) becomes its escape '\\ud800', so the log line of a
    skipped record is written, not lost in a logging error; other text is unchanged."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def time_is_running_out(context):
    """True when the Lambda context says less than DEADLINE_MARGIN_MS remain."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return remaining is not None and remaining() < DEADLINE_MARGIN_MS


# What became of one record: launched (or found running), skipped (nothing to do, ever),
# deferred (not now: the cap, capacity, time), failed (an error to look at).
LAUNCHED, SKIPPED, DEFERRED, FAILED = "launched", "skipped", "deferred", "failed"


class Invocation:
    """One invocation's records: their outcomes, the cap's count, the tokens seen so far.

    The count is made once, before the first launch (count_workers: one DescribeInstances
    with its pages), and kept up to date with this invocation's own launches, so the cap
    costs at most one call per invocation, however many records it holds. Under ENGINE=batch
    there is no count and MAX_WORKERS does not apply: the compute environments' maxvCpus is
    Batch's cap, and jobs past it wait in the queue (RUNNABLE).
    """

    def __init__(self, settings, context, ec2=None, batch=None):
        self.settings, self.context, self.ec2, self.batch = settings, context, ec2, batch
        self.result = {"launched": [], "skipped": [], "deferred": [], "failed": []}
        self.seen_tokens = set()
        self.alive = None  # {awsfun:token: instance id} of live workers, once counted
        self.count_error = None
        self.regional_refusal = None  # a quota or throttle met: the rest defer unasked
        self.out_of_time = False

    def skip(self, obj, reason, level=logging.INFO):
        logger.log(level, "skipped s3://%s/%s: %s", printable(obj["bucket"]),
                   printable(obj["key"]), reason)
        self.result["skipped"].append({"bucket": obj["bucket"], "key": obj["key"],
                                       "reason": reason})
        return SKIPPED

    def defer(self, obj, code, reason):
        logger.warning("deferred s3://%s/%s: %s", printable(obj["bucket"]),
                       printable(obj["key"]), reason)
        self.result["deferred"].append({"bucket": obj["bucket"], "key": obj["key"],
                                        "code": code, "reason": reason})
        return DEFERRED

    def fail(self, obj, err):
        code, message = describe_failure(err)
        logger.error("failed s3://%s/%s: %s %s", printable(obj["bucket"]),
                     printable(obj["key"]), code, message)
        self.result["failed"].append({"bucket": obj["bucket"], "key": obj["key"], "code": code,
                                      "message": message if not isinstance(err, ClientError)
                                      else ""})
        return FAILED

    def count(self):
        """Return the live workers (counted at most once); raise what the count raised."""
        if self.count_error is not None:
            raise self.count_error
        if self.alive is None:
            ec2 = self.ec2 or get_client("ec2")
            try:
                self.alive = count_workers(ec2, stack_templates(self.settings))
            except LAUNCH_ERRORS as err:
                self.count_error = err
                raise
            logger.info("%d workers pending or running; the cap is %d", len(self.alive),
                        self.settings["MAX_WORKERS"])
        return self.alive

    def handle(self, obj):
        """Decide, and launch or defer, one record; return its outcome."""
        if self.out_of_time or time_is_running_out(self.context):
            # Stop before Lambda kills us mid-call; a retry re-uses every token, so the
            # records launched so far do not launch twice and the rest get their turn.
            self.out_of_time = True
            return self.defer(obj, "Timeout", "not attempted: the function's time is running "
                              f"out (less than {DEADLINE_MARGIN_MS} ms left)")
        token = client_token(obj)
        reason = ("the same object version as an earlier record of this invocation"
                  if token in self.seen_tokens
                  else should_process(obj, self.settings["SKIP_SUBSTRING"]))
        self.seen_tokens.add(token)
        if reason:
            return self.skip(obj, reason)
        if self.settings["ENGINE"] == "batch":
            return self.submit(obj)
        if self.settings["DRY_RUN"]:
            try:
                entry = check_object_permission(obj, self.settings, self.ec2)
            except LAUNCH_ERRORS as err:
                return self.fail(obj, err)
            self.result.setdefault("dry_run", []).append(entry)
            return LAUNCHED
        try:
            return self.launch(obj, token)
        except LAUNCH_ERRORS as err:
            reason = already_launched_reason(obj, err)
            if reason:
                # A duplicate delivery (or a retry) of an upload already launched: retrying
                # cannot change EC2's answer, so failing would only dead-letter it.
                return self.skip(obj, reason)
            if is_capacity_refusal(err):
                code, message = describe_failure(err)
                if code not in ZONAL_REFUSALS:
                    self.regional_refusal = code
                return self.defer(obj, code, f"EC2 refused: {code} {message}".strip())
            # One record's failure must not cost the others their launch: note it, go on.
            return self.fail(obj, err)

    def submit(self, obj):
        """Batch: submit one record's job (DRY_RUN: say what would be); defer on throttling."""
        if self.regional_refusal:
            return self.defer(obj, self.regional_refusal, "not attempted: Batch refused "
                              f"{self.regional_refusal} earlier in this invocation")
        try:
            detail = submit_object_detail(obj, self.settings, self.batch,
                                          dry_run=self.settings["DRY_RUN"])
        except LAUNCH_ERRORS as err:
            code, message = describe_failure(err)
            if code in BATCH_THROTTLES:
                self.regional_refusal = code
                return self.defer(obj, code, f"Batch refused: {code} {message}".strip())
            return self.fail(obj, err)
        if self.settings["DRY_RUN"]:
            self.result.setdefault("dry_run", []).append(
                batch_dry_run_entry(obj, detail, self.settings))
            return LAUNCHED
        return self.launched(obj, detail)

    def launch(self, obj, token):
        """Launch one record's worker unless it has a live one or the cap is reached."""
        # Rendered first: a template the role cannot read fails before any EC2 call.
        prepared = prepare_launch(obj, self.settings)
        alive = self.count()
        if token in alive:
            # This upload's worker is running: a redelivery after a later launch step (another
            # market or subnet) launched it; asking again at the first step could launch a second.
            return self.launched(obj, {"instance_id": alive[token], "market": "running",
                                       "subnet": None, "route": prepared[0]["ROUTE"]})
        if self.regional_refusal:
            return self.defer(obj, self.regional_refusal, "not attempted: EC2 refused "
                              f"{self.regional_refusal} earlier in this invocation")
        cap = self.settings["MAX_WORKERS"]
        if len(alive) >= cap:
            return self.defer(obj, "MaxWorkers", f"at the cap: {len(alive)} workers pending or "
                              f"running, MAX_WORKERS={cap}")
        detail = launch_object_detail(obj, self.settings, self.ec2, prepared=prepared)
        alive[token] = detail["instance_id"]
        return self.launched(obj, detail)

    def launched(self, obj, detail):
        self.result["launched"].append({"bucket": obj["bucket"], "key": obj["key"], **detail})
        return LAUNCHED


def is_sqs_event(event):
    """True for an event of SQS messages (Lambda's event source mapping), not S3's own (pure)."""
    records = event.get("Records") if isinstance(event, dict) else None
    return isinstance(records, list) and bool(records) and all(
        isinstance(record, dict) and record.get("eventSource") == "aws:sqs"
        and "messageId" in record for record in records)


def message_event(record):
    """Return (S3 event, None) from one SQS message, or (None, why it holds none) (pure).

    The body is the S3 event as S3 sent it to the queue; S3 also sends one s3:TestEvent
    message when the notification is saved (S3 User Guide, "Event message structure").
    """
    try:
        event = json.loads(record.get("body") or "")
    except ValueError:
        return None, "the message body is not JSON"
    if isinstance(event, dict) and event.get("Event") == "s3:TestEvent":
        return None, "s3:TestEvent: S3 checking that it may send to the queue"
    return event, None


def handle_sqs_event(event, context, settings):
    """Handle a batch of SQS messages; list each message to try again in batchItemFailures.

    Partial batch responses (Lambda Developer Guide, "Handling errors for an SQS event
    source", ReportBatchItemFailures): Lambda deletes every message not listed, and a listed
    one returns after the queue's visibility timeout, to the dead-letter queue after
    maxReceiveCount receives. A message is listed when any record of it was deferred or failed.
    """
    invocation = Invocation(settings, context)
    failures = []
    for record in event["Records"]:
        message_id = record["messageId"]
        body, reason = message_event(record)
        if body is None:
            invocation.result["skipped"].append({"bucket": "", "key": "", "reason": reason,
                                                 "message_id": message_id})
            logger.info("skipped message %s: %s", message_id, reason)
            continue
        try:
            objects, skipped = parse_records(body)
        except EventError as err:
            invocation.result["skipped"].append({"bucket": "", "key": "", "reason": str(err),
                                                 "message_id": message_id})
            logger.warning("skipped message %s: %s", message_id, err)
            continue
        for entry in skipped:
            invocation.skip(entry, entry["reason"], logging.WARNING)
        outcomes = {invocation.handle(obj) for obj in objects}
        if outcomes & {DEFERRED, FAILED}:
            failures.append({"itemIdentifier": message_id})
    return dict(invocation.result, batchItemFailures=failures)


def lambda_handler(event, context):
    """Launch one worker per new object; from SQS, return the messages to try again.

    A plain S3 event (S3 invoking the function, or a console test) raises LaunchFailed when
    any record failed or was deferred, so Lambda's retries and dead-letter queue apply.
    """
    settings = load_settings()
    if is_sqs_event(event):
        return handle_sqs_event(event, context, settings)
    objects, skipped = parse_records(event)
    invocation = Invocation(settings, context)
    for entry in skipped:
        invocation.skip(entry, entry["reason"], logging.WARNING)
    for obj in objects:
        invocation.handle(obj)
    result = invocation.result
    # An AWS code says it all; other errors need their message (e.g. the size).
    not_done = [f"{e['key']!r}: {e['code']}" + (f": {e['message']}" if e["message"] else "")
                for e in result["failed"]] + \
        [f"{e['key']!r}: {e['code']}" for e in result["deferred"] if e["code"] != "Timeout"]
    untried = sum(1 for e in result["deferred"] if e["code"] == "Timeout")
    if untried:
        not_done.append(f"{untried} records not attempted: the function's time is running out")
    if not_done:
        # Raising (not returning) lets Lambda's retries and on-failure destination act;
        # the retry re-uses the ClientTokens, so records that did launch do not launch twice.
        raise LaunchFailed(f"{len(result['failed']) + len(result['deferred'])} of "
                           f"{len(objects)} records failed: " + "; ".join(not_done))
    return result
