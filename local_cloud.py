#!/usr/bin/env python3
"""The whole awsfun pipeline on this machine, with no AWS account.

    python3 local_cloud.py demo            process the shipped samples/ and show each report
    python3 local_cloud.py run FILE...     process your files, copy the reports to ./analysis-out
    python3 local_cloud.py up              keep a local cloud running for the aws CLI / boto3

A moto server on a loopback port stands in for AWS and is deployed with
deploy.sh, the same code path as a real account. moto cannot run a Lambda or
boot an instance, so this file plays both parts: it polls the stack's events queue
as Lambda's event source mapping does, hands lambda_function.lambda_handler batches
of up to 10 SQS messages, deletes those not in its batchItemFailures (the rest come
back after a short visibility timeout, to the dead-letter queue after
maxReceiveCount receives), and "boots" each launched instance with bash.
"""

import argparse
import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from pathlib import Path

from botocore.exceptions import ClientError

import AwsS3
import lambda_function
import local_batch
import local_forkserver
from awsfun_deploy import results
from awsfun_deploy.cli import positive_int
from awsfun_deploy.core import (
    OneLineParser,
    error_code,
    escaped,
    middle_cut,
    one_line,
    plural,
)

REPO = Path(__file__).resolve().parent
SAMPLES = REPO / "samples"
REGION = "us-east-1"
# How long a deferred or failed message stays hidden here: the deployed queue's 6 minutes
# would make a local burst wait for minutes.
LOCAL_VISIBILITY_SECONDS = 1
# deploy.sh --engine: an EC2 instance per object, or an AWS Batch job per object.
ENGINES = ("ec2", "batch")
LAMBDA_RETRIES = 2  # tries after the first before a dead letter, with max_receive_count=3
TOKEN_TAG = "awsfun:token"
MOTO_NO_TOKEN = "ABCDE"  # what moto records as the ClientToken of a launch that gave none
# The handler's launches are booted at once; this poll only finds instances launched by
# anyone else (reconcile, the aws CLI), so it can be slow and cheap.
BOOT_POLL_SECONDS = 1.0
# What a real shutdown gives running processes between SIGTERM and SIGKILL (systemd: 90 s).
SHUTDOWN_GRACE_SECONDS = 5.0
# What ReceiveMessage answers for a queue that does not exist (deleted, e.g. by
# `deploy.sh teardown`): the query protocol's code, and the JSON protocol's (SQS API
# Reference, ReceiveMessage, Errors: QueueDoesNotExist).
QUEUE_GONE_CODES = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")

logger = logging.getLogger("awsfun.local")


