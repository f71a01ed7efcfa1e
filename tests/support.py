"""Helpers the test modules share: run user-data under bash, publish the worker files."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote_plus

REPO = Path(__file__).resolve().parent.parent
PUBLISHED = ("AwsS3.py", "bootstrap/bootstrap.sh", "bootstrap/launcher.py")


class ShutdownStub:
    """A directory holding a `shutdown` that appends its arguments to a file."""

    def __init__(self, directory):
        self.bin = Path(directory)
        self.bin.mkdir(parents=True, exist_ok=True)
        self.log = self.bin / "shutdown.calls"
        script = self.bin / "shutdown"
        script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{self.log}"\n')
        script.chmod(0o755)

    def calls(self):
        """Return the argument strings `shutdown` was called with, in order."""
        return self.log.read_text().splitlines() if self.log.exists() else []


def run_user_data(user_data, workdir, stub, extra_env=None, path=None, timeout=120):
    """Execute rendered user-data with bash as the contract allows; return the CompletedProcess."""
    workdir = Path(workdir)
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    script = workdir / "user-data.sh"
    script.write_text(user_data, encoding="utf-8")
    env = dict(os.environ)
    env.update({"TMPDIR": str(scratch), "PATH": f"{stub.bin}:{path or os.environ['PATH']}"})
    env.update(extra_env or {})
    return subprocess.run(["bash", str(script)], cwd=workdir, env=env, capture_output=True,
                          timeout=timeout, check=False)


def publish_software(s3, bucket, files=PUBLISHED):
    """Upload the published worker files to the software bucket at their repo paths."""
    for name in files:
        s3.upload_file(str(REPO / name), bucket, name)


# --- S3 events, PATHs and fault injection (used by the pipeline tests) -----------------

#: Commands bootstrap.sh runs besides bash builtins; what a bare machine must still offer.
BOOTSTRAP_TOOLS = ("bash", "base64", "cat", "date", "mktemp", "rm", "tee", "timeout")


def worker_image_id(ssm):
    """Return the Amazon Linux 2023 image id from its public SSM parameter, as deploy does.

    Not DescribeImages without a filter: moto answers it with all of its ~1,300 images, which
    costs seconds a call on the 2-core CI machine.
    """
    from awsfun_deploy.ec2 import AMI_PARAMETER

    return ssm.get_parameter(Name=AMI_PARAMETER.format(arch="x86_64"))["Parameter"]["Value"]


def s3_record(bucket, key, *, etag="0123456789abcdef0123456789abcdef",
              event_name="ObjectCreated:Put", version_id=None, sequencer="0055AED6DCD90281E5",
              size=1, raw_key=None):
    """One S3 event record as S3 delivers it: the key URL-encoded with quote_plus."""
    obj = {"key": quote_plus(key) if raw_key is None else raw_key, "size": size,
           "eTag": etag, "sequencer": sequencer}
    if version_id is not None:
        obj["versionId"] = version_id
    return {
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2024-01-01T00:00:00.000Z", "eventName": event_name,
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "tests",
               "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}, "object": obj},
    }


def s3_event(*records):
    """An S3 notification event holding `records`."""
    return {"Records": list(records)}


def python_path(path=None):
    """PATH with the test interpreter (and its boto3) first, so user-data's python3 is it."""
    return os.pathsep.join([str(Path(sys.executable).parent), path or os.environ["PATH"]])


