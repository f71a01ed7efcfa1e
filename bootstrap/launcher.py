"""awsfun launcher: fetch the worker, run it in a supervised child, report what it cannot.

lambda_function renders it into the user-data as a zip; bootstrap.sh runs it once per job:
  python3 launcher.pyz WORK_DIR SOFTWARE_BUCKET WORKER_KEY ERROR_KEY LOG_KEY LIMIT STARTED
      [WORKER_ARGS...] s3://BUCKET/KEY
AwsS3.py runs with runpy in a forked child: one interpreter start (boto3 loaded once), and
a child the OOM killer can take while this parent lives to report. The child must end by
STARTED (the shell's EPOCHREALTIME) + LIMIT less a margin, before the shell's `timeout`.
Exit status: the worker's 0 or 5 (it reported); 127 without boto3 (no report); 3 when no
credentials came (no report: the shell's AWS CLI writes it); else, the error report
written (WORK_DIR/reported then exists): 4 fetch failed, 1 crashed, 124 time limit,
137 SIGKILL, 143 SIGTERM, 128+N signal N, or the worker's own status.
As an AWS Batch job (AWS_BATCH_JOB_ID set) it asks no instance metadata: the report's
instance_id is AWSFUN_INSTANCE_ID (bootstrap.sh: the job id and attempt).
"""
import json
import logging
import os
import runpy
import signal
import sys
import threading
import time
import traceback

FETCH_FAILED = 4
IMDS = "http://169.254.169.254"
NO_CREDENTIALS = 3  # AwsS3.EXIT_FAILED_UNREPORTED: no report written; the shell writes it
WORKER_REPORTED = 5  # AwsS3.EXIT_FAILED_REPORTED
logger = logging.getLogger("awsfun.launcher")


def deadline(started, limit, now):
    """Return when the child must stop: LIMIT/5 (at most 10 s) before the shell's timeout."""
    try:
        now = float(started.replace(",", "."))  # EPOCHREALTIME follows LC_NUMERIC
    except ValueError:
        pass
    return now + limit - min(10.0, limit / 5)


def in_container(environ=os.environ):
    """True when this runs as an AWS Batch job: Batch sets AWS_BATCH_JOB_ID in its container."""
    return bool(environ.get("AWS_BATCH_JOB_ID"))


def outcome(code, limit, crash="", timed_out=False, container=False):
    """Return (exit status, error message or None) for the child's exit code (-N: signal N)."""
    if timed_out:
        return 124, f"worker exceeded its time limit of {limit}s"
    if code in (0, WORKER_REPORTED):
        return code, None
    if code == -signal.SIGKILL:
        return 137, "worker was killed by SIGKILL: out of memory, or by hand"
    if code == -signal.SIGTERM:
        stopper = "the Batch job was stopped" if container else "a shutdown"
        return 143, f"worker stopped by SIGTERM before its time limit of {limit}s: {stopper}"
    if code < 0:
        return 128 - code, f"worker was killed by {signal.Signals(-code).name}"
    if code == 1:
        return 1, f"worker crashed: {crash or 'see its traceback in the log'}"
    return code, f"worker exited with status {code}"


def wait_for_credentials(new_session, sleep=time.sleep, attempts=12, pause=5.0):
    """Return a new_session() holding credentials, or None after attempts x pause (60 s).

    Just after boot, instance metadata can lack the instance profile's credentials for
    seconds and botocore asks once (NoCredentialsError). A new session per try: one caches.
    """
    for attempt in range(attempts):
        try:
            session = new_session()
            if session.get_credentials() is not None:
                return session
        except Exception as err:  # noqa: BLE001 - IMDS not answering yet takes many forms
            logger.warning("%s", err)
        logger.warning("no AWS credentials yet (try %d of %d)", attempt + 1, attempts)
        if attempt + 1 < attempts:
            sleep(pause)
    return None


