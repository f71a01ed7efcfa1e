"""The local cloud: the README's main command, bursts, hostile names, duplicates, failures."""

import gzip
import json
import os
import subprocess
import sys

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


def test_burst_of_40_with_hostile_names(cloud, tmp_path):
    canary = tmp_path / "CANARY"
    injections = [f"$(touch {canary})", f"`touch {canary}`", f";touch {canary};", f"' && touch {canary} #"]
    keys = {}
    for index in range(40):
        folder = tmp_path / "in" / f"{index:02d}"
        folder.mkdir(parents=True)
        path = folder / HOSTILE_NAMES[index % len(HOSTILE_NAMES)]
        path.write_text(f"id,value\n{index},{index * 2}\n")
        # Keys may hold "/", so the prefix carries commands naming an absolute canary.
        prefix = f"burst/{index:02d}/{injections[index % len(injections)]}"
        keys.update(upload_without_waiting(cloud, [path], prefix))
    assert len(keys) == 40
    pending = cloud.tracker.wait_for(list(keys), timeout=240)
    assert pending == []
    assert all(cloud.tracker.outcome(key) == "report" for key in keys)
    for key in keys:
        outcome, report = cloud.fetch_report(key)
        assert outcome == "report" and report["input"]["key"] == key
    assert cloud.wait_idle() == []
    assert not canary.exists()
    # Outputs never start machines: only the 40 inputs were ever launched.
    assert len(cloud.booted) == 40


def upload_without_waiting(cloud, paths, prefix):
    """Upload without waiting, so the whole burst is in flight at once."""
    keys = {}
    for path in paths:
        key = local_cloud.object_key(prefix, path)
        cloud.upload(path, key)
        keys[key] = None
    return keys


def test_multipart_upload_events_process_the_object_once(cloud, tmp_path):
    big = tmp_path / "big.csv"
    row = b"1,2,3,4,5,6,7,8\n"
    big.write_bytes(b"a,b,c,d,e,f,g,h\n" + row * (9 * 1024 * 1024 // len(row)))
    outcomes = process_files(cloud, [big], "multi", timeout=120)
    assert outcomes == {"multi/big.csv": "report"}
    assert cloud.wait_idle() == []
    tokens = list(cloud.booted.values())
    # moto sends an event per multipart completion step and ignores ClientToken;
    # the handler gives both the same token, so only one machine runs.
    assert len(set(tokens)) == 1
    assert sum(1 for pid in cloud.tokens.values()) == 1
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
