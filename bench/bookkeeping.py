#!/usr/bin/env python3
"""Benchmark: status's and reconcile's bookkeeping on a bucket of N inputs, before and after
listings decided it: S3 requests by operation and wall time, on a moto server.

    python3 bench/bookkeeping.py                  # 5,000 inputs, median of 3 runs
    python3 bench/bookkeeping.py --inputs 300 --runs 1

Starts a moto server (`python -m moto.server`, a process of its own, as the local cloud's
stand-in for S3 and EC2) and fills one data bucket: 10 inputs of every kind in
tests/support.py's MIXED_KINDS (error reports, stale reports, long keys, live and ended
workers, ...) and the rest reported by the worker, with receipts. Then it runs, each timed:

  status      its counts and ended workers (reconcile.input_status; drift, names and the
              dead-letter queue cost the same before and after and are left out)
  reconcile   reconcile --dry-run's scan (Reconciler.launch_unprocessed; a real run adds
              one HeadObject and one RunInstances per input it launches)

three ways: "before", the per-object code (tests/per_object_bookkeeping.py); "after", this
code; and "after, no receipts", this code once the receipts are deleted, as on a bucket whose
reports all come from workers older than receipts. Requests are counted as botocore makes
them (provide-client-params), one per call; retries are not counted. "of which listing" is
the time spent in ListObjectsV2 calls (botocore's before-call to after-call): moto lists a
page in time that grows with the bucket, so on a large bucket it costs more than on S3.
"""

import argparse
import collections
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

logger = logging.getLogger("awsfun.bench")
COPIES = 10  # inputs of every kind but "ok"


def start_moto():
    """Start a moto server on a free loopback port; return (process, endpoint URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return server, endpoint
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)


def use_endpoint(endpoint):
    """Point boto3 at `endpoint` with fake credentials, as the tests' conftest does."""
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)


def fill(clients, bucket, inputs, copies):
    """Fill `bucket`: `copies` of every MIXED_KINDS kind but "ok" (support.fill_mixed_bucket),
    then "ok" inputs up to `inputs`, eight uploads at a time; return {input key: kind}."""
    from support import fill_mixed_bucket, mixed_input_key, worker_image_id, write_report

    s3 = clients("s3")
    s3.create_bucket(Bucket=bucket)
    kinds = fill_mixed_bucket(s3, clients("ec2"), bucket, worker_image_id(clients("ssm")),
                              bulk=0, copies=copies)

    def reported(index):
        key = mixed_input_key("ok", index)
        etag = s3.put_object(Bucket=bucket, Key=key, Body=f"ok,{index}\n".encode())["ETag"]
        write_report(s3, bucket, key, etag.strip('"'))
        return key

    with ThreadPoolExecutor(8) as pool:
        for key in pool.map(reported, range(max(0, inputs - len(kinds)))):
            kinds[key] = "ok"
    return kinds


def delete_receipts(s3, bucket):
    """Delete every receipt (DeleteObjects, 1,000 keys a request); return how many."""
    import AwsS3
    from awsfun_deploy.s3 import list_keys

    keys = [o["Key"] for o in list_keys(s3, bucket, prefix=AwsS3.RECEIPT_PREFIX)]
    for start in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": key} for key in keys[start:start + 1000]], "Quiet": True})
    return len(keys)


def reconcile_scan(launch_unprocessed):
    """Return a run of reconcile --dry-run's scan with this launch_unprocessed (a Reconciler's
    or the per-object oracle's)."""
    import deploy
    import lambda_function
    from awsfun_deploy import reconcile

    def run(clients, names):
        settings = lambda_function.load_settings({"AWS_REGION": names.region})
        reconciler = reconcile.Reconciler(clients, names, settings, "", True,
                                          deploy.Progress(echo=False))
        launch_unprocessed(reconciler)
        return reconciler.result["counts"]

    return run


def status_counts(input_status):
    """Return a run of status's counts and ended workers with this input_status."""
    def run(clients, names):
        return input_status(clients, names)[0]

    return run


def time_listings(s3):
    """Add up the seconds each ListObjectsV2 call of `s3` takes, from botocore's before-call
    to its after-call; return the list the durations go to."""
    spent, started = [], []
    s3.meta.events.register("before-call.s3.ListObjectsV2",
                            lambda **_: started.append(time.perf_counter()))
    s3.meta.events.register("after-call.s3.ListObjectsV2",
                            lambda **_: spent.append(time.perf_counter() - started.pop()))
    return spent


