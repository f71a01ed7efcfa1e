#!/usr/bin/env python3
"""Benchmark: the same N small files through both engines of the local cloud, same slots.

    python3 bench/engines.py                 # 100 files, 4 slots, ec2 then batch
    python3 bench/engines.py --files 500 --slots 4 --max-workers 3

Each engine runs in a fresh process of its own (`local_cloud.LocalCloud(engine=...)`, warm
python3 as in the burst tests): the EC2 engine boots an instance per file (deploy's cap, or
--max-workers as the EC2 burst's 3), the Batch engine runs a job per file on --slots local
vCPUs (deploy.sh --engine batch --max-vcpus SLOTS). The files are the burst tests' hostile
keys and small CSVs (tests/test_local_cloud.burst_keys). Measured from the first upload to
the last report: wall time; CPU-s is the engine process's and all its children's (bash, the
fork server's workers, deploy.sh), read with getrusage: "start-up" up to the first upload
(moto, deploy.sh, the fork server's own start), "files" from there until the local cloud
has stopped (the fork server's workers count once it is waited for), CPU-s/file of that. Not a test: the numbers depend on the machine and its load.
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

logger = logging.getLogger("awsfun.bench")


def cpu_seconds():
    """Return user + system CPU-s of this process and its waited-for children."""
    return sum(usage.ru_utime + usage.ru_stime for usage in (
        resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def run_engine(engine, files, slots, max_workers):
    """Send `files` burst files through one engine; return {"engine", "files", "wall",
    "cpu", "start_cpu", "files_cpu", "reports", "lost", "unfinished"}."""
    from test_local_cloud import burst_body, burst_keys

    from local_cloud import LocalCloud, Tracker

    # lambda_function sets the root logger to INFO, as the Lambda runtime expects.
    logging.getLogger().setLevel(logging.WARNING)
    start_cpu = cpu_seconds()
    with tempfile.TemporaryDirectory() as scratch:
        keys = burst_keys(files, Path(scratch) / "CANARY")
        options = {"max_workers": max_workers} if engine == "ec2" and max_workers else {}
        with LocalCloud(workers=slots, tracker=Tracker(quiet=True), engine=engine,
                        warm_python=True, **options) as cloud:
            s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]
            started, ready_cpu = time.monotonic(), cpu_seconds()
            for index, key in enumerate(keys):
                s3.put_object(Bucket=bucket, Key=key, Body=burst_body(index))
                cloud.tracker.stage(key, "uploaded")
            pending = cloud.tracker.wait_for(keys, timeout=60 + 3 * files)
            wall = time.monotonic() - started
            reports = sum(cloud.tracker.outcome(key) == "report" for key in keys)
    end_cpu = cpu_seconds()
    return {"engine": engine, "files": files, "wall": wall, "cpu": end_cpu - start_cpu,
            "start_cpu": ready_cpu - start_cpu, "files_cpu": end_cpu - ready_cpu,
            "reports": reports, "lost": files - reports, "unfinished": len(pending)}


def child(engine, files, slots, max_workers):
    """Run one engine in a process of its own; return its result dict."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", engine, "--files",
         str(files), "--slots", str(slots)]
        + (["--max-workers", str(max_workers)] if max_workers else []),
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"})
    if done.returncode != 0:
        raise SystemExit(f"the {engine} run failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results):
    """Return the printed comparison of the engines' results (pure)."""
    lines = [(f"{'engine':<7} {'files':>6} {'wall s':>8} {'CPU-s':>8} {'start-up':>9} "
              f"{'files':>8} {'CPU-s/file':>11} {'reports':>8} {'lost':>5}")]
    for r in results:
        lines.append(f"{r['engine']:<7} {r['files']:>6} {r['wall']:>8.1f} {r['cpu']:>8.1f} "
                     f"{r['start_cpu']:>9.1f} {r['files_cpu']:>8.1f} "
                     f"{r['files_cpu'] / r['files']:>11.3f} {r['reports']:>8} {r['lost']:>5}")
    if len(results) == 2 and results[0]["wall"] and results[0]["cpu"]:
        a, b = results
        lines.append(f"{b['engine']}/{a['engine']}: wall {b['wall'] / a['wall']:.2f}, "
                     f"CPU {b['cpu'] / a['cpu']:.2f}, CPU per file (after start-up) "
                     f"{(b['files_cpu'] / b['files']) / (a['files_cpu'] / a['files']):.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100, help="files per engine (default 100)")
    parser.add_argument("--slots", type=int, default=4,
                        help="machine slots, the Batch engine's vCPUs (default 4)")
    parser.add_argument("--max-workers", type=int, default=None,
                        help="the EC2 engine's cap, deploy.sh --max-workers (default deploy's)")
    parser.add_argument("--engines", default="ec2,batch", help="comma-separated (default ec2,batch)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
    logging.getLogger("moto").setLevel(logging.CRITICAL)
    if args.child:
        print(json.dumps(run_engine(args.child, args.files, args.slots, args.max_workers)))
        return 0
    results = []
    for engine in args.engines.split(","):
        results.append(child(engine, args.files, args.slots, args.max_workers))
        print(f"{engine}: {results[-1]['wall']:.1f} s, {results[-1]['cpu']:.1f} CPU-s",
              file=sys.stderr, flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
