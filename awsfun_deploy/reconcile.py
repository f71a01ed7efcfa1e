"""reconcile: find every input without a report, replay dead letters, relaunch lost workers."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime

from botocore.exceptions import ClientError, WaiterError

import AwsS3
import lambda_function

from .batch import batch_names
from .batch_jobs import LIVE_STATUSES, ended_jobs, live_job_names
from .core import (
    GONE,
    DeployError,
    Progress,
    _get_or_none,
    error_code,
    log_client_error,
)
from .function import read_function
from .names import BUCKET_TAG, TOKEN_TAG, WORKER_KEY_TAG
from .s3 import bucket_exists, list_keys
from .sqs import find_queue

logger = logging.getLogger("awsfun.deploy")
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
# EC2's states of an instance that is ending or has ended: it writes nothing more.
ENDED_STATES = ("shutting-down", "terminated", "stopping", "stopped")


def job_status(batch, job_id):
    """Return (status, statusReason) of one Batch job (DescribeJobs); ("gone", "") when Batch
    no longer lists it."""
    jobs = batch.describe_jobs(jobs=[job_id]).get("jobs") or []
    if not jobs:
        return "gone", ""
    return jobs[0].get("status", ""), jobs[0].get("statusReason", "")


def worker_tokens(obj):
    """Every ClientToken reconcile may launch this upload with: attempt 0, then each relaunch's (pure)."""
    return [lambda_function.client_token(obj, attempt) for attempt in range(MAX_RELAUNCHES + 1)]


