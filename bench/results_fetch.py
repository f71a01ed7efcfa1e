#!/usr/bin/env python3
"""Benchmark: `./deploy.sh results` on N reports in a moto server (the local cloud's stand-in
for S3, a process of its own as under `local_cloud.py up`): the first fetch, a re-run that
fetches nothing, summary.csv and index.html, the page's size, and its render time in
headless Chromium when it is installed.

    python3 bench/results_fetch.py                  # 500 inputs, 16 fetch threads
    python3 bench/results_fetch.py --inputs 500 --threads 1

The bucket holds one report per input (FASTQ with the worker's histograms, VCF and CSV in
turn, as the worker wrote them for samples/), one in twenty an error report instead, a log
per input and a receipt per report, as the pipeline leaves them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(HERE)]

import AwsS3  # noqa: E402
from bookkeeping import start_moto, use_endpoint  # noqa: E402


def sample_reports():
    """The worker's reports of samples/ (FASTQ with histograms in the worker's shapes)."""
    from test_results_page import local_report

    return [local_report(REPO / "samples" / name, name)
            for name in ("reads.fastq", "calls.vcf", "measurements.csv")]


def fill(s3, bucket, inputs):
    """Put `inputs` reports (every 20th an error report), logs and receipts; return objects."""
    samples = sample_reports()
    for index in range(inputs):
        key = f"runs/{index:04d}/{samples[index % 3]['input']['key']}"
        if index % 20 == 19:
            report = AwsS3.error_report("analyse", EOFError("Compressed file ended before the "
                                        "end-of-stream marker was reached"),
                                        {"bucket": bucket, "key": key, "etag": ""})
            AwsS3.put_report(s3, bucket, key, report, ".error.json")
        else:
            report = dict(samples[index % 3], input={"bucket": bucket, "key": key, "etag": ""})
            AwsS3.put_report(s3, bucket, key, report, ".json")
        s3.put_object(Bucket=bucket, Key=AwsS3.report_key(key, ".log"),
                      Body=f"worker log of {key}\n".encode() * 20)
    return inputs * 3


def render_seconds(page):
    """Seconds headless Chromium takes to open the page and run its scripts, or None."""
    from test_results_page import chromium, render

    try:
        chromium()
    except BaseException:   # pytest.fail's exception: no chromium here
        return None
    with tempfile.TemporaryDirectory() as work:
        _, _, seconds = render(page, Path(work))
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    server, endpoint = start_moto()
    try:
        use_endpoint(endpoint)
        from awsfun_deploy import results
        from awsfun_deploy.core import Clients

        s3 = Clients()("s3")
        s3.create_bucket(Bucket="data")
        objects = fill(s3, "data", args.inputs)
        with tempfile.TemporaryDirectory() as out:
            started = time.monotonic()
            outcome = results.fetch_results(s3, "data", out, threads=args.threads,
                                            stream=open(os.devnull, "w"))
            first = time.monotonic() - started
            started = time.monotonic()
            again = results.fetch_results(s3, "data", out, threads=args.threads)
            rerun = time.monotonic() - started
            started = time.monotonic()
            rows = results.write_outputs(out, again["manifest"])
            written = time.monotonic() - started
            page = Path(out) / results.INDEX_HTML
            size = page.stat().st_size
            seconds = render_seconds(page)
        print(json.dumps({
            "inputs": args.inputs, "objects in the bucket (reports, logs, receipts)": objects,
            "fetched": len(outcome["fetched"]), "threads": args.threads,
            "first fetch s": round(first, 2), "re-run fetched": len(again["fetched"]),
            "re-run s": round(rerun, 2), "summary rows": len(rows),
            "summary.csv + index.html s": round(written, 2), "index.html bytes": size,
            "chromium render s": None if seconds is None else round(seconds, 2)}, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