def bare_path(directory, tools=BOOTSTRAP_TOOLS, extra=()):
    """A directory of symlinks to `tools` (found on PATH) and `extra` paths: a bare machine's PATH."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        if found is None:
            raise FileNotFoundError(f"{tool} is not on PATH")
        (directory / tool).symlink_to(found)
    for target in extra:
        (directory / Path(target).name).symlink_to(target)
    return str(directory)


def find_aws_cli():
    """Return a self-contained AWS CLI executable (one that runs with an empty PATH), or None."""
    candidates = [os.environ.get("AWSFUN_TEST_AWS_CLI"), str(Path(sys.executable).parent / "aws")]
    found = shutil.which("aws")
    if found:
        candidates.append(found)
        if "pyenv" in Path(found).read_text(errors="replace")[:2000]:  # a pyenv shim
            shim = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True,
                                  check=False)
            candidates.append(shim.stdout.strip() if shim.returncode == 0 else None)
    for candidate in filter(None, candidates):
        if not os.access(candidate, os.X_OK):
            continue
        probe = subprocess.run([candidate, "--version"], env={"PATH": "", "HOME": "/nonexistent"},
                               capture_output=True, check=False)
        if probe.returncode == 0:
            return os.path.realpath(candidate)
    return None


def receive_s3_records(sqs, queue_url, count, timeout=10.0):
    """Take `count` S3 event records from an SQS queue (skipping s3:TestEvent); return the events."""
    events, records, deadline = [], 0, time.monotonic() + timeout
    while records < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {records} of {count} S3 records arrived in {timeout}s")
        reply = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
            body = json.loads(message["Body"])
            if body.get("Event") == "s3:TestEvent":
                continue
            events.append(body)
            records += len(body.get("Records", []))
    return events


def fail_operation(client, operation, code, status=403, message=None):
    """Make every `operation` call (e.g. 'PutObject') on `client` fail with `code`.

    Returns the list of the refused calls' parameters. Other clients are not affected.
    """
    from botocore.awsrequest import AWSResponse

    calls = []

    def note(params, **_):
        calls.append(dict(params))

    def refuse(**_):
        return (AWSResponse(None, status, {}, None),
                {"Error": {"Code": code, "Message": message or f"{code} (injected by the tests)"},
                 "ResponseMetadata": {"HTTPStatusCode": status}})

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"provide-client-params.{service}.{operation}", note)
    client.meta.events.register(f"before-call.{service}.{operation}", refuse)
    return calls


def record_calls(client):
    """Record the name and parameters (as the caller passed them) of every API call `client`
    makes, Stubber or not; return the list of (operation name, params)."""
    import copy

    calls = []

    def record(model, params, **_):
        calls.append((model.name, copy.deepcopy(params)))

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"provide-client-params.{service}", record)
    return calls


# --- many keys through rendered user-data, cheaply (the injection soak) -----------------

#: python3 as the soak's user-data sees it: the launcher, recording instead of running. It
#: records the fetch of the worker as `get BUCKET KEY FILE`, the worker's argv (its path, then
#: the arguments after the launcher's seven, NUL-separated, byte for byte) and the launcher's
#: own arguments, and starts no interpreter: a real python3 start costs more than the rest of
#: the bootstrap together. It presigns nothing, so the log goes up by the AWS CLI below.
RECORDING_PYTHON = r"""#!/bin/sh
# python3 WORK_DIR/launcher.pyz WORK_DIR SOFTWARE WORKER_KEY ERROR_KEY LOG_KEY LIMIT STARTED ARGS...
case "${1-}" in
  */launcher.pyz) printf '%s\0' get "$3" "$4" "$2/AwsS3.py" >>"$AWSFUN_TEST_RECORD.s3"
      printf '%s\0' "$@" >"$AWSFUN_TEST_RECORD.launcher"
      path="$2/AwsS3.py"
      shift 8
      printf '%s\0' "$path" "$@" >"$AWSFUN_TEST_RECORD.argv"
      exit "${AWSFUN_TEST_WORKER_STATUS:-0}" ;;
  *) echo "recording python3: unexpected call: $*" >&2
     exit 98 ;;
esac
"""
#: The AWS CLI, for the bootstrap's own writes (error report and log): `aws [--endpoint-url U]
#: s3api put-object --bucket B --key K --body F --content-type T`, recorded as `put B K F`.
RECORDING_AWS = r"""#!/bin/sh
[ "$1" = --endpoint-url ] && shift 2
[ "$1 $2 $3 $5 $7" = "s3api put-object --bucket --key --body" ] || {
  echo "recording aws: unexpected call: $*" >&2; exit 98; }
printf '%s\0' put "$4" "$6" "$8" >>"$AWSFUN_TEST_RECORD.s3"
case "$6" in *.error.json) cat "$8" >"$AWSFUN_TEST_RECORD.error" ;; esac
"""
RECORDING_SHUTDOWN = """#!/bin/sh
printf '%s\\n' "$*" >>"$AWSFUN_TEST_RECORD.shutdown"
"""


def write_recording_machine(directory):
    """Write the recording python3, aws and shutdown into `directory`; return it for PATH."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("python3", RECORDING_PYTHON), ("aws", RECORDING_AWS),
                       ("shutdown", RECORDING_SHUTDOWN)):
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    return str(directory)


