"""The Lambda function, its log group, its retry settings and S3's permission to invoke it."""

from __future__ import annotations

import json
import logging
import os
import time

from botocore.exceptions import ClientError

import lambda_function

from .core import (
    CREATED, DELETED, DeployError, GONE, IN_PLACE, UPDATED, _get_or_none, is_not_found,
    log_client_error, mismatches, wait_out_propagation,
)
from .names import DATA_BUCKET_TAG, SOFTWARE_BUCKET_TAG, STACK_TAG
from .artifacts import BOOTSTRAP_KEY, code_sha256

logger = logging.getLogger("awsfun.deploy")
RUNTIME = "python3.13"
HANDLER = "lambda_function.lambda_handler"
# One S3 event usually carries one record, and each record is one RunInstances call
# of a second or two; 60 s leaves room for a batch and for EC2's own retries.
FUNCTION_TIMEOUT = 60
FUNCTION_MEMORY = 256
MAX_RETRY_ATTEMPTS = 2
MAX_EVENT_AGE_SECONDS = 6 * 3600
LOG_RETENTION_DAYS = 30
# How the function reads the events queue (Lambda Developer Guide, "Using Lambda with Amazon
# SQS"): up to 10 messages a batch (one S3 event each), partial batch responses so only the
# deferred or failed messages come back, and at most 2 batches at once, the least
# ScalingConfig allows: the cap is counted per invocation, so two invocations at once can
# pass it by at most one batch.
EVENTS_BATCH_SIZE = 10
EVENTS_MAX_CONCURRENCY = 2
DEFAULT_MAX_WORKERS = int(lambda_function.DEFAULTS["MAX_WORKERS"])
CAPACITY_VARIABLES = ("MAX_WORKERS", "SPOT", "SUBNET_IDS", "SECURITY_GROUP_IDS", "ENGINE",
                      "JOB_QUEUE", "JOB_DEFINITION")


def find_log_group(logs, name):
    """Return the log group's description, or None."""
    for page in logs.get_paginator("describe_log_groups").paginate(logGroupNamePrefix=name):
        for group in page.get("logGroups", []):
            if group["logGroupName"] == name:
                return group
    return None


def ensure_log_group(logs, names, progress):
    """Create the function's log group with a retention limit (the role may not create it)."""
    group = find_log_group(logs, names.log_group)
    if group is None:
        logs.create_log_group(logGroupName=names.log_group, tags={STACK_TAG: names.prefix})
    if group is None or group.get("retentionInDays") != LOG_RETENTION_DAYS:
        logs.put_retention_policy(logGroupName=names.log_group,
                                  retentionInDays=LOG_RETENTION_DAYS)
        progress.record(CREATED if group is None else UPDATED, "log group", names.log_group,
                        f"{LOG_RETENTION_DAYS} days' retention")
    else:
        progress.record(IN_PLACE, "log group", names.log_group)


def capacity_environment(max_workers=DEFAULT_MAX_WORKERS, spot=False, subnets=(),
                         security_groups=()):
    """Return the handler's capacity settings as environment variables (pure): MAX_WORKERS
    always; SPOT, SUBNET_IDS and SECURITY_GROUP_IDS only when set (./deploy.sh --spot,
    --subnets, --security-groups)."""
    if int(max_workers) < 1:
        raise DeployError(f"--max-workers {max_workers}: at least 1 worker")
    found = {"MAX_WORKERS": str(int(max_workers))}
    if spot:
        found["SPOT"] = "1"
    if subnets:
        found["SUBNET_IDS"] = ",".join(subnets)
    if security_groups:
        found["SECURITY_GROUP_IDS"] = ",".join(security_groups)
    return found


def engine_environment(engine="ec2", job_queue=None, job_definition=None):
    """Return the handler's engine settings as environment variables (pure): nothing for the
    EC2 engine (the handler's default), else ENGINE=batch, JOB_QUEUE and JOB_DEFINITION (a
    name without a revision: the latest ACTIVE one; AWS Batch API Reference, SubmitJob)."""
    if engine == "ec2":
        return {}
    if engine != "batch" or not job_queue or not job_definition:
        raise DeployError(f"--engine {engine!r}: ec2, or batch with its queue and definition")
    return {"ENGINE": "batch", "JOB_QUEUE": job_queue, "JOB_DEFINITION": job_definition}


