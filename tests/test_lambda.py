"""Unit tests of lambda_function: event parsing, skip rule, tokens, tags, rendering, launching.

AWS is never reached: EC2 and S3 are botocore Stubbers (or moto in-process) injected into
lambda_function._clients, so every AWS call the handler makes is visible and counted.
"""

import io
import json
import logging
import re
import subprocess
import sys
import zipfile
from urllib.parse import quote_plus

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber
from moto import mock_aws

import lambda_function as lf
import AwsS3
from support import REPO, RecordingEc2, record_calls, s3_event, s3_record

TEMPLATE = (REPO / "bootstrap" / "bootstrap.sh").read_text(encoding="utf-8")
TEST_EVENT = REPO / "lambda_test_event.json"
BUCKET = "awsfun-data"
JOB_LINE = re.compile(r"^(JOB_[A-Z0-9_]+)='([^']*)'$", re.M)


def settings(**env):
    return lf.load_settings({"AWS_REGION": "us-east-1", **env})


def obj(key="inbox/a.csv", bucket=BUCKET, etag="0123456789abcdef0123456789abcdef", version_id="",
        sequencer="0055AED6DCD90281E5"):
    return {"bucket": bucket, "key": key, "event_name": "ObjectCreated:Put", "etag": etag,
            "version_id": version_id, "sequencer": sequencer, "size": 1}


def job_values(user_data):
    """The job rendered into user-data: lambda_function.decode_job, checked against the
    assignments themselves (each JOB_* name once, base64 or decimal digits in single quotes)."""
    names = [name for name, _ in JOB_LINE.findall(user_data)]
    assert sorted(names) == sorted(set(names)) == [
        "JOB_FIELDS_B64", "JOB_LAUNCHER_B64", "JOB_TIMEOUT_SECONDS", "JOB_WATCHDOG_MINUTES"]
    return lf.decode_job(user_data)


def instance(instance_id):
    return {"Instances": [{"InstanceId": instance_id}]}


def expect_count(stub, tokens=()):
    """Queue EC2's answer to the handler's one count of live workers per invocation (the cap):
    a DescribeInstances of the stack's pending and running workers, one per token given."""
    instances = [{"InstanceId": f"i-{n:017x}", "Tags": [{"Key": "awsfun:token", "Value": t}]}
                 for n, t in enumerate(tokens, start=0xc0)]
    stub.add_response("describe_instances",
                      {"Reservations": [{"Instances": instances}] if instances else []})


def launches(calls):
    """The RunInstances calls among recorded (name, params) calls."""
    return [(name, params) for name, params in calls if name == "RunInstances"]


class Clients:
    """Stubbed EC2 and S3 clients and the calls each received."""

    def __init__(self):
        self.ec2 = boto3.client("ec2", region_name="us-east-1")
        self.s3 = boto3.client("s3", region_name="us-east-1")
        self.ec2_calls, self.s3_calls = record_calls(self.ec2), record_calls(self.s3)
        self.ec2_stub, self.s3_stub = Stubber(self.ec2), Stubber(self.s3)

    def operations(self):
        return [name for name, _ in self.ec2_calls + self.s3_calls]


@pytest.fixture
def clients():
    """EC2 and S3 clients behind Stubbers, injected where the handler looks for its clients.

    Nothing is queued: a test queues exactly the calls it expects, and any other call fails
    with UnStubbedResponseError. The calls made are recorded in order.
    """
    c = Clients()
    c.ec2_stub.activate()
    c.s3_stub.activate()
    lf._clients.update(ec2=c.ec2, s3=c.s3)
    yield c
    c.ec2_stub.deactivate()
    c.s3_stub.deactivate()


# --- parse_records --------------------------------------------------------------------


def test_parse_records_handles_every_record_in_order():
    keys = ["inbox/a.csv", "inbox/b c.csv", "ü/€.txt"]
    event = s3_event(*(s3_record(BUCKET, key, etag=f"etag{i}") for i, key in enumerate(keys)))
    objects, skipped = lf.parse_records(event)
    assert skipped == []
    assert [o["key"] for o in objects] == keys
    assert [o["etag"] for o in objects] == ["etag0", "etag1", "etag2"]
    assert {o["bucket"] for o in objects} == {BUCKET}


@pytest.mark.parametrize("raw, decoded", [
    ("my+file.csv", "my file.csv"),               # S3 writes a space as '+'
    ("dir%2Fsub%2Ffile.csv", "dir/sub/file.csv"),
    ("dir/sub/file.csv", "dir/sub/file.csv"),     # '/' may also arrive unencoded
    ("%C3%BC%E2%82%AC%F0%9F%98%80.txt", "ü€😀.txt"),  # percent-encoded UTF-8
    ("a%2Bb.csv", "a+b.csv"),                     # a literal '+' arrives as %2B
    ("100%252B.csv", "100%2B.csv"),               # a literal '%2B' arrives as %252B: decoded once
    ("50%25+off", "50% off"),
])
def test_keys_are_decoded_exactly_once(raw, decoded):
    objects, skipped = lf.parse_records(s3_event(s3_record(BUCKET, "", raw_key=raw)))
    assert skipped == []
    assert objects[0]["key"] == decoded


@pytest.mark.parametrize("key", ["%2B", "%252B", "a+b", "100% sure", "dir/../x y", "%", "+%+"])
def test_quote_plus_roundtrip(key):
    objects, _ = lf.parse_records(s3_event(s3_record(BUCKET, key)))
    assert objects[0]["key"] == key


def test_record_fields_carry_the_object_version():
    record = s3_record(BUCKET, "k.csv", etag="abc", version_id="v1", sequencer="seq")
    record["s3"]["object"]["eTag"] = '"abc"'  # some producers quote the eTag
    [parsed], _ = lf.parse_records(s3_event(record))
    assert (parsed["etag"], parsed["version_id"], parsed["sequencer"]) == ("abc", "v1", "seq")
    assert parsed["event_name"] == "ObjectCreated:Put"


def _without(record, *path):
    record = json.loads(json.dumps(record))
    target = record
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return record


MALFORMED = [
    ("not a dict", "record is a str"),
    (dict(s3_record(BUCKET, "k"), eventSource="aws:sqs"), "eventSource is 'aws:sqs'"),
    (_without(s3_record(BUCKET, "k"), "eventSource"), "eventSource is None"),
    (_without(s3_record(BUCKET, "k"), "s3"), "missing field 's3'"),
    (_without(s3_record(BUCKET, "k"), "s3", "object", "key"), "missing field 'key'"),
    (_without(s3_record(BUCKET, "k"), "s3", "bucket"), "missing field 'bucket'"),
    (s3_record("Bad_Bucket", "k"), "invalid bucket name 'Bad_Bucket'"),
    (s3_record(BUCKET, "", raw_key=""), "object key is missing or empty"),
    (s3_record(BUCKET, "", raw_key=None), "object key is missing or empty"),
]


