"""Shared plumbing of the deploy package: errors, progress lines, AWS clients, retries, diffs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore import exceptions as botocore_errors
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

logger = logging.getLogger("awsfun.deploy")
CLIENT_CONFIG = Config(retries={"mode": "standard", "max_attempts": 8})
NOT_FOUND = {
    "404", "NoSuchBucket", "NotFound", "NoSuchKey", "NoSuchEntity", "ResourceNotFoundException",
    "AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
    "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound",
    "NoSuchBucketPolicy", "NoSuchPublicAccessBlockConfiguration",
    "ServerSideEncryptionConfigurationNotFoundError", "OwnershipControlsNotFoundError",
    "ParameterNotFound", "NoSuchTagSet",
}
CREATED, UPDATED, IN_PLACE = "created", "updated", "already in place"
DELETED, GONE, KEPT = "deleted", "already gone", "kept"
CHANGES = (CREATED, UPDATED, DELETED)


class DeployError(RuntimeError):
    """Something the operator has to fix; the message says what."""


def error_code(err):
    """Return the AWS error code of a ClientError."""
    return err.response.get("Error", {}).get("Code", "")


def log_client_error(err, doing):
    """Log a ClientError's code and message with what we were doing (the caller re-raises).

    A refusal of the caller's credentials (expired, rejected, denied) is logged only as a
    diagnostic: `explain_error` turns it into the one line a person reads."""
    error = err.response.get("Error", {})
    level = logging.DEBUG if error_code(err) in CREDENTIAL_CODES else logging.ERROR
    logger.log(level, "%s failed: %s %s", doing, error.get("Code"), error.get("Message"))


# --- ordinary mistakes, each as one line that says what to do -----------------------------

# The codes AWS gives an expired session: STS and most JSON services "ExpiredToken" /
# "ExpiredTokenException", EC2 "RequestExpired" (EC2 API Reference, "Common client error
# codes": "the request reached the service more than 15 minutes after the date stamp ... or
# the request expiration date (such as for pre-signed URLs) has passed").
EXPIRED_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "TokenRefreshRequired"}
# Credentials the service does not know or cannot verify (wrong key, a secret that does not
# match, a key made in another partition).
REJECTED_CODES = {"InvalidClientTokenId", "UnrecognizedClientException", "InvalidAccessKeyId",
                  "SignatureDoesNotMatch", "AuthFailure", "InvalidToken"}
# Known credentials without the permission: IAM/S3 "AccessDenied", JSON services
# "AccessDeniedException", EC2 "UnauthorizedOperation", S3's bare HEAD "403".
DENIED_CODES = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403",
                "Forbidden"}
CREDENTIAL_CODES = EXPIRED_CODES | REJECTED_CODES | DENIED_CODES
# botocore's failures to get or refresh a session (SSO, a credential process, `aws login`):
# each means "log in again". LoginError is only in botocore releases from 2025 on.
REFRESH_ERRORS = tuple(getattr(botocore_errors, name) for name in (
    "TokenRetrievalError", "SSOError", "CredentialRetrievalError", "RefreshWithMFAUnsupportedError",
    "LoginError") if hasattr(botocore_errors, name))
UNREACHABLE_ERRORS = (botocore_errors.EndpointConnectionError,
                      botocore_errors.ConnectTimeoutError, botocore_errors.ReadTimeoutError,
                      botocore_errors.ConnectionClosedError, botocore_errors.SSLError,
                      botocore_errors.ProxyConnectionError)
LOGIN_AGAIN = ("log in again (`aws sso login --profile P`, or fresh temporary credentials) "
               "and re-run")


def one_line(text, limit=300):
    """Return text on one line: runs of white space (line feeds included) as one space, other
    control characters escaped, cut to `limit` characters (pure)."""
    flat = escaped(" ".join(str(text).split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def escaped(text):
    """Return text with every character a terminal would act on (line feed, tab, escape,
    other controls) written as a Python escape, the rest as it is (pure): S3 keys may hold
    any of them, and a listing must show one key on one line as it is."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in str(text))


