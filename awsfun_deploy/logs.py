"""logs: print a worker's log, analysis/KEY.log in the data bucket, and follow it as it grows.

A running worker's launcher uploads the whole log again about every minute while it grows,
and the shell uploads it a last time when the job ends, after the report; its last line is
then bootstrap.sh's "finished with status N; shutting down".
"""

from __future__ import annotations

import logging
import re
import time

from botocore.exceptions import ClientError

import AwsS3

from .core import DeployError, error_code

logger = logging.getLogger(__name__)

FOLLOW_SECONDS = 5.0
# bootstrap.sh's on_exit logs this line just before the final upload: the log is complete.
CLOSING_LINE = re.compile(rb"awsfun-bootstrap: finished with status \d+; shutting down\n?$")


def log_key(key):
    """Return the log key of input `key`: analysis/KEY.log, hashed past S3's limit as the worker does (pure)."""
    return AwsS3.report_key(key, ".log")


def log_complete(text):
    """True when a log (bytes; its end is enough) ends with bootstrap.sh's closing line (pure)."""
    return bool(CLOSING_LINE.search(text[-200:]))


def read_log(s3, bucket, key, start=0):
    """Return the bytes of s3://bucket/key from byte `start` on: b"" when there are none past
    it, None when the object does not exist; any other refusal is raised.

    A Range GET that starts at or past the end is answered 416 InvalidRange (S3 API
    Reference, GetObject; RFC 9110, 15.5.17), so nothing new costs one small request.
    """
    params = {"Bucket": bucket, "Key": key}
    if start:
        params["Range"] = f"bytes={start}-"
    try:
        return s3.get_object(**params)["Body"].read()
    except ClientError as err:
        if error_code(err) == "InvalidRange":
            return b""
        if error_code(err) in ("NoSuchKey", "404"):
            return None
        raise


def object_exists(s3, bucket, key):
    """True when s3://bucket/key exists (HEAD); any refusal but not-found is raised."""
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        if error_code(err) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def job_ended(s3, bucket, key):
    """True when input `key` has its report or its error report."""
    return any(object_exists(s3, bucket, AwsS3.report_key(key, suffix))
               for suffix in (".json", ".error.json"))


def print_log(s3, bucket, key, write, follow=False, sleep=time.sleep, interval=FOLLOW_SECONDS):
    """Write input `key`'s log with write(bytes); return the exit status (0).

    With follow, poll every `interval` s (sleep) from the last byte written, writing each
    new part once, until the log is complete: the shell writes its closing line after the
    report or error report, so the job has ended (a warning says so if neither exists, as
    when the shell could not write one). DeployError when there is no log.
    """
    target = log_key(key)
    text = read_log(s3, bucket, target)
    if text is None:
        raise DeployError(f"no log for {key} at s3://{bucket}/{target}: its worker has not "
                          "started yet, or the key is not an input of this deployment")
    write(text)
    printed, tail = len(text), text[-200:]
    while follow and not log_complete(tail):
        sleep(interval)
        new = read_log(s3, bucket, target, printed)
        if new:
            write(new)
            printed, tail = printed + len(new), (tail + new)[-200:]
    if follow and not job_ended(s3, bucket, key):
        logger.warning("the log of %s is complete but it has neither report nor error report", key)
    return 0
