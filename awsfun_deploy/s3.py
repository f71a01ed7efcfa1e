"""The data and software buckets: settings, published files, access, event notifications."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from botocore.exceptions import ClientError

from .core import (
    CREATED, DELETED, DeployError, GONE, IN_PLACE, KEPT, UPDATED, _get_or_none, canonical,
    error_code, is_not_found, log_client_error, mismatches, retry_while, tag_list,
)
from .names import STACK_TAG, USED_BY_TAG
from .artifacts import PUBLISHED_FILES, REPO, file_sha256
from .policies import policy_values, render_policy

logger = logging.getLogger("awsfun.deploy")
PRIVATE_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}
# --public-software: only a bucket policy may make it public; ACLs stay blocked.
PUBLIC_SOFTWARE_BLOCK = dict(PRIVATE_BLOCK, BlockPublicPolicy=False, RestrictPublicBuckets=False)
PUBLIC_READ_SID = "AnonymousReadOfPublishedFilesOnly"


def bucket_exists(s3, bucket, account):
    """True if we own `bucket`; False if it does not exist; DeployError if someone else owns it."""
    try:
        s3.head_bucket(Bucket=bucket, ExpectedBucketOwner=account)
        return True
    except ClientError as err:
        if is_not_found(err):
            return False
        if error_code(err) in ("403", "AccessDenied", "Forbidden"):
            raise DeployError(
                f"bucket {bucket} exists but is not this account's (or these credentials cannot "
                "read it); bucket names are global, so pick another with --data-bucket or "
                "--software-bucket") from None
        log_client_error(err, f"checking bucket {bucket}")
        raise


def create_bucket(s3, bucket, region):
    """Create a bucket in `region` (us-east-1 takes no location constraint)."""
    params = {"Bucket": bucket}
    if region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**params)
    except ClientError as err:
        if error_code(err) == "BucketAlreadyOwnedByYou":
            return
        if error_code(err) == "BucketAlreadyExists":
            raise DeployError(f"bucket name {bucket} is taken by another account; "
                              "choose another with --data-bucket / --software-bucket") from None
        log_client_error(err, f"creating bucket {bucket}")
        raise


def read_bucket_settings(s3, bucket):
    """Return the bucket's ownership, Block Public Access and default encryption settings."""
    ownership = _get_or_none(s3.get_bucket_ownership_controls, Bucket=bucket)
    block = _get_or_none(s3.get_public_access_block, Bucket=bucket)
    encryption = _get_or_none(s3.get_bucket_encryption, Bucket=bucket)
    rules = (encryption or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
    return {
        "ownership": ((ownership or {}).get("OwnershipControls", {}).get("Rules") or [{}])[0]
        .get("ObjectOwnership"),
        "block": (block or {}).get("PublicAccessBlockConfiguration"),
        "sse": (rules[0].get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm")
                if rules else None),
    }


def bucket_setting_differences(settings, block):
    """Return which bucket settings differ from what deploy wants (pure)."""
    found = []
    if settings["ownership"] != "BucketOwnerEnforced":
        found.append("object ownership")
    if settings["block"] != block:
        found.append("block public access")
    # SSE-S3: the roles hold no KMS permissions, so a KMS default would lock them out.
    if settings["sse"] != "AES256":
        found.append("default encryption")
    return found


def used_by_tag(prefix):
    """The tag key deploy puts on a bucket it uses but did not create (pure)."""
    return f"{USED_BY_TAG}{prefix}"


def read_bucket_tags(s3, bucket):
    """Return the bucket's tags as {key: value} ({} when it has none)."""
    tagging = _get_or_none(s3.get_bucket_tagging, Bucket=bucket)
    return {t["Key"]: t["Value"] for t in (tagging or {}).get("TagSet", [])}


def created_by(tags, names):
    """True when a bucket's tags say this deployment created it (pure)."""
    return tags.get(STACK_TAG) == names.prefix


def put_bucket_tags(s3, bucket, tags):
    """Set the bucket's whole tag set (PutBucketTagging replaces it); none deletes it."""
    if tags:
        s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tag_list(tags)})
    else:
        s3.delete_bucket_tagging(Bucket=bucket)


def merge_bucket_tags(s3, bucket, current, ours):
    """Add or update only our tags, keeping the owner's; return True if anything changed."""
    merged = dict(current, **ours)
    if merged == current:
        return False
    put_bucket_tags(s3, bucket, merged)
    return True