def middle_cut(text, width):
    """Return text cut to `width` characters by an ellipsis in the middle, so both its
    start (the folder) and its end (R1/R2, the suffix) still tell it apart (pure)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def plural(count, noun, nouns=None):
    """Return "1 file", "2 files" (pure)."""
    return f"{count:,} {noun if count == 1 else (nouns or noun + 's')}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake in one line on stderr (status 2, as argparse's own)
    instead of the whole usage first; --help still prints it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (--help for usage)\n")


def explain_error(err):
    """Return (exit status, one line saying what went wrong and what to do) for an ordinary
    mistake in the caller's AWS settings or permissions, or None for anything else (pure).

    Status 2: the person has to change something before a re-run can work (profile,
    region, credentials, session, endpoint, permissions), as for a DeployError."""
    if isinstance(err, DeployError):
        return 2, str(err)
    if isinstance(err, botocore_errors.ProfileNotFound):
        return 2, (f"{one_line(err)}: `aws configure list-profiles` shows the profiles you have; "
                   "set AWS_PROFILE to one of them, or unset it")
    if isinstance(err, botocore_errors.NoRegionError):
        return 2, ("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, or a region in your "
                   "AWS profile")
    if isinstance(err, botocore_errors.NoCredentialsError):
        return 2, ("no AWS credentials found: run `aws configure` or `aws sso login`, or set "
                   "AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(err, botocore_errors.PartialCredentialsError):
        return 2, (f"{one_line(err)}: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                   "(and AWS_SESSION_TOKEN for temporary ones), or neither")
    if REFRESH_ERRORS and isinstance(err, REFRESH_ERRORS):
        return 2, f"the AWS session could not be refreshed ({one_line(err, 160)}): {LOGIN_AGAIN}"
    if isinstance(err, UNREACHABLE_ERRORS):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        hint = (f"is AWS_ENDPOINT_URL={endpoint} right, and is that server up?" if endpoint
                else "check the network (and a proxy, HTTPS_PROXY) and the region")
        return 2, f"{one_line(err, 160)}: {hint}"
    if isinstance(err, ClientError):
        code = error_code(err)
        said = one_line(err.response.get("Error", {}).get("Message") or "", 200)
        refused = f"AWS refused {err.operation_name} ({code}{': ' + said if said else ''})"
        if code in EXPIRED_CODES:
            return 2, f"{refused}: the session has expired; {LOGIN_AGAIN}"
        if code in REJECTED_CODES:
            return 2, (f"{refused}: AWS does not accept these credentials; check "
                       "AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (`aws sts "
                       "get-caller-identity` tells which are used)")
        if code in DENIED_CODES:
            return 2, (f"{refused}: these credentials lack a permission; attach the policy "
                       "`./deploy.sh deployer-policy` prints to the user or role you run as")
        if code == "NoSuchBucket":
            bucket = err.response.get("Error", {}).get("BucketName")
            return 2, (f"{refused}: no bucket {bucket or 'of that name'} here; is --prefix (or "
                       "--data-bucket) the deployment's, and AWS_REGION its region? "
                       "`./deploy.sh status --prefix P` says what is deployed")
        return None
    if isinstance(err, BotoCoreError):
        # Anything else botocore raises before a request (a malformed config file, an
        # invalid region name): its own message is the clearest.
        return 2, (f"{one_line(err)}: check your AWS settings (AWS_PROFILE, AWS_REGION, "
                   "AWS_ENDPOINT_URL, ~/.aws/config)")
    return None


def is_not_found(err):
    """True when a ClientError says the thing asked about does not exist."""
    return error_code(err) in NOT_FOUND


def canonical(document):
    """Return a policy document as canonical JSON, so equal documents compare equal."""
    if isinstance(document, str):
        document = json.loads(document)
    return json.dumps(document, sort_keys=True, separators=(",", ":"))


def tag_list(tags):
    """Turn {key: value} into AWS's [{"Key", "Value"}] list."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def mismatches(desired, actual, path=""):
    """Return the paths where `actual` differs from `desired`, looking only at what `desired` sets.

    Lists match when every desired item matches some actual item, so extra entries the
    service adds (default tags, echoed fields) are not reported as drift.
    """
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return [path or "."]
        found = []
        for key, value in desired.items():
            found += mismatches(value, actual.get(key), f"{path}.{key}" if path else key)
        return found
    if isinstance(desired, list):
        if not isinstance(actual, list):
            return [path or "."]
        return [
            f"{path}[{index}]"
            for index, item in enumerate(desired)
            if not any(not mismatches(item, candidate) for candidate in actual)
        ]
    return [] if desired == actual else [path or "."]