def local_environment(endpoint):
    """Return the environment every local component runs with: fake keys, the endpoint, no IMDS."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def job_from_user_data(user_data):
    """Return the (bucket, key) a rendered user-data script carries; ValueError if none."""
    job = lambda_function.decode_job(user_data)
    return job["BUCKET"], job["KEY"]


def shutdown_calls(log_path):
    """Return the argument lists the emulated `shutdown` was called with."""
    try:
        text = Path(log_path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line.split("\x1f") for line in text.split("\n") if line]


def watchdog_minutes(calls):
    """Return N from the last `shutdown -h +N`, or None."""
    minutes = None
    for args in calls:
        for arg in args:
            if re.fullmatch(r"\+\d+", arg):
                minutes = int(arg[1:])
    return minutes


def halted(calls):
    """True when the machine asked for `shutdown -h now`."""
    return any("now" in args for args in calls)


SHUTDOWN_STUB = """#!/usr/bin/env bash
# Emulated shutdown: record the call, its arguments joined by US (0x1f); local_cloud.py
# terminates the instance. Bash, not Python: every machine calls it twice.
IFS=$'\\x1f'
printf '%s\\n' "$*" >>"$AWSFUN_SHUTDOWN_LOG"
"""


class LocalCloudError(RuntimeError):
    """Start-up cannot go on; the message says what to do (main prints it as it is)."""


def error_code_of(err):
    """Return the AWS error code of an exception (core.error_code), or None when it is no
    ClientError (pure)."""
    return (error_code(err) or None) if isinstance(err, ClientError) else None


def error_line(err):
    """Return one line saying what went wrong in a call: a ClientError's code and message,
    else the exception's text (its type's name when it has none) (pure)."""
    code = error_code_of(err)
    if code is not None:
        message = err.response.get("Error", {}).get("Message") or ""
        return one_line(f"{code}: {message}" if message else code)
    return one_line(str(err) or type(err).__name__)


class FaultLog:
    """What a polling loop tells the person about a fault that lasts: one line when it
    shows or changes, nothing while the same line repeats every poll (a traceback each
    second buried the terminal), and one line when the loop works again.

    `doing` says what failed ("cannot receive from the events queue"); `log` is the logger.
    """

    def __init__(self, log, doing):
        self.log = log
        self.doing = doing
        self.last = None  # the line last logged while the fault lasts; None: no fault

    def failed(self, err, line=None, level=logging.ERROR):
        """Note a failed poll: log `line` (default: `doing`: error_line(err)) unless it is
        the one logged last; return True when it was logged."""
        line = line or f"{self.doing}: {error_line(err)}"
        if line == self.last:
            self.log.debug("%s (again)", line)
            return False
        self.last = line
        self.log.log(level, "%s", line)
        return True

    def succeeded(self, line=None, level=logging.INFO):
        """Note a poll that worked: after a fault, log `line` (default: it works again)."""
        if self.last is not None:
            self.log.log(level, "%s", line or f"{self.doing.replace('cannot ', 'can ', 1)} again")
            self.last = None


class Tracker:
    """Keeps each file's stages and prints one progress line per stage."""

    def __init__(self, quiet=False):
        self.start = time.monotonic()
        self.quiet = quiet
        self.files = {}
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def mark(self, key, name):
        """Record that `key` reached stage `name` without printing it (for timings only)."""
        with self.lock:
            entry = self.files.setdefault(key, {"stages": {}, "instances": []})
            entry["stages"].setdefault(name, time.monotonic() - self.start)

    def stage(self, key, name, detail=""):
        """Record that `key` reached stage `name` and print it."""
        with self.lock:
            entry = self.files.setdefault(key, {"stages": {}, "instances": []})
            elapsed = time.monotonic() - self.start
            entry["stages"].setdefault(name, elapsed)
            if name in ("report", "error", "failed"):
                entry["outcome"] = name
                entry["detail"] = detail
            self.changed.notify_all()
        if not self.quiet:
            # Escaped: a key may hold a tab or an escape sequence; one line per stage.
            print(f"[{elapsed:7.2f}s] {name:<10} {escaped(key)}"
                  f"{'  ' + escaped(detail) if detail else ''}", flush=True)

    def outcome(self, key):
        """Return 'report', 'error', 'failed' or None while the file is in flight."""
        with self.lock:
            return self.files.get(key, {}).get("outcome")

    def wait_for(self, keys, timeout):
        """Block until every key has an outcome or the timeout passes; return the unfinished."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                pending = [k for k in keys if not self.files.get(k, {}).get("outcome")]
                remaining = deadline - time.monotonic()
                if not pending or remaining <= 0:
                    return pending
                self.changed.wait(min(remaining, 1.0))


class LocalCloud:
    """A moto server deployed with deploy.sh, plus the Lambda and EC2 behaviour moto lacks."""

    def __init__(self, workers=None, prefix="local", tracker=None, keep_scratch=False,
                 watchdog_seconds_per_minute=60.0, max_workers=None, spot=False,
                 max_receive_count=None, visibility_seconds=LOCAL_VISIBILITY_SECONDS,
                 warm_python=False, engine="ec2", batch_ready=False):
        self.workers = workers or os.cpu_count() or 2
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
        # deploy.sh --engine: "ec2", an instance per object, or "batch", a Batch job per
        # object on `workers` local vCPUs (local_batch.BatchRunner).
        self.engine = engine
        self.batch = None  # the BatchRunner, engine "batch"
        # Prepare moto's Batch (prepare_batch) under ec2 too, so a redeploy with
        # `deploy.sh --engine batch` against a running `up` works and its jobs run here.
        self.batch_ready = batch_ready
        self.booting = False  # whether boot_instances runs (engine "ec2", at start or since)
        self.moto_batch_config = None  # the moto server's Batch config before this cloud's
        self.region = REGION
        # deploy.sh --max-workers / --spot; None: deploy's default cap.
        self.max_workers = max_workers
        self.spot = spot
        # The events queue's maxReceiveCount here (None: as deployed, a day's worth of tries
        # at the deployed visibility timeout); a fault test takes Lambda's 1 + 2 retries.
        self.max_receive_count = max_receive_count
        self.visibility_seconds = visibility_seconds
        self.deferred = 0  # records the handler deferred (the cap, capacity), over the run
        self.invocations = 0
        # Machines start python3 from local_forkserver's warm interpreter, not cold: for
        # bursts, where the cold start would be most of the CPU (see that module).
        self.warm_python = warm_python
        self.forkserver = None  # the fork server's Popen
        self.forkserver_socket = None
        # Tests compress time: one minute of a machine's `shutdown -h +N` watchdog lasts this long.
        self.watchdog_seconds_per_minute = watchdog_seconds_per_minute
        # Fault injection: called as before_boot(instance_id, key, env) just before a machine
        # runs its user-data, e.g. to change the object or point the machine at a FaultProxy.
        self.before_boot = None
        self.prefix = prefix
        self.tracker = tracker or Tracker()
        self.keep_scratch = keep_scratch
        self.server = None
        self.endpoint = None
        self.names = {}
        self.function_env = {}
        # Settings a test puts over the deployed function's (fault tests: a short watchdog),
        # kept across refresh_function_env as a redeploy would not keep them.
        self.setting_overrides = {}
        self.config_faults = FaultLog(logger, "cannot read the function's configuration "
                                              "(its last one stays)")
        self.queue_url = None
        self.stop_event = threading.Event()
        self.threads = []
        self.pool = None
        self.moto_patches = []  # the functions that undo this cloud's changes to moto
        self.account = None  # moto's account id, read once
        self.booted = {}  # instance id -> ClientToken
        self.tokens = {}  # ClientToken -> first instance id: EC2 launches once per token
        self.processes = {}
        self.machines = {}  # instance id -> {"key", "halt"}: what each booted machine did
        self.scratch_root = Path(tempfile.mkdtemp(prefix="awsfun-local-"))
        self.lock = threading.Lock()
        self.clients = {}
        self.saved_environ = None
        # say(text): tells the person what start-up is doing (the commands: a line on
        # stderr); tests keep it quiet.
        self.say = lambda text: None

    # --- lifecycle --------------------------------------------------------------

    def start(self):
        """Start moto, deploy the stack with deploy.sh, and begin pumping events and booting."""
        try:
            from moto import settings as moto_settings
            from moto.server import ThreadedMotoServer
        except ImportError as err:  # only requirements/deploy.txt or results.txt installed
            self.stop()
            raise LocalCloudError(f"the local cloud needs moto ({err}): python3 -m pip install "
                                  f"-r {REPO / 'requirements.txt'}") from err

        # On each S3 event moto tries to run the deployed Lambda in Docker, and its first try
        # prints a warning about the Docker host to stdout; ask that (cached) question quietly.
        with contextlib.redirect_stdout(io.StringIO()):
            moto_settings.moto_server_host()
        # werkzeug logs each request, through a handler bound to the stderr it first saw: in
        # a test that is pytest's capture, closed by the time a later request logs. main()
        # quiets it further for a person at a terminal.
        if logging.getLogger("werkzeug").level == logging.NOTSET:
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.say("starting the local AWS (a moto server on a loopback port)")
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        # moto keeps its state in module globals shared by every server in this process:
        # start from an empty account, whatever an earlier local cloud left behind.
        self.reset_moto()
        speed_up_moto()
        self.moto_patches = [honour_client_tokens(), stamp_s3_sequencers()]
        self.saved_environ = dict(os.environ)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            os.environ.pop(name, None)
        os.environ.update(local_environment(self.endpoint))
        lambda_function._clients.clear()  # a warm container's clients would reach the old endpoint
        try:
            if self.engine == "batch" or self.batch_ready:
                self.prepare_batch()
            self.say(f"deploying the stack with deploy.sh {shlex.join(self.deploy_arguments())} "
                     f"to {self.endpoint}")
            self.deploy()
            self.take_over_the_event_source()
        except BaseException:
            # Ctrl-C or a failed deploy: __exit__ will not run, so stop the server here.
            self.stop()
            raise
        if self.warm_python:
            self.start_forkserver()
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers, "machine")
        runs = (f"Batch jobs on {plural(self.workers, 'vCPU')}, one job each" if self.engine == "batch"
                else f"up to {plural(self.workers, 'machine')} at once")
        self.say(f"ready: data bucket {self.names['data_bucket']}; this computer runs {runs}")
        self.start_thread(self.pump_events)
        self.follow_engine(self.engine)
        return self

    def start_thread(self, target):
        """Run target() in a daemon thread until stop()."""
        thread = threading.Thread(target=target, daemon=True, name=target.__name__)
        thread.start()
        self.threads.append(thread)

    def prepare_batch(self):
        """Before deploy --engine batch: moto's Batch without Docker, each submitted job held
        RUNNABLE for this cloud to run, and the AWS managed policies deploy attaches, which
        every AWS account has and moto's IAM lacks unless it loads them all; stop() undoes it."""
        self.moto_batch_config = local_batch.set_moto_batch_config(self.endpoint, False)
        self.moto_patches.append(local_batch.hold_submitted_jobs())
        local_batch.add_aws_managed_policies(self.client("sts").get_caller_identity()["Account"])

    def follow_engine(self, engine):
        """Run what the function's ENGINE needs: Batch jobs (enable_batch) or booting
        instances (boot_instances), started once each. A redeploy that switches the engine
        starts the other; what the first started keeps running for the work it has."""
        self.engine = engine
        if engine == "batch" and self.batch is None:
            self.enable_batch()
        elif engine == "ec2" and not self.booting:
            self.booting = True
            self.start_thread(self.boot_instances)

    def enable_batch(self):
        """Play the Batch compute environment: each submitted job run here on the machine
        slots (local_batch.BatchRunner), found in the handler's answers and by a poll of
        moto's jobs."""
        if self.moto_batch_config is None:
            self.prepare_batch()
        self.batch = local_batch.BatchRunner(self)
        self.start_thread(self.batch.poll)
        return self.batch

    def stop(self):
        """Stop pumping, halt running machines and the server, remove scratch space."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=5)
        with self.lock:
            processes = list(self.processes.values())
        for process in processes:
            _kill_group(process)
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.forkserver:
            _kill_group(self.forkserver)
            self.forkserver.wait()
        if self.server:
            self.reset_moto()
            if self.moto_batch_config is not None:
                local_batch.set_moto_batch_config(
                    self.endpoint, self.moto_batch_config.get("use_docker", True))
            self.server.stop()
        while self.moto_patches:
            self.moto_patches.pop()()
        if self.saved_environ is not None:
            os.environ.clear()
            os.environ.update(self.saved_environ)
            lambda_function._clients.clear()
        if not self.keep_scratch:
            shutil.rmtree(self.scratch_root, ignore_errors=True)

    def start_forkserver(self):
        """Start local_forkserver with this interpreter; return once it is warm."""
        self.forkserver_socket = self.scratch_root / "python3.sock"
        self.forkserver = local_forkserver.start(self.forkserver_socket,
                                                 self.scratch_root / "forkserver.log")

    def warm_starts(self):
        """Return how many python3 calls the fork server has taken."""
        if not self.forkserver:
            return 0
        return local_forkserver.served(self.scratch_root / "forkserver.log")

    def reset_moto(self):
        """Empty the emulated account: no bucket, instance or role outlives this local cloud."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def environment(self):
        """Return the environment a process needs to reach this local cloud (e.g. deploy.py reconcile)."""
        return {**os.environ, **local_environment(self.endpoint)}

    def client(self, service):
        """Return this local cloud's boto3 client for `service`, made once: a client costs
        tens of milliseconds to build and is safe to share between threads."""
        import boto3
        from botocore.config import Config

        with self.lock:
            if service not in self.clients:
                self.clients[service] = boto3.client(
                    service, endpoint_url=self.endpoint, region_name=REGION,
                    aws_access_key_id="local", aws_secret_access_key="local",
                    config=Config(retries={"mode": "standard"}, max_pool_connections=50))
            return self.clients[service]

    def deploy_arguments(self):
        """Return deploy.sh's arguments for this cloud's stack: the prefix, `deploy`, and the
        engine's options (--max-workers and --spot under ec2; --engine batch and the local
        vCPUs as --max-vcpus under batch) (pure)."""
        options = (["--max-workers", str(self.max_workers)]
                   if self.max_workers is not None else []) + \
            (["--spot"] if self.spot else []) + \
            (["--engine", "batch", "--max-vcpus", str(self.workers)]
             if self.engine == "batch" else [])
        return ["--prefix", self.prefix, "deploy", *options]

    def deploy(self):
        """Deploy with deploy.sh against the local endpoint and read back what it made."""
        command = ["bash", str(REPO / "deploy.sh"), "--prefix", self.prefix]
        done = subprocess.run(["bash", str(REPO / "deploy.sh"), *self.deploy_arguments()],
                              env=os.environ.copy(), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LocalCloudError(f"deploy.sh failed ({done.returncode}) on the local "
                                  f"endpoint:\n{done.stdout}{done.stderr}".rstrip())
        logger.debug("deploy.sh said:\n%s", done.stdout)
        status = subprocess.run(command + ["status", "--json"], env=os.environ.copy(),
                                capture_output=True, text=True, check=True)
        self.names = json.loads(status.stdout)
        self.function_env = self.read_function_env()

    def read_function_env(self):
        """Return the deployed function's Environment.Variables (GetFunctionConfiguration);
        ClientError when the function is gone."""
        config = self.client("lambda").get_function_configuration(
            FunctionName=self.names["function_name"])
        return config.get("Environment", {}).get("Variables", {})

    def refresh_function_env(self):
        """Take the function's configuration as it is now, as Lambda gives each new
        invocation the configuration of the last successful UpdateFunctionConfiguration
        (Lambda Developer Guide, "Lambda function states": LastUpdateStatus): a redeploy
        against a running `up` (another ENGINE, MAX_WORKERS) applies from the next batch.
        Variables the new configuration dropped leave os.environ; a switch of ENGINE starts
        what the new engine needs (follow_engine). When the read fails, the last one stays."""
        try:
            fresh = self.read_function_env()
        except Exception as err:  # noqa: BLE001 - a failed read keeps the last configuration
            self.config_faults.failed(err)
            return
        self.config_faults.succeeded()
        fresh = {**fresh, **self.setting_overrides}
        for name in set(self.function_env) - set(fresh):
            os.environ.pop(name, None)
        self.function_env = fresh
        engine = (fresh.get("ENGINE") or lambda_function.DEFAULTS["ENGINE"]).strip().lower()
        if engine != self.engine and engine in ENGINES:
            logger.warning("the function's ENGINE is now %s (redeployed): %s", engine,
                           "Batch jobs run here" if engine == "batch" else
                           "instances boot here")
            self.follow_engine(engine)

    def take_over_the_event_source(self):
        """Play Lambda's part of the event source mapping deploy.sh made.

        moto answers each message sent to a mapped queue by trying to run the function in
        Docker and, failing, leaves the message received once more; the mapping stays (status
        and teardown see it), only moto's link from the queue to it is dropped.
        """
        from moto.sqs.models import sqs_backends

        sqs = self.client("sqs")
        self.queue_url = sqs.get_queue_url(QueueName=self.names["events_queue"])["QueueUrl"]
        account = self.client("sts").get_caller_identity()["Account"]
        sqs_backends[account][REGION].queues[self.names["events_queue"]] \
            .lambda_event_source_mappings.clear()
        attributes = sqs.get_queue_attributes(QueueUrl=self.queue_url,
                                              AttributeNames=["RedrivePolicy"])["Attributes"]
        redrive = json.loads(attributes["RedrivePolicy"])
        if self.max_receive_count:
            redrive["maxReceiveCount"] = self.max_receive_count
            sqs.set_queue_attributes(QueueUrl=self.queue_url,
                                     Attributes={"RedrivePolicy": json.dumps(redrive)})
        self.max_receive_count = int(redrive["maxReceiveCount"])

    # --- the Lambda stand-in ----------------------------------------------------

    def pump_events(self):
        """Poll the events queue as Lambda's event source mapping does: batches of up to 10.

        A receive that fails is tried again a second later, its reason logged in one line
        once (FaultLog). A queue that no longer exists (`deploy.sh teardown`) is said once
        and waited for quietly; when a redeploy brings it back, this takes over its event
        source again and goes on."""
        sqs = self.client("sqs")
        faults = FaultLog(logger, "cannot receive from the events queue")
        gone = False
        while not self.stop_event.is_set():
            try:
                if gone:
                    self.take_over_the_event_source()
                messages = sqs.receive_message(
                    QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                    VisibilityTimeout=self.visibility_seconds,
                    AttributeNames=["ApproximateReceiveCount"]).get("Messages", [])
            except Exception as err:  # noqa: BLE001 - keep polling, as Lambda's poller does
                gone = error_code_of(err) in QUEUE_GONE_CODES
                if gone:
                    faults.failed(err, f"the events queue {self.names.get('events_queue', '')} "
                                       "is gone (torn down?): no event is taken until a "
                                       "redeploy brings it back", logging.WARNING)
                else:
                    faults.failed(err)
                self.stop_event.wait(1)  # a lasting fault must not become a busy loop
                continue
            if gone:
                faults.succeeded("the events queue is back (redeployed): taking its events "
                                 "again", logging.WARNING)
                gone = False
            faults.succeeded()
            if messages:
                self.invoke_handler(sqs_event(messages, self.names["events_queue"]))

    def invoke_handler(self, event):
        """Invoke lambda_handler with one SQS batch; delete what it did not list to retry.

        An exception fails the whole batch (every message comes back), as in Lambda.
        """
        # The Lambda's settings as deployed now, and the endpoint in case a test's fixture
        # swapped the environment.
        self.refresh_function_env()
        os.environ.update(self.function_env)
        os.environ.update(local_environment(self.endpoint))
        records = event["Records"]
        self.invocations += 1
        try:
            result = lambda_function.lambda_handler(event, None)
        except Exception as err:  # noqa: BLE001 - Lambda catches everything a handler raises
            logger.warning("handler failed the whole batch: %s", err)
            result = {"launched": [], "skipped": [], "deferred": [], "failed": [],
                      "batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in records]}
        retry = {failure["itemIdentifier"] for failure in result["batchItemFailures"]}
        sqs = self.client("sqs")
        for record in records:
            if record["messageId"] in retry:
                self.note_retry(sqs, record, result)
            else:
                sqs.delete_message(QueueUrl=self.queue_url,
                                   ReceiptHandle=record["receiptHandle"])
        with self.lock:
            self.deferred += len(result.get("deferred", []))
        for entry in result["launched"]:
            self.tracker.stage(entry["key"], "launched",
                               entry.get("instance_id") or entry.get("job_id", ""))
        # Boot at once instead of waiting for the poll: EC2 starts a launched instance at
        # once too, and a Batch job with a free vCPU.
        instance_ids = [e["instance_id"] for e in result["launched"] if e.get("instance_id")]
        if instance_ids:
            self.boot_new_instances(self.client("ec2"), instance_ids)
        if self.batch:
            self.batch.start_jobs([e["job_id"] for e in result["launched"] if e.get("job_id")])
        launched = {entry["key"] for entry in result["launched"]}
        for entry in result["skipped"]:
            # A duplicate of a record launched in the same batch (moto sends two events for
            # one multipart upload) is no failure.
            if entry["key"] and entry["key"] not in launched and \
                    self.tracker.outcome(entry["key"]) is None and "analysis" not in entry["key"]:
                self.tracker.stage(entry["key"], "failed", f"skipped: {entry['reason']}")

    def note_retry(self, sqs, record, result):
        """A message to try again; after its last receive it goes to the dead-letter queue."""
        if int(record["attributes"].get("ApproximateReceiveCount", "1")) < self.max_receive_count:
            return
        # SQS moves it on the next receive (moto does, too): make that the pump's next one.
        sqs.change_message_visibility(QueueUrl=self.queue_url,
                                      ReceiptHandle=record["receiptHandle"], VisibilityTimeout=0)
        failed = {e["key"]: e for e in result.get("failed", []) + result.get("deferred", [])}
        for inner in json.loads(record["body"]).get("Records", []):
            key = _record_key(inner)
            if key is not None and key in failed:
                self.tracker.stage(key, "failed", "launch failed, message sent to the DLQ: "
                                   f"{failed[key].get('code', '')}")

    # --- the EC2 stand-in -------------------------------------------------------

    def boot_instances(self):
        """Watch EC2 for workers launched outside the handler and boot each one."""
        ec2 = self.client("ec2")
        faults = FaultLog(logger, "cannot list the running instances")
        while not self.stop_event.wait(BOOT_POLL_SECONDS):
            try:
                self.boot_new_instances(ec2, self.running_instance_ids())
            except Exception as err:  # noqa: BLE001 - keep watching; the next poll retries
                faults.failed(err)
            else:
                faults.succeeded()

    def running_instance_ids(self):
        """Return the ids of every pending or running instance, read from moto's own state as
        a hypervisor knows its guests. Any EC2 API answer serialises each instance: with the
        ~500 a burst keeps queued, DescribeInstanceStatus cost 0.5 CPU-s a poll, once a second."""
        from moto.ec2.models import ec2_backends

        if self.account is None:
            self.account = self.client("sts").get_caller_identity()["Account"]
        backend = ec2_backends[self.account][REGION]
        return [instance.id for reservation in list(backend.reservations.values())
                for instance in list(reservation.instances)
                if instance.state in ("pending", "running")]

    def boot_new_instances(self, ec2, instance_ids):
        """Boot each awsfun worker among instance_ids not seen before."""
        with self.lock:
            new = [i for i in instance_ids if i not in self.booted]
        for start in range(0, len(new), 100):
            reply = ec2.describe_instances(InstanceIds=new[start:start + 100])
            for reservation in reply["Reservations"]:
                for instance in reservation["Instances"]:
                    tags = {t["Key"] for t in instance.get("Tags", [])}
                    if TOKEN_TAG in tags and instance["State"]["Name"] in ("pending", "running"):
                        self.maybe_boot(ec2, instance)

    def maybe_boot(self, ec2, instance):
        """Boot an instance once (a repeated ClientToken returns the same instance)."""
        instance_id = instance["InstanceId"]
        token = next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == TOKEN_TAG), "")
        with self.lock:
            if instance_id in self.booted:
                return
            self.booted[instance_id] = token
            self.tokens.setdefault(token, instance_id)
        self.pool.submit(self.run_machine, instance_id)

    def run_machine(self, instance_id):
        """Run one instance's user-data with bash until it calls shutdown, then terminate it."""
        ec2 = self.client("ec2")
        raw = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        user_data = base64.b64decode(raw["UserData"]["Value"]).decode("utf-8")
        _, key = job_from_user_data(user_data)
        scratch, calls_log = self.machine_scratch(instance_id)
        script = scratch / "user-data"
        script.write_text(user_data, encoding="utf-8")
        env = self.machine_environment(scratch, calls_log)
        env["AWSFUN_INSTANCE_ID"] = instance_id
        if self.before_boot:
            self.before_boot(instance_id, key, env)
        with self.lock:
            self.machines[instance_id] = {"key": key, "halt": None}
        self.tracker.stage(key, "running", instance_id)
        with open(scratch / "console.log", "wb") as console:
            process = subprocess.Popen(["bash", str(script)], cwd=scratch, env=env,
                                       stdout=console, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            with self.lock:
                self.processes[instance_id] = process
            reason = self.wait_for_machine(process, calls_log)
            with self.lock:
                self.processes.pop(instance_id, None)
                self.machines[instance_id]["halt"] = reason or "exited without shutdown -h now"
        self.record_outcome(key, instance_id, scratch)
        if reason:
            ec2.terminate_instances(InstanceIds=[instance_id])
            self.tracker.stage(key, "terminated", f"{instance_id} ({reason})")
        else:
            self.tracker.stage(key, "stopped?", f"{instance_id} exited without shutdown -h now")
        if not self.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    def machine_scratch(self, name):
        """Make a machine's (an instance's or a Batch job's) scratch folder: bin/ with the
        `shutdown` stub (and the fork server's python3 shim when warm), tmp/; return
        (scratch, the stub's calls log)."""
        scratch = self.scratch_root / name
        (scratch / "bin").mkdir(parents=True)
        (scratch / "tmp").mkdir()
        stub = scratch / "bin" / "shutdown"
        stub.write_text(SHUTDOWN_STUB, encoding="utf-8")
        stub.chmod(0o755)
        if self.forkserver:
            shim = scratch / "bin" / "python3"
            shim.write_text(local_forkserver.shim_text(
                self.forkserver_socket, Path(sys.executable).parent / "python3"), encoding="utf-8")
            shim.chmod(0o755)
        return scratch, scratch / "shutdown.calls"

    def machine_environment(self, scratch, calls_log):
        """Return the environment a machine's script starts with: this process's without
        the Lambda's settings, the local endpoint, scratch/bin first on PATH, TMPDIR in
        scratch, and where the `shutdown` stub records its calls."""
        env = {**os.environ, **local_environment(self.endpoint)}
        env.update({
            "PATH": f"{scratch / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
            "TMPDIR": str(scratch / "tmp"),
            "AWSFUN_SHUTDOWN_LOG": str(calls_log),
        })
        for name in self.function_env:
            env.pop(name, None)  # the Lambda's settings are not the instance's
        return env

    def wait_for_machine(self, process, calls_log):
        """Wait for the user-data to end, enforcing an armed watchdog; return why it halted."""
        started = time.monotonic()
        while True:
            try:
                process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                minutes = watchdog_minutes(shutdown_calls(calls_log))
                if self.stop_event.is_set():
                    _kill_group(process)
                    return "local cloud stopped"
                limit = None if minutes is None else minutes * self.watchdog_seconds_per_minute
                if limit is not None and time.monotonic() - started >= limit:
                    _shut_down_group(process, SHUTDOWN_GRACE_SECONDS)
                    return f"watchdog after {minutes} min"
        return "shutdown -h now" if halted(shutdown_calls(calls_log)) else None

    def record_outcome(self, key, instance_id, scratch):
        """Record whether the machine left a report or an error report for its key."""
        outcome, report = self.fetch_report(key)
        if outcome == "report":
            self.tracker.stage(key, "report", describe_report(report))
        elif outcome == "error":
            self.tracker.stage(key, "error", report.get("error", "error report written"))
        else:
            console = (scratch / "console.log").read_text(errors="replace").strip().splitlines()
            self.tracker.stage(key, "failed", f"{instance_id} left no report; console: "
                               + (console[-1] if console else "(empty)"))

    # --- fault injection (tests) -------------------------------------------------

    @contextlib.contextmanager
    def failing_handler_calls(self, service, operation, code, status=400):
        """Make every `operation` call the handler makes (e.g. ec2 RunInstances) fail with `code`.

        A before-call hook answers instead of the service, so botocore's own retries are
        skipped and each Lambda attempt sees exactly one refusal. Yields the refused calls'
        parameters; the fault is removed when the block ends.
        """
        refused = []

        def refuse(params, **_):
            refused.append(params)
            return (_http_response(status),
                    {"Error": {"Code": code, "Message": f"{code} (injected by the local cloud)"},
                     "ResponseMetadata": {"HTTPStatusCode": status}})

        os.environ.update(local_environment(self.endpoint))
        events = lambda_function.get_client(service).meta.events
        event_name = f"before-call.{service}.{operation}"
        events.register(event_name, refuse, unique_id=f"awsfun-fault-{event_name}")
        try:
            yield refused
        finally:
            events.unregister(event_name, unique_id=f"awsfun-fault-{event_name}")

    # --- what the commands use --------------------------------------------------

    def upload(self, path, key):
        """Upload a local file to the data bucket under `key`."""
        self.tracker.mark(key, "uploading")
        self.client("s3").upload_file(str(path), self.names["data_bucket"], key)
        self.tracker.stage(key, "uploaded", f"{Path(path).stat().st_size:,} bytes")

    def running_machines(self):
        """Return the ids of awsfun workers not ended: the Batch jobs and the instances, of
        each engine this cloud runs."""
        found = self.batch.unfinished() if self.batch else []
        if not self.booting:
            return found
        ec2 = self.client("ec2")
        for page in ec2.get_paginator("describe_instances").paginate(Filters=[
                {"Name": "instance-state-name", "Values": ["pending", "running"]},
                {"Name": "tag-key", "Values": [TOKEN_TAG]}]):
            for reservation in page["Reservations"]:
                found += [i["InstanceId"] for i in reservation["Instances"]]
        return found

    def wait_idle(self, timeout=30):
        """Wait until no worker is running or pending; return those still running."""
        deadline = time.monotonic() + timeout
        while True:
            running = self.running_machines()
            if not running or time.monotonic() >= deadline:
                return running
            time.sleep(0.3)

    def fetch_report(self, key):
        """Return (outcome, report dict) for a key from S3, or (None, None)."""
        s3 = self.client("s3")
        for suffix, outcome in ((".json", "report"), (".error.json", "error")):
            try:
                body = s3.get_object(Bucket=self.names["data_bucket"],
                                     Key=AwsS3.report_key(key, suffix))["Body"]
            except s3.exceptions.NoSuchKey:
                continue
            return outcome, json.loads(body.read())
        return None, None


def honour_client_tokens():
    """Make moto's RunInstances answer a ClientToken already used as EC2 does since January
    2025 (moto ignores the token); return the function that undoes it.

    With the same parameters, the first reservation while its instance is not terminated;
    IdempotentInstanceTerminated once it is; IdempotentParameterMismatch whenever the other
    parameters differ (checked first: which of the two EC2 checks first is not documented,
    and every caller treats a mismatch on an ended instance like a terminated one). The
    local cloud's moto runs in this process, so this reaches every caller: the handler,
    reconcile in a subprocess, the aws CLI.
    """
    from moto.ec2.exceptions import EC2ClientError
    from moto.ec2.models.instances import InstanceBackend

    original = InstanceBackend.run_instances

    def run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        token = kwargs.get("client_token")
        if not token or token == MOTO_NO_TOKEN:
            return original(self, image_id, count, user_data, security_group_names, **kwargs)
        asked = launch_parameters(image_id, count, user_data, security_group_names, kwargs)
        for reservation in self.all_reservations():
            if not any(instance.client_token == token for instance in reservation.instances):
                continue
            if getattr(reservation, "awsfun_parameters", asked) != asked:
                raise EC2ClientError("IdempotentParameterMismatch",
                                     f"Client token {token} was used with other parameters.")
            if all(i.state == "terminated" for i in reservation.instances):
                raise EC2ClientError("IdempotentInstanceTerminated",
                                     f"The instance launched with client token {token} has "
                                     "terminated.")
            return reservation
        reservation = original(self, image_id, count, user_data, security_group_names, **kwargs)
        reservation.awsfun_parameters = asked
        return reservation

    InstanceBackend.run_instances = run_instances

    def restore():
        InstanceBackend.run_instances = original

    return restore


def stamp_s3_sequencers():
    """Give every S3 event record a `sequencer`, as S3 does (moto sends none); return the undo.

    S3 gives each write of an object its own sequencer (two PUTs of the same bytes differ),
    and a duplicate delivery of one event the same one. A write here is moto's key object,
    so the Put and CompleteMultipartUpload events moto sends for one multipart upload (S3
    sends one) share theirs. Hex, increasing, like S3's.
    """
    import itertools

    from moto.s3 import notifications

    original = notifications._get_s3_event
    numbers = itertools.count(1)
    lock = threading.Lock()

    def get_s3_event(event_name, bucket, key, notification_id):
        event = original(event_name, bucket, key, notification_id)
        with lock:
            if not hasattr(key, "awsfun_sequencer"):
                key.awsfun_sequencer = f"{int(time.time()):010X}{next(numbers):08X}"
        for record in event["Records"]:
            record["s3"]["object"].setdefault("sequencer", key.awsfun_sequencer)
        return event

    notifications._get_s3_event = get_s3_event

    def restore():
        notifications._get_s3_event = original

    return restore


def sqs_event(messages, queue_name):
    """Return the event Lambda's event source mapping makes of received SQS messages (pure)."""
    return {"Records": [{
        "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
        "attributes": m.get("Attributes", {}), "messageAttributes": {},
        "md5OfBody": m.get("MD5OfBody", ""), "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{REGION}:000000000000:{queue_name}",
        "awsRegion": REGION} for m in messages]}


def speed_up_moto():
    """Replace five of moto's hot spots with the same answers computed once; idempotent.

    Each is a stand-in cost, not AWS behaviour; the first three were a third of a burst's
    local-cloud CPU:
    - ReceiveMessage checks each message's retention by computing every attribute of the
      queue, and ApproximateNumberOfMessages walks all its messages: O(depth) per message
      handed out. A 500-file burst queues about a thousand S3 events (inputs, reports, logs).
      The rule stays AWS's MessageRetentionPeriod counted from SentTimestamp, read directly.
    - The server lists moto's package directory (a listdir and ~180 stats) on every request
      to route it; the directory does not change while it runs.
    - S3 reloads its URL module twice a request, in case MOTO_S3_CUSTOM_ENDPOINTS changed;
      it now reloads when that variable did.
    - An EC2 resource finds its own tags by matching its id, as a pattern, against every
      tag of every resource: a DescribeInstances filtered by tag was O(instances x tags),
      0.5 s with 300 ended instances, once per handler invocation under a cap. It now
      reads its own entry of the same table.
    - DescribeInstances checks filters in the order the request lists them; the handler's
      count lists the tag first, so each ended instance was rejected only after a pattern
      match of its tags. Attribute filters (the state) now come first: the same AND of the
      same filters, which EC2 does not document as ordered either.
    """
    import importlib

    import moto.ec2.utils
    import moto.s3.urls
    from moto import backends
    from moto.core.utils import unix_time
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix
    from moto.s3.models import S3Backend
    from moto.sqs.models import SQSBackend

    if getattr(backends, "awsfun_faster", False):
        return
    loaded_for = [os.environ.get("MOTO_S3_CUSTOM_ENDPOINTS")]

    def s3_url_module(self):
        if os.environ.get("MOTO_S3_CUSTOM_ENDPOINTS") != loaded_for[0]:
            loaded_for[0] = os.environ.get("MOTO_S3_CUSTOM_ENDPOINTS")
            importlib.reload(moto.s3.urls)
        return moto.s3.urls

    S3Backend._url_module = property(s3_url_module)

    def is_message_valid_based_on_retention_period(self, queue_name, message):
        retention = int(self.get_queue(queue_name).message_retention_period)
        return retention + message.sent_timestamp / 1000 > unix_time()

    SQSBackend.is_message_valid_based_on_retention_period = is_message_valid_based_on_retention_period

    def get_tags(self):
        # describe_tags(filters={"resource-id": [id]})'s answer: ids hold no wildcard.
        tags = self.ec2_backend.tags.get(self.id, {}) if self.id else {}
        kind = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "") if tags else ""
        return [{"resource_id": self.id, "key": key, "value": value, "resource_type": kind}
                for key, value in tags.items()]

    TaggedEC2Resource.get_tags = get_tags
    passes_filter_dict = moto.ec2.utils.passes_filter_dict

    def attributes_first(instance, filter_dict):
        return passes_filter_dict(instance, dict(sorted(
            filter_dict.items(), key=lambda item: moto.ec2.utils.is_tag_filter(item[0]))))

    moto.ec2.utils.passes_filter_dict = attributes_first
    modules = tuple(backends.list_of_moto_modules())
    backends.list_of_moto_modules = lambda: modules
    backends.awsfun_faster = True