def deployed_capacity(config):
    """Return the capacity settings of a deployed function's environment (pure): what status
    judges drift against, since only deploy's command line says what they should be."""
    variables = ((config or {}).get("Environment") or {}).get("Variables") or {}
    found = {name: variables[name] for name in CAPACITY_VARIABLES if name in variables}
    return found if "MAX_WORKERS" in found else dict(found, **capacity_environment())


def handler_environment(names, environ=None, capacity=None):
    """Return the function's environment variables (the contract's names); `capacity` is
    capacity_environment's (default: its defaults)."""
    environ = os.environ if environ is None else environ
    return {
        "LAUNCH_TEMPLATE": names.launch_template,
        "SOFTWARE_BUCKET": names.software_bucket,
        "BOOTSTRAP_KEY": BOOTSTRAP_KEY,
        # Fixed, never from the environment: workers write under analysis/, and a skip
        # substring that misses those keys would make every report launch a new worker.
        "SKIP_SUBSTRING": lambda_function.DEFAULTS["SKIP_SUBSTRING"],
        "WATCHDOG_MINUTES": watchdog_minutes(environ),
        **(capacity if capacity is not None else capacity_environment()),
    }


def watchdog_minutes(environ):
    """WATCHDOG_MINUTES from the caller's environment (whole minutes >= 1), else the contract's."""
    value = environ.get("WATCHDOG_MINUTES") or lambda_function.DEFAULTS["WATCHDOG_MINUTES"]
    if not value.isdigit() or int(value) < 1:
        raise DeployError(f"WATCHDOG_MINUTES={value!r}: expected whole minutes >= 1")
    return str(int(value))


def function_configuration(names, environ=None, capacity=None):
    """Return the function's configuration parameters, shared by create and update (pure)."""
    return {
        "FunctionName": names.function_name,
        "Role": names.lambda_role_arn,
        "Runtime": RUNTIME,
        "Handler": HANDLER,
        "Description": f"awsfun launcher: one EC2 worker per new object in {names.data_bucket}",
        "Timeout": FUNCTION_TIMEOUT,
        "MemorySize": FUNCTION_MEMORY,
        "Environment": {"Variables": handler_environment(names, environ, capacity)},
        "DeadLetterConfig": {"TargetArn": names.dlq_arn},
        # System level INFO keeps Lambda's START and REPORT lines (duration, memory), which
        # WARN drops; log levels need the JSON format (Lambda Developer Guide, log levels).
        "LoggingConfig": {"LogFormat": "JSON", "ApplicationLogLevel": "INFO",
                          "SystemLogLevel": "INFO", "LogGroup": names.log_group},
    }


def function_tags(names):
    """Tags on the function; they also let status and teardown find explicitly named buckets."""
    return {STACK_TAG: names.prefix, DATA_BUCKET_TAG: names.data_bucket,
            SOFTWARE_BUCKET_TAG: names.software_bucket}


def read_function(lam, name):
    """Return the function's configuration and tags, or None."""
    try:
        response = lam.get_function(FunctionName=name)
    except ClientError as err:
        if is_not_found(err):
            return None
        log_client_error(err, f"reading function {name}")
        raise
    config = response["Configuration"]
    config["Tags"] = response.get("Tags") or {}
    if response.get("TagsError"):
        # "Lambda returns tag data only if you have explicit allow permissions for
        # lambda:ListTags" (Lambda API Reference, GetFunction); deploy then re-tags each run.
        logger.warning("cannot read the tags of function %s: %s %s (lambda:ListTags)", name,
                       response["TagsError"].get("ErrorCode"),
                       response["TagsError"].get("Message"))
    return config


def function_differences(desired, config, zip_sha):
    """Return which reported settings of a deployed function differ from `desired` (pure).

    Settings the service does not report are not judged (moto omits LoggingConfig and
    DeadLetterConfig); AWS reports both.
    """
    found = ["code"] if config.get("CodeSha256") != zip_sha else []
    for key, value in desired.items():
        if key == "FunctionName" or config.get(key) is None:
            continue
        if key == "Environment":
            # Exactly: a stray DRY_RUN=1 left from a permission check must count as drift.
            if (config[key].get("Variables") or {}) != value["Variables"]:
                found.append(key)
        elif mismatches(value, config[key]):
            found.append(key)
    return found


def _wait_for_function(lam, name, waiter):
    lam.get_waiter(waiter).wait(FunctionName=name, WaiterConfig={"Delay": 2, "MaxAttempts": 60})