def test_malformed_records_are_skipped_with_a_reason_and_the_rest_parsed():
    good = s3_record(BUCKET, "inbox/good.csv")
    records = [record for record, _ in MALFORMED]
    objects, skipped = lf.parse_records(s3_event(records[0], good, *records[1:]))
    assert [o["key"] for o in objects] == ["inbox/good.csv"]
    assert len(skipped) == len(MALFORMED)
    indexes = [0] + list(range(2, len(MALFORMED) + 1))
    for entry, index, (_, reason) in zip(skipped, indexes, MALFORMED):
        assert set(entry) == {"bucket", "key", "reason"}
        assert entry["reason"].startswith(f"malformed record #{index}: ")
        assert reason in entry["reason"]


@pytest.mark.parametrize("event", [
    {}, {"Records": []}, {"Records": "x"}, {"Records": None}, [], "text", None, 42,
    {"detail-type": "Object Created", "detail": {"bucket": {"name": BUCKET}}},  # EventBridge shape
    {"key1": "value1", "key2": "value2", "key3": "value3"},  # the console's default test event
])
def test_an_event_without_records_raises_saying_what_was_expected(event, clients):
    with pytest.raises(lf.EventError) as raised:
        lf.lambda_handler(event, None)
    message = str(raised.value)
    assert "Records" in message and "'aws:s3'" in message and "lambda_test_event.json" in message
    assert "got " in message
    assert clients.operations() == []


def test_the_error_names_the_keys_it_got():
    with pytest.raises(lf.EventError, match=r"got keys \['key1', 'key2'\]"):
        lf.parse_records({"key1": 1, "key2": 2})


# --- the skip rule --------------------------------------------------------------------


@pytest.mark.parametrize("key, skipped", [
    ("analysis/inbox/a.csv.json", True),
    ("inbox/my-analysis.csv", True),
    ("analysis", True),
    ("inbox/analyses.csv", False),
    ("inbox/a.csv", False),
])
def test_skip_rule_default_substring(key, skipped):
    reason = lf.should_process(obj(key), settings()["SKIP_SUBSTRING"])
    assert (reason is not None) == skipped
    if skipped:
        assert "'analysis'" in reason


@pytest.mark.parametrize("event_name", ["ObjectRemoved:Delete", "ObjectRestore:Completed",
                                        "LifecycleExpiration:Delete", ""])
def test_non_object_created_events_are_skipped(event_name):
    reason = lf.should_process(dict(obj(), event_name=event_name), "analysis")
    assert reason is not None and "not ObjectCreated" in reason


@pytest.mark.parametrize("event_name", ["ObjectCreated:Put", "ObjectCreated:Copy",
                                        "ObjectCreated:CompleteMultipartUpload", "ObjectCreated:Post"])
def test_object_created_events_are_processed(event_name):
    assert lf.should_process(dict(obj(), event_name=event_name), "analysis") is None


def test_handler_skips_with_reasons_and_makes_no_call(clients):
    event = s3_event(
        s3_record(BUCKET, "analysis/inbox/a.csv.json"),
        s3_record(BUCKET, "inbox/gone.csv", event_name="ObjectRemoved:Delete"),
    )
    result = lf.lambda_handler(event, None)
    assert result["launched"] == []
    assert [(s["key"], "analysis" in s["reason"] or "not ObjectCreated" in s["reason"])
            for s in result["skipped"]] == [("analysis/inbox/a.csv.json", True), ("inbox/gone.csv", True)]
    assert "not ObjectCreated" in result["skipped"][1]["reason"]
    assert clients.operations() == []


def test_skip_substring_is_overridable(clients, monkeypatch):
    monkeypatch.setenv("SKIP_SUBSTRING", "/tmp/")
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0000000000000000a"))
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/tmp/x.csv"),
                                        s3_record(BUCKET, "inbox/x.csv")), None)
    assert [s["key"] for s in result["skipped"]] == ["inbox/tmp/x.csv"]
    assert "'/tmp/'" in result["skipped"][0]["reason"]
    assert [l["key"] for l in result["launched"]] == ["inbox/x.csv"]
    clients.ec2_stub.assert_no_pending_responses()


# --- client tokens --------------------------------------------------------------------


def test_client_token_is_deterministic_and_short():
    token = lf.client_token(obj())
    assert token == lf.client_token(obj())
    assert 1 <= len(token) <= 64
    assert token.isascii() and token.isprintable()


def test_client_token_fits_for_the_longest_keys():
    assert len(lf.client_token(obj("€" * 341, bucket="b" * 63, version_id="v" * 1024))) <= 64


@pytest.mark.parametrize("change", [
    {"key": "inbox/b.csv"}, {"bucket": "other-bucket"}, {"etag": "ffff"}, {"version_id": "v2"},
    {"key": "inbox/a.csv "}, {"key": "inbox/A.csv"},
])
def test_client_token_differs_per_object_version(change):
    assert lf.client_token(obj()) != lf.client_token(obj(**change))


def test_client_token_uses_the_sequencer_when_there_is_no_etag():
    assert lf.client_token(obj(etag="", sequencer="A")) != lf.client_token(obj(etag="", sequencer="B"))


def test_client_token_is_the_same_for_a_duplicate_delivery():
    record = s3_record(BUCKET, "inbox/dup licate+€.csv", etag="e1", version_id="v1")
    [first], _ = lf.parse_records(s3_event(record))
    [second], _ = lf.parse_records(json.loads(json.dumps(s3_event(record))))
    assert lf.client_token(first) == lf.client_token(second)


def test_relaunch_attempts_get_their_own_tokens_and_attempt_0_is_the_events():
    tokens = [lf.client_token(obj(), attempt) for attempt in range(4)]
    assert tokens[0] == lf.client_token(obj())
    assert len(set(tokens)) == 4 and all(len(token) <= 64 for token in tokens)
    assert tokens == [lf.client_token(obj(), attempt) for attempt in range(4)]  # deterministic


def test_client_token_does_not_mix_fields():
    # A key that looks like the other fields' encoding cannot collide with them.
    assert lf.client_token(obj('x", "v1/e', version_id="", etag="")) != \
        lf.client_token(obj("x", version_id="v1", etag="e"))
    assert lf.client_token(obj("a", bucket="bkt-b")) != lf.client_token(obj("b", bucket="bkt-a"))


def test_client_token_differs_for_two_puts_of_the_same_bytes():
    """S3 gives each PUT its own event `sequencer`, also in an unversioned bucket where the
    eTag repeats: a new upload of identical bytes is a new job, so a new token."""
    assert lf.client_token(obj(sequencer="0055AED6DCD90281E5")) != \
        lf.client_token(obj(sequencer="0055AED6DCD90281F7"))


def test_a_scan_token_never_equals_an_event_token():
    """reconcile has no event: its token comes from LastModified, labelled as such, so it is
    stable across runs and never an event's token, whatever the field values."""
    scanned = dict(obj(sequencer=""), last_modified="2025-01-02T03:04:05+00:00")
    assert lf.client_token(scanned) == lf.client_token(dict(scanned))
    assert lf.client_token(scanned) != lf.client_token(obj(sequencer=""))
    assert lf.client_token(scanned) != lf.client_token(obj(sequencer="2025-01-02T03:04:05+00:00"))


def test_report_key_follows_the_workers_rule():
    for key in ("inbox/a.csv", "ü/€ x.csv", "k" * 1010, "€" * 341):
        for suffix in (".json", ".error.json"):
            assert lf.report_key(key, suffix) == AwsS3.report_key(key, suffix)
    assert lf.report_key("k" * 1030).startswith("analysis/_long/")