def launch_parameters(image_id, count, user_data, security_group_names, kwargs):
    """Return one RunInstances request's parameters but its ClientToken, comparable (pure)."""
    fields = dict(kwargs, image_id=image_id, count=count, user_data=user_data,
                  security_group_names=security_group_names)
    fields.pop("client_token", None)
    return json.dumps(fields, sort_keys=True, default=str)


def _http_response(status):
    from botocore.awsrequest import AWSResponse

    return AWSResponse(None, status, {}, None)


class FaultProxy:
    """An HTTP proxy in front of the moto server that refuses chosen requests.

    Point one machine's AWS_ENDPOINT_URL at it (LocalCloud.before_boot) to deny, say, the
    PutObject of one report: moto enforces no bucket policy, and its IAM checks would refuse
    the local cloud's own calls too. refuse(method, path) returns (status, code) or None;
    throttle(method, path) returns the bytes per second to send a reply's body at, or None
    (a slow network, so a test can act while a worker is mid-stream). `sent` counts the body
    bytes sent per path.
    """

    def __init__(self, upstream, refuse=lambda method, path: None,
                 throttle=lambda method, path: None):
        import http.server
        import urllib.parse

        self.upstream = urllib.parse.urlsplit(upstream)
        self.refused = []
        self.sent = {}
        self.lock = threading.Lock()
        self.throttle = throttle
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # the test output is not the place for access logs
                pass

            def handle_request(self):
                proxy.forward(self, refuse)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_request

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fault-proxy").start()

    def forward(self, request, refuse):
        """Answer one request: refused with an S3-style error, or passed on to moto."""
        import http.client
        import urllib.parse

        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        verdict = refuse(request.command, urllib.parse.unquote(request.path.split("?")[0]))
        if verdict:
            status, code = verdict
            self.refused.append((request.command, request.path))
            payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                       f"<Message>{code} (injected by FaultProxy)</Message></Error>").encode()
            request.send_response(status)
            request.send_header("Content-Type", "application/xml")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            if request.command != "HEAD":
                request.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
            headers["Host"] = self.upstream.netloc
            upstream.request(request.command, request.path, body=body, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
            request.send_response(reply.status, reply.reason)
            # A HEAD reply keeps moto's Content-Length: it is the object's size, with no body.
            dropped = ("transfer-encoding", "connection", "server", "date") + (
                () if request.command == "HEAD" else ("content-length",))
            for name, value in reply.getheaders():
                if name.lower() not in dropped:
                    request.send_header(name, value)
            if request.command != "HEAD":
                request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            if request.command != "HEAD":
                self.send_body(request, data)
        finally:
            upstream.close()

    def send_body(self, request, data, chunk=64 * 1024):
        """Send a reply's body, as slowly as `throttle` says; stop if the client went away."""
        import urllib.parse

        path = urllib.parse.unquote(request.path.split("?")[0])
        rate = self.throttle(request.command, path)
        for start in range(0, len(data), chunk):
            try:
                request.wfile.write(data[start:start + chunk])
            except (BrokenPipeError, ConnectionResetError):
                return
            with self.lock:
                self.sent[path] = self.sent.get(path, 0) + len(data[start:start + chunk])
            if rate:
                time.sleep(chunk / rate)

    def close(self):
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


def _record_key(record):
    from urllib.parse import unquote_plus

    try:
        return unquote_plus(record["s3"]["object"]["key"])
    except (KeyError, TypeError):
        return None


def session_processes(session_id):
    """Return the pids in a session: a machine's processes, as its cgroup would hold them.

    A process group is not enough: `timeout` moves the worker into a group of its own.
    """
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id:
            pids.append(int(stat.parent.name))
    return pids


def _signal_machine(process, sig):
    """Send `sig` to every process of a machine (its session; its group where /proc is absent)."""
    pids = session_processes(process.pid) if Path("/proc/self/stat").exists() else []
    if not pids:
        pids = [-process.pid]  # a negative pid signals the process group
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_group(process):
    _signal_machine(process, signal.SIGKILL)


def _shut_down_group(process, grace):
    """Stop a machine's processes as an OS shutdown does: SIGTERM, then SIGKILL after `grace` s."""
    _signal_machine(process, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        logger.warning("machine ignored SIGTERM for %ss; killing it", grace)
    _kill_group(process)


def describe_report(report):
    """Return a one-line, human summary of a report."""
    summary = report.get("summary") or {}
    fmt = report.get("format", "?")
    picks = {
        "fastq": ("reads", "bases", "gc_percent", "mean_quality"),
        "vcf": ("samples", "records", "snvs", "indels", "ts_tv_ratio"),
        "csv": ("rows", "columns"),
        "tsv": ("rows", "columns"),
    }.get(fmt, ())
    parts = [f"{name}={summary[name]}" for name in picks if name in summary]
    comp = f"{report['compression']}+" if report.get("compression") else ""
    return f"{comp}{fmt}, {report.get('lines', '?')} lines" + (f", {', '.join(parts)}" if parts else "")


def object_key(prefix, path, root=None):
    """Return the data-bucket key a local file is uploaded to: PREFIX/ then its path below
    the folder `root` it was found in (so runs/a/R1.fastq.gz and runs/b/R1.fastq.gz stay two
    inputs), or its name when it was given as a file (pure)."""
    name = Path(path).relative_to(root).as_posix() if root is not None else Path(path).name
    return f"{prefix.strip('/')}/{name}" if prefix.strip("/") else name


def usage_error(text):
    """End with one line on stderr and status 2, as argparse does for a bad option: the
    person's input is to change, nothing was started."""
    print(f"local_cloud.py: {text}", file=sys.stderr)
    raise SystemExit(2)


def files_below(folder):
    """Return the files under `folder`, recursively, sorted, skipping hidden files and
    folders (a name starting with "."), as `aws s3 sync --exclude '.*'` would be asked to;
    symbolic links to folders are not followed (os.walk's default), so no loop."""
    found = []
    for here, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        found += [Path(here) / name for name in sorted(files) if not name.startswith(".")]
    return found


def input_keys(prefix, arguments):
    """Return {key: path} for FILE and FOLDER arguments (folders recursively, object_key);
    usage_error when an argument is neither, a folder holds no file, or two
    files would share a key."""
    keys = {}
    missing = [str(a) for a in arguments if not Path(a).is_file() and not Path(a).is_dir()]
    if missing:
        usage_error(f"not a file or folder: {', '.join(missing)}")
    for argument in arguments:
        if Path(argument).is_dir():
            found = [(path, object_key(prefix, path, argument)) for path in files_below(argument)]
            if not found:
                usage_error(f"no file (hidden ones are skipped) in {argument}")
        else:
            found = [(Path(argument), object_key(prefix, argument))]
        for path, key in found:
            if key in keys:
                usage_error(f"two files would share the key {key!r}: "
                                 f"{keys[key]} and {path}")
            keys[key] = path
    return keys


def process_files(cloud, paths, prefix, timeout):
    """Upload files (a list of files and folders, or {key: path} from input_keys) through
    the local cloud and wait for each outcome; return {key: outcome}."""
    keys = paths if isinstance(paths, dict) else input_keys(prefix, paths)
    for key, path in keys.items():
        cloud.upload(path, key)
    pending = cloud.tracker.wait_for(list(keys), timeout)
    for key in pending:
        cloud.tracker.stage(key, "failed", f"no report after {timeout}s")
    return {key: cloud.tracker.outcome(key) for key in keys}


def save_reports(cloud, keys, out_dir):
    """Copy the reports, error reports and logs into out_dir as `./deploy.sh results` does,
    and write summary.csv and index.html there; return the paths of `keys`' reports."""
    outcome = results.fetch_results(cloud.client("s3"), cloud.names["data_bucket"], out_dir,
                                    prune=False)
    results.write_outputs(out_dir, outcome["manifest"], title="awsfun local cloud results")
    wanted = {AwsS3.report_key(key, suffix) for key in keys for suffix in (".json", ".error.json")}
    return [Path(out_dir) / entry["path"] for object_key, entry in outcome["manifest"].items()
            if object_key in wanted]


FILE_COLUMN = 40


def table_names(keys, width=FILE_COLUMN):
    """Return {key: how the table shows it}: escaped, cut in the middle to `width` (the
    folder's start and the name's end, R1/R2 and the suffix, both stay), and shown whole
    wherever a cut would make two keys look the same (pure)."""
    shown = {key: middle_cut(escaped(key), width) for key in keys}
    seen = {}
    for name in shown.values():
        seen[name] = seen.get(name, 0) + 1
    return {key: name if seen[name] == 1 else escaped(key) for key, name in shown.items()}


def print_table(cloud, outcomes):
    """Print one row per file: outcome, timings and the report's summary."""
    names = table_names(outcomes)
    width = max([FILE_COLUMN] + [len(name) for name in names.values()])
    print(f"\n{'file':<{width}} {'outcome':<8} {'upload':>7} {'launch':>7} {'worker':>7} "
          f"{'total':>7}  summary")
    for key, outcome in outcomes.items():
        stages = cloud.tracker.files.get(key, {}).get("stages", {})
        up = stages.get("uploaded", 0.0)
        upload = up - stages.get("uploading", up)
        # launch: event delivery, the handler and the boot, up to the user-data starting.
        launch = stages.get("running", stages.get("launched", up)) - up
        end = stages.get(outcome or "", stages.get("failed", up))
        # worker: the user-data's whole run, the report's upload included.
        worker = end - stages.get("running", end)
        detail = cloud.tracker.files.get(key, {}).get("detail", "")
        print(f"{names[key]:<{width}} {outcome or '?':<8} {upload:6.2f}s {launch:6.2f}s "
              f"{worker:6.2f}s {upload + end - up:6.2f}s  {escaped(detail)}")


def finish(cloud, outcomes, out_dir):
    """Save reports, print the table, and return the exit status."""
    saved = save_reports(cloud, outcomes, out_dir)
    still_running = cloud.wait_idle()
    print_table(cloud, outcomes)
    failed = [key for key, outcome in outcomes.items() if outcome != "report"]
    print(f"\n{len(outcomes) - len(failed)} of {plural(len(outcomes), 'file')} reported; "
          f"{plural(len(saved), 'report')} saved to {out_dir}; machines still running: "
          f"{len(still_running)}")
    print(f"summary: {Path(out_dir) / results.SUMMARY_CSV}; page: {Path(out_dir) / results.INDEX_HTML}")
    return 1 if failed or still_running else 0


def say(text):
    """Print one start-up or progress line for the person, on stderr (stdout keeps the table)."""
    print(f"local_cloud.py: {text}", file=sys.stderr, flush=True)


def check_inputs(keys):
    """usage_error when the handler would skip a key (it contains
    SKIP_SUBSTRING, the reports' "analysis": should_process), so nothing would come back."""
    skip = lambda_function.DEFAULTS["SKIP_SUBSTRING"]
    skipped = [key for key in keys if skip in key]
    if skipped:
        usage_error(f"the pipeline skips keys containing {skip!r} (its "
                         f"reports' folder): {escaped(skipped[0])}"
                         + (f" and {len(skipped) - 1} more" if len(skipped) > 1 else "")
                         + "; rename the folder or choose another --prefix")


def check_out(out):
    """usage_error when --out cannot be the reports' folder (a file is in the
    way, or the nearest existing folder above it is not writable)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        usage_error(f"--out {out}: a file, not a folder")
    existing = next(parent for parent in [path, *path.absolute().parents] if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        usage_error(f"--out {out}: cannot write in {existing}")


def start_cloud(args, **options):
    """Return a LocalCloud for a command's options that tells the person what it is doing."""
    cloud = LocalCloud(workers=args.workers, engine=args.engine, **options)
    cloud.say = say
    return cloud


def command_run(args):
    """`run`: process the given files and folders."""
    keys = input_keys(args.prefix, args.files)
    check_inputs(keys)
    check_out(args.out)
    with start_cloud(args, tracker=Tracker(quiet=args.quiet), max_workers=args.max_workers,
                     spot=args.spot) as cloud:
        say(f"uploading {plural(len(keys), 'file')} to s3://{cloud.names['data_bucket']}/"
            f"{args.prefix.strip('/')}")
        outcomes = process_files(cloud, keys, args.prefix, args.timeout)
        return finish(cloud, outcomes, args.out)


def command_demo(args):
    """`demo`: process the shipped samples."""
    check_out(args.out)
    files = sorted(p for p in SAMPLES.iterdir() if p.is_file())
    print(f"awsfun local demo: {plural(len(files), 'sample file')}, a local stand-in for AWS, "
          "no account needed\n")
    with start_cloud(args) as cloud:
        print(f"deployed locally: data bucket {cloud.names['data_bucket']}, "
              f"{runs_on(cloud.engine, cloud.function_env)}\n")
        outcomes = process_files(cloud, files, "demo", args.timeout)
        return finish(cloud, outcomes, args.out)


def runs_on(engine, function_env):
    """Return what the function's work runs on, for a banner: the Batch job queue under
    engine "batch", else the launch template (pure)."""
    if engine == "batch":
        return f"Batch job queue {function_env.get('JOB_QUEUE')}"
    return f"launch template {function_env.get('LAUNCH_TEMPLATE')}"


def up_instructions(endpoint, names, prefix, region=REGION, engine="ec2", function_env=None):
    """Return what `up` prints: the names (the job queue under engine "batch", the launch
    template under "ec2"), and commands a person can paste as they are into another shell:
    the environment the AWS CLI and deploy.sh need for this endpoint, and deploy.sh with the
    --prefix that finds this stack (pure)."""
    bucket = names["data_bucket"]
    environment = " ".join(f"{name}={shlex.quote(value)}" for name, value in (
        ("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"), ("AWS_DEFAULT_REGION", region)))
    deploy_sh = shlex.quote(str(REPO / "deploy.sh"))
    sample = shlex.quote(str(SAMPLES / "calls.vcf"))
    # This virtual environment, so `results` finds jinja2 and plotly there too.
    script = Path(sys.prefix) / "bin" / "activate"
    activate = (f"  . {shlex.quote(str(script))}\n"
                if sys.prefix != sys.base_prefix and script.is_file() else "")
    return f"""local cloud is up (Ctrl-C stops it)
  endpoint         {endpoint}
  data bucket      {bucket}
  software bucket  {names['software_bucket']}
  Lambda function  {names['function_name']} (run in this process)
  runs on          {runs_on(engine, function_env or {})} (run in this process)

In another shell (the AWS CLI, boto3 and deploy.sh read these):
{activate}  unset AWS_PROFILE AWS_SESSION_TOKEN
  export {environment}
  aws s3 cp {sample} s3://{bucket}/incoming/calls.vcf
  aws s3 cp s3://{bucket}/analysis/incoming/calls.vcf.json -
  {deploy_sh} status --prefix {shlex.quote(prefix)}
  {deploy_sh} results --prefix {shlex.quote(prefix)}
  {deploy_sh} logs --prefix {shlex.quote(prefix)} incoming/calls.vcf
"""


def command_up(args):
    """`up`: keep the local cloud running until Ctrl-C."""
    # batch_ready: a redeploy from another shell may switch the engine to batch.
    with start_cloud(args, max_workers=args.max_workers, spot=args.spot,
                     batch_ready=True) as cloud:
        print(up_instructions(cloud.endpoint, cloud.names, cloud.prefix, engine=cloud.engine,
                              function_env=cloud.function_env), flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nstopping the local cloud", flush=True)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def positive_seconds(text):
    """argparse type of --timeout: a number of seconds > 0 (not nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: a number of seconds > 0")
    return value


def engine_option_conflict(args):
    """Return the one-line mistake in options the chosen --engine would ignore, or None
    (pure): under --engine batch the handler reads neither MAX_WORKERS nor SPOT (the compute
    environment's maxvCpus, here --workers, bounds the jobs), so --max-workers and --spot
    would be silently dropped."""
    if getattr(args, "engine", None) != "batch":
        return None
    for option, given in (("--max-workers", getattr(args, "max_workers", None) is not None),
                          ("--spot", getattr(args, "spot", False))):
        if given:
            return (f"argument {option}: applies to --engine ec2 only (under --engine batch, "
                    "--workers sets the local vCPUs)")
    return None


class LocalCloudParser(OneLineParser):
    """OneLineParser that also refuses a combination of options (engine_option_conflict),
    in the same one line and status 2; its subcommands' parsers are of this class too."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        mistake = engine_option_conflict(namespace)
        if mistake:
            self.error(mistake)
        return namespace, rest


def build_parser():
    """Return the command-line parser."""
    parser = LocalCloudParser(
        description="Run the awsfun pipeline on this machine, with moto standing in for AWS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback as well as the reason")
    commands = parser.add_subparsers(dest="command", required=True)

    def engine(sub):
        sub.add_argument("--engine", choices=ENGINES, default="ec2",
                         help="deploy.sh --engine: ec2, one instance per file (default), or "
                              "batch, one AWS Batch job per file, --workers local vCPUs "
                              "running the jobs (deploy.sh --max-vcpus)")

    def common(sub):
        sub.add_argument("--workers", type=positive_int, default=None,
                         help="machines (batch: vCPUs, one job each) running at once "
                              "(default: the number of cores)")
        engine(sub)
        sub.add_argument("--timeout", type=positive_seconds, default=600,
                         help="seconds to wait for every report (default 600)")
        sub.add_argument("--out", default="analysis-out",
                         help="folder the reports are copied to (default ./analysis-out)")

    def capacity(sub):
        sub.add_argument("--max-workers", type=positive_int, default=None, metavar="N",
                         help="--engine ec2 only: deploy.sh --max-workers, at most N instances "
                              "at once, the rest wait in the events queue (default: "
                              "deploy's, 16)")
        sub.add_argument("--spot", action="store_true",
                         help="--engine ec2 only: deploy.sh --spot (the local EC2 never "
                              "refuses spot)")

    def debug(sub):  # --debug after the command too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)

    demo = commands.add_parser("demo", help="process the sample files in samples/")
    debug(demo)
    common(demo)
    demo.set_defaults(func=command_demo)
    run = commands.add_parser("run", help="process files and folders (recursively, hidden "
                              "files skipped) and copy their reports to --out")
    run.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER",
                     help="a file (key: PREFIX/NAME) or a folder (keys: PREFIX/ its files' "
                          "paths below it)")
    run.add_argument("--prefix", default="incoming", help="key prefix in the data bucket")
    debug(run)
    run.add_argument("--quiet", action="store_true", help="only the summary table")
    common(run)
    capacity(run)
    run.set_defaults(func=command_run)
    up = commands.add_parser("up", help="keep a local cloud running for the aws CLI")
    debug(up)
    up.add_argument("--workers", type=positive_int, default=None,
                    help="machines (batch: vCPUs, one job each) running at once "
                         "(default: the number of cores)")
    engine(up)
    capacity(up)
    up.set_defaults(func=command_up)
    return parser


def main(argv=None):
    """Command-line entry point."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # lambda_function sets the root logger to INFO, as the Lambda runtime expects.
    logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # moto answers an action it lacks (GetEbsDefaultKmsKeyId, which deploy asks and copes
    # without) with a 500, and werkzeug logs that as an ERROR with moto's traceback.
    logging.getLogger("werkzeug").setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    # moto tries to run the deployed Lambda in Docker on every S3 event and logs each failure;
    # here the handler runs in-process instead, so those errors say nothing.
    logging.getLogger("moto.awslambda").setLevel(logging.CRITICAL)
    # A terminated local cloud cleans up like an interrupted one: no server or machine left.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted; the local cloud is stopped", file=sys.stderr)
        return 130
    except LocalCloudError as err:
        if args.debug:
            traceback.print_exc()
        print(f"local_cloud.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