def run_child(path, args):
    """In the forked child: run the worker as __main__ as python3 would; never return."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:  # PR_SET_PDEATHSIG: a killed launcher leaves no worker behind
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    sys.argv, code = [path, *args], 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as done:
        code = 0 if done.code is None else done.code
        if not isinstance(code, int):
            sys.stderr.write(f"{code}\n")
            code = 1
    except BaseException as err:  # noqa: BLE001 - Python's status 1, and the cause for the report
        traceback.print_exc()
        with open(path + ".crash", "w", encoding="utf-8", errors="backslashreplace") as crash:
            crash.write(f"{type(err).__name__}: {err}"[:500])
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


def supervise(pid, until, stopped):
    """Wait for child `pid`, SIGKILLing it at time `until` or once stopped() (SIGTERM came);
    return (its exit code, -N for signal N; whether it ran out of time)."""
    pause = 0.01
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        timed_out = time.time() >= until
        if timed_out or stopped():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -signal.SIGTERM, timed_out
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def run(path, args, until, beside):
    """Run the worker in a forked child under supervise() and thread `beside`, started after
    the fork; return its (exit code, timed out)."""
    terms = []
    signal.signal(signal.SIGTERM, lambda *_: terms.append(1))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        run_child(path, args)
    beside.start()
    return supervise(pid, until, lambda: bool(terms))


def send_log(s3, bucket, key, work_dir, done):
    """Until done is set, PUT the log to key every AWSFUN_LOG_SECONDS (60) if it grew."""
    sent = 0
    while not done.wait(float(os.environ.get("AWSFUN_LOG_SECONDS", "60"))):
        try:
            with open(os.path.join(work_dir, "bootstrap.log"), "rb") as log:
                body = log.read()
            if len(body) > sent:
                s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/plain")
                sent = len(body)
        except Exception as err:  # noqa: BLE001 - the shell uploads it at the end
            logger.warning("log upload: %s", err)


def spot_interruption(environ=os.environ, timeout=1.0):
    """Return EC2's spot interruption notice ({"action", "time"}) or None, by IMDSv2:
    spot/instance-action is 404 until a reclaim is due (EC2 User Guide, "Spot Instance
    interruption notices"). Honours AWS_EC2_METADATA_SERVICE_ENDPOINT and _DISABLED."""
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true" or in_container(environ):
        return None
    from urllib.request import Request, urlopen
    base = environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", IMDS).rstrip("/")
    try:
        with urlopen(Request(base + "/latest/api/token", method="PUT", headers={
                "X-aws-ec2-metadata-token-ttl-seconds": "60"}), timeout=timeout) as answer:
            token = answer.read().decode("ascii")
        with urlopen(Request(base + "/latest/meta-data/spot/instance-action",
                             headers={"X-aws-ec2-metadata-token": token}),
                     timeout=timeout) as answer:
            notice = json.loads(answer.read())
    except (OSError, ValueError):  # no metadata service, 404 (no notice), not JSON
        return None
    return notice if isinstance(notice, dict) and notice.get("action") else None


def error_report(bucket, key, stage, message, code):
    """Return the error report for a job the worker could not finish (as bootstrap.sh's)."""
    instance = ""
    try:
        if not in_container():  # a container may read its host's tag: the job is what ran
            with open("/sys/devices/virtual/dmi/id/board_asset_tag", encoding="ascii") as tag:
                instance = tag.read().strip()
    except (OSError, ValueError):
        pass
    if not instance.startswith("i-"):
        instance = os.environ.get("AWSFUN_INSTANCE_ID", "unknown")
    return {"input": {"bucket": bucket, "key": key,
                      "etag": os.environ.get("AWSFUN_EXPECTED_ETAG", "")},
            "status": "error", "stage": stage, "error": message, "exit_code": code,
            "instance_id": instance, "written_by": "bootstrap",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv, sleep=time.sleep):
    """Run one job (see the module docstring); return the exit status."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s awsfun-bootstrap: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the worker's logging.basicConfig must still take effect
    text = [os.fsencode(arg).decode("utf-8") for arg in argv[1:8] + argv[-1:]]
    work_dir, software, worker_key, error_key, log_key, limit, started, target = text
    bucket, _, key = target[len("s3://"):].partition("/")
    path, limit, status = os.path.join(work_dir, "AwsS3.py"), int(limit), 1
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        logger.error("python3 cannot import boto3: %s", err)
        return 127
    session = wait_for_credentials(boto3.Session, sleep)
    if session is None:
        logger.error("no AWS credentials after waiting: the shell reports through the AWS CLI")
        return NO_CREDENTIALS
    # The forked worker's boto3.client() then uses this session and the service models it has
    # loaded: about 0.15 CPU-seconds less per job than a second session parsing them again.
    boto3.DEFAULT_SESSION = session
    # botocore < 1.31.0 ignores these variables; s3v4 for the presigned log upload.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    s3 = session.client("s3", endpoint_url=endpoint or None, config=Config(
        retries={"mode": "standard", "max_attempts": 5}, signature_version="s3v4"))
    try:
        try:
            body = s3.get_object(Bucket=software, Key=worker_key)["Body"].read()
        except Exception as err:  # noqa: BLE001 - any failure to fetch is reported
            status, stage = FETCH_FAILED, "fetch"
            message = f"cannot fetch s3://{software}/{worker_key}: {err}"
        else:
            with open(path, "wb") as worker:
                worker.write(body)
            done = threading.Event()
            live = threading.Thread(target=send_log, args=(s3, bucket, log_key, work_dir, done),
                                    daemon=True)
            code, timed_out = run(path, argv[8:], deadline(started, limit, time.time()), live)
            done.set()
            live.join(10)
            crash = ""
            if os.path.exists(path + ".crash"):
                with open(path + ".crash", encoding="utf-8") as cause:
                    crash = cause.read()
            (status, message), stage = outcome(code, limit, crash, timed_out,
                                               in_container()), "worker"
        if message:
            logger.error("%s", message)
            report = error_report(bucket, key, stage, message, status)
            # Metadata as the worker's reports have: reconcile reads a HEAD, and relaunches a
            # reclaimed spot worker's input.
            metadata = {"input-etag": report["input"]["etag"]}
            notice = spot_interruption() if status == 143 else None
            if notice:
                report["spot_interruption"] = notice
                metadata["interruption"] = "spot"
            s3.put_object(Bucket=bucket, Key=error_key, ContentType="application/json",
                          Metadata=metadata,
                          Body=json.dumps(report, ensure_ascii=False).encode("utf-8"))
            open(os.path.join(work_dir, "reported"), "w").close()
            logger.info("wrote error report for stage %s", stage)
    except Exception as err:  # noqa: BLE001 - without WORK_DIR/reported the shell reports
        logger.error("could not write the error report: %s", err)
    finally:
        # For this one PUT, valid for minutes, kept out of argv and the log: curl uploads
        # the log without another python3 start.
        try:
            url = s3.generate_presigned_url("put_object", ExpiresIn=900,
                                            Params={"Bucket": bucket, "Key": log_key})
            with open(os.path.join(work_dir, "log-upload.curl"), "w", encoding="utf-8") as config:
                config.write(f'url = "{url}"\n')
        except Exception as err:  # noqa: BLE001 - the shell falls back to the AWS CLI
            logger.error("cannot presign the log upload: %s", err)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