def running_worker(obj, running):
    """Return the instance id of a running worker for this object version, or None (pure).

    `running` maps awsfun:object tag values to instance ids (see live_workers).
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
    head = _get_or_none(s3.head_object, f"reading s3://{bucket}/{key}", Bucket=bucket, Key=key)
    return None if head is None else object_from_head(bucket, key, head)


def recorded_input(s3, bucket, report):
    """Return (the input eTag a report records, "" if none, or None if there is no report;
    its interruption: "spot" when EC2 reclaimed the spot worker that wrote it, else "").

    A HEAD where the report carries its input-etag metadata (the worker's, the launcher's),
    else its body (bootstrap.sh writes its error reports without metadata).
    """
    head = _get_or_none(s3.head_object, f"reading s3://{bucket}/{report}", Bucket=bucket,
                        Key=report)
    if head is None:
        return None, ""
    metadata = head.get("Metadata", {})
    if "input-etag" in metadata:
        return metadata["input-etag"], metadata.get("interruption", "")
    body = s3.get_object(Bucket=bucket, Key=report)["Body"].read()
    try:
        parsed = json.loads(body)
        return (str((parsed.get("input") or {}).get("etag") or ""),
                "spot" if parsed.get("spot_interruption") else "")
    except (ValueError, AttributeError):
        return "", ""


def settled_state(etag, report_etag, error_etag, interruption=""):
    """Return REPORTED or FAILED when an input needs no worker, else None (pure).

    A report counts only for the input's current eTag. An error report is a visible
    failure (not re-launched) unless it names another eTag; one that names none is
    taken as current, since re-launching a failure nobody looked at helps no one. An
    error report of a spot worker EC2 reclaimed (interruption "spot") is no failure of
    the input: it is relaunched, on demand, so once.
    """
    if report_etag is not None and report_etag == etag:
        return REPORTED
    if error_etag is not None and error_etag in ("", etag) and interruption != "spot":
        return FAILED
    return None


def report_etags(s3, bucket, key):
    """Return (report eTag, error report eTag, the error report's interruption) of an input,
    each read from its report (eTags None where there is none), for settled_state."""
    report_etag = recorded_input(s3, bucket, AwsS3.report_key(key))[0]
    return (report_etag, *recorded_input(s3, bucket, AwsS3.report_key(key, ".error.json")))


def list_bucket(s3, bucket, key_prefix=""):
    """Return (the objects under key_prefix as ListObjectsV2 gives them, {key: ETag} of
    everything under analysis/: reports, receipts, logs, outputs).

    ListObjectsV2 answers 1,000 keys a request. One listing serves both where key_prefix
    takes in analysis/ (status; reconcile without --key-prefix), else analysis/ is listed too.
    """
    objects = list_keys(s3, bucket, prefix=key_prefix)
    reports = ([o for o in objects if o["Key"].startswith(AwsS3.REPORT_PREFIX)]
               if AwsS3.REPORT_PREFIX.startswith(key_prefix)
               else list_keys(s3, bucket, prefix=AwsS3.REPORT_PREFIX))
    return objects, {o["Key"]: o["ETag"].strip('"') for o in reports}


def receipted_etag(target, listed, etag):
    """Return `etag` or "" where report `target`'s receipt proves it records that input eTag,
    else None: the listing cannot tell (pure).

    `listed` is list_bucket's {key: ETag}. The receipt's listed ETag is the MD5 of
    AwsS3.receipt_body(target, the report's listed ETag, the eTag it records), so it is
    checked for the two values that settle an input. A report without a receipt (from a
    worker older than receipts, the launcher or bootstrap.sh), or whose receipt is of other
    report bytes or another eTag (a stale report, one rewritten since), is for a read.
    """
    report, receipt = listed.get(target), listed.get(AwsS3.receipt_key(target))
    if report is None or receipt is None:
        return None
    for candidate in dict.fromkeys((etag, "")):
        body = AwsS3.receipt_body(target, report, candidate)
        if hashlib.md5(body, usedforsecurity=False).hexdigest() == receipt:
            return candidate
    return None


def listed_report(s3, bucket, target, etag, listed):
    """Return (the input eTag report `target` records, or None if `listed` (list_bucket) has
    no such report; its interruption, as recorded_input's): from its receipt where that
    settles it (only the worker writes receipts, and it is never the one reclaimed), else
    from the report itself."""
    if target not in listed:
        return None, ""
    proven = receipted_etag(target, listed, etag)
    return (proven, "") if proven is not None else recorded_input(s3, bucket, target)


def live_workers(ec2, bucket):
    """Return ({awsfun:object tag: instance id}, {awsfun:key tag}) of the workers pending or
    running for the bucket's objects: one DescribeInstances pass."""
    running, keys = {}, set()
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{BUCKET_TAG}", "Values": [bucket]},
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
    ]):
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if tags.get(OBJECT_TAG):
                    running[tags[OBJECT_TAG]] = instance["InstanceId"]
                    keys.add(tags.get(WORKER_KEY_TAG, ""))
    return running, keys


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


def end_reason(ec2, instance_id=None, token=None):
    """Return EC2's StateReason of an ended worker (by id, else by its awsfun:token tag), or "".

    A worker that ended without a report may never have booted, and EC2 says why only there:
    e.g. Client.InvalidKMSKey.InvalidState (the launching role may not use the account's
    default EBS key), Client.VolumeLimitExceeded, Server.InsufficientInstanceCapacity; a
    terminated instance stays visible for about an hour (EC2 API Reference, StateReason).
    """
    if not instance_id and not token:
        return ""
    params = ({"InstanceIds": [instance_id]} if instance_id else
              {"Filters": [{"Name": f"tag:{TOKEN_TAG}", "Values": [token]}]})
    try:
        reservations = ec2.describe_instances(**params)["Reservations"]
    except ClientError as err:
        if error_code(err) == "InvalidInstanceID.NotFound":
            return ""
        log_client_error(err, f"reading why {instance_id or token} ended")
        raise
    for reservation in reservations:
        for instance in reservation["Instances"]:
            if state_reason_text(instance):
                return state_reason_text(instance)
    return ""


def state_reason_text(instance):
    """Return EC2's StateReason of a DescribeInstances instance as "Code: Message", or "" (pure).

    Both fields, as EC2 gives them: the Message often repeats the Code (a worker whose
    launch role may not use the account's default EBS key ends with Code
    Client.InternalError, Message "Client.InternalError: Client error on launch"; AWS
    Knowledge Center, "encrypted-volumes-stops-immediately"). Codes: EC2 API Reference,
    StateReason.
    """
    reason = instance.get("StateReason") or {}
    return ": ".join(part for part in (reason.get("Code"), reason.get("Message")) if part)


def ended_worker(instance):
    """Describe an ended worker from DescribeInstances for status and reconcile (pure)."""
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    launched = instance.get("LaunchTime")
    return {"instance_id": instance["InstanceId"], "state": instance["State"]["Name"],
            "key": tags.get(WORKER_KEY_TAG, ""), "object": tags.get(OBJECT_TAG, ""),
            "launch_time": launched.isoformat() if isinstance(launched, datetime)
            else str(launched or ""),
            "state_reason": state_reason_text(instance),
            "state_transition_reason": instance.get("StateTransitionReason") or ""}


def ended_workers(ec2, bucket):
    """Return ended_worker() of each of the bucket's workers that is ending or has ended.

    EC2 shows a terminated instance for about an hour after it ended (EC2 User Guide,
    "Terminate Amazon EC2 instances"), so these are the recent ends.
    """
    found = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=[
        {"Name": f"tag:{BUCKET_TAG}", "Values": [bucket]},
        {"Name": "instance-state-name", "Values": list(ENDED_STATES)},
    ]):
        for reservation in page["Reservations"]:
            found += [ended_worker(instance) for instance in reservation["Instances"]]
    return found