def test_object_version_tag_is_the_same_for_every_upload_of_one_version():
    assert lf.object_version_tag(obj(sequencer="A")) == lf.object_version_tag(
        dict(obj(sequencer=""), last_modified="2025-01-01"))
    assert lf.object_version_tag(obj()) != lf.object_version_tag(obj(etag="ffff"))
    assert len(lf.object_version_tag(obj("€" * 341))) == 64


# --- EC2's answers to a ClientToken already used (since January 2025) -------------------


@pytest.fixture
def recording_ec2(monkeypatch):
    """The handler's EC2 replaced by RecordingEc2, which answers repeated tokens as EC2 does."""
    recorder = RecordingEc2()
    monkeypatch.setitem(lf._clients, "ec2", recorder)
    return recorder


def test_duplicate_event_while_the_worker_runs_returns_the_same_instance(recording_ec2):
    """EC2: the same ClientToken and parameters while the instance is pending or running
    return that instance (the idempotent success)."""
    event = s3_event(s3_record(BUCKET, "inbox/a.csv"))
    first = lf.lambda_handler(event, None)
    again = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert again["launched"][0]["instance_id"] == first["launched"][0]["instance_id"]
    assert len(recording_ec2.launches) == 1


def test_duplicate_event_after_its_worker_finished_is_skipped_not_failed(recording_ec2):
    """EC2 (since January 2025) answers a ClientToken whose instance has terminated with
    IdempotentInstanceTerminated; it used to return the ended instance. That upload was
    processed: skipping it with the report's name beats failing into the dead-letter queue."""
    key = "inbox/done " + "d" * 1000 + ".csv"  # its reports are hashed under analysis/_long/
    event = s3_event(s3_record(BUCKET, key))
    [launched] = lf.lambda_handler(event, None)["launched"]
    recording_ec2.terminate(launched["instance_id"])
    result = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert result["launched"] == []
    [skipped] = result["skipped"]
    assert (skipped["bucket"], skipped["key"]) == (BUCKET, key)
    assert skipped["reason"].startswith(f"already processed: report {AwsS3.report_key(key)} or "
                                        f"{AwsS3.report_key(key, '.error.json')}")
    assert "IdempotentInstanceTerminated" in skipped["reason"]
    assert "reconcile" in skipped["reason"]
    assert len(recording_ec2.requests) == 2 and len(recording_ec2.launches) == 1


def test_duplicate_event_after_a_redeploy_changed_a_setting_is_skipped_not_failed(
        recording_ec2, monkeypatch):
    """EC2 answers a ClientToken reused with other parameters (here the user-data, which
    carries the watchdog) with IdempotentParameterMismatch: that upload already has its
    worker, launched with the old settings; skip it instead of failing. While that worker
    runs the handler's count already shows it (its awsfun:token tag), so EC2 is not asked."""
    event = s3_event(s3_record(BUCKET, "inbox/a.csv"))
    [first] = lf.lambda_handler(event, None)["launched"]
    monkeypatch.setenv("WATCHDOG_MINUTES", "30")
    running = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert [e["instance_id"] for e in running["launched"]] == [first["instance_id"]]
    assert running["launched"][0]["market"] == "running" and len(recording_ec2.requests) == 1
    recording_ec2.terminate(first["instance_id"])
    result = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert result["launched"] == []
    [skipped] = result["skipped"]
    assert skipped["reason"].startswith("already launched: ")
    assert "IdempotentParameterMismatch" in skipped["reason"]
    assert "analysis/inbox/a.csv.json" in skipped["reason"]
    first, second = recording_ec2.requests
    assert first["ClientToken"] == second["ClientToken"] and first["UserData"] != second["UserData"]


def test_the_same_bytes_uploaded_again_after_a_failed_job_launch_a_new_worker(recording_ec2):
    """In an unversioned bucket a second PUT of the same bytes has the same eTag, but S3 gives
    its event a new `sequencer`. The first job failed and its machine ended; EC2 (since
    January 2025) answers that job's token with IdempotentInstanceTerminated and before that
    returned the ended instance, so the new upload got no worker and no report ever came."""
    first = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv",
                                                 sequencer="0055AED6DCD90281E5")), None)
    recording_ec2.terminate(first["launched"][0]["instance_id"])
    again = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv",
                                                 sequencer="0055AED6DCD9028A00")), None)
    assert again["skipped"] == []
    [launched] = again["launched"]
    assert launched["instance_id"] != first["launched"][0]["instance_id"]
    assert launched["instance_id"] not in recording_ec2.terminated


def test_other_launch_errors_still_fail_the_record(recording_ec2):
    err = lf.ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "x"}},
                         "RunInstances")
    assert lf.already_launched_reason(obj(), err) is None
    assert lf.already_launched_reason(obj(), lf.UserDataTooLarge("big")) is None


# --- folder markers -------------------------------------------------------------------


def test_a_console_folder_marker_is_skipped_with_a_reason(recording_ec2):
    """The S3 console's "Create folder" writes a zero-byte key ending in '/': no input."""
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/new folder/", size=0),
                                        s3_record(BUCKET, "inbox/x/", size=5)), None)
    [skipped] = result["skipped"]
    assert skipped["key"] == "inbox/new folder/" and skipped["reason"].startswith("folder marker")
    assert [e["key"] for e in result["launched"]] == ["inbox/x/"]  # a real object, however named
    assert len(recording_ec2.requests) == 1


def test_build_tags_carry_the_object_version():
    specs = lf.build_tags(obj(), lf.client_token(obj()), settings())
    for spec in specs:
        tags = {tag["Key"]: tag["Value"] for tag in spec["Tags"]}
        assert tags["awsfun:object"] == lf.object_version_tag(obj())


# --- tags -----------------------------------------------------------------------------


def test_short_tag_values_pass_unchanged():
    assert lf.shorten_tag_value("inbox/a b ü.csv") == "inbox/a b ü.csv"
    assert lf.shorten_tag_value("x" * 256) == "x" * 256


def test_long_tag_values_keep_both_ends():
    value = "HEAD-" + "m" * 2000 + "-TAIL.csv"
    short = lf.shorten_tag_value(value)
    assert len(short) == 256
    assert short.startswith("HEAD-mmm") and short.endswith("mmm-TAIL.csv")


def test_long_tag_values_that_differ_in_the_middle_stay_distinct():
    a = lf.shorten_tag_value("x" * 300 + "A" + "x" * 300)
    b = lf.shorten_tag_value("x" * 300 + "B" + "x" * 300)
    assert a != b and len(a) <= 256 and len(b) <= 256


def test_tag_values_replace_control_characters():
    short = lf.shorten_tag_value("a\nb\tc\rd\x00e\x7ff\x1bg")
    assert short == "a?b?c?d?e?f?g"
    assert all(ch.isprintable() for ch in short)


@pytest.mark.parametrize("unit", ["€", "😀", "漢", "e\u0301"])
def test_long_unicode_tag_values(unit):
    value = unit * 600 + "\n"
    short = lf.shorten_tag_value(value)
    assert len(short) <= 256
    assert short.startswith(unit * 10) and short.endswith("?")
    assert "\n" not in short
    short.encode("utf-8")  # valid text: no lone surrogate from a cut


