"""reconcile and status counts on a deployed stack (moto server): nothing lost.

Every input ends with a report, a visible error report or a running worker; reconcile finds
the ones that have none, launches them through the handler's own path (same user-data and
route; a ClientToken of the scan's own, from LastModified, as there is no event), and replays
the dead-letter queue (the event's own token), deleting only what it launched.
"""

import base64
import json
import os
import subprocess
import sys

import pytest
from botocore.awsrequest import AWSResponse

import AwsS3
import deploy
import lambda_function
import local_cloud
from conftest import REPO
from support import s3_event, s3_record


@pytest.fixture
def stack(clients):
    """A deployed stack (prefix "local", as local_cloud.py deploys it); returns its Names."""
    names = deploy.resolve_names(clients, "local")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    return names


@pytest.fixture
def function_env(clients, stack, monkeypatch):
    """The deployed function's environment in os.environ, so lambda_handler runs as deployed."""
    env = clients("lambda").get_function_configuration(
        FunctionName=stack.function_name)["Environment"]["Variables"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lambda_function._clients.update(ec2=clients("ec2"), s3=clients("s3"))
    return env


def put(s3, bucket, key, body=b"a,b\n1,2\n"):
    """Upload an input; return its eTag as the S3 event would carry it."""
    return s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"].strip('"')


def put_report(s3, bucket, key, etag, suffix=".json"):
    """Write a report the way the worker does (input-etag metadata)."""
    AwsS3.put_report(s3, bucket, key, {"input": {"bucket": bucket, "key": key, "etag": etag}},
                     suffix)


def event_token(bucket, key, etag):
    """The ClientToken the handler derives from the S3 event of this object version."""
    [obj], _ = lambda_function.parse_records(s3_event(s3_record(bucket, key, etag=etag)))
    return lambda_function.client_token(obj)


def scan_token(s3, bucket, key, attempt=0):
    """The ClientToken reconcile's scan derives for the object as it is now (no event)."""
    obj = deploy.object_from_head(bucket, key, s3.head_object(Bucket=bucket, Key=key))
    return lambda_function.client_token(obj, attempt)


@pytest.fixture
def ec2_answers_tokens():
    """moto's RunInstances answers a used ClientToken as EC2 does since January 2025 (moto
    ignores the token): the local cloud's emulation, local_cloud.honour_client_tokens."""
    restore = local_cloud.honour_client_tokens()
    yield
    restore()


def workers(ec2, bucket):
    """{key tag: [(instance id, token tag)]} of the pending or running workers for the bucket."""
    found = {}
    for reservation in ec2.describe_instances(Filters=[
            {"Name": "tag:awsfun:bucket", "Values": [bucket]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]:
        for instance in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
            found.setdefault(tags["awsfun:key"], []).append(
                (instance["InstanceId"], tags["awsfun:token"]))
    return found


def user_data(ec2, instance_id):
    value = ec2.describe_instance_attribute(InstanceId=instance_id,
                                            Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode("utf-8")


def quiet():
    return deploy.Progress(echo=False)


# --- the scan --------------------------------------------------------------------------


def test_settled_state_rules():
    # A spot worker EC2 reclaimed is no failure of the input: it is launched again.
    assert deploy.settled_state("e1", None, "e1", "spot") is None
    assert deploy.settled_state("e1", "e1", "e1", "spot") == deploy.REPORTED
    assert deploy.settled_state("e1", "e1", None) == deploy.REPORTED
    assert deploy.settled_state("e1", "e1", "e1") == deploy.REPORTED
    assert deploy.settled_state("e2", "e1", None) is None          # report of an older version
    assert deploy.settled_state("e1", None, "e1") == deploy.FAILED  # visible failure
    assert deploy.settled_state("e1", None, "") == deploy.FAILED    # names no eTag: taken as current
    assert deploy.settled_state("e2", "e1", "e1") is None          # both for an older version
    assert deploy.settled_state("e1", None, None) is None


def test_reconcile_launches_exactly_the_unprocessed_inputs_with_a_token_of_its_own(
        clients, stack, function_env):
    s3, ec2 = clients("s3"), clients("ec2")
    bucket = stack.data_bucket
    long_key = "deep/" + "x" * 1030 + ".csv"  # its reports are hashed under analysis/_long/
    etags = {key: put(s3, bucket, key) for key in (
        "new/a.csv", "new/b c+ü.csv", "done/r.csv", long_key, "stale/s.csv", "failed/f.csv",
        "failed/old.csv", "failed/by-bootstrap.csv", "busy/w.csv", "notes/analysis-draft.txt")}
    put_report(s3, bucket, "done/r.csv", etags["done/r.csv"])
    put_report(s3, bucket, long_key, etags[long_key])
    put_report(s3, bucket, "stale/s.csv", "an-older-etag")
    put_report(s3, bucket, "failed/f.csv", etags["failed/f.csv"], ".error.json")
    put_report(s3, bucket, "failed/old.csv", "an-older-etag", ".error.json")
    # bootstrap.sh's error reports carry the eTag in the body only.
    s3.put_object(Bucket=bucket, Key="analysis/failed/by-bootstrap.csv.error.json",
                  Body=json.dumps({"input": {"key": "failed/by-bootstrap.csv",
                                             "etag": etags["failed/by-bootstrap.csv"]}}))
    # A worker the Lambda launched from the S3 event is still running.
    busy = lambda_function.lambda_handler(
        s3_event(s3_record(bucket, "busy/w.csv", etag=etags["busy/w.csv"])), None)
    [busy_launch] = busy["launched"]
    expected = ["failed/old.csv", "new/a.csv", "new/b c+ü.csv", "stale/s.csv"]

    before = deploy.collect_status(clients, stack)["counts"]
    assert before == {"inputs": 9, "reports": 2, "error_reports": 2, "running": 1,
                      "unprocessed": 4}

    result = deploy.reconcile(clients, stack, progress=quiet())
    assert sorted(result["unprocessed"]) == expected
    assert sorted(e["key"] for e in result["launched"]) == expected
    assert result["failed"] == [] and result["counts"] == before
    running = workers(ec2, bucket)
    assert sorted(running) == sorted(expected + ["busy/w.csv"])
    for entry in result["launched"]:
        [(instance_id, token)] = running[entry["key"]]
        assert instance_id == entry["instance_id"]
        # No event, so no sequencer: the scan's token, never the event's.
        assert token == scan_token(s3, bucket, entry["key"])
        assert token != event_token(bucket, entry["key"], etags[entry["key"]])
    assert running["busy/w.csv"] == [(busy_launch["instance_id"],
                                      event_token(bucket, "busy/w.csv", etags["busy/w.csv"]))]

    # Byte for byte what the handler launches for the object's S3 event.
    handled = lambda_function.lambda_handler(
        s3_event(s3_record(bucket, "new/a.csv", etag=etags["new/a.csv"])), None)
    [reconciled] = [e["instance_id"] for e in result["launched"] if e["key"] == "new/a.csv"]
    assert user_data(ec2, handled["launched"][0]["instance_id"]) == user_data(ec2, reconciled)

    after = deploy.collect_status(clients, stack)["counts"]
    assert after == dict(before, running=5, unprocessed=0)


def test_an_input_whose_spot_worker_was_reclaimed_is_relaunched_once_on_demand(clients):
    """AWS fact: EC2 may reclaim a spot instance at two minutes' notice. The launcher's error
    report then says "spot" (bootstrap/launcher.py); reconcile relaunches that input on
    demand, which EC2 does not reclaim, so once; a later error report is a failure."""
    names = deploy.resolve_names(clients, "local")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False), spot=True)
    s3, ec2, bucket = clients("s3"), clients("ec2"), names.data_bucket
    etag = put(s3, bucket, "run/reads.csv")
    error_key = AwsS3.report_key("run/reads.csv", ".error.json")
    s3.put_object(Bucket=bucket, Key=error_key, Metadata={"input-etag": etag,
                                                          "interruption": "spot"},
                  Body=json.dumps({"input": {"key": "run/reads.csv", "etag": etag},
                                   "exit_code": 143, "spot_interruption": {
                                       "action": "terminate", "time": "2026-12-01T02:20:00Z"}}))
    launches = []
    ec2.meta.events.register("provide-client-params.ec2.RunInstances",
                             lambda params, **_: launches.append(dict(params)))
    assert deploy.collect_status(clients, names)["counts"]["unprocessed"] == 1

    result = deploy.reconcile(clients, names, progress=quiet())
    assert [e["key"] for e in result["launched"]] == ["run/reads.csv"]
    [launch] = launches
    assert "InstanceMarketOptions" not in launch  # on demand, though the stack launches spot

    # The on-demand worker failed in its own right: that error report is the answer.
    for reservation in ec2.describe_instances()["Reservations"]:
        ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in reservation["Instances"]])
    put_report(s3, bucket, "run/reads.csv", etag, ".error.json")
    again = deploy.reconcile(clients, names, progress=quiet())
    assert again["launched"] == [] and again["counts"]["error_reports"] == 1
    assert len(launches) == 1


