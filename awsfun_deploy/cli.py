"""The command line of ./deploy.sh: parsing, confirmation, one run_* per command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from .core import (
    DENIED_CODES,
    OneLineParser,
    plural,
    CREATED, Clients, DELETED, DeployError, GONE, IN_PLACE, Progress, UPDATED, canonical,
    explain_error, one_line,
)
from .names import (
    DEFAULT_INSTANCE_TYPE, DEFAULT_PREFIX, default_launch_template, deployed_names, resolve_names,
)
from .artifacts import ROUTES_FILE
from .stack import DEFAULT_MAX_WORKERS
from .batch import DEFAULT_ENGINE, DEFAULT_IMAGE, DEFAULT_MAX_VCPUS, ENGINES
from .function import read_function
from .policies import policy_values, render_policy
from .routes import check_routing_table, load_routes_file, uses_spot
from .logs import print_log
from .reconcile import reconcile
from .results import results_options, run_results
from .stack import deploy, teardown
from .status import READ_LIMIT, collect_status, print_status


def confirm(question, stdin=None, stream=None):
    """Ask a yes/no question on the terminal; anything but yes (or end of input) is no."""
    print(f"{question} [y/N] ", end="", file=stream or sys.stdout, flush=True)
    answer = (stdin or sys.stdin).readline()
    return answer.strip().lower() in ("y", "yes")


def deployed_engine(lam, function_name):
    """Return the engine the deployed function's ENGINE names ("ec2" when it names none, as
    the handler reads it), or None when no function is deployed yet; raises ClientError."""
    config = read_function(lam, function_name)
    if config is None:
        return None
    variables = (config.get("Environment") or {}).get("Variables") or {}
    return variables.get("ENGINE") or DEFAULT_ENGINE


def resolve_engine(given, deployed):
    """Return (engine, why) (pure): --engine when given, else the deployed one, else the
    default for a new deployment."""
    if given is not None:
        return given, f"--engine {given}"
    if deployed is not None:
        return deployed, "as deployed"
    return DEFAULT_ENGINE, "the default for a new deployment"


ENGINE_LABELS = {"ec2": "for one EC2 instance per object",
                 "batch": "for one AWS Batch job per object"}
# What stays of the engine deploy leaves (stack.deploy keeps the launch templates under batch;
# the Batch pieces stay until teardown, which removes them whatever the engine, and with
# minvCpus 0 their compute environments run no instance once their jobs are done).
LEFT_BEHIND = {"batch": "the Batch pieces stay, idle and free (minvCpus 0), until teardown",
               "ec2": "the EC2 launch templates stay, unused under batch and free"}


def engine_note(given, deployed):
    """Return deploy's line about its engine, or None when --engine names the deployed one
    (pure): which engine and why when --engine is not given, the switch when it changes."""
    engine, why = resolve_engine(given, deployed)
    other = next(name for name in ENGINES if name != engine)
    if given is None:
        switch = "switches" if deployed is not None else ENGINE_LABELS[other]
        return f"engine {engine} ({why}; --engine {other} {switch})"
    if deployed is None or deployed == given:
        return None
    return f"engine: {deployed} -> {given}; {LEFT_BEHIND[deployed]}"


def batch_only_options(args, engine, why):
    """Raise DeployError when --max-vcpus or --image is given for an engine other than batch
    (they would be ignored); return (max_vcpus, image) with batch.py's defaults applied."""
    given = [flag for flag, value in (("--max-vcpus", args.max_vcpus), ("--image", args.image))
             if value is not None]
    if given and engine != "batch":
        raise DeployError(f"{' and '.join(given)} only {'applies' if len(given) == 1 else 'apply'}"
                          f" to --engine batch, and the engine is {engine} ({why}) "
                          "(--help for usage)")
    return (DEFAULT_MAX_VCPUS if args.max_vcpus is None else args.max_vcpus,
            DEFAULT_IMAGE if args.image is None else args.image)