def without_report(s3, bucket, ended, scanned, listed, key_prefix=""):
    """Return the ended workers whose object has no report and no error report, by launch time.

    `scanned` is scan_inputs' answer, `listed` list_bucket's {key: ETag}. A worker is matched
    to its input by its awsfun:key tag (shortened past 256 characters, so the listed keys are
    shortened the same way). An input settled for its current eTag has its report. An
    unsettled one counts as unreported for a worker of its current version (awsfun:object
    tag; the input's HeadObject gives its VersionId), and for a worker of an older version
    only when no report or error report of any eTag is there. A key no longer listed
    (deleted since) counts as reported when a report key of it is listed; one outside
    key_prefix is left out.
    """
    inputs = {lambda_function.shorten_tag_value(entry["key"]): entry for entry in scanned}
    found = []
    for worker in ended:
        entry = inputs.get(worker["key"])
        obj = None
        if entry is not None and entry["state"] not in (REPORTED, FAILED):
            obj = entry.get("obj") or head_input(s3, bucket, entry["key"])
            entry["obj"] = obj  # read once, however many of its workers ended
            if obj is None:
                entry = None  # deleted since the listing
        if entry is None:
            if not worker["key"].startswith(key_prefix):
                continue
            reported = any(AwsS3.report_key(worker["key"], suffix) in listed
                           for suffix in (".json", ".error.json"))
        elif entry["state"] in (REPORTED, FAILED):
            reported = True
        else:
            older = worker["object"] != lambda_function.object_version_tag(obj)
            reported = older and (entry["report_etag"], entry["error_etag"]) != (None, None)
        if not reported:
            found.append(dict(worker, key=entry["key"] if entry else worker["key"]))
    return sorted(found, key=lambda worker: (worker["launch_time"], worker["instance_id"]))


def ended_detail(worker):
    """For a person: an ended worker's state, key, EC2's StateReason and StateTransitionReason (pure)."""
    return (f"{worker['state']}, {worker['key']}: {worker['state_reason'] or 'no StateReason'};"
            f" {worker['state_transition_reason'] or 'no StateTransitionReason'}")


def is_input(key, skip_substring, key_prefix="", size=None):
    """True for a key the handler would launch a worker for, under key_prefix (pure).

    A console folder marker (zero-byte, ending in '/') is no input.
    """
    return (key.startswith(key_prefix) and not (skip_substring and skip_substring in key)
            and not lambda_function.is_folder_marker(key, size))