def test_dry_run_key_prefix_second_run_and_new_version(clients, stack):
    s3, ec2 = clients("s3"), clients("ec2")
    bucket = stack.data_bucket
    for key in ("in/a.csv", "in/b.csv", "other/c.csv"):
        put(s3, bucket, key)

    dry = deploy.reconcile(clients, stack, key_prefix="in/", dry_run=True, progress=quiet())
    assert sorted(dry["unprocessed"]) == ["in/a.csv", "in/b.csv"]
    assert dry["launched"] == [] and workers(ec2, bucket) == {}

    first = deploy.reconcile(clients, stack, key_prefix="in/", progress=quiet())
    assert sorted(e["key"] for e in first["launched"]) == ["in/a.csv", "in/b.csv"]
    assert sorted(workers(ec2, bucket)) == ["in/a.csv", "in/b.csv"]

    # While those workers run, a second run launches only what is left.
    second = deploy.reconcile(clients, stack, progress=quiet())
    assert [e["key"] for e in second["launched"]] == ["other/c.csv"]
    third = deploy.reconcile(clients, stack, progress=quiet())
    assert third["unprocessed"] == [] and third["launched"] == []
    assert third["counts"] == {"inputs": 3, "reports": 0, "error_reports": 0, "running": 3,
                               "unprocessed": 0}
    assert sum(len(found) for found in workers(ec2, bucket).values()) == 3

    # A new version of a reported input needs its own worker, with its own token.
    put_report(s3, bucket, "other/c.csv", s3.head_object(Bucket=bucket, Key="other/c.csv")[
        "ETag"].strip('"'))
    put(s3, bucket, "other/c.csv", b"changed\n")
    fourth = deploy.reconcile(clients, stack, progress=quiet())
    assert fourth["unprocessed"] == ["other/c.csv"]
    tokens = {token for _, token in workers(ec2, bucket)["other/c.csv"]}
    assert scan_token(s3, bucket, "other/c.csv") in tokens and len(tokens) == 2

    # A worker lost without any report (host failure): EC2 before January 2025 answered its
    # ClientToken with that dead instance (imitated here). reconcile relaunches
    # under the next attempt's token, and a further run sees that worker running.
    [(dead, dead_token)] = workers(ec2, bucket)["in/a.csv"]
    ec2.terminate_instances(InstanceIds=[dead])
    used = answer_tokens_with_instance(ec2, {dead_token: dead})
    fifth = deploy.reconcile(clients, stack, progress=quiet())
    assert fifth["unprocessed"] == ["in/a.csv"] and fifth["failed"] == []
    [relaunched] = fifth["launched"]
    [(instance_id, token)] = workers(ec2, bucket)["in/a.csv"]
    assert relaunched["instance_id"] == instance_id != dead
    head = s3.head_object(Bucket=bucket, Key="in/a.csv")
    obj = deploy.object_from_head(bucket, "in/a.csv", head)
    assert token == lambda_function.client_token(obj, 1) != dead_token
    assert used == [dead_token, token]
    sixth = deploy.reconcile(clients, stack, progress=quiet())
    assert sixth["launched"] == [] and sixth["counts"]["running"] == 3

    # Every attempt's token answered by an ended worker: reported as failed, not "launched".
    ec2.terminate_instances(InstanceIds=[instance_id])
    answer_tokens_with_instance(ec2, {t: dead for t in deploy.worker_tokens(obj)})
    seventh = deploy.reconcile(clients, stack, progress=quiet())
    assert seventh["launched"] == []
    [failed] = seventh["failed"]
    assert failed["key"] == "in/a.csv"
    assert "every ClientToken is used by a worker that ended without a report" in failed["error"]
    # With EC2's reason for the end (StateReason), the only place it says why a worker that
    # never booted (e.g. a default EBS key the launcher may not use) ended.
    assert (f"{dead} (terminated: Client.UserInitiatedShutdown: Client.UserInitiatedShutdown: "
            "User initiated shutdown)") in failed["error"]


