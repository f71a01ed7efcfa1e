"""The dead-letter queue that keeps events the function could not handle."""

from __future__ import annotations

from .core import CREATED, IN_PLACE, UPDATED, _get_or_none, retry_while
from .names import STACK_TAG

DLQ_ATTRIBUTES = {"MessageRetentionPeriod": str(14 * 24 * 3600), "SqsManagedSseEnabled": "true"}


def find_queue(sqs, name):
    """Return (url, attributes) of the queue, or None if it does not exist."""
    found = _get_or_none(sqs.get_queue_url, f"looking up queue {name}", QueueName=name)
    if found is None:
        return None
    url = found["QueueUrl"]
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