def boot_recorded(user_data, record, machine, worker_status=0, timeout=60):
    """Run rendered user-data under bash on the recording machine; return the CompletedProcess.

    `record` is a path prefix: the script is saved as RECORD.sh and the recordings land beside
    it (see read_recording). The recording worker exits with `worker_status`.
    """
    record = Path(record)
    scratch = record.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    script = record.with_name(record.name + ".sh")
    script.write_text(user_data, encoding="utf-8")
    env = dict(os.environ, PATH=f"{machine}:{os.environ['PATH']}", TMPDIR=str(scratch),
               AWSFUN_TEST_RECORD=str(record), AWSFUN_TEST_WORKER_STATUS=str(worker_status))
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, timeout=timeout,
                          check=False)


def read_recording(record):
    """Return what one recorded boot did: worker and launcher argv (bytes), S3 copies, error
    report, shutdowns."""
    record = str(record)

    def read(suffix):
        path = Path(record + suffix)
        return path.read_bytes() if path.exists() else None

    argv, launcher = read(".argv"), read(".launcher")
    s3_fields = (read(".s3") or b"").split(b"\0")[:-1]
    # Each copy is `OP BUCKET KEY FILE`.
    copies = [tuple(part.decode("utf-8") for part in s3_fields[i:i + 3])
              for i in range(0, len(s3_fields), 4)]
    return {
        "argv": argv.split(b"\0")[:-1] if argv is not None else None,
        "launcher": launcher.split(b"\0")[:-1] if launcher is not None else None,
        "copies": copies,
        "error_report": read(".error"),
        "shutdown": (read(".shutdown") or b"").decode().splitlines(),
    }


def remove_recording(record):
    """Delete one boot's script and recordings."""
    for suffix in (".sh", ".argv", ".launcher", ".s3", ".error", ".shutdown"):
        Path(str(record) + suffix).unlink(missing_ok=True)


class RecordingEc2:
    """EC2 as the handler sees it: RunInstances records the request and 'launches' at once.

    A ClientToken already used is answered as EC2 does since January 2025 (moto ignores the
    token): the same parameters while its instance is not terminated give that instance
    again; a terminated instance gives IdempotentInstanceTerminated; other parameters give
    IdempotentParameterMismatch. `terminate` ends an instance, as its shutdown would.
    """

    def __init__(self):
        self.requests = []
        self.launches = {}  # ClientToken -> (the other parameters, instance id)
        self.terminated = set()
        self.tags = {}  # instance id -> {tag: value} of each instance not terminated
        self.counts = 0

    def describe_instances(self, Filters=(), **_):
        """Answer the handler's count: the live instances whose tags pass `Filters` (tag:K
        filters; instance-state-name is taken as pending or running)."""
        self.counts += 1
        wanted = {f["Name"][4:]: set(f["Values"]) for f in Filters if f["Name"].startswith("tag:")}
        instances = [{"InstanceId": i, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}
                     for i, tags in self.tags.items()
                     if all(tags.get(k) in values for k, values in wanted.items())]
        return {"Reservations": [{"Instances": instances}] if instances else []}

    def run_instances(self, **params):
        """Record the request; return a fresh instance id, or answer a repeated token."""
        self.requests.append(params)
        token = params.get("ClientToken")
        others = {name: value for name, value in params.items() if name != "ClientToken"}
        if token in self.launches:
            first, instance_id = self.launches[token]
            if first != others:
                raise ec2_error("IdempotentParameterMismatch",
                                f"Client token {token} was used with other parameters.")
            if instance_id in self.terminated:
                raise ec2_error("IdempotentInstanceTerminated",
                                f"The instance of client token {token} has terminated.")
            return {"Instances": [{"InstanceId": instance_id}]}
        instance_id = f"i-{len(self.launches) + 1:017x}"
        if token:
            self.launches[token] = (others, instance_id)
        specs = params.get("TagSpecifications") or []
        self.tags[instance_id] = {t["Key"]: t["Value"] for spec in specs[:1]
                                  for t in spec["Tags"]}
        return {"Instances": [{"InstanceId": instance_id}]}

    def terminate(self, instance_id):
        """End an instance, as its `shutdown -h now` (or a lost host) does."""
        self.terminated.add(instance_id)
        self.tags.pop(instance_id, None)