def run_deploy(args, clients):
    """`deploy`: create or update everything, with --engine or else the deployed engine."""
    # Before any AWS call: a bad routing table is the operator's to fix now, not the handler's later.
    check_routing_table(args.routes, default_launch_template(args.prefix), args.instance_type)
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    # A re-run without --engine keeps the engine the function runs, not the default's.
    deployed = deployed_engine(clients("lambda"), names.function_name)
    engine, why = resolve_engine(args.engine, deployed)
    max_vcpus, image = batch_only_options(args, engine, why)
    print(f"awsfun deploy: prefix {names.prefix}, account {names.account}, "
          f"region {names.region}")
    note = engine_note(args.engine, deployed)
    if note:
        print(note)
    progress = Progress()
    result = deploy(clients, names, args.instance_type, args.public_software, progress,
                    routes_file=args.routes, max_workers=args.max_workers, spot=args.spot,
                    subnets=args.subnets, security_groups=args.security_groups,
                    engine=engine, max_vcpus=max_vcpus, image=image)
    if progress.changed():
        print(f"Deployed: {progress.count(CREATED)} created, {progress.count(UPDATED)} updated, "
              f"{progress.count(DELETED)} removed, {progress.count(IN_PLACE)} already in place.")
    else:
        print("Nothing to change: everything already in place.")
    print(f"Upload inputs to s3://{names.data_bucket}/ ; reports appear under analysis/. "
          f"Function {result['function_arn']}")
    return 0


def run_status(args, clients):
    """`status`: what is deployed, running and reported, and any drift."""
    names = deployed_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    status = collect_status(clients, names, instance_type=args.instance_type,
                            routes_file=args.routes, read_limit=args.read)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print_status(status)
    return 0


def run_reconcile(args, clients):
    """`reconcile`: replay dead letters and launch every input nothing has processed."""
    names = deployed_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    if not args.json:
        print(f"awsfun reconcile: s3://{names.data_bucket}/{args.key_prefix}"
              + (" (dry run: nothing is launched or deleted)" if args.dry_run else ""))
    result = reconcile(clients, names, args.key_prefix, args.dry_run,
                       Progress(echo=not args.json))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(reconcile_summary(result))
    launch_failed = result["failed"] or any(
        entry.get("reason") == "a launch failed" for entry in result["dlq_failed"])
    return 1 if launch_failed else 0


def reconcile_summary(result):
    """The closing lines of `reconcile` for a person (pure)."""
    counts = result["counts"]
    lines = [f"Inputs: {counts['inputs']}: {counts['reports']} reported, "
             f"{counts['error_reports']} error-reported, {counts['running']} with a running "
             f"worker, {counts['unprocessed']} unprocessed."]
    if result["dry_run"]:
        lines.append(f"Dry run: would launch {len(result['unprocessed'])}; "
                     f"{len(result['dlq_kept'])} dead letters looked at, none deleted.")
    else:
        lines.append(f"Launched {len(result['launched'])}, failed {len(result['failed'])}; "
                     f"dead letters replayed {len(result['replayed'])}, kept "
                     f"{len(result['dlq_failed']) + len(result['dlq_kept'])}.")
    if result.get("ended_without_report"):
        ended = plural(len(result["ended_without_report"]), "worker")
        lines.append(f"{ended} ended without a report; "
                     "EC2's or Batch's reasons are above (ended unreported).")
    return "\n".join(lines)


def run_logs(args, clients):
    """`logs KEY [--follow]`: print the worker's log of input KEY; Ctrl-C ends --follow quietly."""
    names = deployed_names(clients, args.prefix, args.data_bucket, args.software_bucket)

    def write(data):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    try:
        return print_log(clients("s3"), names.data_bucket, args.key, write, follow=args.follow)
    except KeyboardInterrupt:
        return 130


def run_teardown(args, clients):
    """`teardown`: remove everything deploy created (the data bucket only with --delete-data)."""
    names = deployed_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    data = (f"and the data bucket {names.data_bucket} with ALL its objects" if args.delete_data
            else f"(the data bucket {names.data_bucket} is kept)")
    print(f"This removes the awsfun deployment {names.prefix!r} from account {names.account}, "
          f"region {names.region}: function, workers, launch template {names.launch_template}, "
          f"roles, queue, logs, software bucket {names.software_bucket} {data}"
          + (", and its AWS Batch job queue, compute environments and job definition"
             if names.engine == "batch" else "") + ".")
    if not args.yes and not confirm("Continue?"):
        print("Nothing removed.")
        return 1
    progress = teardown(clients, names, args.delete_data)
    print(f"Removed {progress.count(DELETED)}; {progress.count(GONE)} already gone.")
    return 0
