"""The Batch engine's jobs as status and reconcile see them: counts by status, the names of
those under way, and the ones that ended FAILED without a report (what ended_workers is to
EC2).

A job that ends FAILED without writing a report or an error report (its image could not be
pulled, boto3 could not be installed, the host went away on its last attempt) leaves nothing
in the bucket; Batch's statusReason and the container's exit code are then the only account
of it, as EC2's StateReason is for an instance that never booted.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import lambda_function

from .batch import batch_names, read_job_queue, read_live
from .core import _get_or_none, plural

logger = logging.getLogger(__name__)

# DescribeJobs takes up to 100 job ids a call (AWS Batch API Reference, DescribeJobs).
DESCRIBE_JOBS_LIMIT = 100
# status: ListJobs per status, at most this many pages of 100 each.
LIST_JOBS_PAGES = 10
JOB_STATUSES = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING", "SUCCEEDED",
                "FAILED")
LIVE_STATUSES = JOB_STATUSES[:5]


def job_pages(batch, queue, status, pages):
    """Yield (page, more) for at most `pages` pages of ListJobs of one status; `more` is True
    when the last page read still has a nextToken (ListJobs answers 100 a page at most)."""
    for number, page in enumerate(batch.get_paginator("list_jobs").paginate(
            jobQueue=queue, jobStatus=status, PaginationConfig={"PageSize": 100}), 1):
        yield page, number == pages and bool(page.get("nextToken"))
        if number == pages:
            return


def job_counts(batch, queue, statuses=JOB_STATUSES, pages=LIST_JOBS_PAGES):
    """Return {status: number of jobs} of a queue, reading at most `pages` pages of ListJobs
    per status; a count that reached the cap is reported as "N+" (a string)."""
    counts = {}
    for status in statuses:
        total, capped = 0, False
        for page, more in job_pages(batch, queue, status, pages):
            total += len(page.get("jobSummaryList") or [])
            capped = capped or more
        counts[status] = f"{total}+" if capped else total
    return counts


def live_job_names(batch, queue, pages=LIST_JOBS_PAGES):
    """Return the names of the queue's jobs that are not finished (at most `pages` pages of
    ListJobs per status): the uploads that have a job under way."""
    return {job["jobName"] for status in LIVE_STATUSES
            for page, _ in job_pages(batch, queue, status, pages)
            for job in page.get("jobSummaryList") or []}


def batch_status(batch, names):
    """Return {"job_queue", "state", "status", "jobs": job_counts} or {"job_queue", "missing"}."""
    queue = batch_names(names)["queue"]
    found = _get_or_none(batch.describe_job_queues, "reading the job queue", jobQueues=[queue])
    # A deleted queue is described as DELETED for a while: missing, as read_live reads it.
    described = read_live(next(iter((found or {}).get("jobQueues") or []), None))
    if described is None:
        return {"job_queue": queue, "missing": True}
    return {"job_queue": queue, "state": described.get("state"),
            "status": described.get("status"), "jobs": job_counts(batch, queue)}


def unfinished_jobs_detail(counts):
    """Return the queue's teardown detail for {status: count} of its unfinished jobs, "" when
    there is none; a count "N+" (job_counts' cap) makes the total "at least" (pure)."""
    total = sum(int(str(count).rstrip("+")) for count in counts.values())
    if not total:
        return ""
    capped = any(str(count).endswith("+") for count in counts.values())
    number = f"{total:,}+ unfinished jobs" if capped else plural(total, "unfinished job")
    return (f"{number} terminated with it: their inputs get no report; reconcile after the "
            "next deploy submits them again")


def job_input(job):
    """Return (bucket, key) of the object an awsfun job was submitted for, or None (pure).

    `job` is one of DescribeJobs' jobs; its container's environment holds SubmitJob's
    overrides (lambda_function.batch_environment), JOB_FIELDS_B64 among them. None for a job
    this project did not submit, or one of a version whose fields do not decode.
    """
    environment = {e.get("name"): e.get("value") for e in
                   (job.get("container") or {}).get("environment") or []}
    try:
        fields = lambda_function.decode_job_fields(environment.get("JOB_FIELDS_B64") or "")
    except ValueError:
        return None
    return fields["BUCKET"], fields["KEY"]


def ended_job(job, key):
    """Describe a FAILED job like reconcile.ended_worker describes an ended instance (pure).

    instance_id is the job id; state_reason Batch's statusReason ("Essential container in task
    exited", "Host EC2 (instance i-...) terminated.", "CannotPullContainerError: ..."); the
    transition reason the container's exit code. "object" is empty: the job does not carry the
    object's version, so an input counts as unreported only with no report of any eTag.
    """
    created = job.get("createdAt")  # milliseconds since the epoch
    launched = (datetime.fromtimestamp(created / 1000, timezone.utc).isoformat()
                if isinstance(created, (int, float)) else "")
    exit_code = (job.get("container") or {}).get("exitCode")
    return {"instance_id": job["jobId"], "state": job.get("status", ""),
            "key": lambda_function.shorten_tag_value(key), "object": "",
            "launch_time": launched, "state_reason": job.get("statusReason") or "",
            "state_transition_reason": ("no exit code (the container never ran, or Batch "
                                        "does not show it)" if exit_code is None
                                        else f"the container exited with {exit_code}")}


def ended_jobs(batch, queue, bucket, pages=1):
    """Return ended_job() of the queue's FAILED jobs submitted for objects of `bucket`.

    At most `pages` pages of ListJobs (100 jobs each, newest first for a status filter) and
    one DescribeJobs per 100 jobs. How long Batch keeps listing a finished job is not
    documented; these are the recent ends, as EC2 shows a terminated instance for an hour.
    [] when the queue is gone (ListJobs answers ClientException for it): status reports that
    as drift.
    """
    if read_live(read_job_queue(batch, queue)) is None:
        return []
    ids = [job["jobId"] for page, _ in job_pages(batch, queue, "FAILED", pages)
           for job in page.get("jobSummaryList") or []]
    found = []
    for start in range(0, len(ids), DESCRIBE_JOBS_LIMIT):
        answer = batch.describe_jobs(jobs=ids[start:start + DESCRIBE_JOBS_LIMIT])
        for job in answer.get("jobs") or []:
            target = job_input(job)
            if target is not None and target[0] == bucket:
                found.append(ended_job(job, target[1]))
    return found