def test_a_lost_worker_is_relaunched_when_ec2_answers_idempotent_instance_terminated(
        clients, stack, ec2_answers_tokens):
    """EC2 (since January 2025) answers the token of a terminated instance with
    IdempotentInstanceTerminated instead of that instance. With no report, the worker was
    lost: reconcile relaunches under the next attempt's token (it used to mark the input
    failed), up to MAX_RELAUNCHES times, then fails loudly."""
    s3, ec2 = clients("s3"), clients("ec2")
    bucket = stack.data_bucket
    put(s3, bucket, "in/a.csv")
    first = deploy.reconcile(clients, stack, progress=quiet())
    [(instance_id, token)] = workers(ec2, bucket)["in/a.csv"]
    assert token == scan_token(s3, bucket, "in/a.csv")
    assert first["launched"] == [{"key": "in/a.csv", "instance_id": instance_id, "source": "scan"}]
    for attempt in range(1, deploy.MAX_RELAUNCHES + 1):
        ec2.terminate_instances(InstanceIds=[instance_id])  # lost without a trace
        result = deploy.reconcile(clients, stack, progress=quiet())
        assert result["failed"] == [] and result["unprocessed"] == ["in/a.csv"]
        [(instance_id, token)] = workers(ec2, bucket)["in/a.csv"]
        assert result["launched"][0]["instance_id"] == instance_id
        assert token == scan_token(s3, bucket, "in/a.csv", attempt)
    # A re-run while that worker runs launches nothing: the same tokens, the worker found.
    assert deploy.reconcile(clients, stack, progress=quiet())["launched"] == []
    ec2.terminate_instances(InstanceIds=[instance_id])
    last = deploy.reconcile(clients, stack, progress=quiet())
    assert last["launched"] == [] and workers(ec2, bucket) == {}
    [failed] = last["failed"]
    assert failed["key"] == "in/a.csv"
    assert "every ClientToken is used by a worker that ended without a report" in failed["error"]
    # EC2 names no instance here; its StateReason is found by the token's tag.
    assert "(terminated: Client.UserInitiatedShutdown" in failed["error"]