# IAM's limits on a policy's characters, white space not counted (IAM User Guide, "IAM and
# AWS STS quotas"): a managed policy, and all of a role's inline policies together.
MANAGED_POLICY_LIMIT = 6144
ROLE_POLICY_LIMIT = 10240


def deployer_policy_fit(size):
    """Say where a policy of `size` characters can be attached (pure)."""
    if size <= MANAGED_POLICY_LIMIT:
        return (f"{size:,} characters: fits a managed policy ({MANAGED_POLICY_LIMIT:,}) for the "
                "user, group or role that runs ./deploy.sh")
    if size <= ROLE_POLICY_LIMIT:
        return (f"{size:,} characters: too long for a managed policy ({MANAGED_POLICY_LIMIT:,}); "
                f"attach it as an inline policy of a role ({ROLE_POLICY_LIMIT:,}), or use a "
                "shorter --prefix or bucket names")
    return (f"{size:,} characters: too long for any IAM policy; use a shorter --prefix or "
            "bucket names")


def policy_engine(lam, function_name):
    """Return (engine, why) of deployer-policy without --engine: the deployed one (as deploy
    resolves it), ec2 for a new deployment, and ec2 when the caller may not read the function
    (whoever asks for the policy may have no permission yet: that is what it is for)."""
    try:
        return resolve_engine(None, deployed_engine(lam, function_name))
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        if code not in DENIED_CODES:
            raise
        return DEFAULT_ENGINE, f"the deployed function is not readable: {code}"


def run_deployer_policy(args, clients):
    """`deployer-policy`: print iam/deployer-policy.json rendered for this deployment.

    --security-groups names the user's own groups that deploy --security-groups will put in
    the templates: the deployer may launch into those (deploy's DryRun check, reconcile), as
    into the stack's own group, which it finds by its tag. --spot, or a route of the routing
    table with "spot", adds what spot workers need (policies.render_policy).
    """
    names = resolve_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    spot = uses_spot(args.spot, load_routes_file(args.routes))
    engine = args.engine
    if engine is None:
        engine, why = policy_engine(clients("lambda"), names.function_name)
        print(f"deploy.sh deployer-policy: for engine {engine} ({why}; --engine "
              f"{next(name for name in ENGINES if name != engine)} for the other)",
              file=sys.stderr)
    document = render_policy("deployer-policy", policy_values(
        names, security_group_ids=args.security_groups, spot=spot, batch=engine == "batch"))
    print(json.dumps(document, indent=2))
    print(f"deploy.sh deployer-policy: {deployer_policy_fit(len(canonical(document)))}",
          file=sys.stderr)
    return 0


# Subcommands by name, registered with add_command.
COMMANDS = {}


def add_command(name, run, help_text, add_arguments=None):
    """Register a subcommand: run(args, clients) -> exit status; add_arguments(parser) adds options."""
    COMMANDS[name] = {"run": run, "help": help_text, "add_arguments": add_arguments}


def _common_options():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="short name for this deployment (default: %(default)s); names are "
                             "PREFIX plus account and region")
    common.add_argument("--data-bucket", help="data bucket name "
                        "(default: PREFIX-data-ACCOUNT-REGION)")
    common.add_argument("--software-bucket", help="software bucket name "
                        "(default: PREFIX-software-ACCOUNT-REGION)")
    common.add_argument("-v", "--verbose", action="store_true", help="log diagnostics to stderr")
    common.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback as well as the one-line reason")
    return common


def _routes_option(parser):
    parser.add_argument("--routes", default=str(ROUTES_FILE), metavar="FILE",
                        help="routing table to validate, publish and make launch templates for "
                             "(default: routes.json beside deploy.py)")


def id_list_option(text):
    """argparse type of --subnets and --security-groups: comma-separated ids (pure)."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected one or more comma-separated ids")
    return ids


def positive_int(text):
    """argparse type of --max-workers: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of workers >= 1")
    return int(text)


