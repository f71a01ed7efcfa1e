"""The local cloud: the README's main command, bursts, hostile names, duplicates, failures."""

import gzip
import json
import logging
import os
import subprocess
import sys
import types
import time

import pytest

import AwsS3
import local_cloud
from local_cloud import LocalCloud, Tracker, process_files

REPO = local_cloud.REPO

HOSTILE_NAMES = [
    "with space.csv",
    "$(touch CANARY).txt",
    "`touch CANARY`.txt",
    "quote'single.csv",
    'quote"double.csv',
    "semi;colon&amp.txt",
    "ünïcødé-数据.csv",
    "-leading-dash.txt",
    # No line feed: moto's server cannot store such a key (PutObject answers 404); keys with
    # line feeds are proven in test_injection.py, through bash, with the worker in-process.
    "tab\there.txt",
    "back\\slash.txt",
    "star*question?.txt",
    "percent%2F+plus.txt",
]


def test_pure_helpers():
    user_data = lambda_user_data("data-bucket", "a/b c$(x)\n")
    assert local_cloud.job_from_user_data(user_data) == ("data-bucket", "a/b c$(x)\n")
    with pytest.raises(ValueError):
        local_cloud.job_from_user_data("#!/bin/bash\necho no job\n")
    calls = [["-h", "+120", "awsfun watchdog"], ["-h", "now"]]
    assert local_cloud.watchdog_minutes(calls) == 120
    assert local_cloud.halted(calls) and not local_cloud.halted(calls[:1])
    assert local_cloud.object_key("in/", "/tmp/x y.csv") == "in/x y.csv"
    assert local_cloud.object_key("", "/tmp/x.csv") == "x.csv"


def lambda_user_data(bucket, key):
    import lambda_function

    settings = lambda_function.load_settings({})
    obj = {"bucket": bucket, "key": key, "etag": "e", "version_id": "", "sequencer": "",
           "event_name": "ObjectCreated:Put", "size": 1}
    template = (REPO / "bootstrap" / "bootstrap.sh").read_text()
    return lambda_function.render_user_data(template, obj, settings)


def test_demo_command_exits_zero_and_reports_every_sample(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "demo", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    samples = sorted(p.name for p in (REPO / "samples").iterdir())
    for name in samples:
        assert f"demo/{name}" in done.stdout
    reports = {p.name: json.loads(p.read_text()) for p in (out / "demo").glob("*.json")}
    assert sorted(reports) == sorted(f"{name}.json" for name in samples)
    expected = {name: AwsS3.analyse_file(str(REPO / "samples" / name)) for name in samples}
    for name in samples:
        report, local = reports[f"{name}.json"], expected[name]
        assert report["input"]["key"] == f"demo/{name}"
        for field in ("format", "compression", "lines", "bytes", "sha256", "summary"):
            assert report[field] == local[field], (name, field)
    assert {reports[f"{n}.json"]["format"] for n in samples} >= {"csv", "fastq", "vcf"}
    assert any(r["compression"] == "gzip" for r in reports.values())
    assert "machines still running: 0" in done.stdout


@pytest.fixture
def cloud(tmp_path):
    with LocalCloud(workers=2, tracker=Tracker(quiet=True)) as running:
        yield running


# Each machine costs the 2-core CI box about 0.45 CPU-seconds (bash, one python3 with boto3,
# curl, the moto server): 500 take two to three minutes. AWSFUN_BURST_FILES=N changes the count.
BURST_FILES = int(os.environ.get("AWSFUN_BURST_FILES", "500"))
BURST_MACHINES = 3


def test_burst_of_uploads_at_once_with_hostile_names(tmp_path):
    """BURST_FILES small uploads at once, 3 machine slots: one report per input, each naming
    its key exactly; no machine left, no token launched twice, no report for a report."""
    canary = tmp_path / "CANARY"
    injections = [f"$(touch {canary})", f"`touch {canary}`", f";touch {canary};", f"' && touch {canary} #"]
    keys = [f"burst/{index:03d}/{injections[index % len(injections)]}/"
            f"{HOSTILE_NAMES[index % len(HOSTILE_NAMES)]}" for index in range(BURST_FILES)]
    with LocalCloud(workers=BURST_MACHINES, tracker=Tracker(quiet=True)) as cloud:
        s3, bucket = cloud.client("s3"), cloud.names["data_bucket"]
        started = time.monotonic()
        for index, key in enumerate(keys):
            s3.put_object(Bucket=bucket, Key=key, Body=f"id,value\n{index},{index * 2}\n".encode())
            cloud.tracker.stage(key, "uploaded")
        pending = cloud.tracker.wait_for(keys, timeout=60 + 3 * BURST_FILES)
        elapsed = time.monotonic() - started
        logging.getLogger(__name__).warning("burst: %d files in %.1f s (%.2f files/s)",
                                            BURST_FILES, elapsed, BURST_FILES / elapsed)
        assert pending == []
        assert cloud.wait_idle() == []
        outputs = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="analysis/") for o in page.get("Contents", [])]
        reports = [k for k in outputs if k.endswith(".json") and not k.endswith(".error.json")]
        named = [json.loads(s3.get_object(Bucket=bucket, Key=k)["Body"].read())["input"]["key"]
                 for k in reports]
        # One report per input, each for exactly its key; nothing else but their logs.
        assert sorted(named) == sorted(keys)
        assert sorted(outputs) == sorted([AwsS3.report_key(k) for k in keys]
                                         + [AwsS3.report_key(k, ".log") for k in keys])
        # Every launch had its own token and booted one machine, which shut itself down;
        # the reports and logs (keys with "analysis") started none.
        tokens = list(cloud.booted.values())
        assert len(tokens) == len(set(tokens)) == len(cloud.tokens) == BURST_FILES
        assert sorted(m["key"] for m in cloud.machines.values()) == sorted(keys)
        assert {m["halt"] for m in cloud.machines.values()} == {"shutdown -h now"}
    assert not canary.exists()