def test_a_redeploy_then_a_lost_worker_is_relaunched_on_parameter_mismatch(
        clients, stack, ec2_answers_tokens):
    """EC2 answers a token reused with other parameters (a redeploy changed the watchdog, so
    the user-data) with IdempotentParameterMismatch. reconcile finds that token's instance
    by its awsfun:token tag: it has ended with no report, so the next attempt launches."""
    s3, ec2, lam = clients("s3"), clients("ec2"), clients("lambda")
    bucket = stack.data_bucket
    put(s3, bucket, "in/a.csv")
    deploy.reconcile(clients, stack, progress=quiet())
    [(dead, dead_token)] = workers(ec2, bucket)["in/a.csv"]
    ec2.terminate_instances(InstanceIds=[dead])
    env = lam.get_function_configuration(FunctionName=stack.function_name)["Environment"]
    lam.update_function_configuration(FunctionName=stack.function_name, Environment={
        "Variables": dict(env["Variables"], WATCHDOG_MINUTES="30")})
    assert deploy.instance_by_token(ec2, dead_token) == (dead, "terminated")
    result = deploy.reconcile(clients, stack, progress=quiet())
    assert result["failed"] == []
    [(instance_id, token)] = workers(ec2, bucket)["in/a.csv"]
    assert result["launched"][0]["instance_id"] == instance_id != dead
    assert token == scan_token(s3, bucket, "in/a.csv", 1)
    assert "JOB_WATCHDOG_MINUTES='30'" in user_data(ec2, instance_id)
    assert deploy.instance_by_token(ec2, token) == (instance_id, "running")