def vcpus_int(text):
    """argparse type of --max-vcpus: a whole number of vCPUs >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of vCPUs >= 1")
    return int(text)


def image_uri(text):
    """argparse type of --image: a container image reference, no white space (pure)."""
    if not text or any(c.isspace() for c in text) or len(text) > 255:
        raise argparse.ArgumentTypeError(f"{text!r}: a container image such as "
                                         f"{DEFAULT_IMAGE} (no spaces)")
    return text


def non_negative_int(text):
    """argparse type of status --read: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 0")
    return int(text)


def _deploy_options(parser):
    parser.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                        help="worker instance type (default: %(default)s)")
    parser.add_argument("--max-workers", type=positive_int, default=DEFAULT_MAX_WORKERS,
                        metavar="N", help="engine ec2: at most N workers pending or running "
                        "at once; further uploads wait in the events queue (default: "
                        "%(default)s)")
    parser.add_argument("--spot", action="store_true",
                        help="launch workers as spot instances, on demand when spot capacity "
                             "is refused")
    parser.add_argument("--subnets", type=id_list_option, default=[], metavar="A,B",
                        help="subnets (one VPC) to launch workers in, tried in order when one "
                             "has no capacity (default: the default VPC's)")
    parser.add_argument("--security-groups", type=id_list_option, default=[], metavar="SG,..",
                        help="security groups for the workers (default: the stack's own: no "
                             "inbound, HTTPS out)")
    # None, not the defaults: run_deploy resolves the engine (the deployed one when not
    # given), refuses the batch-only options under ec2, then applies their defaults.
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="how each upload is processed: ec2, one instance per object from "
                             "the launch template, or batch, one AWS Batch job per object on "
                             "spot, then on-demand capacity (default: the deployed engine; "
                             f"{DEFAULT_ENGINE} for a new deployment)")
    parser.add_argument("--max-vcpus", type=vcpus_int, default=None, metavar="N",
                        help="engine batch only: each compute environment's maxvCpus "
                             f"(default: {DEFAULT_MAX_VCPUS})")
    parser.add_argument("--image", type=image_uri, default=None, metavar="URI",
                        help="engine batch only: the job's container image, e.g. one built "
                             f"from the Dockerfile (default: {DEFAULT_IMAGE})")
    _routes_option(parser)
    parser.add_argument("--public-software", action="store_true",
                        help="let anyone read the published files (relaxes Block Public Access "
                             "on the software bucket only); private by default")


def _status_options(parser):
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--read", type=non_negative_int, default=READ_LIMIT, metavar="N",
                        help="read the newest N error reports (for their stage and reason) "
                             "and the newest N reports (for their format); each is one S3 "
                             "GET request, so a large N costs time and requests. Counts by "
                             "status come from the listing of analysis/ (up to 10,000 "
                             "objects) and need no GET (default: %(default)s)")
    parser.add_argument("--instance-type", default=None,
                        help="report drift against this instance type (default: the deployed one)")
    _routes_option(parser)


def _reconcile_options(parser):
    parser.add_argument("--key-prefix", default="", metavar="K",
                        help="only inputs (and dead letters) whose keys start with K")
    parser.add_argument("--dry-run", action="store_true",
                        help="only print what would be launched and replayed")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _logs_options(parser):
    parser.add_argument("key", metavar="KEY", help="the input's key in the data bucket")
    parser.add_argument("--follow", action="store_true",
                        help="keep printing what the running worker adds, until its job ends")


def _teardown_options(parser):
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--delete-data", action="store_true",
                        help="also empty and delete the data bucket (inputs and reports)")


def _deployer_policy_options(parser):
    parser.add_argument("--spot", action="store_true",
                        help="for deploy --spot: let the deployer launch spot workers and create "
                             "EC2's service-linked role for spot (implied by a route of --routes "
                             "with spot)")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="the engine deploy will run: batch adds what the Batch engine "
                             "needs (default: the deployed engine, as deploy resolves it; "
                             f"{DEFAULT_ENGINE} for a new deployment)")
    parser.add_argument("--security-groups", type=id_list_option, default=[], metavar="SG,..",
                        help="the groups of your own that deploy --security-groups will use: "
                             "the policy lets the deployer launch workers into them")
    _routes_option(parser)
