#!/usr/bin/env python3
"""Injection soak, long form: N generated S3 keys (20,000 by default) through event -> handler ->
user-data -> bash -> worker, exactly the property tests/test_injection.py checks with 2,000 keys
in CI (see that module's docstring for the stages). Not part of CI.

    python3 bench/fuzz_keys.py [--keys N] [--processes P]

Prints keys/s and every failure; exits 1 if any key failed. Needs only the test requirements:
AWS is moto, in-process; no credentials, no network.
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

logger = logging.getLogger("fuzz_keys")


def isolate_from_aws():
    """Fake credentials and no endpoint, config or IMDS: nothing can reach a real account."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "DRY_RUN"):
        os.environ.pop(name, None)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                      AWS_SHARED_CREDENTIALS_FILE=os.devnull)


def parse_args(argv=None):
    """Return the command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20000, help="keys to generate (default 20000)")
    parser.add_argument("--processes", type=int, default=None,
                        help="bash jobs at a time (default: as in CI)")
    parser.add_argument("--show", type=int, default=50, help="failures to print (default 50)")
    return parser.parse_args(argv)


def run(keys_wanted, processes):
    """Draw the keys and soak them; return (SoakResult, seconds drawing, seconds soaking)."""
    import boto3
    from moto import mock_aws

    import test_injection as soak_test

    started = time.monotonic()
    keys = soak_test.draw_keys(keys_wanted)
    drawn = time.monotonic()
    soak_test.CANARY_DIR.mkdir(exist_ok=True)
    try:
        with mock_aws(), tempfile.TemporaryDirectory() as workdir:
            s3 = boto3.client("s3", region_name="us-east-1")
            s3.create_bucket(Bucket=soak_test.DATA)
            result = soak_test.soak(keys, workdir, s3, processes or soak_test.SOAK_BASH_PROCESSES)
    finally:
        soak_test.CANARY.unlink(missing_ok=True)
        soak_test.CANARY_DIR.rmdir()
    return result, drawn - started, time.monotonic() - drawn


def main(argv=None):
    """Run the soak and report it; exit status 1 if any key failed."""
    args = parse_args(argv)
    # The worker logs two INFO lines a key; only warnings are worth reading here.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    isolate_from_aws()
    import lambda_function  # noqa: F401 - it sets the root logger to INFO when imported

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("test_injection").setLevel(logging.INFO)  # progress every 1,000 keys
    result, draw_seconds, soak_seconds = run(args.keys, args.processes)
    print(f"{result.keys} keys drawn in {draw_seconds:.1f} s; soaked in {soak_seconds:.1f} s "
          f"({result.keys / soak_seconds:.1f} keys/s); {result.reached_worker} reached the "
          f"worker; {len(result.failures)} failures")
    for failure in result.failures[:args.show]:
        print("FAIL", failure)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