def ec2_error(code, message):
    """A ClientError as botocore raises it for an EC2 error answer."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, "RunInstances")


# --- a data bucket of every kind of input (status's and reconcile's bookkeeping) ---------

#: The state status and reconcile must find for each kind of input fill_mixed_bucket makes
#: (reconcile.REPORTED, FAILED, RUNNING, UNPROCESSED), by how its reports and workers came to be.
MIXED_KINDS = {
    "ok": "reported",                      # the worker's report, with its receipt
    "ok-legacy": "reported",               # a report from before receipts: metadata only
    "ok-again": "reported",                # reported, then the same bytes uploaded again
    "ok-old-error": "reported",            # an old version failed, the current one reported
    "failed": "error-reported",            # the worker's error report, with its receipt
    "failed-blank": "error-reported",      # an error report that names no eTag
    "failed-launcher": "error-reported",   # the launcher's error report: the eTag in the body only
    "stale": "unprocessed",                # the report of an older version, with its receipt
    "stale-legacy": "unprocessed",         # the same from before receipts
    "stale-error": "unprocessed",          # the error report of an older version
    "rewritten": "unprocessed",            # receipted report overwritten by an older version's
    "new": "unprocessed",                  # nothing yet
    "long-ok": "reported",                 # a key whose reports are hashed under _long/
    "long-new": "unprocessed",
    "running": "running",                  # a live worker of the current version
    "running-old": "unprocessed",          # a live worker of an older version only
    "lost": "unprocessed",                 # its worker ended without a report
    "lost-old": "unprocessed",             # an older version's worker ended, its report there
    "lost-old-none": "unprocessed",        # an older version's worker ended, no report at all
}
#: Workers that ended without leaving anything, by the kind of input they were for ("gone":
#: an input deleted since; "gone-reported", deleted after its report, is not one of them).
MIXED_ENDED_UNREPORTED = ("lost", "lost-old-none", "gone")


def mixed_input_key(kind, index):
    """An input key of `kind`: hostile characters, and near S3's 1,024 bytes for long-* (pure)."""
    if kind.startswith("long-"):
        return f"{kind}/{index:05d}/" + "x" * 1000 + ".csv"
    return f"{kind}/{index:05d} b+ü.csv"