def retry_while(retryable, action, doing, timeout=90.0, delay=3.0, sleep=time.sleep):
    """Call action() until it stops failing with an error whose code or message contains one
    of the `retryable` fragments (eventual consistency), for at most `timeout` seconds
    (of the clock, and of the waits `sleep` was asked for); then re-raise the ClientError."""
    deadline = time.monotonic() + timeout
    waited = 0.0
    while True:
        try:
            return action()
        except ClientError as err:
            error = err.response.get("Error", {})
            text = f"{error.get('Code', '')} {error.get('Message', '')}"
            if not any(fragment in text for fragment in retryable) or \
                    time.monotonic() + delay > deadline or waited + delay > timeout:
                log_client_error(err, doing)
                raise
            logger.warning("%s: %s %s; retrying in %ss (IAM and SQS changes take a few "
                           "seconds to propagate)", doing, error.get("Code"), error.get("Message"),
                           delay)
            sleep(delay)
            waited += delay
# Refusals that only mean a role or instance profile made seconds ago has not reached the
# service yet (IAM is eventually consistent: "changes ... take time to become visible",
# IAM User Guide, troubleshooting), or that the function is still being updated. Lambda says
# "The role defined for the function cannot be assumed by Lambda." or "The provided execution
# role does not have permissions to call SendMessage on SQS" (or CreateNetworkInterface on
# EC2); EC2 "Value (...) for parameter iamInstanceProfile.name is invalid. Invalid IAM
# Instance Profile name"; Lambda's ResourceConflictException "An update is in progress".
PROPAGATION_REFUSALS = ("cannot be assumed", "does not have permissions to call",
                        "Invalid IAM Instance Profile", "An update is in progress")
PROPAGATION_TIMEOUT = 90.0
PROPAGATION_DELAY = 3.0


def wait_out_propagation(action, doing, sleep=time.sleep):
    """Return action(), waiting (at most PROPAGATION_TIMEOUT s) while AWS refuses it only
    because an IAM change has not propagated yet; any other refusal, or the last, is raised."""
    return retry_while(PROPAGATION_REFUSALS, action, doing, timeout=PROPAGATION_TIMEOUT,
                       delay=PROPAGATION_DELAY, sleep=sleep)


class Progress:
    """Prints each step as it happens and keeps the list, so callers and tests can read it back."""

    def __init__(self, echo=True, stream=None):
        self.steps = []
        self.echo = echo
        self.stream = stream

    def record(self, outcome, what, name, detail=""):
        """Remember one step's outcome and print it for the person at the terminal."""
        self.steps.append({"outcome": outcome, "what": what, "name": name, "detail": detail})
        if self.echo:
            extra = f"  ({detail})" if detail else ""
            print(f"  {outcome:<17} {what:<24} {name}{extra}", file=self.stream or sys.stdout,
                  flush=True)

    def count(self, outcome):
        """How many steps ended with `outcome`."""
        return sum(1 for step in self.steps if step["outcome"] == outcome)

    def changed(self):
        """True when any step created, updated or deleted something."""
        return any(step["outcome"] in CHANGES for step in self.steps)


class Clients:
    """boto3 clients for one account and region, each created on first use with standard retries."""

    def __init__(self, session=None, region=None):
        self.session = session or boto3.session.Session()
        # AWS_REGION wins over AWS_DEFAULT_REGION, as in the AWS CLI and the Lambda runtime.
        self.region = region or os.environ.get("AWS_REGION") or self.session.region_name
        if not self.region:
            raise DeployError("no AWS region: set AWS_REGION or AWS_DEFAULT_REGION, "
                              "or a region in your AWS profile")
        self._cache = {}

    def __call__(self, service):
        if service not in self._cache:
            client = self.session.client(service, region_name=self.region, config=CLIENT_CONFIG)
            if service == "s3control" and os.environ.get("AWS_ENDPOINT_URL"):
                # S3 Control is addressed at ACCOUNT.s3-control...; an emulator at one
                # address (moto) serves it there, not at a per-account host name.
                client.meta.events.register("before-send.s3-control",
                                            _send_to_endpoint(client.meta.endpoint_url))
            self._cache[service] = client
        return self._cache[service]


def _send_to_endpoint(endpoint_url):
    """Return a before-send hook that drops a host prefix added to `endpoint_url`'s host."""
    endpoint = urlsplit(endpoint_url)

    def send_to_endpoint(request, **_):
        parts = urlsplit(request.url)
        if parts.netloc.endswith("." + endpoint.netloc):
            request.url = urlunsplit(parts._replace(netloc=endpoint.netloc))

    return send_to_endpoint


def _get_or_none(call, doing=None, **params):
    """Return call(**params), or None when AWS answers that the resource does not exist
    (NOT_FOUND); any other refusal is logged as `doing` (default: the call's name) and raised."""
    try:
        return call(**params)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, doing or call.__name__)
        raise