def ensure_bucket(s3, bucket, names, block, progress, what):
    """Create the bucket if needed and apply ownership, Block Public Access and SSE-S3; a bucket
    deploy did not create only gets our tag beside its own (and, for --public-software, the
    two Block Public Access settings a public policy needs). Return True if deploy created it."""
    existed = bucket_exists(s3, bucket, names.account)
    if not existed:
        create_bucket(s3, bucket, names.region)
    tags = read_bucket_tags(s3, bucket) if existed else {}
    if existed and not created_by(tags, names):
        differences = adopt_foreign_bucket(s3, bucket, names, block, tags)
        progress.record(UPDATED if differences else IN_PLACE, what, bucket,
                        ", ".join(differences))
        return False
    differences = bucket_setting_differences(read_bucket_settings(s3, bucket), block)
    if "object ownership" in differences:
        # ACLs disabled: every object belongs to the bucket owner, whoever wrote it.
        s3.put_bucket_ownership_controls(
            Bucket=bucket,
            OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]})
    if "block public access" in differences:
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=block)
    if "default encryption" in differences:
        s3.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]})
    if merge_bucket_tags(s3, bucket, tags, {STACK_TAG: names.prefix}) and existed:
        differences.append("tags")
    if not existed:
        progress.record(CREATED, what, bucket)
    elif differences:
        progress.record(UPDATED, what, bucket, ", ".join(differences))
    else:
        progress.record(IN_PLACE, what, bucket)
    return True


def adopt_foreign_bucket(s3, bucket, names, block, tags):
    """Use a bucket deploy did not create without undoing its owner's settings; return what changed.

    Its ownership, encryption, versioning, lifecycle and CORS stay as they are (a warning
    names what differs from deploy's defaults). Only a relaxed `block` (--public-software)
    is merged into its Block Public Access, since S3 refuses a public policy otherwise.
    """
    changed = []
    settings = read_bucket_settings(s3, bucket)
    current_block = settings["block"] or dict.fromkeys(PRIVATE_BLOCK, False)
    relaxed = {k: False for k, v in block.items() if v is False}
    if relaxed and dict(current_block, **relaxed) != current_block:
        s3.put_public_access_block(Bucket=bucket,
                                   PublicAccessBlockConfiguration=dict(current_block, **relaxed))
        changed.append("block public access")
    kept = [d for d in bucket_setting_differences(settings, dict(current_block, **relaxed))
            if d not in changed]
    if kept:
        logger.warning("bucket %s was not created by deploy: its %s left as its owner set them",
                       bucket, ", ".join(kept))
    if merge_bucket_tags(s3, bucket, tags, {used_by_tag(names.prefix): names.function_name}):
        changed.append("tags")
    return changed


def release_foreign_bucket(s3, bucket, names, progress, what):
    """Teardown of a bucket deploy did not create: remove only our tag; record it as kept."""
    tags = read_bucket_tags(s3, bucket)
    key = used_by_tag(names.prefix)
    if key in tags:
        put_bucket_tags(s3, bucket, {k: v for k, v in tags.items() if k != key})
    progress.record(KEPT, what, bucket, "not created by deploy: only its awsfun tag removed")


def published_digest(s3, bucket, key):
    """Return the sha256 recorded on a published object, or None if it is absent."""
    head = _get_or_none(s3.head_object, f"reading s3://{bucket}/{key}", Bucket=bucket, Key=key)
    return None if head is None else head.get("Metadata", {}).get("sha256", "")


def publish_software(s3, bucket, files=PUBLISHED_FILES, progress=None, repo=REPO, sources=None):
    """Upload the published files to the software bucket at their repo paths, if changed."""
    for key in files:
        if key.startswith("private/") or key not in PUBLISHED_FILES:
            raise DeployError(f"{key} is not on the published-files allowlist PUBLISHED_FILES")
        path = (sources or {}).get(key) or Path(repo) / key
        digest = file_sha256(path)
        current = published_digest(s3, bucket, key)
        if current == digest:
            if progress:
                progress.record(IN_PLACE, "software file", f"s3://{bucket}/{key}")
            continue
        content_type = {".py": "text/x-python", ".sh": "text/x-shellscript",
                        ".json": "application/json"}.get(Path(key).suffix,
                                                         "application/octet-stream")
        s3.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(),
                      ContentType=content_type, Metadata={"sha256": digest})
        if progress:
            progress.record(CREATED if current is None else UPDATED, "software file",
                            f"s3://{bucket}/{key}", "published")