def write_report(s3, bucket, key, etag, suffix=".json", writer="worker"):
    """Write a report of `key` recording `etag` as `writer` does: "worker" (AwsS3.put_report:
    input-etag metadata and a receipt), "legacy" (a worker from before receipts: metadata
    only) or "launcher" (bootstrap/launcher.py, bootstrap.sh: the eTag in the body only)."""
    import AwsS3

    report = {"input": {"bucket": bucket, "key": key, "etag": etag},
              "status": "error" if suffix == ".error.json" else "ok"}
    if writer == "worker":
        AwsS3.put_report(s3, bucket, key, report, suffix)
        return
    extra = {"Metadata": {"input-etag": etag}} if writer == "legacy" else {}
    s3.put_object(Bucket=bucket, Key=AwsS3.report_key(key, suffix), ContentType="application/json",
                  Body=json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"), **extra)


def fill_mixed_bucket(s3, ec2, bucket, image_id, bulk=200, copies=1):
    """Fill `bucket` with `bulk` inputs of kind "ok" and `copies` of every other MIXED_KINDS
    kind, their reports as each writer leaves them, and their workers, live or ended, tagged
    as the handler tags them; besides, keys that are no input (one containing "analysis", a
    console folder marker) and deleted inputs with ended workers ("gone", "gone-reported").
    Returns {input key: kind}."""
    import lambda_function

    kinds = {}

    def put(key, kind, version):
        written = s3.put_object(Bucket=bucket, Key=key, Body=f"{kind},{version}\n".encode())
        return {"bucket": bucket, "key": key, "etag": written["ETag"].strip('"'),
                "version_id": written.get("VersionId") or ""}

    def worker(obj, live):
        tags = {"awsfun:bucket": bucket, "awsfun:key": lambda_function.shorten_tag_value(obj["key"]),
                "awsfun:object": lambda_function.object_version_tag(obj)}
        instance = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1,
                                     InstanceType="t3.micro", TagSpecifications=[{
                                         "ResourceType": "instance",
                                         "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
                                     )["Instances"][0]["InstanceId"]
        if not live:
            ec2.terminate_instances(InstanceIds=[instance])

    for kind in MIXED_KINDS:
        for index in range(bulk if kind == "ok" else copies):
            key = mixed_input_key(kind, index)
            kinds[key] = kind
            first = put(key, kind, 0)
            if kind in ("ok", "ok-again", "long-ok"):
                write_report(s3, bucket, key, first["etag"])
                if kind == "ok-again":
                    put(key, kind, 0)
            elif kind == "ok-legacy":
                write_report(s3, bucket, key, first["etag"], writer="legacy")
            elif kind in ("failed", "failed-blank", "failed-launcher"):
                write_report(s3, bucket, key, "" if kind == "failed-blank" else first["etag"],
                             ".error.json", "launcher" if kind == "failed-launcher" else "worker")
            elif kind in ("running", "lost"):
                worker(first, live=kind == "running")
            elif kind != "new" and kind != "long-new":
                # Kinds whose current version is a second upload, after the first's traces.
                if kind == "ok-old-error":
                    write_report(s3, bucket, key, first["etag"], ".error.json", "legacy")
                elif kind in ("stale", "stale-legacy", "lost-old"):
                    write_report(s3, bucket, key, first["etag"],
                                 writer="legacy" if kind == "stale-legacy" else "worker")
                elif kind == "stale-error":
                    write_report(s3, bucket, key, first["etag"], ".error.json")
                if kind in ("running-old", "lost-old", "lost-old-none"):
                    worker(first, live=kind == "running-old")
                second = put(key, kind, 1)
                if kind == "ok-old-error":
                    write_report(s3, bucket, key, second["etag"])
                elif kind == "rewritten":
                    write_report(s3, bucket, key, second["etag"])
                    write_report(s3, bucket, key, first["etag"], writer="legacy")
    for index in range(copies):
        s3.put_object(Bucket=bucket, Key=f"notes/analysis-draft-{index}.txt", Body=b"no input")
        s3.put_object(Bucket=bucket, Key=f"folder-{index}/", Body=b"")
        for kind in ("gone", "gone-reported"):
            obj = put(f"{kind}/{index:05d}.csv", kind, 0)
            worker(obj, live=False)
            if kind == "gone-reported":
                write_report(s3, bucket, obj["key"], obj["etag"])
            s3.delete_object(Bucket=bucket, Key=obj["key"])
    return kinds


# --- moto's IAM enforcement and anonymous clients (the security tests) -----------------


@contextlib.contextmanager
def moto_iam_enforced(endpoint):
    """Make the moto server at `endpoint` check every request against IAM for the block."""
    import urllib.request

    def reset_auth(value):
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                         data=str(value).encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    previous = reset_auth(0)
    try:
        yield
    finally:
        reset_auth(previous)


def assumed_role_session(sts, role_arn, name="awsfun-test"):
    """A boto3 session holding the temporary credentials of `role_arn`, as the role's user gets."""
    import boto3

    credentials = sts.assume_role(RoleArn=role_arn, RoleSessionName=name)["Credentials"]
    return boto3.session.Session(aws_access_key_id=credentials["AccessKeyId"],
                                 aws_secret_access_key=credentials["SecretAccessKey"],
                                 aws_session_token=credentials["SessionToken"],
                                 region_name=sts.meta.region_name)


def anonymous_client(service="s3"):
    """A client that signs nothing: what anyone on the internet can do."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.client(service, config=Config(signature_version=UNSIGNED))


def fail_first(client, operation, code, message, times=1, status=400):
    """Make the first `times` `operation` calls on `client` fail with `code` and `message`, the
    rest reach the service; returns the list of every call's parameters (refused or not)."""
    from botocore.awsrequest import AWSResponse

    calls = []

    def note(params, **_):
        calls.append(dict(params))

    def refuse(**_):
        if len(calls) > times:
            return None
        return (AWSResponse(None, status, {}, None),
                {"Error": {"Code": code, "Message": message},
                 "ResponseMetadata": {"HTTPStatusCode": status}})

    service = client.meta.service_model.service_id.hyphenize()
    client.meta.events.register(f"provide-client-params.{service}.{operation}", note)
    client.meta.events.register(f"before-call.{service}.{operation}", refuse)
    return calls


# --- the target machine's Python (tests/target_python.py) ------------------------------


def target_venv_bin():
    """Return the bin directory of .venv-target (Python 3.9 with AL2023's boto3 and botocore).

    Raises AssertionError naming the command that makes it when it is missing or stale: a test
    that needs the target fails there, it never skips.
    """
    import target_python

    if not target_python.venv_is_current():
        raise AssertionError(
            f"the target venv {target_python.VENV} is missing or older than "
            f"{target_python.REQUIREMENTS.name}: make it with `{target_python.MAKE_COMMAND}`")
    return target_python.venv_python().parent