def test_console_folder_markers_are_not_inputs(clients, stack):
    """The S3 console's "Create folder" writes a zero-byte key ending in '/': no input, so
    status does not count it and reconcile launches nothing for it."""
    s3, ec2 = clients("s3"), clients("ec2")
    bucket = stack.data_bucket
    s3.put_object(Bucket=bucket, Key="in/new folder/", Body=b"")
    put(s3, bucket, "in/new folder/a.csv")
    assert deploy.collect_status(clients, stack)["counts"] == {
        "inputs": 1, "reports": 0, "error_reports": 0, "running": 0, "unprocessed": 1}
    result = deploy.reconcile(clients, stack, progress=quiet())
    assert result["unprocessed"] == ["in/new folder/a.csv"]
    assert sorted(workers(ec2, bucket)) == ["in/new folder/a.csv"]


def answer_tokens_with_instance(ec2, answers):
    """Make RunInstances answer these ClientTokens with an existing instance, as EC2 did for a
    token already used before January 2025; other tokens launch as usual. Returns the tokens
    asked for, in order."""
    asked = []

    def note(params, **_):
        asked.append(params["ClientToken"])

    def answer(**_):
        if asked and asked[-1] in answers:
            return (AWSResponse(None, 200, {}, None),
                    {"Instances": [{"InstanceId": answers[asked[-1]]}],
                     "ResponseMetadata": {"HTTPStatusCode": 200}})
        return None

    ec2.meta.events.register("provide-client-params.ec2.RunInstances", note)
    ec2.meta.events.register("before-call.ec2.RunInstances", answer)
    return asked


# --- the dead-letter queue ---------------------------------------------------------------


def refuse_launches_of(ec2, prefix):
    """Make RunInstances fail (InsufficientInstanceCapacity) for keys under `prefix` only."""
    current = {}

    def note(params, **_):
        tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
        current["key"] = tags["awsfun:key"]

    def refuse(**_):
        if current.pop("key", "").startswith(prefix):
            return (AWSResponse(None, 400, {}, None),
                    {"Error": {"Code": "InsufficientInstanceCapacity",
                               "Message": "injected by the tests"},
                     "ResponseMetadata": {"HTTPStatusCode": 400}})
        return None

    ec2.meta.events.register("provide-client-params.ec2.RunInstances", note)
    ec2.meta.events.register("before-call.ec2.RunInstances", refuse)


def dlq_bodies(sqs, url):
    """The bodies left in the queue (all visible), read without keeping them hidden."""
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                   VisibilityTimeout=0).get("Messages", [])
    return sorted(m["Body"] for m in messages)