def list_keys(s3, bucket, prefix="", limit=None):
    """Return the bucket's objects (dicts from ListObjectsV2), at most `limit` of them."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend(page.get("Contents", []))
        if limit is not None and len(found) >= limit:
            return found[:limit]
    return found


def remove_unpublished(s3, bucket, files, progress):
    """Delete objects in the software bucket that are not on the allowlist, so it holds exactly it."""
    for obj in list_keys(s3, bucket):
        if obj["Key"] not in files:
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
            progress.record(DELETED, "unpublished file", f"s3://{bucket}/{obj['Key']}")


def read_bucket_policy(s3, bucket):
    """Return the bucket policy as a dict, or None."""
    policy = _get_or_none(s3.get_bucket_policy, Bucket=bucket)
    return json.loads(policy["Policy"]) if policy else None


def ensure_software_access(s3, names, public, published_files, progress):
    """Grant (public) or withdraw (private) anonymous read of exactly the published keys."""
    current = read_bucket_policy(s3, names.software_bucket)
    statements = (current or {}).get("Statement", [])
    if isinstance(statements, dict):
        statements = [statements]
    # Other statements are the bucket owner's: kept beside ours, never replaced.
    others = [s for s in statements if s.get("Sid") != PUBLIC_READ_SID]
    ours = len(others) != len(statements)
    if public:
        rendered = render_policy("software-public-read",
                                 policy_values(names, published_files=published_files))
        wanted = dict(current or rendered, Statement=others + rendered["Statement"])
        if current is not None and canonical(current) == canonical(wanted):
            progress.record(IN_PLACE, "public read policy", names.software_bucket)
            return
        # Block Public Access was relaxed by ensure_bucket first; S3 refuses a public policy before.
        s3.put_bucket_policy(Bucket=names.software_bucket, Policy=json.dumps(wanted))
        progress.record(UPDATED if ours else CREATED, "public read policy",
                        names.software_bucket, "anonymous s3:GetObject on published keys")
    elif ours:
        if others:
            s3.put_bucket_policy(Bucket=names.software_bucket,
                                 Policy=json.dumps(dict(current, Statement=others)))
        else:
            s3.delete_bucket_policy(Bucket=names.software_bucket)
        progress.record(DELETED, "public read policy", names.software_bucket, "bucket is private")
    elif current is not None:
        logger.warning("software bucket %s has a bucket policy deploy did not write; left as is",
                       names.software_bucket)


def notification_config(s3, bucket):
    """Return the bucket's notification configuration without response metadata."""
    config = s3.get_bucket_notification_configuration(Bucket=bucket)
    config.pop("ResponseMetadata", None)
    return config


NOTIFICATION_KINDS = ("LambdaFunctionConfigurations", "QueueConfigurations",
                      "TopicConfigurations")
_KIND_OF_TARGET = {"LambdaFunctionArn": "LambdaFunctionConfigurations",
                   "QueueArn": "QueueConfigurations", "TopicArn": "TopicConfigurations"}


def notification_kind(configuration):
    """Return the configuration list a notification configuration belongs in (pure)."""
    return next(kind for key, kind in _KIND_OF_TARGET.items() if key in configuration)


def with_notification(config, wanted):
    """Return the notification configuration with `wanted` (a queue, function or topic
    configuration) in place of any of the same Id, of whatever kind (an older deploy sent
    to the function); every other consumer's configuration is kept as it is (pure)."""
    config = without_notification(config, wanted["Id"])
    kind = notification_kind(wanted)
    return dict(config, **{kind: config.get(kind, []) + [wanted]})


def without_notification(config, notification_id):
    """Return the notification configuration without the configurations of that Id (pure)."""
    config = dict(config)
    for kind in NOTIFICATION_KINDS:
        if kind not in config:
            continue
        kept = [c for c in config[kind] if c.get("Id") != notification_id]
        if kept:
            config[kind] = kept
        else:
            del config[kind]
    return config


def has_notification(config, notification_id):
    """True when any configuration of that Id is there (pure)."""
    return any(c.get("Id") == notification_id
               for kind in NOTIFICATION_KINDS for c in config.get(kind, []))


def _events_overlap(first, second):
    """True when two S3 event types share an event (s3:ObjectCreated:* covers :Put) (pure)."""
    if first == second:
        return True
    return any(a.endswith(":*") and b.startswith(a[:-1]) for a, b in
               ((first, second), (second, first)))


def _filter_values(config):
    rules = config.get("Filter", {}).get("Key", {}).get("FilterRules", [])
    values = {rule.get("Name", "").lower(): rule.get("Value", "") for rule in rules}
    return values.get("prefix", ""), values.get("suffix", "")


def notifications_overlap(first, second):
    """True when S3 would refuse two notification configurations side by side (pure).

    "Configurations overlap" (Amazon S3 User Guide, event notifications, "Examples of valid
    and invalid configurations"): they share an event type, and one key could match both
    filters: each prefix starts the other (or is empty), and each suffix ends the other.
    """
    if not any(_events_overlap(a, b) for a in first.get("Events", [])
               for b in second.get("Events", [])):
        return False
    (prefix_a, suffix_a), (prefix_b, suffix_b) = _filter_values(first), _filter_values(second)
    prefixes = prefix_a.startswith(prefix_b) or prefix_b.startswith(prefix_a)
    suffixes = suffix_a.endswith(suffix_b) or suffix_b.endswith(suffix_a)
    return prefixes and suffixes