def test_build_tags_name_the_job_on_instance_and_volume():
    key = "inbox/" + "k" * 400 + "\n.csv"
    token = lf.client_token(obj(key))
    specs = lf.build_tags(obj(key), token, settings())
    assert sorted(spec["ResourceType"] for spec in specs) == ["instance", "volume"]
    for spec in specs:
        tags = {tag["Key"]: tag["Value"] for tag in spec["Tags"]}
        assert tags["awsfun:bucket"] == BUCKET
        assert tags["awsfun:token"] == token
        assert tags["awsfun:key"].startswith("inbox/kkk") and tags["awsfun:key"].endswith("k?.csv")
        assert tags["Name"].startswith("awsfun") and "inbox/" in tags["Name"]
        assert all(len(value) <= 256 for value in tags.values())
        assert all(len(name) <= 128 and not name.startswith("aws:") for name in tags)


# --- render_user_data -----------------------------------------------------------------


HOSTILE_KEYS = [
    "$(touch /tmp/awsfun-canary-render)",
    "`reboot`; rm -rf / #",
    "x'; shutdown -h now; echo '",
    "a\nJOB_FIELDS_B64='Zm9v'\nb",
    "--help && curl http://169.254.169.254/ | sh",
    "${IFS}cat${IFS}/etc/passwd",
    "ü €😀 \t\"quoted\" \\back\\slash",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_render_keeps_hostile_keys_out_of_the_script(key):
    job = obj(key, etag="e$(id)")
    user_data = lf.render_user_data(TEMPLATE, job, settings(SOFTWARE_BUCKET="soft-ware"))
    assert key not in user_data
    for line in key.splitlines():
        if len(line) > 3:
            assert line not in user_data
    values = job_values(user_data)
    assert values["KEY"] == key
    assert values["BUCKET"] == BUCKET
    assert values["ETAG"] == "e$(id)"
    assert values["SOFTWARE_BUCKET"] == "soft-ware"
    assert values["WORKER_KEY"] == "AwsS3.py"
    assert values["REGION"] == "us-east-1"
    assert values["WATCHDOG_MINUTES"] == "120"
    # Exactly one rendered job block, replacing the marker.
    assert lf.JOB_MARKER not in user_data
    assert user_data.count("JOB_FIELDS_B64='") == 1


def test_rendered_user_data_is_valid_bash_that_decodes_every_field_in_order():
    """bash's decode_job and lambda_function.JOB_FIELDS name the same fields in one order:
    each field distinct, the key hostile, with trailing line feeds, and one field empty."""
    key = HOSTILE_KEYS[3] + "\n\n"  # trailing newlines must survive too
    user_data = lf.render_user_data(TEMPLATE, obj("k" * 1010 + key, etag="e\n"),
                                    settings(SOFTWARE_BUCKET="soft-ware"))
    prelude = user_data.split('\nmain "$@"')[0]
    printed = " ".join(f'"$JOB_{name}"' for name in lf.JOB_FIELDS)
    script = prelude + f"\ndecode_job\nprintf '%s\\0' {printed}\n"
    done = subprocess.run(["bash", "-c", script], capture_output=True, check=False, timeout=10)
    assert done.returncode == 0, done.stderr
    decoded = lf.decode_job(user_data)
    expected = [decoded[name] for name in lf.JOB_FIELDS]
    assert done.stdout.decode("utf-8").split("\0")[:-1] == expected
    assert expected[:3] == [BUCKET, "k" * 1010 + key, "e\n"]
    # Empty: COMMAND (no route); the rest distinct (the report keys hashed: the key is long).
    assert expected[-1] == "" and len(set(expected)) == len(expected)


def test_render_carries_the_settings():
    user_data = lf.render_user_data(TEMPLATE, obj(), settings(WATCHDOG_MINUTES="30",
                                                              WORKER_TIMEOUT_SECONDS="7"))
    values = job_values(user_data)
    assert (values["WATCHDOG_MINUTES"], values["TIMEOUT_SECONDS"]) == ("30", "7")


def test_default_worker_timeout_stops_before_the_watchdog():
    for minutes in ("2", "120", "600"):
        values = settings(WATCHDOG_MINUTES=minutes)
        assert values["WORKER_TIMEOUT_SECONDS"] < values["WATCHDOG_MINUTES"] * 60 or \
            values["WORKER_TIMEOUT_SECONDS"] == 60


def _time_limits_in_order(user_data, started=1_000_000.0):
    """Assert the rendered job's limits fire in order: the launcher's deadline, then the
    shell's `timeout` (plus its -k grace and the time to report), then the watchdog."""
    sys.path.insert(0, str(REPO / "bootstrap"))
    try:
        import launcher
    finally:
        sys.path.remove(str(REPO / "bootstrap"))
    values = job_values(user_data)
    watchdog, limit = int(values["WATCHDOG_MINUTES"]), int(values["TIMEOUT_SECONDS"])
    [grace] = re.findall(r'timeout -k (\d+) "\$JOB_TIMEOUT_SECONDS"', user_data)
    child_deadline = launcher.deadline(str(started), limit, now=started)
    assert started < child_deadline < started + limit
    # 30 s to write the report and upload the log while the network is up.
    assert limit + int(grace) + 30 <= watchdog * 60, (limit, grace, watchdog)


@pytest.mark.parametrize("env, route", [
    ({}, None),
    ({"WATCHDOG_MINUTES": "30"}, None),
    ({"WORKER_TIMEOUT_SECONDS": "7200"}, None),  # reaches the default 120-minute watchdog
    ({}, {"name": "big", "match": "*", "launch_template": "su2cw_big", "watchdog_minutes": 240}),
    ({}, {"name": "slow", "match": "*", "launch_template": "su2cw_big",
          "watchdog_minutes": 10, "worker_timeout_seconds": 3600}),
    ({"WATCHDOG_MINUTES": "20"}, {"name": "long", "match": "*", "launch_template": "su2cw_big",
                                  "worker_timeout_seconds": 1200}),
])
def test_the_worker_s_own_time_limit_fires_before_the_watchdog(env, route):
    """AWS fact (cloud-init): the final stage runs with KillMode=process, so when the
    watchdog's `shutdown -h +N` fires the script is signalled only after networking has
    stopped, and a report written then never reaches S3. Whatever the settings a handler
    pasted alone is given, the rendered numbers keep launcher deadline < shell timeout (+ its
    kill grace and the report) < watchdog."""
    launch = lf.apply_route(settings(**env), lf.validate_routes({"routes": [route]})[0]
                            if route else None)
    _time_limits_in_order(lf.render_user_data(TEMPLATE, obj(), launch))


def test_render_fits_the_longest_s3_key():
    key = "€" * 341  # 1,023 bytes: close to S3's 1,024-byte key limit, all multi-byte
    user_data = lf.render_user_data(TEMPLATE, obj(key, etag="f" * 32 + "-10000"), settings())
    assert len(user_data.encode("utf-8")) < lf.USER_DATA_LIMIT
    assert job_values(user_data)["KEY"] == key


def test_user_data_drops_only_comments_from_the_template():
    """without_comment_lines empties comment lines only: bash's own reading of every
    function (declare -f, which drops comments) is the same before and after, and no
    heredoc could hold a line starting with #."""
    assert not re.search(r"(?<!<)<<(?!<)", TEMPLATE)  # a heredoc; <<< is a here-string

    def functions(script):
        body = script.split('\nmain "$@"')[0].replace(lf.JOB_MARKER, "")
        done = subprocess.run(["bash", "-c", body + "\ndeclare -f"], capture_output=True,
                              text=True, check=True, timeout=10)
        return done.stdout

    stripped = lf.without_comment_lines(TEMPLATE)
    assert functions(stripped) == functions(TEMPLATE) and "decode_job ()" in functions(TEMPLATE)
    assert stripped.count("\n") == TEMPLATE.count("\n") and stripped.startswith("#!")
    assert len(stripped) < len(TEMPLATE) - 1000


def test_render_refuses_user_data_over_16_kb():
    pad = ":" * 100 + "\n"
    base = len(lf.render_user_data(TEMPLATE, obj("k"), settings()).encode("utf-8"))
    template = TEMPLATE + ":" + "p" * (lf.USER_DATA_LIMIT - base - 2) + "\n"
    exact = lf.render_user_data(template, obj("k"), settings())
    assert len(exact.encode("utf-8")) == lf.USER_DATA_LIMIT  # exactly 16 KB is allowed
    with pytest.raises(lf.UserDataTooLarge) as raised:
        lf.render_user_data(template, obj("kkkk"), settings())  # 4 more base64 bytes
    message = str(raised.value)
    assert "16384" in message and str(lf.USER_DATA_LIMIT + 4) in message
    with pytest.raises(lf.UserDataTooLarge):
        lf.render_user_data(TEMPLATE + pad * 200, obj("k"), settings())


@pytest.mark.parametrize("key", [
    "inbox/a.csv", "k" * 1004, "k" * 1005, "k" * 1011, "k" * 1012, "k" * 1015, "k" * 1024,
    "€" * 336, "€" * 337, "€" * 341, "a\nb $(x) ü", "-n", "%s\\n", "😀" * 254,
])
@pytest.mark.parametrize("suffix", [".json", ".error.json", ".log"])
def test_the_handler_names_reports_like_the_worker(key, suffix):
    """The handler renders the keys of the bootstrap's .error.json and .log: the worker's rule,
    _long/ hashing past 1,024 bytes included."""
    assert lf.report_key(key, suffix) == AwsS3.report_key(key, suffix)


def test_rendered_report_keys_and_launcher_are_what_the_job_needs(tmp_path):
    key = "k" * 1010
    values = job_values(lf.render_user_data(TEMPLATE, obj(key), settings()))
    # Hashed: rendered. Not hashed: "" and the shell writes analysis/KEY.log (the soak in
    # tests/test_injection.py checks what it writes against AwsS3.report_key).
    assert values["ERROR_KEY"] == lf.report_key(key, ".error.json")
    assert values["ERROR_KEY"].startswith("analysis/_long/")
    assert values["LOG_KEY"] == ""
    archive = values["LAUNCHER"]
    (tmp_path / "launcher.pyz").write_bytes(archive)
    with zipfile.ZipFile(tmp_path / "launcher.pyz") as unpacked:
        assert unpacked.read("__main__.py") == (REPO / lf.LAUNCHER_KEY).read_bytes()
    # python3 runs the zip: without its arguments the launcher fails on unpacking them.
    done = subprocess.run([sys.executable, str(tmp_path / "launcher.pyz")], capture_output=True,
                          text=True, timeout=30, check=False)
    assert "not enough values to unpack" in done.stderr


def test_render_refuses_a_template_without_the_marker():
    with pytest.raises(ValueError, match="__AWSFUN_JOB__"):
        lf.render_user_data(TEMPLATE.replace(lf.JOB_MARKER, ": nothing here"), obj(), settings())


# --- load_bootstrap_template ----------------------------------------------------------


def _body(text):
    data = text.encode("utf-8")
    return {"Body": StreamingBody(io.BytesIO(data), len(data))}


def test_template_from_s3_is_read_once_per_container(tmp_path):
    s3 = boto3.client("s3", region_name="us-east-1")
    calls = record_calls(s3)
    with Stubber(s3) as stub:
        stub.add_response("get_object", _body("#!/bin/bash\n: __AWSFUN_JOB__\n"),
                          {"Bucket": "su2csoftware", "Key": "bootstrap/bootstrap.sh"})
        first = lf.load_bootstrap_template(settings(), s3=s3, local_dir=str(tmp_path))
        second = lf.load_bootstrap_template(settings(), s3=s3, local_dir=str(tmp_path))
        stub.assert_no_pending_responses()
    assert first == second == "#!/bin/bash\n: __AWSFUN_JOB__\n"
    assert [name for name, _ in calls] == ["GetObject"]


def test_template_beside_the_handler_needs_no_s3_call(tmp_path):
    (tmp_path / "bootstrap").mkdir()
    (tmp_path / "bootstrap" / "bootstrap.sh").write_text("local template\n", encoding="utf-8")
    s3 = boto3.client("s3", region_name="us-east-1")
    calls = record_calls(s3)
    with Stubber(s3):  # nothing queued: any S3 call would raise
        assert lf.load_bootstrap_template(settings(), s3=s3, local_dir=str(tmp_path)) == "local template\n"
    assert calls == []


def test_the_packaged_template_is_the_repository_file():
    assert lf.load_bootstrap_template(settings()) == TEMPLATE


def test_an_unreadable_template_fails_the_record_not_silently(clients, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(lf, "__file__", str(tmp_path / "lambda_function.py"))
    clients.s3_stub.add_client_error("get_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(lf.LaunchFailed, match="AccessDenied"):
        lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    assert "cannot read s3://su2csoftware/bootstrap/bootstrap.sh: AccessDenied" in caplog.text
    assert [name for name, _ in clients.ec2_calls] == []


# --- the handler's launches -----------------------------------------------------------


def test_a_packaged_launch_makes_one_count_and_one_run_instances(clients):
    """The cap costs one DescribeInstances per invocation, the launch one RunInstances."""
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0123456789abcdef0"))
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    assert clients.operations() == ["DescribeInstances", "RunInstances"]
    assert result["launched"][0]["instance_id"] == "i-0123456789abcdef0"
    clients.ec2_stub.assert_no_pending_responses()


def test_a_warm_console_launch_makes_one_count_and_one_run_instances(clients, monkeypatch, tmp_path):
    """Pasted into the console (nothing beside the handler): S3 on the cold start only."""
    monkeypatch.setattr(lf, "__file__", str(tmp_path / "lambda_function.py"))
    stubbed_s3 = clients.s3
    with mock_aws():
        software = boto3.client("s3", region_name="us-east-1")
        software.create_bucket(Bucket="su2csoftware")
        software.put_object(Bucket="su2csoftware", Key="bootstrap/bootstrap.sh", Body=TEMPLATE.encode())
        software.put_object(Bucket="su2csoftware", Key=lf.LAUNCHER_KEY,
                            Body=(REPO / lf.LAUNCHER_KEY).read_bytes())
        cold_calls = record_calls(software)
        lf._clients["s3"] = software
        expect_count(clients.ec2_stub)
        clients.ec2_stub.add_response("run_instances", instance("i-00000000000000001"))
        lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/cold.csv")), None)
    assert cold_calls and {name for name, _ in cold_calls} == {"GetObject"}
    assert ("GetObject", {"Bucket": "su2csoftware", "Key": "bootstrap/bootstrap.sh"}) in cold_calls

    # Warm: the S3 client is a Stubber with nothing queued, so any S3 call would raise.
    lf._clients["s3"] = stubbed_s3
    del clients.ec2_calls[:]
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-00000000000000002"))
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/warm.csv")), None)
    assert clients.operations() == ["DescribeInstances", "RunInstances"]
    assert result["launched"][0]["instance_id"] == "i-00000000000000002"
    user_data = launches(clients.ec2_calls)[0][1]["UserData"]
    assert job_values(user_data)["KEY"] == "inbox/warm.csv"


def test_launch_parameters(clients):
    key = "inbox/" + "long name " * 40 + "ü.csv"
    record = s3_record(BUCKET, key, etag="e" * 32, version_id="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0123456789abcdef0"))
    lf.lambda_handler(s3_event(record), None)
    [(name, params)] = launches(clients.ec2_calls)
    [parsed], _ = lf.parse_records(s3_event(record))
    token = lf.client_token(parsed)
    assert name == "RunInstances"
    assert params["LaunchTemplate"] == {"LaunchTemplateName": "su2cw_worker", "Version": "$Latest"}
    assert (params["MinCount"], params["MaxCount"]) == (1, 1)
    assert params["ClientToken"] == token and len(token) <= 64
    assert params["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert params["MetadataOptions"]["HttpTokens"] == "required"
    assert params.get("DryRun") in (None, False)
    specs = {spec["ResourceType"]: {t["Key"]: t["Value"] for t in spec["Tags"]}
             for spec in params["TagSpecifications"]}
    assert set(specs) == {"instance", "volume"}
    for tags in specs.values():
        assert tags["awsfun:bucket"] == BUCKET
        assert tags["awsfun:token"] == token
        assert tags["awsfun:key"] == lf.shorten_tag_value(key)
        assert "Name" in tags
        assert all(len(value) <= 256 for value in tags.values())
    values = job_values(params["UserData"])
    assert (values["BUCKET"], values["KEY"], values["ETAG"]) == \
        (BUCKET, key, "e" * 32)


def test_run_instances_states_every_metadata_option_itself_hop_limit_one(clients):
    """The request's MetadataOptions override the template's, and EC2 documents no merge of a
    partial structure: an option left out falls to the account's instance metadata defaults
    (ModifyInstanceMetadataDefaults) or the AMI's, and Amazon Linux 2023 images (ImdsSupport
    v2.0) default HttpPutResponseHopLimit to 2, which lets a container on the worker reach the
    worker role's credentials (EC2 User Guide, "Configure instance metadata options"). moto
    keeps whatever is sent, so the request must say 1 itself."""
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0123456789abcdef0"))
    lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    [(_, params)] = launches(clients.ec2_calls)
    assert params["MetadataOptions"] == {"HttpTokens": "required", "HttpEndpoint": "enabled",
                                         "HttpPutResponseHopLimit": 1}


def test_launch_template_name_is_overridable(clients, monkeypatch):
    monkeypatch.setenv("LAUNCH_TEMPLATE", "other_template")
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0123456789abcdef0"))
    lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    assert launches(clients.ec2_calls)[0][1]["LaunchTemplate"]["LaunchTemplateName"] == \
        "other_template"


def test_result_shape_and_one_log_line_per_record(clients, caplog):
    caplog.set_level(logging.INFO)
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0000000000000000a"))
    clients.ec2_stub.add_response("run_instances", instance("i-0000000000000000b"))
    event = s3_event(
        s3_record(BUCKET, "inbox/one+1.csv"),
        s3_record(BUCKET, "analysis/inbox/one.csv.json"),
        "garbage",
        s3_record(BUCKET, "inbox/two ü.csv"),
    )
    result = lf.lambda_handler(event, None)
    assert set(result) >= {"launched", "skipped"}
    launched = [(e["bucket"], e["key"], e["instance_id"]) for e in result["launched"]]
    assert launched == [(BUCKET, "inbox/one+1.csv", "i-0000000000000000a"),
                        (BUCKET, "inbox/two ü.csv", "i-0000000000000000b")]
    for entry in result["skipped"]:
        assert {"bucket", "key", "reason"} <= set(entry) and entry["reason"]
    assert sorted(e["key"] for e in result["skipped"]) == ["", "analysis/inbox/one.csv.json"]
    json.dumps(result)  # Lambda must be able to serialise it
    lines = [r.getMessage() for r in caplog.records if r.name == "root"]
    assert sum("launched i-0000000000000000a" in line and "inbox/one+1.csv" in line for line in lines) == 1
    assert sum("launched i-0000000000000000b" in line for line in lines) == 1
    assert sum(line.startswith("skipped") and "analysis/inbox/one.csv.json" in line for line in lines) == 1
    assert sum(line.startswith("skipped") and "malformed record #2" in line for line in lines) == 1


# --- DRY_RUN --------------------------------------------------------------------------


def test_dry_run_allowed(clients, monkeypatch):
    monkeypatch.setenv("DRY_RUN", "1")
    clients.ec2_stub.add_client_error(
        "run_instances", "DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    assert clients.ec2_calls[0][1]["DryRun"] is True
    assert result["launched"] == []
    [entry] = result["dry_run"]
    assert entry["allowed"] is True and entry["code"] == "DryRunOperation"
    assert entry["key"] == "inbox/a.csv"


def test_dry_run_not_allowed_reports_the_encoded_reason(clients, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    encoded = "AbC123-encoded-authorization-failure-XyZ"
    monkeypatch.setenv("DRY_RUN", "true")
    clients.ec2_stub.add_client_error(
        "run_instances", "UnauthorizedOperation",
        f"You are not authorized to perform this operation. Encoded authorization failure "
        f"message: {encoded}", 403)
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)
    [entry] = result["dry_run"]
    assert entry["allowed"] is False and entry["code"] == "UnauthorizedOperation"
    assert encoded in entry["message"]
    assert encoded in caplog.text
    assert result["launched"] == []


def test_dry_run_other_errors_fail(clients, monkeypatch):
    monkeypatch.setenv("DRY_RUN", "1")
    clients.ec2_stub.add_client_error(
        "run_instances", "InvalidLaunchTemplateName.NotFoundException", "no such template", 400)
    with pytest.raises(lf.LaunchFailed, match="InvalidLaunchTemplateName.NotFoundException"):
        lf.lambda_handler(s3_event(s3_record(BUCKET, "inbox/a.csv")), None)


# --- failed launches ------------------------------------------------------------------


def test_failed_launches_raise_after_the_other_records_launch(clients, caplog):
    caplog.set_level(logging.INFO)
    keys = ["inbox/1.csv", "inbox/2 denied.csv", "inbox/3 full.csv", "inbox/4.csv"]
    stub = clients.ec2_stub
    expect_count(stub)
    stub.add_response("run_instances", instance("i-00000000000000001"))
    stub.add_client_error("run_instances", "UnauthorizedOperation",
                          "You are not authorized to perform this operation.", 403)
    stub.add_client_error("run_instances", "InsufficientInstanceCapacity",
                          "We currently do not have sufficient capacity.", 500)
    stub.add_response("run_instances", instance("i-00000000000000004"))
    event = s3_event(*(s3_record(BUCKET, key, etag=f"e{i}") for i, key in enumerate(keys)))
    with pytest.raises(lf.LaunchFailed) as raised:
        lf.lambda_handler(event, None)
    stub.assert_no_pending_responses()  # all four records were tried
    message = str(raised.value)
    assert "2 of 4" in message
    assert "'inbox/2 denied.csv': UnauthorizedOperation" in message
    assert "'inbox/3 full.csv': InsufficientInstanceCapacity" in message
    assert "inbox/1.csv" not in message and "inbox/4.csv" not in message
    assert "launched i-00000000000000001 for s3://awsfun-data/inbox/1.csv" in caplog.text
    assert "launched i-00000000000000004 for s3://awsfun-data/inbox/4.csv" in caplog.text
    assert "failed s3://awsfun-data/inbox/2 denied.csv: UnauthorizedOperation" in caplog.text
    # Capacity refused: deferred, not failed; a plain S3 event still raises for Lambda's retry.
    assert "deferred s3://awsfun-data/inbox/3 full.csv: EC2 refused: InsufficientInstanceCapacity" \
        in caplog.text

    # Lambda's retry delivers the same event: every record gets the same ClientToken again,
    # so EC2 returns the instances already launched instead of starting new ones.
    first_tokens = [params["ClientToken"] for _, params in launches(clients.ec2_calls)]
    del clients.ec2_calls[:]
    expect_count(stub)
    for i in range(4):
        stub.add_response("run_instances", instance(f"i-0000000000000000{i + 1}"))
    result = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert [params["ClientToken"] for _, params in launches(clients.ec2_calls)] == first_tokens
    assert len(set(first_tokens)) == 4
    assert [e["key"] for e in result["launched"]] == keys


def test_ten_records_three_refused_seven_launch_and_the_retry_reuses_every_token(clients, caplog):
    caplog.set_level(logging.INFO)
    keys = [f"batch/{i}.csv" for i in range(10)]
    refused = {2: ("InsufficientInstanceCapacity", 500), 5: ("UnauthorizedOperation", 403),
               9: ("VcpuLimitExceeded", 400)}
    stub = clients.ec2_stub
    expect_count(stub)
    for i in range(10):
        if i in refused:
            code, status = refused[i]
            stub.add_client_error("run_instances", code, f"{code} for record {i}", status)
        else:
            stub.add_response("run_instances", instance(f"i-{i:017x}"))
    event = s3_event(*(s3_record(BUCKET, key, etag=f"etag{i}") for i, key in enumerate(keys)))
    with pytest.raises(lf.LaunchFailed) as raised:
        lf.lambda_handler(event, None)
    stub.assert_no_pending_responses()  # every record was tried, in order
    assert str(raised.value).startswith("3 of 10 records failed: ")
    for i, (code, _) in refused.items():
        assert f"'batch/{i}.csv': {code}" in str(raised.value)
        # A capacity refusal defers the record (tried again later); any other fails it.
        outcome = "failed" if code == "UnauthorizedOperation" else "deferred"
        detail = "" if outcome == "failed" else "EC2 refused: "
        assert f"{outcome} s3://{BUCKET}/batch/{i}.csv: {detail}{code} {code} for record {i}" \
            in caplog.text
    launched = [i for i in range(10) if i not in refused]
    for i in launched:
        assert f"launched i-{i:017x} for s3://{BUCKET}/batch/{i}.csv" in caplog.text
    first = [params["ClientToken"] for _, params in launches(clients.ec2_calls)]
    assert len(set(first)) == 10

    # Lambda retries the same event: each record asks again with its own token, which is
    # what makes EC2 hand back the 7 instances already running instead of starting new ones.
    del clients.ec2_calls[:]
    expect_count(stub)
    for i in range(10):
        stub.add_response("run_instances", instance(f"i-{i:017x}"))
    result = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert [params["ClientToken"] for _, params in launches(clients.ec2_calls)] == first
    assert [e["key"] for e in result["launched"]] == keys


def test_a_network_failure_fails_its_record_only(clients, caplog):
    from botocore.config import Config
    from botocore.exceptions import EndpointConnectionError

    caplog.set_level(logging.INFO)
    # botocore's own retries are spent (one attempt here); the record must still not take
    # the rest of the batch down with it.
    ec2 = boto3.client("ec2", region_name="us-east-1", config=Config(retries={"max_attempts": 1}))
    current = {}

    def note(params, **_):
        current["key"] = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}[
            "awsfun:key"]

    def drop(model, **_):
        if model.name == "RunInstances" and current["key"] == "n/b.csv":
            raise EndpointConnectionError(endpoint_url="https://ec2.us-east-1.amazonaws.com")

    ec2.meta.events.register("provide-client-params.ec2.RunInstances", note)
    lf._clients["ec2"] = ec2
    with Stubber(ec2) as stub:
        # Ahead of the Stubber's handler, so the dropped call consumes no stubbed response.
        ec2.meta.events.register_first("before-call.*.*", drop)
        expect_count(stub)
        stub.add_response("run_instances", instance("i-0000000000000000a"))
        stub.add_response("run_instances", instance("i-0000000000000000c"))
        event = s3_event(*(s3_record(BUCKET, f"n/{k}.csv", etag=k) for k in "abc"))
        with pytest.raises(lf.LaunchFailed, match="1 of 3 records failed: 'n/b.csv': "
                                                  "EndpointConnectionError"):
            lf.lambda_handler(event, None)
        stub.assert_no_pending_responses()
    assert "failed s3://awsfun-data/n/b.csv: EndpointConnectionError" in caplog.text
    assert "launched i-0000000000000000c for s3://awsfun-data/n/c.csv" in caplog.text


def test_user_data_too_large_fails_that_record_only(clients, monkeypatch, tmp_path):
    (tmp_path / "bootstrap").mkdir()
    base = len(lf.render_user_data(TEMPLATE, obj("k"), settings()).encode("utf-8"))
    padded = TEMPLATE + ":" + "p" * (lf.USER_DATA_LIMIT - base - 2 - 200) + "\n"
    (tmp_path / "bootstrap" / "bootstrap.sh").write_text(padded, encoding="utf-8")
    (tmp_path / lf.LAUNCHER_KEY).write_bytes((REPO / lf.LAUNCHER_KEY).read_bytes())
    monkeypatch.setattr(lf, "__file__", str(tmp_path / "lambda_function.py"))
    clients.s3_stub.add_client_error("get_object", "NoSuchKey", "no routes.json", 404)
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0000000000000000a"))
    event = s3_event(s3_record(BUCKET, "short.csv"), s3_record(BUCKET, "€" * 300))
    with pytest.raises(lf.LaunchFailed, match="1 of 2 records failed: .*16384"):
        lf.lambda_handler(event, None)
    assert [name for name, _ in clients.ec2_calls] == ["DescribeInstances", "RunInstances"]


def test_a_missing_routes_file_read_without_list_permission_means_no_routes(
        clients, monkeypatch, tmp_path, caplog):
    """S3 answers a GetObject of a missing key with 403 AccessDenied, not 404 NoSuchKey, when
    the caller may not s3:ListBucket (S3 API Reference, GetObject, "Permissions"); the
    launcher may not. The handler pasted alone, with no routes.json published, must still
    launch every record on the default route, and say why once. moto answers NoSuchKey."""
    (tmp_path / "bootstrap").mkdir()
    (tmp_path / "bootstrap" / "bootstrap.sh").write_text(TEMPLATE, encoding="utf-8")
    # Packaged beside it like the template (the thin bootstrap renders the launcher in).
    (tmp_path / lf.LAUNCHER_KEY).write_bytes((REPO / lf.LAUNCHER_KEY).read_bytes())
    monkeypatch.setattr(lf, "__file__", str(tmp_path / "lambda_function.py"))
    clients.s3_stub.add_client_error("get_object", "AccessDenied", "Access Denied", 403,
                                     expected_params={"Bucket": "su2csoftware",
                                                      "Key": "routes.json"})
    expect_count(clients.ec2_stub)
    for suffix in "ab":
        clients.ec2_stub.add_response("run_instances", instance(f"i-000000000000000{suffix}"))
    event = s3_event(s3_record(BUCKET, "one.csv", etag="1"), s3_record(BUCKET, "two.csv", etag="2"))
    with caplog.at_level(logging.WARNING):
        result = lf.lambda_handler(event, None)
    assert [entry["route"] for entry in result["launched"]] == ["default", "default"]
    warnings = [r.getMessage() for r in caplog.records if "routes.json" in r.getMessage()]
    assert len(warnings) == 1 and "AccessDenied" in warnings[0], warnings
    clients.s3_stub.assert_no_pending_responses()


def test_a_bootstrap_template_the_role_may_not_read_still_fails_loudly(clients):
    clients.s3_stub.add_client_error("get_object", "AccessDenied", "Access Denied", 403)
    with pytest.raises(lf.ClientError, match="AccessDenied"):
        lf.load_bootstrap_template(settings(), local_dir="")


# --- lambda_test_event.json -----------------------------------------------------------


def load_test_event():
    return json.loads(TEST_EVENT.read_text(encoding="utf-8"))


def test_test_event_has_the_console_s3_put_shape():
    event = load_test_event()
    [record] = event["Records"]
    assert record["eventSource"] == "aws:s3" and record["eventName"] == "ObjectCreated:Put"
    for field in ("eventVersion", "awsRegion", "eventTime", "userIdentity", "requestParameters",
                  "responseElements", "s3"):
        assert field in record
    s3 = record["s3"]
    assert {"s3SchemaVersion", "configurationId", "bucket", "object"} <= set(s3)
    assert {"name", "ownerIdentity", "arn"} <= set(s3["bucket"])
    assert {"key", "size", "eTag", "sequencer"} <= set(s3["object"])
    assert s3["bucket"]["arn"] == "arn:aws:s3:::" + s3["bucket"]["name"]
    assert "REPLACE-ME" in s3["bucket"]["name"] and "REPLACE-ME" in s3["object"]["key"]


def test_test_event_pasted_unchanged_launches_nothing_and_says_why(clients):
    result = lf.lambda_handler(load_test_event(), None)
    assert result["launched"] == []
    [entry] = result["skipped"]
    assert entry["bucket"] == load_test_event()["Records"][0]["s3"]["bucket"]["name"]
    assert "invalid bucket name" in entry["reason"] and "placeholder" in entry["reason"]
    assert "REPLACE-ME" in entry["reason"]
    assert clients.operations() == []


def test_test_event_with_placeholders_replaced_parses_and_launches(clients):
    event = load_test_event()
    s3 = event["Records"][0]["s3"]
    s3["bucket"]["name"] = "my-data-bucket"
    s3["bucket"]["arn"] = "arn:aws:s3:::my-data-bucket"
    s3["object"]["key"] = quote_plus("inbox/run 7/sample ü.csv")
    [parsed], skipped = lf.parse_records(event)
    assert skipped == []
    assert (parsed["bucket"], parsed["key"]) == ("my-data-bucket", "inbox/run 7/sample ü.csv")
    assert parsed["etag"] == s3["object"]["eTag"]
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-0123456789abcdef0"))
    result = lf.lambda_handler(event, None)
    assert [(e["bucket"], e["key"]) for e in result["launched"]] == \
        [("my-data-bucket", "inbox/run 7/sample ü.csv")]


# --- hostile shapes and the function's deadline ----------------------------------------


def test_a_bad_percent_escape_is_refused_not_renamed(clients):
    """'%ff' is not UTF-8: decoding it leniently would name another object (U+FFFD)."""
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, "", raw_key="inbox/%ff.csv")), None)
    [entry] = result["skipped"]
    assert "not valid percent-encoded UTF-8" in entry["reason"]
    assert result["launched"] == [] and clients.ec2_calls == []