def test_multipart_upload_events_process_the_object_once(cloud, tmp_path):
    big = tmp_path / "big.csv"
    row = b"1,2,3,4,5,6,7,8\n"
    big.write_bytes(b"a,b,c,d,e,f,g,h\n" + row * (9 * 1024 * 1024 // len(row)))
    outcomes = process_files(cloud, [big], "multi", timeout=120)
    assert outcomes == {"multi/big.csv": "report"}
    assert cloud.wait_idle() == []
    # moto sends an event per multipart completion step; the handler gives both the same
    # ClientToken, and EC2 (the local cloud's moto, see honour_client_tokens) answers the
    # repeat with the first instance: one instance exists at all, and one machine ran.
    reservations = cloud.client("ec2").describe_instances()["Reservations"]
    assert sum(len(r["Instances"]) for r in reservations) == 1
    assert len(cloud.booted) == len(cloud.tokens) == 1
    _, report = cloud.fetch_report("multi/big.csv")
    assert report["summary"]["rows"] == 9 * 1024 * 1024 // len(row)


def test_failing_worker_leaves_error_report_and_run_fails(cloud, tmp_path, capsys):
    bad = tmp_path / "broken.csv.gz"
    bad.write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000)[:-20])
    good = tmp_path / "fine.csv"
    good.write_text("a,b\n1,2\n")
    outcomes = process_files(cloud, [bad, good], "mixed", timeout=120)
    assert outcomes == {"mixed/broken.csv.gz": "error", "mixed/fine.csv": "report"}
    outcome, report = cloud.fetch_report("mixed/broken.csv.gz")
    assert outcome == "error" and "gzip" in report["error"]
    status = local_cloud.finish(cloud, outcomes, tmp_path / "out")
    assert status == 1
    assert (tmp_path / "out" / "mixed" / "broken.csv.gz.error.json").exists()
    assert "1 of 2 files reported" in capsys.readouterr().out


def test_run_command_rejects_missing_files(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "run", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a file" in done.stderr


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, str(REPO / "local_cloud.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for command in ("demo", "run", "up"):
        assert command in done.stdout


def test_summary_table_splits_upload_launch_and_worker(capsys):
    tracker = Tracker(quiet=True)
    tracker.files["in/a.csv"] = {
        "stages": {"uploading": 1.0, "uploaded": 3.0, "launched": 3.5, "running": 4.0,
                   "report": 6.5},
        "outcome": "report", "detail": "csv, 3 lines"}
    local_cloud.print_table(types.SimpleNamespace(tracker=tracker), {"in/a.csv": "report"})
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:6] == ["file", "outcome", "upload", "launch", "worker", "total"]
    # upload 1->3, launch 3->4 (event, handler, boot), worker 4->6.5, total 1->6.5
    assert row.split()[:6] == ["in/a.csv", "report", "2.00s", "1.00s", "2.50s", "5.50s"]
