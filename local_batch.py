"""The local cloud's AWS Batch stand-in: run each submitted job on this machine.

moto emulates the Batch API without Docker when its server is told
`{"batch": {"use_docker": false}}` (POST /moto-api/config; moto.batch.responses picks
moto.batch_simple then), but that backend marks every job SUCCEEDED inside SubmitJob and runs
nothing. Here, as a compute environment would, the local cloud keeps each submitted job
RUNNABLE (hold_submitted_jobs) and BatchRunner runs it: the job definition's command (for
awsfun `bash -c SCRIPT`, lambda_function.batch_job_script) with the job's environment (the
definition's, overlaid by containerOverrides.environment), AWS_BATCH_JOB_ID,
AWS_BATCH_JOB_ATTEMPT and AWS_BATCH_JQ_NAME, at most `slots` jobs at once (each awsfun job
asks 1 vCPU; the slots are the local vCPUs). The job then ends SUCCEEDED or FAILED by its
exit code, as Batch reports it (AWS Batch User Guide, "Job states").
"""

import base64
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import urllib.request

import lambda_function

logger = logging.getLogger("awsfun.local.batch")

# Jobs the handler submitted start at once (LocalCloud.invoke_handler); this poll only finds
# those submitted by anyone else (reconcile, the aws CLI), so it can be slow and cheap.
JOB_POLL_SECONDS = 1.0
# What ECS gives a container between SIGTERM and SIGKILL when Batch stops it at its
# attemptDurationSeconds (ECS Developer Guide, stopTimeout: 30 s by default).
STOP_TIMEOUT_SECONDS = 30
FINAL_STATES = ("SUCCEEDED", "FAILED")
# AWS managed policies deploy --engine batch attaches (the Batch instances' role); moto's IAM
# holds them only when it loads all ~1,000 (MOTO_IAM_LOAD_MANAGED_POLICIES), slowly.
AWS_MANAGED_POLICIES = ("AmazonEC2ContainerServiceforEC2Role",)