def scan_inputs(s3, bucket, skip_substring, live, listing, key_prefix=""):
    """Return one entry per input under key_prefix: key, eTag, state, the eTags its reports
    record and, where it was read, its object.

    Decided from the listing of the inputs and of analysis/ (`listing`, list_bucket's answer),
    asking S3 per object only where it cannot tell: a report without a receipt that settles it
    (receipted_etag) is read, and so is the error report of an input the report does not
    settle (else error_etag stays None); an unsettled input is read (HeadObject: the
    VersionId its workers' awsfun:object tag is made of) only when a live worker carries its
    key, else no worker of its can be running. `live` is live_workers' answer.
    """
    tokens, live_keys = live
    objects, listed = listing
    scanned = []
    for item in (o for o in objects
                 if is_input(o["Key"], skip_substring, key_prefix, o.get("Size"))):
        key, etag = item["Key"], item["ETag"].strip('"')
        report_etag = listed_report(s3, bucket, AwsS3.report_key(key), etag, listed)[0]
        error_etag, interruption = (None, "") if report_etag == etag else listed_report(
            s3, bucket, AwsS3.report_key(key, ".error.json"), etag, listed)
        state = settled_state(etag, report_etag, error_etag, interruption)
        entry = {"key": key, "etag": etag, "state": state, "report_etag": report_etag,
                 "error_etag": error_etag, "interruption": interruption}
        if state is None and lambda_function.shorten_tag_value(key) not in live_keys:
            entry["state"] = UNPROCESSED
        elif state is None:
            obj = head_input(s3, bucket, key)
            if obj is None:
                continue  # deleted since the listing
            running = running_worker(obj, tokens)
            entry.update(obj=obj, instance_id=running, state=RUNNING if running else UNPROCESSED)
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


def input_status(clients, names):
    """Return status's (counts of inputs by state, ended workers without a report); (None, [])
    without a data bucket. See state_counts and without_report."""
    s3, ec2 = clients("s3"), clients("ec2")
    if not bucket_exists(s3, names.data_bucket, names.account):
        return None, []
    listing = list_bucket(s3, names.data_bucket)
    scanned = scan_inputs(s3, names.data_bucket, lambda_function.DEFAULTS["SKIP_SUBSTRING"],
                          live_workers(ec2, names.data_bucket), listing)
    return state_counts(scanned), without_report(
        s3, names.data_bucket, ended_ones(clients("batch") if names.engine == "batch" else None,
                                          ec2, names), scanned, listing[1])


