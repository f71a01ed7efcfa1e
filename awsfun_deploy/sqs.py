"""The stack's queues: the events queue the function reads, and the dead-letter queue."""

from __future__ import annotations

import json
import math

from .core import CREATED, DELETED, GONE, IN_PLACE, UPDATED, _get_or_none, canonical, retry_while
from .names import STACK_TAG

DLQ_ATTRIBUTES = {"MessageRetentionPeriod": str(14 * 24 * 3600), "SqsManagedSseEnabled": "true"}
# Lambda's advice for a queue it reads: a visibility timeout of at least six times the
# function's timeout (Lambda Developer Guide, "Configuring an Amazon SQS queue to trigger a
# Lambda function"); function.FUNCTION_TIMEOUT is 60 s (tests/test_stack.py checks the pair).
# It is also the wait before a deferred message is tried again.
EVENTS_VISIBILITY_SECONDS = 6 * 60
# A deferred message reaches the dead-letter queue only after receives spanning at least a
# day: a lab's burst waits for the cap instead of being dead-lettered within minutes.
DEFER_SPAN_SECONDS = 24 * 3600
MAX_RECEIVE_COUNT = math.ceil(DEFER_SPAN_SECONDS / EVENTS_VISIBILITY_SECONDS)
# SQS keeps a message's first enqueue time when it moves it to a dead-letter queue, so the
# dead-letter queue keeps messages longer (14 days) than the events queue (4, SQS's default).
EVENTS_RETENTION_SECONDS = 4 * 24 * 3600


def find_queue(sqs, name):
    """Return (url, attributes) of the queue, or None if it does not exist."""
    found = _get_or_none(sqs.get_queue_url, f"looking up queue {name}", QueueName=name)
    if found is None:
        return None
    url = found["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    return url, attributes


def events_queue_attributes(names, policy):
    """Return the events queue's attributes: SSE, visibility, retention, redrive to the
    dead-letter queue, and `policy` (the rendered iam/events-queue-policy.json) (pure)."""
    return {
        "SqsManagedSseEnabled": "true",
        "VisibilityTimeout": str(EVENTS_VISIBILITY_SECONDS),
        "MessageRetentionPeriod": str(EVENTS_RETENTION_SECONDS),
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": names.dlq_arn,
                                     "maxReceiveCount": MAX_RECEIVE_COUNT}),
        "Policy": json.dumps(policy),
    }


def attribute_differences(wanted, attributes):
    """Return the names of the attributes that differ from `wanted` (JSON ones compared as
    documents, since SQS may answer them re-serialised) (pure)."""
    changed = []
    for name, value in wanted.items():
        current = attributes.get(name)
        if name in ("Policy", "RedrivePolicy"):
            try:
                same = current is not None and canonical(current) == canonical(value)
            except ValueError:
                same = False
        else:
            same = current == value
        if not same:
            changed.append(name)
    return changed


def _ensure(sqs, name, attributes, names, progress, what):
    found = find_queue(sqs, name)
    if found is None:
        # SQS refuses a name deleted less than 60 s ago (teardown then deploy).
        url = retry_while(
            ("QueueDeletedRecently",),
            lambda: sqs.create_queue(QueueName=name, Attributes=attributes,
                                     tags={STACK_TAG: names.prefix})["QueueUrl"],
            f"creating queue {name}", timeout=75, delay=10)
        progress.record(CREATED, what, name)
        return url
    url, current = found
    changed = attribute_differences(attributes, current)
    if changed:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={k: attributes[k] for k in changed})
        progress.record(UPDATED, what, name, ", ".join(changed))
    else:
        progress.record(IN_PLACE, what, name)
    return url


def ensure_queue(sqs, names, progress):
    """Create the dead-letter queue (encrypted, 14 days' retention) if needed; return its URL."""
    return _ensure(sqs, names.dlq_name, DLQ_ATTRIBUTES, names, progress, "dead-letter queue")


def ensure_events_queue(sqs, names, policy, progress):
    """Create or correct the events queue (events_queue_attributes); return its URL.

    Its dead-letter queue is the stack's own (names.dlq_name), which reconcile replays and
    status counts: a message there holds the S3 event as S3 sent it, as the function's
    asynchronous dead letters do.
    """
    return _ensure(sqs, names.events_queue, events_queue_attributes(names, policy), names,
                   progress, "events queue")


def delete_queue(sqs, name, progress, what):
    """Delete a queue; tolerate it being gone."""
    found = find_queue(sqs, name)
    if found:
        sqs.delete_queue(QueueUrl=found[0])
        progress.record(DELETED, what, name)
    else:
        progress.record(GONE, what, name)


def queue_depth(attributes):
    """Return {"visible", "in_flight"}: messages waiting, and received but not yet deleted
    (ApproximateNumberOfMessages, ...NotVisible); deferred ones are in flight until their
    visibility timeout ends (pure)."""
    return {"visible": int(attributes.get("ApproximateNumberOfMessages", 0)),
            "in_flight": int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))}
