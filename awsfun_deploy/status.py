"""status: names, running workers, recent reports, counts, dead letters and drift."""

from __future__ import annotations

import json
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from botocore.exceptions import ClientError

from .core import DeployError, escaped, is_not_found, middle_cut, mismatches, one_line
from .names import DEFAULT_INSTANCE_TYPE
from .artifacts import (
    PUBLISHED_FILES, ROUTES_FILE, build_function_zip, code_sha256, file_sha256, software_sources,
)
from .routes import (check_routing_table, load_routes_or_none, routes_by_template,
                     template_volume_sizes)
from .policies import policy_values, render_policy
from .s3 import (
    PRIVATE_BLOCK, PUBLIC_READ_SID, PUBLIC_SOFTWARE_BLOCK, bucket_exists,
    bucket_setting_differences, list_keys, notification_config, published_digest,
    read_bucket_policy, read_bucket_settings,
)
from .sqs import events_queue_attributes, attribute_differences, find_queue, queue_depth
from .iam import read_instance_profile, read_role, role_differences
from .ec2 import (
    default_ebs_key, find_stack_security_group, find_workers, instance_architecture, latest_worker_ami, read_launch_template,
    root_device, security_group_differences, stack_launch_templates,
    worker_launch_template_data,
)
from .function import (
    MAX_RETRY_ATTEMPTS, deployed_capacity, event_source_differences, find_event_source_mapping,
    find_log_group, function_configuration, function_differences, read_event_invoke_config,
    read_function,
)
from .reconcile import ended_detail, input_status
from .batch import (
    active_revisions, batch_names, read_compute_environment, read_job_queue, read_live,
)
from .batch_jobs import batch_status