def test_a_wrong_typed_field_is_named_as_such(clients):
    record = s3_record(BUCKET, "inbox/a.csv")
    record["s3"]["object"] = "inbox/a.csv"
    result = lf.lambda_handler(s3_event(record), None)
    assert "must be JSON objects" in result["skipped"][0]["reason"]
    assert clients.ec2_calls == []


def test_repeated_records_of_one_object_version_launch_once(clients):
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-00000000000000001"))
    clients.ec2_stub.add_response("run_instances", instance("i-00000000000000002"))
    records = [s3_record(BUCKET, "inbox/a.csv")] * 500 + [s3_record(BUCKET, "inbox/b.csv")]
    result = lf.lambda_handler(s3_event(*records), None)
    assert [e["key"] for e in result["launched"]] == ["inbox/a.csv", "inbox/b.csv"]
    assert len(result["skipped"]) == 499
    assert all("same object version" in e["reason"] for e in result["skipped"])
    assert len(launches(clients.ec2_calls)) == 2


class ShrinkingContext:
    """A Lambda context whose remaining time drops by `step` ms at each look."""

    def __init__(self, remaining, step):
        self.remaining, self.step = remaining, step

    def get_remaining_time_in_millis(self):
        self.remaining -= self.step
        return self.remaining


def test_stops_before_the_deadline_and_fails_so_the_retry_finishes(clients):
    expect_count(clients.ec2_stub)
    clients.ec2_stub.add_response("run_instances", instance("i-00000000000000001"))
    clients.ec2_stub.add_response("run_instances", instance("i-00000000000000002"))
    records = [s3_record(BUCKET, f"inbox/{n}.csv") for n in range(5)]
    # Each look costs 9 s: 21 s and 12 s remain for the first two, then 3 s (< the margin).
    context = ShrinkingContext(remaining=30_000, step=9_000)
    with pytest.raises(lf.LaunchFailed, match="3 records not attempted"):
        lf.lambda_handler(s3_event(*records), context)
    assert len(launches(clients.ec2_calls)) == 2