def ended_ones(batch, ec2, names):
    """Return the recent ends of the bucket's workers: EC2's ended instances and, with `batch`
    (the Batch engine), the queue's FAILED jobs (batch_jobs.ended_jobs), in one shape."""
    ended = ended_workers(ec2, names.data_bucket)
    if batch is not None:
        ended += ended_jobs(batch, batch_names(names)["queue"], names.data_bucket)
    return ended


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
        self.tokens, self.live_keys = live_workers(self.ec2, names.data_bucket)
        # Under the Batch engine (ENGINE=batch in the function's environment) an input is
        # resubmitted as a job, and one with a job under way (by its name) is left alone.
        self.batch = clients("batch") if names.engine == "batch" else None
        self.live_jobs = (live_job_names(self.batch, batch_names(names)["queue"])
                          if self.batch is not None else set())
        self.refused = {}  # object version -> error: a refused launch is not tried twice a run
        self.queue_url = None
        self.result = {"dry_run": dry_run, "key_prefix": key_prefix, "unprocessed": [],
                       "launched": [], "failed": [], "replayed": [], "dlq_failed": [],
                       "dlq_kept": [], "ended_without_report": []}

    def launch(self, obj, on_demand=False):
        """Launch one object's worker through the handler's path; return (instance id, None) or (None, error).

        on_demand: not spot, for an input whose spot worker EC2 reclaimed (its error report
        says so): relaunched once, since an on-demand worker is not reclaimed.

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
        if self.batch is not None:
            return self.submit(obj)
        running = running_worker(obj, self.tokens)
        if running:
            return running, None
        ended = []
        for attempt, attempt_token in enumerate(worker_tokens(obj)):
            try:
                # local_dir "": render and route with what deploy published, like the function.
                instance_id = lambda_function.launch_object(obj, self.settings, ec2=self.ec2,
                                                            s3=self.s3, local_dir="",
                                                            attempt=attempt, on_demand=on_demand)
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
                self.live_keys.add(lambda_function.shorten_tag_value(obj["key"]))
                return instance_id, None
            reason = end_reason(self.ec2, instance_id, attempt_token)
            logger.warning("s3://%s/%s: ClientToken attempt %d is %s's, which is %s with no "
                           "report (%s); relaunching", obj["bucket"], obj["key"], attempt,
                           instance_id or "a worker", state or "gone", reason or "no reason shown")
            ended.append(f"{instance_id or 'attempt ' + str(attempt)} ({state or 'gone'}"
                         f"{': ' + reason if reason else ''})")
        self.refused[token] = (f"every ClientToken is used by a worker that ended without a "
                               f"report: {', '.join(ended)}; see their console output")
        logger.error("s3://%s/%s: %s", obj["bucket"], obj["key"], self.refused[token])
        return None, self.refused[token]

    def submit(self, obj):
        """Submit one object's job through the handler's path (lambda_function.submit_object_detail);
        return (job id or live job's name, None) or (None, error).

        An object whose job (by batch_job_name of any of its tokens) is under way is not
        submitted again. Batch has no client token: a job name already used (ListJobs finds it)
        belongs to an earlier attempt, which, ended with no report (or the scan would not be
        here), was lost; the next attempt's name is tried, MAX_RELAUNCHES times at most, as the
        EC2 path moves on from a token whose worker ended.
        """
        token = lambda_function.object_version_tag(obj)
        for attempt_token in worker_tokens(obj):
            name = lambda_function.batch_job_name(attempt_token)
            if name in self.live_jobs:
                return name, None
        ended = []
        for attempt in range(MAX_RELAUNCHES + 1):
            try:
                detail = lambda_function.submit_object_detail(
                    obj, self.settings, batch=self.batch, s3=self.s3, local_dir="",
                    attempt=attempt)
                status, reason = ("SUBMITTED", "") if detail["submitted"] else \
                    job_status(self.batch, detail["job_id"])
            except lambda_function.LAUNCH_ERRORS as err:
                code, message = lambda_function.describe_failure(err)
                logger.error("job for s3://%s/%s failed: %s %s", obj["bucket"], obj["key"],
                             code, message)
                self.refused[token] = f"{code}: {message}"
                return None, self.refused[token]
            if status in LIVE_STATUSES:
                self.live_jobs.add(detail["job_name"])
                return detail["job_id"], None
            logger.warning("s3://%s/%s: job %s (%s) is %s with no report (%s); resubmitting",
                           obj["bucket"], obj["key"], detail["job_name"], detail["job_id"],
                           status, reason or "no reason shown")
            ended.append(f"{detail['job_id']} ({status}{': ' + reason if reason else ''})")
        self.refused[token] = (f"every job name is used by a job that ended without a "
                               f"report: {', '.join(ended)}; see their logs")
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
        etags = report_etags(self.s3, obj["bucket"], obj["key"])
        state = settled_state(obj["etag"], *etags)
        if state:
            return state, None
        if self.dry_run:
            return "would launch", None
        instance_id, error = self.launch(obj, on_demand=etags[2] == "spot")
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
        bucket = self.names.data_bucket
        listing = list_bucket(self.s3, bucket, self.key_prefix)
        scanned = scan_inputs(self.s3, bucket, self.settings["SKIP_SUBSTRING"],
                              (self.tokens, self.live_keys), listing, self.key_prefix)
        self.result["counts"] = state_counts(scanned)
        # Before any launch: why each worker that left nothing ended, as EC2 says it.
        self.result["ended_without_report"] = without_report(
            self.s3, bucket, ended_ones(self.batch, self.ec2, self.names), scanned, listing[1],
            self.key_prefix)
        for worker in self.result["ended_without_report"]:
            self.progress.record("ended unreported", "worker", worker["instance_id"],
                                 ended_detail(worker))
        for entry in scanned:
            if entry["state"] != UNPROCESSED:
                continue
            if self.dry_run:
                self.result["unprocessed"].append(entry["key"])
                self.progress.record("would launch", "unprocessed input", entry["key"])
                continue
            # HeadObject: the VersionId and LastModified the scan's ClientToken is made of.
            obj = entry.get("obj") or head_input(self.s3, bucket, entry["key"])
            if obj is None:
                self.progress.record(GONE, "unprocessed input", entry["key"],
                                     "deleted since the listing")
                continue
            self.result["unprocessed"].append(entry["key"])
            reclaimed = entry.get("interruption") == "spot"
            instance_id, error = self.launch(obj, on_demand=reclaimed)
            if instance_id:
                self.result["launched"].append({"key": entry["key"], "instance_id": instance_id,
                                                "source": "scan"})
                self.progress.record("launched", "unprocessed input", entry["key"],
                                     instance_id + (" (on demand: spot worker reclaimed)"
                                                    if reclaimed else ""))
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