def measure(run, clients, names, runs, calls, listings):
    """Run `run` `runs` times; return (its answer, {operation: requests} of one run, median
    seconds, median seconds in ListObjectsV2). `calls` maps "s3" and "ec2" to their
    record_calls lists, `listings` is time_listings' list."""
    seconds, listed, answer, counted = [], [], None, None
    for _ in range(runs):
        for recorded in (*calls.values(), listings):
            del recorded[:]
        started = time.perf_counter()
        answer = run(clients, names)
        seconds.append(time.perf_counter() - started)
        listed.append(sum(listings))
        counted = collections.Counter(f"{service}:{name}" for service, recorded in calls.items()
                                      for name, _ in recorded)
    return answer, counted, statistics.median(seconds), statistics.median(listed)


def table(rows):
    """Format the measured rows as a Markdown table (pure)."""
    header = ("command", "code", "reports", "ListObjectsV2", "HeadObject", "GetObject",
              "other S3", "EC2", "seconds", "of which listing")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for command, code, reports, counted, seconds, listing in rows:
        s3_other = sum(n for op, n in counted.items() if op.startswith("s3:")
                       and op not in ("s3:ListObjectsV2", "s3:HeadObject", "s3:GetObject"))
        ec2 = sum(n for op, n in counted.items() if op.startswith("ec2:"))
        lines.append(f"| {command} | {code} | {reports} | {counted['s3:ListObjectsV2']:,} | "
                     f"{counted['s3:HeadObject']:,} | {counted['s3:GetObject']:,} | {s3_other:,} | "
                     f"{ec2:,} | {seconds:.2f} | {listing:.2f} |")
    return "\n".join(lines)


def benchmark(inputs, runs, copies):
    """Fill a bucket on a fresh moto server and measure; return (rows, {input key: kind})."""
    server, endpoint = start_moto()
    try:
        use_endpoint(endpoint)
        import deploy
        import per_object_bookkeeping as oracle
        from awsfun_deploy import reconcile
        from support import record_calls

        clients = deploy.Clients()
        names = deploy.resolve_names(clients, "bench")
        started = time.monotonic()
        kinds = fill(clients, names.data_bucket, inputs, copies)
        logger.info("filled %s with %d inputs in %.0f s", names.data_bucket, len(kinds),
                    time.monotonic() - started)
        commands = (
            ("status", status_counts(oracle.input_status), status_counts(reconcile.input_status)),
            ("reconcile --dry-run", reconcile_scan(oracle.launch_unprocessed),
             reconcile_scan(reconcile.Reconciler.launch_unprocessed)),
        )
        calls = {service: record_calls(clients(service)) for service in ("s3", "ec2")}
        listings = time_listings(clients("s3"))
        rows, answers = [], {}
        for receipts in (True, False):
            if not receipts:
                logger.info("deleted %d receipts", delete_receipts(clients("s3"),
                                                                   names.data_bucket))
            for command, before, after in commands:
                reports = "with receipts" if receipts else "no receipts"
                for code, run in (("before", before), ("after", after)):
                    if code == "before" and not receipts:
                        continue  # the per-object code never looks at receipts
                    answer, counted, seconds, listing = measure(run, clients, names, runs, calls,
                                                                listings)
                    logger.info("%s, %s code, %s: %.2f s", command, code, reports, seconds)
                    answers.setdefault(command, []).append(answer)
                    rows.append((command, code, reports, counted, seconds, listing))
        for command, found in answers.items():
            if any(answer != found[0] for answer in found):
                raise AssertionError(f"{command}: the answers differ: {found}")
        return sorted(rows, key=lambda row: row[0] != "status"), kinds
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=5000, help="inputs in the bucket (default 5000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument("--copies", type=int, default=COPIES,
                        help=f"inputs of every kind but the reported (default {COPIES})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    rows, kinds = benchmark(args.inputs, args.runs, args.copies)
    counts = collections.Counter(kinds.values())
    print(f"\n{len(kinds):,} inputs ({counts['ok']:,} reported with a receipt, {args.copies} of "
          f"each of {len(counts) - 1} other kinds); {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; median of {args.runs} run(s); the answers of "
          "every run agree\n")
    print(table(rows))


if __name__ == "__main__":
    main()
