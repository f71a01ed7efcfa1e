"""awsfun Lambda handler: launch one disposable EC2 worker per new S3 object.

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
                "worker_timeout_seconds", "command", "root_volume_gib"}
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
    return settings


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


def _b64(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


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
    job = {
        "JOB_BUCKET_B64": _b64(obj["bucket"]),
        "JOB_KEY_B64": _b64(obj["key"]),
        "JOB_ETAG_B64": _b64(obj["etag"]),
        "JOB_ERROR_KEY_B64": _b64(long_report_key(obj["key"], ".error.json")),
        "JOB_LOG_KEY_B64": _b64(long_report_key(obj["key"], ".log")),
        "JOB_SOFTWARE_BUCKET_B64": _b64(settings["SOFTWARE_BUCKET"]),
        "JOB_WORKER_KEY_B64": _b64(settings["WORKER_KEY"]),
        "JOB_REGION_B64": _b64(settings["REGION"]),
        "JOB_COMMAND_B64": _b64(json.dumps(settings["COMMAND"])) if settings.get("COMMAND") else "",
        "JOB_WATCHDOG_MINUTES": str(watchdog),
        "JOB_TIMEOUT_SECONDS": str(limit),
        "JOB_LAUNCHER_B64": launcher_archive(launcher),
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
    return merged


def launch_worker(ec2, obj, user_data, settings, dry_run=False, attempt=0):
    """Call RunInstances once for one object and return the new instance id."""
    token = client_token(obj, attempt)
    response = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": settings["LAUNCH_TEMPLATE"], "Version": "$Latest"},
        MinCount=1,
        MaxCount=1,
        UserData=user_data,
        ClientToken=token,
        # Repeated here so a hand-made template can never leave a stopped (billed)
        # machine behind or expose IMDSv1. Every metadata option is stated: this structure
        # overrides the template's, and an option left out falls to the account's or the
        # AMI's default (a hop limit of 2 on Amazon Linux 2023, which lets containers reach
        # the worker role's credentials).
        InstanceInitiatedShutdownBehavior="terminate",
        MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled",
                         "HttpPutResponseHopLimit": 1},
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


def prepare_launch(obj, settings, s3=None, local_dir=None):
    """Return (launch settings, user-data) for one object: its route applied, the template rendered."""
    template = load_bootstrap_template(settings, s3, local_dir)
    launch = apply_route(settings, choose_route(obj["key"], load_routes(settings, s3, local_dir)))
    launcher = load_launcher(settings, s3, local_dir)
    return launch, render_user_data(template, obj, launch, launcher)


def launch_object(obj, settings, ec2=None, s3=None, local_dir=None, attempt=0):
    """Route, render and launch one object's worker; return the instance id (handler and reconcile)."""
    launch, user_data = prepare_launch(obj, settings, s3, local_dir)
    instance_id = launch_worker(ec2 or get_client("ec2"), obj, user_data, launch, attempt=attempt)
    logger.info("launched %s for s3://%s/%s (route %s, template %s)", instance_id,
                obj["bucket"], obj["key"], launch["ROUTE"], launch["LAUNCH_TEMPLATE"])
    return instance_id


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


def lambda_handler(event, context):
    """Launch one worker per new object in the event; raise if any launch failed."""
    settings = load_settings()
    objects, skipped = parse_records(event)
    result = {"launched": [], "skipped": skipped}
    for entry in skipped:
        logger.warning("skipped s3://%s/%s: %s", printable(entry["bucket"]), printable(entry["key"]),
                       entry["reason"])
    failures = []
    seen_tokens = set()
    for index, obj in enumerate(objects):
        if time_is_running_out(context):
            # Stop before Lambda kills us mid-call; the retry re-uses every token, so the
            # records launched so far do not launch twice and the rest get their turn.
            failures.append(f"{len(objects) - index} records not attempted: the function's "
                            "time is running out")
            logger.error("stopping with %d records left: less than %d ms remain",
                         len(objects) - index, DEADLINE_MARGIN_MS)
            break
        token = client_token(obj)
        reason = ("the same object version as an earlier record of this event"
                  if token in seen_tokens else should_process(obj, settings["SKIP_SUBSTRING"]))
        seen_tokens.add(token)
        if reason:
            logger.info("skipped s3://%s/%s: %s", obj["bucket"], obj["key"], reason)
            result["skipped"].append({"bucket": obj["bucket"], "key": obj["key"], "reason": reason})
            continue
        try:
            if settings["DRY_RUN"]:
                result.setdefault("dry_run", []).append(check_object_permission(obj, settings))
                continue
            instance_id = launch_object(obj, settings)
        except LAUNCH_ERRORS as err:
            reason = already_launched_reason(obj, err)
            if reason:
                # A duplicate delivery (or Lambda's retry) of an upload already launched:
                # retrying cannot change EC2's answer, so failing would only dead-letter it.
                logger.info("skipped s3://%s/%s: %s", obj["bucket"], obj["key"], reason)
                result["skipped"].append({"bucket": obj["bucket"], "key": obj["key"],
                                          "reason": reason})
                continue
            # One record's failure must not cost the others their launch: note it, go on.
            code, message = describe_failure(err)
            logger.error("failed s3://%s/%s: %s %s", obj["bucket"], obj["key"], code, message)
            # An AWS code says it all; other errors need their message (e.g. the size).
            failures.append(f"{obj['key']!r}: {code}" if isinstance(err, ClientError)
                            else f"{obj['key']!r}: {code}: {message}")
            continue
        result["launched"].append({"bucket": obj["bucket"], "key": obj["key"],
                                   "instance_id": instance_id, "route": route_name(obj, settings)})
    if failures:
        # Raising (not returning) lets Lambda's retries and on-failure destination act;
        # the retry re-uses the ClientTokens, so records that did launch do not launch twice.
        raise LaunchFailed(f"{len(failures)} of {len(objects)} records failed: " + "; ".join(failures))
    return result