def ensure_function(lam, names, zip_bytes, progress, environ=None, sleep=time.sleep,
                    capacity=None):
    """Create the function, or update its code and configuration only where they changed."""
    desired = function_configuration(names, environ, capacity)
    config = read_function(lam, names.function_name)
    if config is None:
        params = dict(desired, Code={"ZipFile": zip_bytes}, Tags=function_tags(names),
                      Architectures=["x86_64"], PackageType="Zip")
        # A role created seconds ago may not be assumable by Lambda yet.
        created = wait_out_propagation(lambda: lam.create_function(**params),
                                       f"creating function {names.function_name}", sleep)
        _wait_for_function(lam, names.function_name, "function_active_v2")
        progress.record(CREATED, "function", names.function_name, RUNTIME)
        return created["FunctionArn"]
    differences = function_differences(desired, config, code_sha256(zip_bytes))
    if "code" in differences:
        lam.update_function_code(FunctionName=names.function_name, ZipFile=zip_bytes)
        _wait_for_function(lam, names.function_name, "function_updated_v2")
    if any(d != "code" for d in differences):
        wait_out_propagation(lambda: lam.update_function_configuration(**desired),
                             f"updating function {names.function_name}", sleep)
        _wait_for_function(lam, names.function_name, "function_updated_v2")
    wanted_tags = function_tags(names)
    if any(config["Tags"].get(k) != v for k, v in wanted_tags.items()):
        lam.tag_resource(Resource=config["FunctionArn"], Tags=wanted_tags)
    progress.record(UPDATED if differences else IN_PLACE, "function", names.function_name,
                    ", ".join(differences))
    return config["FunctionArn"]


def read_event_invoke_config(lam, name):
    """Return the function's asynchronous-invocation settings, or None."""
    return _get_or_none(lam.get_function_event_invoke_config, FunctionName=name)


def ensure_event_invoke_config(lam, names, progress, sleep=time.sleep):
    """Bound Lambda's retries and event age; what still fails goes to the dead-letter queue."""
    wanted = {"MaximumRetryAttempts": MAX_RETRY_ATTEMPTS,
              "MaximumEventAgeInSeconds": MAX_EVENT_AGE_SECONDS}
    current = read_event_invoke_config(lam, names.function_name)
    if current is not None and not mismatches(wanted, current):
        progress.record(IN_PLACE, "async retry settings", names.function_name)
        return
    wait_out_propagation(
        lambda: lam.put_function_event_invoke_config(FunctionName=names.function_name, **wanted),
        f"setting the retry settings of {names.function_name}", sleep)
    progress.record(CREATED if current is None else UPDATED, "async retry settings",
                    names.function_name, f"{MAX_RETRY_ATTEMPTS} retries")


def s3_permission_statement(lam, names):
    """Return the function policy's statement that lets S3 invoke it, or None."""
    policy = _get_or_none(lam.get_policy, FunctionName=names.function_name)
    if not policy:
        return None
    for statement in json.loads(policy["Policy"]).get("Statement", []):
        if statement.get("Sid") == names.permission_sid:
            return statement
    return None


def permission_matches(statement, names):
    """True when the S3 invoke statement names our bucket and account (pure)."""
    if not statement:
        return False
    condition = statement.get("Condition", {})
    return (
        statement.get("Principal", {}).get("Service") == "s3.amazonaws.com"
        and statement.get("Action") == "lambda:InvokeFunction"
        and condition.get("ArnLike", {}).get("AWS:SourceArn") == names.data_bucket_arn
        and condition.get("StringEquals", {}).get("AWS:SourceAccount") == names.account
    )


def remove_s3_invoke_permission(lam, names, progress):
    """Remove S3's permission to invoke the function: S3 sends to the events queue now, so
    the function needs none (a deployment made before the queue has it)."""
    if s3_permission_statement(lam, names) is None:
        return
    lam.remove_permission(FunctionName=names.function_name, StatementId=names.permission_sid)
    progress.record(DELETED, "S3 invoke permission", names.function_name,
                    "events go through the queue")


def event_source_settings():
    """The event source mapping's settings, as CreateEventSourceMapping takes them (pure)."""
    return {"BatchSize": EVENTS_BATCH_SIZE, "FunctionResponseTypes": ["ReportBatchItemFailures"],
            "ScalingConfig": {"MaximumConcurrency": EVENTS_MAX_CONCURRENCY}}


