"""status's and reconcile's bookkeeping as it was before listings decided it: one S3 request
(or two) per input. Kept as the oracle of tests/test_bookkeeping.py and as the "before" of
bench/bookkeeping.py.

The functions below are awsfun_deploy/reconcile.py's at commit 6c0653d, their code unchanged
(docstrings shortened): recorded_input_etag, report_etags, scan_inputs, without_report,
input_status and Reconciler.launch_unprocessed (as launch_unprocessed, to call with a
Reconciler). running_tokens is live_workers' first half, which is what it was.
"""

import json

import AwsS3
import lambda_function
from awsfun_deploy.core import _get_or_none
from awsfun_deploy.reconcile import (
    FAILED, REPORTED, RUNNING, UNPROCESSED, ended_detail, ended_workers, head_input, is_input,
    live_workers, running_worker, settled_state, state_counts,
)
from awsfun_deploy.s3 import bucket_exists, list_keys


def running_tokens(ec2, bucket):
    """{awsfun:object tag: instance id} of the live workers, as 6c0653d's running_tokens."""
    return live_workers(ec2, bucket)[0]


def recorded_input_etag(s3, bucket, report):
    """Return the input eTag a report records, "" if it records none, or None if there is no report."""
    head = _get_or_none(s3.head_object, f"reading s3://{bucket}/{report}", Bucket=bucket,
                        Key=report)
    if head is None:
        return None
    metadata = head.get("Metadata", {})
    if "input-etag" in metadata:
        return metadata["input-etag"]
    # bootstrap.sh writes its error reports without metadata; the body names the eTag.
    body = s3.get_object(Bucket=bucket, Key=report)["Body"].read()
    try:
        return str((json.loads(body).get("input") or {}).get("etag") or "")
    except (ValueError, AttributeError):
        return ""


def report_etags(s3, bucket, key, present=None):
    """Return (report eTag, error report eTag) of an input; `present` (listed report keys) saves HEADs."""
    found = []
    for suffix in (".json", ".error.json"):
        target = AwsS3.report_key(key, suffix)
        found.append(None if present is not None and target not in present
                     else recorded_input_etag(s3, bucket, target))
    return tuple(found)


def without_report(s3, bucket, ended, scanned, key_prefix=""):
    """Return the ended workers whose object has no report and no error report, by launch time."""
    inputs = {lambda_function.shorten_tag_value(entry["key"]): entry for entry in scanned}
    found = []
    for worker in ended:
        entry = inputs.get(worker["key"])
        if entry is None:
            if not worker["key"].startswith(key_prefix):
                continue
            reported = any(etag is not None for etag in report_etags(s3, bucket, worker["key"]))
        elif entry["state"] in (REPORTED, FAILED):
            reported = True
        else:
            older = worker["object"] != lambda_function.object_version_tag(entry["obj"])
            reported = older and (entry["report_etag"], entry["error_etag"]) != (None, None)
        if not reported:
            found.append(dict(worker, key=entry["key"] if entry else worker["key"]))
    return sorted(found, key=lambda worker: (worker["launch_time"], worker["instance_id"]))


def scan_inputs(s3, bucket, skip_substring, tokens, key_prefix=""):
    """Return one entry per input under key_prefix: key, state and, unless settled, its object and token."""
    listing = [o for o in list_keys(s3, bucket, prefix=key_prefix)
               if is_input(o["Key"], skip_substring, key_prefix, o.get("Size"))]
    present = {o["Key"] for o in list_keys(s3, bucket, prefix=AwsS3.REPORT_PREFIX)}
    scanned = []
    for listed in listing:
        key, etag = listed["Key"], listed["ETag"].strip('"')
        report_etag, error_etag = report_etags(s3, bucket, key, present)
        state = settled_state(etag, report_etag, error_etag)
        entry = {"key": key, "etag": etag, "state": state, "report_etag": report_etag,
                 "error_etag": error_etag}
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


def input_status(clients, names):
    """Return status's (counts of inputs by state, ended workers without a report)."""
    s3, ec2 = clients("s3"), clients("ec2")
    if not bucket_exists(s3, names.data_bucket, names.account):
        return None, []
    scanned = scan_inputs(s3, names.data_bucket, lambda_function.DEFAULTS["SKIP_SUBSTRING"],
                          running_tokens(ec2, names.data_bucket))
    return state_counts(scanned), without_report(s3, names.data_bucket,
                                                 ended_workers(ec2, names.data_bucket), scanned)


def launch_unprocessed(self):
    """Scan the data bucket and launch every unprocessed input (a Reconciler method)."""
    scanned = scan_inputs(self.s3, self.names.data_bucket, self.settings["SKIP_SUBSTRING"],
                          self.tokens, self.key_prefix)
    self.result["counts"] = state_counts(scanned)
    # Before any launch: why each worker that left nothing ended, as EC2 says it.
    self.result["ended_without_report"] = without_report(
        self.s3, self.names.data_bucket, ended_workers(self.ec2, self.names.data_bucket),
        scanned, self.key_prefix)
    for worker in self.result["ended_without_report"]:
        self.progress.record("ended unreported", "worker", worker["instance_id"],
                             ended_detail(worker))
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