def _iso(moment):
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def input_key_of(report_key):
    """Map analysis/KEY.json or .error.json back to KEY (hashed long keys stay as they are)."""
    key = report_key[len("analysis/"):]
    for suffix in (".error.json", ".json"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


# How many reports, and how many error reports, status reads by default (--read): each is one
# S3 GET. The listing (one request per 1,000 keys) counts them all for nothing more.
READ_LIMIT = 100
LISTING_LIMIT = 10000
READ_THREADS = 8  # below botocore's 10 pooled connections a client keeps


def read_report(s3, bucket, key):
    """Return the JSON document at `key`, None when it is gone, {"unreadable": why} when it
    is not a JSON object (one GET)."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as err:
        if is_not_found(err):
            return None
        raise
    try:
        document = json.loads(body)
    except ValueError as err:
        return {"unreadable": f"not JSON: {err}"}
    return document if isinstance(document, dict) else {"unreadable": "not a JSON object"}


def error_reason(document):
    """Return {"stage", "reason", "error_code"} of an error report (pure).

    The worker writes status "error", stage, error ("Code: message") and error_code
    (AwsS3.error_report); the launcher and bootstrap.sh write stage, error and exit_code."""
    document = document or {}
    if "unreadable" in document:
        return {"stage": "?", "reason": f"error report unreadable ({document['unreadable']})",
                "error_code": None}
    code = document.get("error_code")
    if code is None and document.get("exit_code") is not None:
        code = f"exit {document['exit_code']}"
    return {"stage": str(document.get("stage") or "?"),
            "reason": str(document.get("error") or "no reason given"),
            "error_code": None if code is None else str(code)}


def report_format(document):
    """Return a report's format as the worker wrote it ("fastq", "vcf", "csv", ...), or "?"."""
    value = (document or {}).get("format")
    return value if isinstance(value, str) and value else "?"


def most_first(counter):
    """Return a Counter as a dict, largest count first, ties by name (pure, stable output)."""
    return dict(sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def read_reports(s3, bucket, read_limit=READ_LIMIT, scan_limit=LISTING_LIMIT, recent=10):
    """Count the reports under analysis/ by status (all listed) and read the newest
    `read_limit` of each kind: error reports for their stage and reason, reports for their
    format. Returns the JSON-ready summary `status` shows, with the `recent` newest reports.
    Costs the listing plus at most 2 x read_limit GETs, made READ_THREADS at a time."""
    objects = list_keys(s3, bucket, prefix="analysis/", limit=scan_limit)
    objects.sort(key=lambda o: o["LastModified"], reverse=True)
    errors = [o for o in objects if o["Key"].endswith(".error.json")]
    reports = [o for o in objects
               if o["Key"].endswith(".json") and not o["Key"].endswith(".error.json")]
    to_read = errors[:read_limit] + reports[:read_limit]
    with ThreadPoolExecutor(READ_THREADS) as pool:
        documents = dict(zip([o["Key"] for o in to_read],
                             pool.map(lambda o: read_report(s3, bucket, o["Key"]), to_read)))
    entries = []
    for obj in errors[:read_limit]:
        document = documents[obj["Key"]]
        if document is None:  # replaced by a report since the listing
            continue
        source = document.get("input") if isinstance(document.get("input"), dict) else {}
        entries.append({"key": obj["Key"], "last_modified": _iso(obj["LastModified"]),
                        "input_key": source.get("key") or input_key_of(obj["Key"]),
                        **error_reason(document)})
    formats = Counter(report_format(documents[o["Key"]]) for o in reports[:read_limit]
                      if documents[o["Key"]] is not None)
    return {
        "recent": [{"key": o["Key"], "input_key": input_key_of(o["Key"]),
                    "last_modified": _iso(o["LastModified"]), "size": o["Size"]}
                   for o in reports[:recent]],
        "listed": len(objects),
        "listing_complete": len(objects) < scan_limit,
        "by_status": {"report": len(reports), "error": len(errors)},
        "read_limit": read_limit,
        "formats_read": sum(formats.values()),
        "by_format": most_first(formats),
        "errors_read": len(entries),
        "errors_by_stage": most_first(Counter(entry["stage"] for entry in entries)),
        "errors": entries,
    }


def routed_templates(ec2, names, instance_type=None, routes_file=ROUTES_FILE):
    """Return ({launch template: its template or None}, {name: wanted instance type}, problem or None)
    for the worker template and those the routing table names."""
    default = read_launch_template(ec2, names.launch_template)
    default_type = (instance_type or (default or {}).get("data", {}).get("InstanceType")
                    or DEFAULT_INSTANCE_TYPE)
    try:
        _, types = check_routing_table(routes_file, names.launch_template, default_type)
        problem = None
    except DeployError as err:
        types, problem = {names.launch_template: default_type}, str(err)
    templates = {name: default if name == names.launch_template
                 else read_launch_template(ec2, name) for name in types}
    return templates, types, problem


def template_drift(ec2, ssm, names, name, template, instance_type, security_group_id=None,
                   volume_gib=0, subnet_id=None, group_ids=None):
    """Return the problems of one launch template against what deploy would make of it."""
    if template is None:
        return ["missing"]
    image_id, _ = latest_worker_ami(ssm, ec2, instance_architecture(ec2, instance_type))
    device, size = root_device(ec2, image_id)
    size = max(size, volume_gib)
    wanted = worker_launch_template_data(image_id, instance_type, names.worker_instance_profile,
                                         device, size, names.prefix, security_group_id,
                                         subnet_id, group_ids)
    return [f"changed: {problem}" + (" (a newer Amazon Linux 2023 image is out)"
                                     if problem == "ImageId" else "")
            for problem in mismatches(wanted, template["data"])]


def find_drift(clients, names, instance_type=None, routes_file=ROUTES_FILE):
    """Return each missing or changed resource as {"resource", "name", "problem"}."""
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    drift = []

    def note(resource, name, problem):
        drift.append({"resource": resource, "name": name, "problem": problem})

    for what, bucket in (("data bucket", names.data_bucket),
                         ("software bucket", names.software_bucket)):
        if not bucket_exists(s3, bucket, names.account):
            note(what, bucket, "missing")
            continue
        settings = read_bucket_settings(s3, bucket)
        # The software bucket may be public on purpose (--public-software); ACLs never.
        block = (PUBLIC_SOFTWARE_BLOCK if what == "software bucket"
                 and settings["block"] == PUBLIC_SOFTWARE_BLOCK else PRIVATE_BLOCK)
        for problem in bucket_setting_differences(settings, block):
            note(what, bucket, f"changed: {problem}")
    sources = software_sources(routes_file)
    if not any(d["name"] == names.software_bucket for d in drift):
        present = {o["Key"] for o in list_keys(s3, names.software_bucket)}
        for key in PUBLISHED_FILES:
            digest = published_digest(s3, names.software_bucket, key)
            if digest is None:
                note("software file", key, "missing")
            elif digest != file_sha256(sources[key]):
                note("software file", key, "changed: differs from this checkout")
        for key in sorted(present - set(PUBLISHED_FILES)):
            note("software file", key, "not on the published allowlist")
    if not any(d["name"] == names.data_bucket for d in drift):
        queues = notification_config(s3, names.data_bucket).get("QueueConfigurations", [])
        if not any(c.get("Id") == names.notification_id
                   and c.get("QueueArn") == names.events_queue_arn for c in queues):
            note("object-created event", names.data_bucket, "missing")

    if find_queue(sqs, names.dlq_name) is None:
        note("dead-letter queue", names.dlq_name, "missing")
    events = find_queue(sqs, names.events_queue)
    if events is None:
        note("events queue", names.events_queue, "missing")
    else:
        wanted = events_queue_attributes(names, render_policy(
            "events-queue-policy", policy_values(names)))
        for problem in attribute_differences(wanted, events[1]):
            note("events queue", names.events_queue, f"changed: {problem}")
    if find_log_group(logs, names.log_group) is None:
        note("log group", names.log_group, "missing")

    routed, types, routes_problem = routed_templates(ec2, names, instance_type, routes_file)
    if routes_problem:
        note("routing table", str(routes_file), f"invalid: {routes_problem}")
    # The network deploy was given (--subnets, --security-groups) is in the function's
    # environment; without it, the stack's own group in the default VPC.
    config = read_function(lam, names.function_name)
    capacity = deployed_capacity(config)
    subnets = [x for x in capacity.get("SUBNET_IDS", "").split(",") if x]
    groups = [x for x in capacity.get("SECURITY_GROUP_IDS", "").split(",") if x]
    group = find_stack_security_group(ec2, names)
    group_id = group["GroupId"] if group else None
    if not groups or group_id in groups:
        for problem in security_group_differences(group):
            note("worker security group", names.worker_security_group,
                 problem if problem == "missing" else f"changed: {problem}")
    # As deploy renders it: the templates' images, the instance types the table wants.
    values = policy_values(names, [t["id"] for t in routed.values() if t],
                           image_ids=[t["data"].get("ImageId") for t in routed.values()
                                      if t and t["data"].get("ImageId")],
                           instance_types=types.values(),
                           security_group_ids=groups or ([group_id] if group_id else []),
                           ebs_key_arn=default_ebs_key(ec2, clients("kms")),
                           batch=names.engine == "batch")
    for what, role, trust, policy_name, policy in (
        ("worker role", names.worker_role, "worker-trust", names.worker_policy_name,
         "worker-policy"),
        ("launcher role", names.lambda_role, "lambda-trust", names.lambda_policy_name,
         "lambda-policy"),
    ):
        for problem in role_differences(read_role(iam, role), render_policy(trust, values),
                                        policy_name, render_policy(policy, values)):
            note(what, role, problem if problem == "missing" else f"changed: {problem}")
    profile = read_instance_profile(iam, names.worker_instance_profile)
    if profile is None:
        note("worker instance profile", names.worker_instance_profile, "missing")
    elif [r["RoleName"] for r in profile.get("Roles", [])] != [names.worker_role]:
        note("worker instance profile", names.worker_instance_profile,
             "changed: does not hold exactly the worker role")

    try:
        sizes = template_volume_sizes(load_routes_or_none(routes_file))
    except DeployError:
        sizes = {}  # the routing table's problem is noted above
    for name, template in routed.items():
        for problem in template_drift(ec2, ssm, names, name, template, types[name], group_id,
                                      sizes.get(name, 0), subnets[0] if subnets else None,
                                      groups or None):
            note("launch template", name, problem)
    for name in stack_launch_templates(ec2, names):
        if name not in routed and read_launch_template(ec2, name):
            note("launch template", name, "not named by the routing table")

    if config is None:
        note("function", names.function_name, "missing")
    else:
        for problem in function_differences(function_configuration(names, capacity=capacity),
                                            config,
                                            code_sha256(build_function_zip(sources=sources))):
            note("function", names.function_name, f"changed: {problem}")
        for problem in event_source_differences(find_event_source_mapping(lam, names)):
            note("event source mapping", names.events_queue,
                 problem if problem == "missing" else f"changed: {problem}")
        retry = read_event_invoke_config(lam, names.function_name)
        if retry is None or mismatches({"MaximumRetryAttempts": MAX_RETRY_ATTEMPTS}, retry):
            note("async retry settings", names.function_name, "missing or changed")
    if names.engine == "batch":
        batch, parts = clients("batch"), batch_names(names)
        for kind in ("spot", "ondemand"):
            environment = read_live(read_compute_environment(batch, parts[kind]))
            if environment is None:
                note("compute environment", parts[kind], "missing")
            elif (environment.get("state"), environment.get("status")) != ("ENABLED", "VALID"):
                note("compute environment", parts[kind],
                     f"changed: {environment.get('state')}, {environment.get('status')}")
        queue = read_live(read_job_queue(batch, parts["queue"]))
        if queue is None:
            note("job queue", parts["queue"], "missing")
        elif queue.get("state") != "ENABLED":
            note("job queue", parts["queue"], f"changed: {queue.get('state')}")
        if not active_revisions(batch, parts["definition"]):
            note("job definition", parts["definition"], "missing")
    return drift


def collect_status(clients, names, now=None, instance_type=None, routes_file=ROUTES_FILE,
                   read_limit=READ_LIMIT):
    """Return the deployment's status as one JSON-ready dict (see `status --json`); reads at
    most `read_limit` reports and as many error reports (read_reports)."""
    now = now or datetime.now(timezone.utc)
    s3, ec2, lam, sqs = clients("s3"), clients("ec2"), clients("lambda"), clients("sqs")
    templates, _, _ = routed_templates(ec2, names, instance_type, routes_file)
    template = templates[names.launch_template]
    config = read_function(lam, names.function_name)
    queue = find_queue(sqs, names.dlq_name)
    events = find_queue(sqs, names.events_queue)
    all_templates = sorted(set(templates) | set(stack_launch_templates(ec2, names)))
    workers = []
    for worker in find_workers(ec2, all_templates):
        worker["age_seconds"] = int((now - worker["launch_time"]).total_seconds())
        worker["launch_time"] = _iso(worker["launch_time"])
        workers.append(worker)
    reports, errors, listed, read = [], [], 0, None
    counts, ended = input_status(clients, names)
    if bucket_exists(s3, names.data_bucket, names.account):
        read = read_reports(s3, names.data_bucket, read_limit)
        # The newest reports; each error report with its reason, newest first (up to read_limit).
        reports, errors, listed = read["recent"], read["errors"], read["listed"]
    policy = (read_bucket_policy(s3, names.software_bucket)
              if bucket_exists(s3, names.software_bucket, names.account) else None)
    return {
        "deployed": config is not None,
        "prefix": names.prefix,
        "account": names.account,
        "region": names.region,
        "data_bucket": names.data_bucket,
        "software_bucket": names.software_bucket,
        "public_software": bool(policy and any(
            s.get("Sid") == PUBLIC_READ_SID for s in policy.get("Statement", []))),
        "function_name": names.function_name,
        "function_arn": config["FunctionArn"] if config else None,
        "launch_template": names.launch_template,
        "launch_template_id": template["id"] if template else None,
        "launch_template_version": template["default_version"] if template else None,
        "launch_templates": template_summaries(templates, load_routes_or_none(routes_file),
                                               names.launch_template),
        "worker_role": names.worker_role,
        "worker_instance_profile": names.worker_instance_profile,
        "lambda_role": names.lambda_role,
        "log_group": names.log_group,
        "dlq_name": names.dlq_name,
        "dlq_url": queue[0] if queue else None,
        "dlq_depth": int(queue[1].get("ApproximateNumberOfMessages", 0)) if queue else None,
        "dlq_in_flight": (int(queue[1].get("ApproximateNumberOfMessagesNotVisible", 0))
                          if queue else None),
        "events_queue": names.events_queue,
        # Waiting to be read, and received but not deleted: deferred messages (the cap, no
        # capacity) wait there for their visibility timeout, the rest are being handled.
        "events_waiting": queue_depth(events[1])["visible"] if events else None,
        "events_deferred": queue_depth(events[1])["in_flight"] if events else None,
        "max_workers": int(deployed_capacity(config)["MAX_WORKERS"]) if config else None,
        "workers": workers,
        "reports": reports,
        "error_reports": errors,
        "analysis_objects_listed": listed,
        "report_counts": {key: value for key, value in (read or {}).items()
                          if key not in ("errors", "recent")},
        "counts": counts,
        "ended_without_report": ended,
        "drift": find_drift(clients, names, instance_type, routes_file),
        # ENGINE in the function's environment (names.discover_names); under batch, the
        # queue and its jobs by status (ListJobs per status, a capped number of pages).
        "engine": names.engine,
        "batch": batch_status(clients("batch"), names) if names.engine == "batch" else None,
        # Batch's cap under batch, where the handler ignores MAX_WORKERS (max_workers above).
        "compute_environments": (compute_environment_caps(clients("batch"), names)
                                 if names.engine == "batch" else None),
    }


def compute_environment_caps(batch, names):
    """Return [{"name", "max_vcpus"}] of the spot and on-demand compute environments, in that
    order; max_vcpus None for one that is missing (DescribeComputeEnvironments, one call each).

    maxvCpus is Batch's cap: "The maximum number of vCPUs that a compute environment can
    support" (AWS Batch API Reference, ComputeResource); jobs past it wait RUNNABLE."""
    parts = batch_names(names)
    caps = []
    for kind in ("spot", "ondemand"):
        environment = read_live(read_compute_environment(batch, parts[kind]))
        resources = (environment or {}).get("computeResources") or {}
        caps.append({"name": parts[kind], "max_vcpus": resources.get("maxvCpus")})
    return caps


def compute_environment_line(caps):
    """Return the status line of the compute environments' maxvCpus (pure): one figure when
    they agree (deploy gives both --max-vcpus), else each environment's own."""
    figures = {cap["max_vcpus"] for cap in caps}
    if len(figures) == 1 and None not in figures:
        return (f"  compute environments {', '.join(cap['name'] for cap in caps)}: at most "
                f"{figures.pop()} vCPUs each (maxvCpus)")
    each = ", ".join(f"{cap['name']} " + ("MISSING" if cap["max_vcpus"] is None
                                           else f"at most {cap['max_vcpus']} vCPUs")
                     for cap in caps)
    return f"  compute environments {each} (maxvCpus)"


def template_summaries(templates, routes, default_template):
    """Return one status entry per launch template: id, default version, instance type, routes (pure)."""
    serving = routes_by_template(routes, default_template)
    return [{"name": name,
             "id": template["id"] if template else None,
             "version": template["default_version"] if template else None,
             "instance_type": template["data"].get("InstanceType") if template else None,
             "routes": serving.get(name, [])}
            for name, template in templates.items()]


def _age(seconds):
    minutes, seconds = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


KEY_WIDTH = 60
REASON_WIDTH = 100


def shown_key(key, width=KEY_WIDTH):
    """Return a key as one short line: control characters escaped, the middle cut (pure)."""
    return middle_cut(escaped(key), width)


def error_line(entry):
    """Return one error report as one line: time, input key, stage: reason (pure)."""
    return (f"  {entry['last_modified']}  {shown_key(entry['input_key'])}  "
            f"{one_line(entry['stage'], 20)}: {one_line(entry['reason'], REASON_WIDTH)}")


def _tally(counts):
    return ", ".join(f"{escaped(name)} {count}" for name, count in counts.items()) or "none"


def report_count_lines(counts):
    """Return the lines counting reports by status and format and error reports by stage,
    saying how many were read when not all were (pure)."""
    if not counts:
        return []
    by_status = counts["by_status"]
    listed = "" if counts["listing_complete"] else f" (in the first {counts['listed']:,} " \
        "objects listed under analysis/)"
    lines = [f"reports: {by_status['report']}, error reports: {by_status['error']}{listed}"]
    if by_status["report"]:
        read = ("all read" if counts["formats_read"] == by_status["report"]
                else f"newest {counts['formats_read']} read; --read N for more")
        lines.append(f"  by format ({read}): {_tally(counts['by_format'])}")
    if by_status["error"]:
        read = ("all read" if counts["errors_read"] == by_status["error"]
                else f"newest {counts['errors_read']} read; --read N for more")
        lines.append(f"error reports by stage ({read}): {_tally(counts['errors_by_stage'])}")
    return lines


def print_status(status, stream=None):
    """Print a status dict for people."""
    out = stream or sys.stdout

    def say(text=""):
        print(text, file=out)

    say(f"awsfun {status['prefix']} in account {status['account']}, region {status['region']}: "
        + ("deployed" if status["deployed"] else "NOT deployed"))
    for label, key in (("data bucket", "data_bucket"), ("software bucket", "software_bucket"),
                       ("function", "function_name"), ("launch template", "launch_template"),
                       ("worker role", "worker_role"), ("launcher role", "lambda_role"),
                       ("dead-letter queue", "dlq_name")):
        say(f"  {label:<18} {status[key]}")
    say(f"engine: {status.get('engine', 'ec2')}")
    queue = status.get("batch")
    if queue is not None:
        if queue.get("missing"):
            say(f"  job queue          {queue['job_queue']}: MISSING")
        else:
            jobs = ", ".join(f"{name.lower()} {count}" for name, count in queue["jobs"].items())
            say(f"  job queue          {queue['job_queue']} ({queue['state']}, "
                f"{queue['status']}): {jobs}")
    if status["public_software"]:
        say("  software bucket is PUBLIC: anyone may read the published files")
    say(f"  dead letters       {status['dlq_depth'] if status['dlq_depth'] is not None else '-'}")
    if status.get("events_waiting") is not None:
        # MAX_WORKERS is the EC2 engine's cap only; under batch it is each compute
        # environment's maxvCpus (the next line).
        cap = (f"; at most {status['max_workers']} workers at once"
               if status.get("engine", "ec2") == "ec2" else "")
        say(f"  events queue       {status['events_waiting']} waiting, "
            f"{status['events_deferred']} deferred or in flight{cap}")
    if status.get("compute_environments"):
        say(compute_environment_line(status["compute_environments"]))
    for template in status["launch_templates"]:
        say(f"  template           {template['name']}: {template['instance_type'] or 'MISSING'}"
            f" (routes: {', '.join(template['routes']) or '-'})")
    counts = status["counts"]
    if counts is not None:
        say(f"inputs: {counts['inputs']}  reported: {counts['reports']}  error-reported: "
            f"{counts['error_reports']}  running: {counts['running']}  unprocessed: "
            f"{counts['unprocessed']}" + ("  (./deploy.sh reconcile launches them)"
                                          if counts["unprocessed"] else ""))
    say(f"running workers: {len(status['workers'])}")
    for worker in status["workers"]:
        say(f"  {worker['instance_id']}  {worker['state']:<8} {_age(worker['age_seconds']):>7}  "
            f"{shown_key(worker['key'] or '')}")
    ended = status["ended_without_report"]
    if ended:
        why = ("EC2's StateReason; StateTransitionReason, or Batch's statusReason; exit code"
               if any(not w["instance_id"].startswith("i-") for w in ended)
               else "EC2's StateReason; StateTransitionReason")
        say(f"workers ended without a report: {len(ended)} ({why})")
        for worker in ended:
            say(f"  {worker['instance_id']}  {escaped(ended_detail(worker))}")
    say(f"last reports: {len(status['reports'])}")
    for entry in status["reports"]:
        say(f"  {entry['last_modified']}  {shown_key(entry['key'])}")
    for line in report_count_lines(status.get("report_counts") or {}):
        say(line)
    for entry in status["error_reports"]:
        say(error_line(entry))
    if status["drift"]:
        say(f"drift: {len(status['drift'])} (./deploy.sh deploy puts it right)")
        for item in status["drift"]:
            say(f"  {item['resource']} {item['name']}: {item['problem']}")
    else:
        say("drift: none")