def find_event_source_mapping(lam, names):
    """Return the mapping from the events queue to the function, or None."""
    for page in lam.get_paginator("list_event_source_mappings").paginate(
            EventSourceArn=names.events_queue_arn, FunctionName=names.function_name):
        for mapping in page.get("EventSourceMappings", []):
            return mapping
    return None


def event_source_differences(mapping):
    """Return which settings of a mapping differ from event_source_settings (pure)."""
    if mapping is None:
        return ["missing"]
    found = mismatches(event_source_settings(), mapping)
    if mapping.get("State") not in ("Enabled", "Enabling", "Updating", "Creating"):
        found.append(f"state {mapping.get('State')}")
    return found


def ensure_event_source_mapping(lam, names, progress, sleep=time.sleep):
    """Let the function read the events queue, with partial batch responses; return its UUID."""
    mapping = find_event_source_mapping(lam, names)
    if mapping is None:
        # The role's queue permissions may not have reached Lambda yet ("The provided
        # execution role does not have permissions to call ReceiveMessage on SQS").
        created = wait_out_propagation(
            lambda: lam.create_event_source_mapping(
                EventSourceArn=names.events_queue_arn, FunctionName=names.function_name,
                Enabled=True, **event_source_settings()),
            f"mapping {names.events_queue} to {names.function_name}", sleep)
        wait_for_mapping(lam, created["UUID"], sleep)
        progress.record(CREATED, "event source mapping", names.events_queue,
                        f"-> {names.function_name}, batches of {EVENTS_BATCH_SIZE}")
        return created["UUID"]
    differences = event_source_differences(mapping)
    if differences:
        wait_out_propagation(
            lambda: lam.update_event_source_mapping(UUID=mapping["UUID"], Enabled=True,
                                                    **event_source_settings()),
            f"updating the mapping of {names.events_queue}", sleep)
        wait_for_mapping(lam, mapping["UUID"], sleep)
        progress.record(UPDATED, "event source mapping", names.events_queue,
                        ", ".join(differences))
    else:
        progress.record(IN_PLACE, "event source mapping", names.events_queue)
    return mapping["UUID"]


# A mapping is Creating or Updating for a few seconds before Lambda polls the queue with it.
MAPPING_SETTLING = ("Creating", "Updating", "Enabling")


def wait_for_mapping(lam, uuid, sleep=time.sleep, attempts=30, delay=2.0):
    """Return the mapping's state once Lambda has applied it (at most attempts × delay s)."""
    for _ in range(attempts):
        state = lam.get_event_source_mapping(UUID=uuid).get("State")
        if state not in MAPPING_SETTLING:
            return state
        sleep(delay)
    return state


def delete_event_source_mapping(lam, names, progress):
    """Delete the mapping (deleting the function leaves it behind); tolerate it being gone."""
    mapping = find_event_source_mapping(lam, names)
    if mapping is None:
        progress.record(GONE, "event source mapping", names.events_queue)
        return
    lam.delete_event_source_mapping(UUID=mapping["UUID"])
    progress.record(DELETED, "event source mapping", names.events_queue)


def ensure_s3_invoke_permission(lam, names, progress, sleep=time.sleep):
    """Let S3 invoke the function for the data bucket of this account only."""
    statement = s3_permission_statement(lam, names)
    if permission_matches(statement, names):
        progress.record(IN_PLACE, "S3 invoke permission", names.function_name)
        return
    if statement:
        lam.remove_permission(FunctionName=names.function_name, StatementId=names.permission_sid)
    # SourceAccount too: a bucket name freed by its owner could be re-created elsewhere.
    wait_out_propagation(
        lambda: lam.add_permission(FunctionName=names.function_name,
                                   StatementId=names.permission_sid,
                                   Action="lambda:InvokeFunction", Principal="s3.amazonaws.com",
                                   SourceArn=names.data_bucket_arn, SourceAccount=names.account),
        f"letting S3 invoke {names.function_name}", sleep)
    progress.record(UPDATED if statement else CREATED, "S3 invoke permission",
                    names.function_name, names.data_bucket)


def delete_function(lam, names, progress):
    """Delete the function (its permission and retry settings go with it)."""
    try:
        lam.delete_function(FunctionName=names.function_name)
    except ClientError as err:
        if is_not_found(err):
            progress.record(GONE, "function", names.function_name)
            return
        log_client_error(err, f"deleting function {names.function_name}")
        raise
    progress.record(DELETED, "function", names.function_name)