def overlapping_notifications(config, wanted):
    """Return "Kind Id" of each other configuration S3 would refuse beside `wanted` (pure)."""
    found = []
    for kind in NOTIFICATION_KINDS:
        for other in config.get(kind, []):
            if other.get("Id") != wanted["Id"] and notifications_overlap(wanted, other):
                found.append(f"{kind[:-len('Configurations')]} configuration "
                             f"{other.get('Id') or '(no id)'}")
    return found


def data_notification(names, queue_arn):
    """Our notification configuration on the data bucket: ObjectCreated to the events queue (pure)."""
    return {"Id": names.notification_id, "QueueArn": queue_arn,
            "Events": ["s3:ObjectCreated:*"]}


def ensure_data_notification(s3, names, queue_arn, progress):
    """Send the data bucket's ObjectCreated events to the events queue, keeping other
    notifications (and replacing ours where an older deploy sent them to the function)."""
    config = notification_config(s3, names.data_bucket)
    wanted = data_notification(names, queue_arn)
    current = [c for c in config.get("QueueConfigurations", [])
               if c.get("Id") == names.notification_id]
    # Ours as a function configuration: what a deploy made before the events queue.
    elsewhere = has_notification({kind: config.get(kind, []) for kind in NOTIFICATION_KINDS
                                  if kind != "QueueConfigurations"}, names.notification_id)
    if current and not mismatches(wanted, current[0]) and "Filter" not in current[0] \
            and not elsewhere:
        progress.record(IN_PLACE, "object-created event", names.data_bucket)
        return
    existed = current or elsewhere
    config = with_notification(config, wanted)
    # S3 test-sends to the queue when the configuration is saved, and refuses it ("Unable to
    # validate the following destination configurations") until the queue's policy lets it.
    retry_while(("Unable to validate",),
                lambda: s3.put_bucket_notification_configuration(
                    Bucket=names.data_bucket, NotificationConfiguration=config),
                f"setting the notification on {names.data_bucket}")
    progress.record(UPDATED if existed else CREATED, "object-created event", names.data_bucket,
                    f"-> {names.events_queue}")


def remove_data_notification(s3, names, progress):
    """Remove only deploy's notification from the data bucket, keeping any others."""
    if not bucket_exists(s3, names.data_bucket, names.account):
        progress.record(GONE, "object-created event", names.data_bucket)
        return
    config = notification_config(s3, names.data_bucket)
    if not has_notification(config, names.notification_id):
        progress.record(GONE, "object-created event", names.data_bucket)
        return
    config = without_notification(config, names.notification_id)
    s3.put_bucket_notification_configuration(Bucket=names.data_bucket,
                                             NotificationConfiguration=config)
    progress.record(DELETED, "object-created event", names.data_bucket)


def delete_bucket(s3, bucket, account, progress, what):
    """Empty (every version and delete marker) and delete a bucket; tolerate it being gone."""
    if not bucket_exists(s3, bucket, account):
        progress.record(GONE, what, bucket)
        return
    paginator = s3.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket):
        batch = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                 for v in page.get("Versions", []) + page.get("DeleteMarkers", [])]
        # DeleteObjects takes at most 1,000 keys; a page holds at most 1,000 versions
        # plus delete markers, so send it in slices.
        for start in range(0, len(batch), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": batch[start:start + 1000],
                                                     "Quiet": True})
    s3.delete_bucket(Bucket=bucket)
    progress.record(DELETED, what, bucket)


def location_region(constraint):
    """Return the region GetBucketLocation's LocationConstraint names (pure).

    It answers None (or "") for us-east-1 and the legacy "EU" for eu-west-1 (S3 API
    Reference, GetBucketLocation).
    """
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(constraint, constraint)


def bucket_region(s3, bucket):
    """Return the region a bucket lives in."""
    return location_region(s3.get_bucket_location(Bucket=bucket).get("LocationConstraint"))


def release_software_bucket(s3, names, progress):
    """Delete the software bucket if deploy created it; else remove only what deploy put there."""
    bucket = names.software_bucket
    if not bucket_exists(s3, bucket, names.account) or \
            created_by(read_bucket_tags(s3, bucket), names):
        delete_bucket(s3, bucket, names.account, progress, "software bucket")
        return
    for key in PUBLISHED_FILES:
        if published_digest(s3, bucket, key) is not None:
            s3.delete_object(Bucket=bucket, Key=key)
            progress.record(DELETED, "software file", f"s3://{bucket}/{key}")
    ensure_software_access(s3, names, False, PUBLISHED_FILES, progress)
    release_foreign_bucket(s3, bucket, names, progress, "software bucket")