add_command("deploy", run_deploy, "create or update everything (the default; safe to re-run)",
            _deploy_options)
add_command("status", run_status, "show names, running workers, reports counted by status and "
            "format, each error report's stage and reason, dead letters, drift",
            _status_options)
add_command("reconcile", run_reconcile,
            "launch every input with no report, error report or running worker; replay the "
            "dead-letter queue", _reconcile_options)
add_command("logs", run_logs, "print the worker log of one input (analysis/KEY.log); "
            "--follow prints it as it grows", _logs_options)
add_command("teardown", run_teardown, "remove what deploy created (asks first)",
            _teardown_options)
add_command("deployer-policy", run_deployer_policy,
            "print the IAM policy a person needs to run deploy, status, reconcile and "
            "teardown for this prefix and these buckets (iam/deployer-policy.json)",
            _deployer_policy_options)
add_command("results", run_results,
            "copy the reports, error reports and logs to a folder (only what changed) and "
            "write summary.csv and index.html there", results_options)
# Options that take a value, so a value that happens to be a command name stays a value.
VALUE_OPTIONS = ("--prefix", "--data-bucket", "--software-bucket", "--instance-type",
                 "--routes", "--key-prefix", "--max-workers", "--subnets", "--security-groups",
                 "--read", "--out", "--engine", "--max-vcpus", "--image")


def command_first(argv):
    """Return argv with its command moved first (`--prefix p status` works); `deploy` if none."""
    index = 0
    while index < len(argv):
        if argv[index] in COMMANDS:
            return [argv[index]] + argv[:index] + argv[index + 1:]
        index += 2 if argv[index] in VALUE_OPTIONS else 1
    if argv[:1] in (["-h"], ["--help"]):
        return argv
    return ["deploy"] + argv


def build_parser():
    """Return the argument parser with one subparser per registered command."""
    parser = OneLineParser(
        prog="deploy.sh",
        description="Deploy the awsfun pipeline (S3 -> SQS -> Lambda -> one worker per "
                    "object) with least-privilege IAM, show its status, or tear it down. "
                    "Each object gets an EC2 instance of its own (--engine ec2, a new "
                    "stack's default, at most --max-workers at once) or an AWS Batch job on "
                    "spot, then "
                    "on-demand capacity (--engine batch, at most --max-vcpus per compute "
                    "environment). Uses your usual AWS settings: AWS_PROFILE, "
                    "AWS_REGION/AWS_DEFAULT_REGION, AWS_ENDPOINT_URL.",
        epilog="Without a command, deploy. `./deploy.sh deploy --help` shows deploy's "
               "options (--engine, --max-workers, --max-vcpus, --image, ...); "
               "`./deploy.sh COMMAND --help` another command's.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, parents=[common], help=command["help"],
                                  description=command["help"])
        if command["add_arguments"]:
            command["add_arguments"](sub)
    return parser


def main(argv=None, clients=None):
    """Command-line entry point; returns the exit status.

    An ordinary mistake (profile, region, credentials, session, endpoint, permissions, a
    bucket name taken: core.explain_error) is one line on stderr and status 2; another AWS
    refusal or a wait given up is one line and status 1. --debug adds the traceback."""
    argv = command_first(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    if not args.verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        clients = clients or Clients()
        return COMMANDS[args.command]["run"](args, clients)
    except WaiterError as err:  # a BotoCoreError, but not the caller's settings
        failure, status, line = err, 1, f"gave up waiting: {one_line(err)}"
    except (DeployError, BotoCoreError, ClientError) as err:
        failure = err
        explained = explain_error(err)
        if explained is None:  # an AWS refusal that is not the caller's settings
            error = err.response.get("Error", {}) if isinstance(err, ClientError) else {}
            explained = 1, (f"AWS refused {getattr(err, 'operation_name', '?')}: "
                            f"{error.get('Code')} {one_line(error.get('Message') or '')}")
        status, line = explained
    if args.debug:
        traceback.print_exception(type(failure), failure, failure.__traceback__, file=sys.stderr)
    print(f"deploy.sh {args.command}: {line}", file=sys.stderr)
    return status