def test_dead_letters_are_replayed_and_deleted_only_once_launched(clients, stack):
    s3, ec2, sqs = clients("s3"), clients("ec2"), clients("sqs")
    bucket = stack.data_bucket
    url = sqs.get_queue_url(QueueName=stack.dlq_name)["QueueUrl"]
    etags = {key: put(s3, bucket, key) for key in ("lost/a.csv", "lost/b.csv", "fail/c.csv",
                                                     "done/d.csv", "changed/e.csv")}
    put_report(s3, bucket, "done/d.csv", etags["done/d.csv"])
    new_e = put(s3, bucket, "changed/e.csv", b"changed\n")
    bodies = {
        "two lost": s3_event(s3_record(bucket, "lost/a.csv", etag=etags["lost/a.csv"]),
                             s3_record(bucket, "lost/b.csv", etag=etags["lost/b.csv"])),
        "fails": s3_event(s3_record(bucket, "fail/c.csv", etag=etags["fail/c.csv"])),
        "reported": s3_event(s3_record(bucket, "done/d.csv", etag=etags["done/d.csv"])),
        "superseded": s3_event(s3_record(bucket, "changed/e.csv", etag=etags["changed/e.csv"])),
        "deleted": s3_event(s3_record(bucket, "gone/f.csv", etag="ffff")),
        "report event": s3_event(s3_record(bucket, "analysis/lost/a.csv.json")),
    }
    for body in bodies.values():
        sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    sqs.send_message(QueueUrl=url, MessageBody="not an event")
    refuse_launches_of(ec2, "fail/")

    dry = deploy.reconcile(clients, stack, dry_run=True, progress=quiet())
    assert dry["launched"] == [] and dry["replayed"] == [] and workers(ec2, bucket) == {}
    assert sum(r["outcome"] == "would launch" for e in dry["dlq_kept"] for r in e["records"]) \
        == 3  # lost/a, lost/b, fail/c
    assert len(dlq_bodies(sqs, url)) == 7  # every letter kept, and visible again

    result = deploy.reconcile(clients, stack, progress=quiet())

    launched = {e["key"]: e for e in result["launched"]}
    assert sorted(launched) == ["changed/e.csv", "lost/a.csv", "lost/b.csv"]
    assert launched["lost/a.csv"]["source"] == launched["lost/b.csv"]["source"] == \
        "dead-letter queue"
    # The replay used the event's token; the scan then saw that worker and left it alone.
    for key in ("lost/a.csv", "lost/b.csv"):
        [(_, token)] = workers(ec2, bucket)[key]
        assert token == event_token(bucket, key, etags[key])
    # The superseded event launched nothing; the scan launched the current version.
    assert launched["changed/e.csv"]["source"] == "scan"
    [(_, token)] = workers(ec2, bucket)["changed/e.csv"]
    assert token == scan_token(s3, bucket, "changed/e.csv") != event_token(bucket, "changed/e.csv",
                                                                            new_e)

    outcomes = {tuple(r["key"] for r in e["records"]): [r["outcome"] for r in e["records"]]
                for e in result["replayed"]}
    assert outcomes == {("lost/a.csv", "lost/b.csv"): ["launched", "launched"],
                        ("done/d.csv",): [deploy.REPORTED],
                        ("changed/e.csv",): ["superseded by a newer version"],
                        ("gone/f.csv",): ["object deleted"],
                        ("analysis/lost/a.csv.json",): [
                            "key contains 'analysis' (worker output)"]}
    assert sorted(e.get("reason") for e in result["dlq_failed"]) == [
        "a launch failed", "not an S3 event: the message body is not JSON"]
    assert [f["key"] for f in result["failed"]] == ["fail/c.csv"]  # tried once, not twice
    assert "InsufficientInstanceCapacity" in result["failed"][0]["error"]
    # Only the failed launch and the unreadable message stay, visible for the next run.
    assert dlq_bodies(sqs, url) == sorted([json.dumps(bodies["fails"]), "not an event"])


# --- the command line ---------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "deploy.py"), *args], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_reconcile_json_text_and_exit_status(clients, stack):
    s3 = clients("s3")
    for key in ("in/a.csv", "in/b.csv"):
        put(s3, stack.data_bucket, key)

    dry = run_cli("--prefix", "local", "reconcile", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would launch" in dry.stdout and "in/a.csv" in dry.stdout
    assert "Dry run: would launch 2" in dry.stdout

    done = run_cli("reconcile", "--prefix", "local", "--key-prefix", "in/a", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [e["key"] for e in result["launched"]] == ["in/a.csv"]

    text = run_cli("reconcile", "--prefix", "local")
    assert text.returncode == 0, text.stderr
    assert "launched" in text.stdout and "in/b.csv" in text.stdout
    assert "Launched 1, failed 0" in text.stdout

    status = run_cli("status", "--prefix", "local")
    assert status.returncode == 0, status.stderr
    assert "inputs: 2  reported: 0  error-reported: 0  running: 2  unprocessed: 0" in status.stdout

    missing = run_cli("reconcile", "--prefix", "nostack")
    assert missing.returncode == 2
    assert "nostack-launcher is not deployed" in missing.stderr

    # A launch that fails makes the run fail (after the others), so a scheduler notices.
    put(s3, stack.data_bucket, "in/c.csv")
    clients("ec2").delete_launch_template(LaunchTemplateName=stack.launch_template)
    failed = run_cli("reconcile", "--prefix", "local")
    assert failed.returncode == 1
    assert "failed" in failed.stdout and "in/c.csv" in failed.stdout
    assert "Launched 0, failed 1" in failed.stdout