def set_moto_batch_config(endpoint, use_docker):
    """Tell the moto server at `endpoint` whether Batch jobs need Docker; return the Batch
    config it held before ({"use_docker": bool}). moto's POST /moto-api/config sets a
    process-wide default (moto.core.config.default_user_config), so restore it after."""
    def call(body=None):
        request = urllib.request.Request(
            f"{endpoint}/moto-api/config", method="POST" if body else "GET",
            data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.loads(reply.read())

    before = call()["batch"]
    call({"batch": {"use_docker": use_docker}})
    return before


def hold_submitted_jobs():
    """Make moto's Docker-less Batch keep a submitted job RUNNABLE instead of marking it
    SUCCEEDED at once (moto.batch_simple), and show an ended job's exit code in DescribeJobs'
    container.exitCode as Batch does (moto's describe drops it for container jobs); return
    the function that undoes both.

    The job is stored in the backend as moto stores it; BatchRunner moves it on.
    """
    from moto.batch.models import Job
    from moto.batch_simple.models import BatchSimpleBackend

    original = BatchSimpleBackend._mark_job_as_finished
    original_details = Job._container_details

    def keep_runnable(self, include_start_attempt, job):
        self.backend._jobs[job.job_id] = job
        job.status = "RUNNABLE"

    def container_details(self):
        details = original_details(self)
        if self.job_stopped and self.exit_code is not None:
            details["exitCode"] = self.exit_code
        return details

    BatchSimpleBackend._mark_job_as_finished = keep_runnable
    Job._container_details = container_details

    def restore():
        BatchSimpleBackend._mark_job_as_finished = original
        Job._container_details = original_details

    return restore


@functools.cache
def moto_managed_policy(name):
    """Return moto's copy of the AWS managed policy `name` (parsed once: 1 MB of JSON)."""
    from moto.iam.models import aws_managed_policies_data

    return json.loads(aws_managed_policies_data)[name]


def add_aws_managed_policies(account, names=AWS_MANAGED_POLICIES, partition="aws"):
    """Put AWS managed policies `names` into moto's IAM for `account`, from moto's own copy
    of them, as every AWS account has them (arn:aws:iam::aws:policy/...); KeyError for a
    name moto does not know."""
    from moto.iam.models import AWSManagedPolicy, iam_backends

    backend = iam_backends[account][partition]
    for name in names:
        policy = AWSManagedPolicy.from_data(name, account, "us-east-1",
                                            moto_managed_policy(name))
        backend.managed_policies.setdefault(policy.arn, policy)


def job_environment(definition_environment, override_environment):
    """Return {name: value} of a job: the job definition's containerProperties.environment
    overlaid by SubmitJob's containerOverrides.environment (pure; AWS Batch API Reference,
    ContainerOverrides.environment: "adds to or replaces the environment variables from the
    job definition")."""
    merged = {entry["name"]: entry["value"] for entry in definition_environment or []}
    merged.update({entry["name"]: entry["value"] for entry in override_environment or []})
    return merged


def job_key(environment):
    """Return the object key an awsfun job's environment carries (JOB_FIELDS_B64), or None
    for a job that carries none (pure)."""
    encoded = environment.get("JOB_FIELDS_B64")
    if not encoded:
        return None
    try:
        fields = base64.b64decode(encoded, validate=True).split(b"\0")
        return dict(zip(lambda_function.JOB_FIELDS, fields))["KEY"].decode("utf-8")
    except (ValueError, KeyError):
        return None


def attempt_seconds(*timeouts):
    """Return the first attemptDurationSeconds among timeout dicts (the job's before the
    definition's, as SubmitJob's timeout overrides the definition's), or None (pure)."""
    for timeout in timeouts:
        if timeout and timeout.get("attemptDurationSeconds"):
            return int(timeout["attemptDurationSeconds"])
    return None


class BatchRunner:
    """Runs the cloud's Batch jobs on its machine slots; one run per job id.

    `cloud` is the LocalCloud (its moto server in this process, its pool of `workers` slots,
    its tracker and scratch space). `jobs` records each job run: {job id: {"key", "queue",
    "exit_code", "status", "shutdown_calls"}}; `peak` is the most jobs that ran at once.
    """

    def __init__(self, cloud):
        self.cloud = cloud
        self.lock = threading.Lock()
        self.jobs = {}
        self.definitions = {}  # job definition ARN (its revision in it) -> the definition
        self.definitions_lock = threading.Lock()
        self.definition_reads = 0
        self.running = 0
        self.peak = 0
        self.account = None
        self.stop_timeout = STOP_TIMEOUT_SECONDS

    # --- finding jobs -------------------------------------------------------------

    def backend(self):
        """Return moto's Batch backend for the cloud's account, in this process."""
        from moto.batch.models import batch_backends

        if self.account is None:
            self.account = self.cloud.client("sts").get_caller_identity()["Account"]
        return batch_backends[self.account][self.cloud.region]

    def runnable_job_ids(self):
        """Return the ids of jobs moto holds RUNNABLE, oldest first: the queue a compute
        environment takes work from (read in-process, as running_instance_ids reads EC2)."""
        jobs = list(self.backend()._jobs.values())
        return [job.job_id for job in sorted(jobs, key=lambda job: job.job_created_at)
                if job.status == "RUNNABLE" and not job._child_jobs]

    def poll(self):
        """Until the cloud stops, start each RUNNABLE job not seen before, every second; a
        poll that fails is logged in one line, once while the same fault lasts."""
        from local_cloud import FaultLog

        faults = FaultLog(logger, "cannot list the Batch jobs")
        while not self.cloud.stop_event.wait(JOB_POLL_SECONDS):
            try:
                self.start_jobs(self.runnable_job_ids())
            except Exception as err:  # noqa: BLE001 - keep watching; the next poll retries
                faults.failed(err)
            else:
                faults.succeeded()

    def start_jobs(self, job_ids):
        """Queue each job id not seen before on the cloud's slots; return those queued."""
        with self.lock:
            new = [job_id for job_id in dict.fromkeys(job_ids) if job_id not in self.jobs]
            for job_id in new:
                self.jobs[job_id] = {"key": None, "queue": None, "exit_code": None,
                                     "status": "RUNNABLE", "shutdown_calls": []}
        for job_id in new:
            self.cloud.pool.submit(self.run_job, job_id)
        return new

    def definition(self, arn):
        """Return a job definition by its ARN: DescribeJobDefinitions once per ARN (an ARN
        names one revision, and a revision never changes), then from this cache."""
        # Its own lock, held over the read: the slots' first jobs all ask at once.
        with self.definitions_lock:
            known = self.definitions.get(arn)
            if known is None:
                found = self.cloud.client("batch").describe_job_definitions(
                    jobDefinitions=[arn])["jobDefinitions"]
                if not found:
                    raise LookupError(f"no job definition {arn}")
                known = self.definitions[arn] = found[0]
                self.definition_reads += 1
        return known

    # --- running a job --------------------------------------------------------------

    def run_job(self, job_id):
        """Run one job to its end and record its outcome; a job that cannot start (moto does
        not hold it, its definition is gone) is logged and marked FAILED."""
        try:
            self._run_job(job_id)
        except Exception:  # noqa: BLE001 - one job's failure must not stop the slot
            logger.exception("job %s could not run", job_id)
            job = self.backend()._jobs.get(job_id)
            if job is not None:
                job._mark_stopped(success=False)

    def _run_job(self, job_id):
        from local_cloud import _kill_group, local_environment, shutdown_calls

        cloud = self.cloud
        job = self.backend()._jobs[job_id]
        definition = self.definition(job.job_definition.arn)
        container = definition.get("containerProperties") or {}
        overrides = dict(job.container_overrides or {})
        command = list(overrides.get("command") or container.get("command") or [])
        # A copy: moto's DescribeJobs appends to the overrides' list it describes.
        environment = job_environment(container.get("environment"),
                                      list(overrides.get("environment") or []))
        key = job_key(environment) or f"(batch job {job_id})"
        queue = job.job_queue.name
        with self.lock:
            self.jobs[job_id].update(key=key, queue=queue)
        scratch, calls_log = cloud.machine_scratch(job_id)
        env = cloud.machine_environment(scratch, calls_log)
        env.update(environment)
        env.update(local_environment(cloud.endpoint))
        env.update({"AWS_BATCH_JOB_ID": job_id, "AWS_BATCH_JOB_ATTEMPT": "1",
                    "AWS_BATCH_JQ_NAME": queue, "AWS_BATCH_CE_NAME": "local"})
        if cloud.before_boot:
            cloud.before_boot(job_id, key, env)
        limit = attempt_seconds(job.timeout, definition.get("timeout"))
        job.status = "STARTING"
        job.job_started_at = _now()
        job.log_stream_name = job._stream_name
        job._start_attempt()
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        job.status = "RUNNING"
        cloud.tracker.stage(key, "running", job_id)
        try:
            with open(scratch / "console.log", "wb") as console:
                process = subprocess.Popen(command, cwd=scratch, env=env, stdout=console,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                with cloud.lock:
                    cloud.processes[job_id] = process
                try:
                    exit_code = process.wait(timeout=limit)
                    reason = None
                except subprocess.TimeoutExpired:
                    # Batch stops a job at its timeout as ECS stops a container: SIGTERM to
                    # its first process alone, SIGKILL to all after the stop timeout.
                    process.terminate()
                    try:
                        process.wait(timeout=self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        _kill_group(process)
                    exit_code = process.wait()
                    reason = f"Job attempt duration exceeded timeout ({limit} s)"
                with cloud.lock:
                    cloud.processes.pop(job_id, None)
                # What the job left running ends with its container: its process group (one
                # signal; a scan of /proc for its session costs ~3 ms a job, kept for a timeout).
                if reason:
                    _kill_group(process)
                else:
                    _kill_process_group(process.pid)
        finally:
            with self.lock:
                self.running -= 1
        calls = shutdown_calls(calls_log)
        exit_code = container_exit_code(exit_code)
        status = "SUCCEEDED" if exit_code == 0 else "FAILED"
        with self.lock:
            self.jobs[job_id].update(exit_code=exit_code, status=status, shutdown_calls=calls)
        job.exit_code = exit_code
        if reason:
            job.job_stopped_reason = reason
        job._mark_stopped(success=exit_code == 0)
        cloud.record_outcome(key, job_id, scratch)
        cloud.tracker.stage(key, "exited", f"{job_id} {status} (exit {exit_code})")
        if not cloud.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    # --- what the commands and tests read --------------------------------------------

    def unfinished(self):
        """Return the ids of jobs moto holds that have not ended (submitted, runnable, running)."""
        return [job.job_id for job in list(self.backend()._jobs.values())
                if job.status not in FINAL_STATES and not job._child_jobs]


def container_exit_code(returncode):
    """Return the exit code a container runtime reports for a process's return code: a
    process killed by signal N ends 128 + N, as Docker reports it (137 for SIGKILL) (pure)."""
    return 128 - returncode if returncode < 0 else returncode


def _kill_process_group(pgid):
    """SIGKILL process group `pgid`, if anything is left in it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _now():
    from datetime import datetime

    return datetime.now()

