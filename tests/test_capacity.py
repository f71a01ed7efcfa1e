"""The handler's capacity rules: SQS batches, the cap on live workers, deferral, spot with
on-demand fallback, and subnets.

EC2 is a botocore Stubber: moto never refuses capacity, so each refusal is EC2's documented
answer (EC2 API Reference, "Error codes"), queued by hand. Each test names the fact it encodes.
"""

import json
import logging

import boto3
import pytest
from botocore.stub import ANY, Stubber
from support import RecordingEc2, record_calls, s3_event, s3_record

import lambda_function as lf

BUCKET = "awsfun-data"
SPOT = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time",
                                              "InstanceInterruptionBehavior": "terminate"}}


def sqs_message(message_id, body):
    """One SQS record as Lambda's event source mapping delivers it (body: S3's JSON text)."""
    return {"messageId": message_id, "receiptHandle": f"rh-{message_id}",
            "body": body if isinstance(body, str) else json.dumps(body),
            "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:su2c-events",
            "awsRegion": "us-east-1"}


def sqs_batch(*keys):
    """An SQS batch of one message per key, each holding that key's S3 event (ids m0, m1...)."""
    return {"Records": [sqs_message(f"m{i}", s3_event(s3_record(BUCKET, key, etag=f"e{i}")))
                        for i, key in enumerate(keys)]}


def live(*tokens):
    """EC2's DescribeInstances answer listing one live worker per awsfun:token."""
    instances = [{"InstanceId": f"i-{n:017x}", "Tags": [{"Key": "awsfun:token", "Value": t}]}
                 for n, t in enumerate(tokens, start=0xa0)]
    return {"Reservations": [{"Instances": instances}] if instances else []}


def running_count(n):
    return live(*(f"other-{i}" for i in range(n)))


COUNT_PARAMS = {"Filters": [{"Name": "tag:awsfun:launch-template", "Values": ["su2cw_worker"]},
                            {"Name": "instance-state-name", "Values": ["pending", "running"]}],
                "MaxResults": 1000}


def instance(instance_id):
    return {"Instances": [{"InstanceId": instance_id}]}


@pytest.fixture
def ec2():
    """The handler's EC2 client behind a Stubber; `.calls` records every call made."""
    client = boto3.client("ec2", region_name="us-east-1")
    client.calls = record_calls(client)
    stub = Stubber(client)
    stub.activate()
    lf._clients["ec2"] = client
    client.stub = stub
    yield client
    stub.deactivate()


def runs(ec2):
    return [params for name, params in ec2.calls if name == "RunInstances"]


def token_of(key, index):
    [obj], _ = lf.parse_records(s3_event(s3_record(BUCKET, key, etag=f"e{index}")))
    return lf.client_token(obj)


# --- the cap ----------------------------------------------------------------------------


def test_at_the_cap_every_record_defers_and_exactly_those_messages_are_retried(ec2, monkeypatch):
    """With MAX_WORKERS workers pending or running, records defer: no RunInstances, and the
    partial batch response (Lambda Developer Guide, "Handling errors for an SQS event source":
    batchItemFailures of itemIdentifier = messageId) lists exactly those messages."""
    monkeypatch.setenv("MAX_WORKERS", "2")
    ec2.stub.add_response("describe_instances", running_count(2), COUNT_PARAMS)
    result = lf.lambda_handler(sqs_batch("in/a.csv", "in/b.csv", "analysis/x.json"), None)
    assert result["launched"] == [] and runs(ec2) == []
    assert [e["key"] for e in result["deferred"]] == ["in/a.csv", "in/b.csv"]
    assert all(e["code"] == "MaxWorkers" and "MAX_WORKERS=2" in e["reason"]
               for e in result["deferred"])
    assert result["batchItemFailures"] == [{"itemIdentifier": "m0"}, {"itemIdentifier": "m1"}]
    assert [e["key"] for e in result["skipped"]] == ["analysis/x.json"]  # deleted, not retried
    ec2.stub.assert_no_pending_responses()


def test_the_cap_counts_once_per_invocation_and_then_its_own_launches(ec2, monkeypatch):
    """One DescribeInstances (its pages followed: NextToken) per invocation, not per record;
    launches made meanwhile are counted locally: 1 live + 2 launched = the cap of 3."""
    monkeypatch.setenv("MAX_WORKERS", "3")
    ec2.stub.add_response("describe_instances", dict(running_count(0), NextToken="p2"),
                          COUNT_PARAMS)
    ec2.stub.add_response("describe_instances", running_count(1), dict(COUNT_PARAMS,
                                                                       NextToken="p2"))
    ec2.stub.add_response("run_instances", instance("i-00000000000000001"))
    ec2.stub.add_response("run_instances", instance("i-00000000000000002"))
    result = lf.lambda_handler(sqs_batch("a.csv", "b.csv", "c.csv", "d.csv"), None)
    assert [e["key"] for e in result["launched"]] == ["a.csv", "b.csv"]
    assert [e["key"] for e in result["deferred"]] == ["c.csv", "d.csv"]
    assert result["batchItemFailures"] == [{"itemIdentifier": "m2"}, {"itemIdentifier": "m3"}]
    assert [name for name, _ in ec2.calls] == ["DescribeInstances", "DescribeInstances",
                                              "RunInstances", "RunInstances"]
    ec2.stub.assert_no_pending_responses()


def test_only_skipped_records_cost_no_call(ec2):
    result = lf.lambda_handler(sqs_batch("analysis/a.csv.json"), None)
    assert ec2.calls == [] and result["batchItemFailures"] == []


def test_a_plain_s3_event_at_the_cap_still_raises_for_lambdas_retry(ec2, monkeypatch):
    """S3 invoking the function directly (or a console test) has no batch to answer with:
    a deferred record raises, as a failed one does, so Lambda's retries apply."""
    monkeypatch.setenv("MAX_WORKERS", "1")
    ec2.stub.add_response("describe_instances", running_count(1))
    with pytest.raises(lf.LaunchFailed, match="1 of 1 records failed: 'in/a.csv': MaxWorkers"):
        lf.lambda_handler(s3_event(s3_record(BUCKET, "in/a.csv")), None)


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_max_workers_must_be_a_whole_number_of_at_least_one(value):
    with pytest.raises(ValueError):
        lf.load_settings({"MAX_WORKERS": value})


# --- capacity refusals ------------------------------------------------------------------


@pytest.mark.parametrize("code, message", [
    ("VcpuLimitExceeded", ("You have requested more vCPU capacity than your current vCPU "
                           "limit of 16 allows for the instance bucket that the specified "
                           "instance type belongs to.")),
    ("InstanceLimitExceeded", ("You have requested more instances than your current instance "
                               "limit allows for the specified instance type.")),
    ("RequestLimitExceeded", "Request limit exceeded."),
])
def test_a_regional_refusal_defers_this_record_and_the_rest_unasked(ec2, code, message):
    """EC2's quota refusals (VcpuLimitExceeded, InstanceLimitExceeded) and throttling
    (RequestLimitExceeded, once botocore's retries are spent) hold for the whole region: the
    record defers, and the rest of the batch defers without asking EC2 again."""
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", code, message, 400 if code != "RequestLimitExceeded"
                              else 503)
    result = lf.lambda_handler(sqs_batch("a.csv", "b.csv", "c.csv"), None)
    assert len(runs(ec2)) == 1
    assert [(e["key"], e["code"]) for e in result["deferred"]] == \
        [("a.csv", code), ("b.csv", code), ("c.csv", code)]
    assert result["deferred"][0]["reason"] == f"EC2 refused: {code} {message}"
    assert "earlier in this invocation" in result["deferred"][1]["reason"]
    assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == ["m0", "m1", "m2"]
    assert result["failed"] == []


def test_insufficient_capacity_on_demand_defers_that_record_only(ec2):
    """InsufficientInstanceCapacity is one Availability Zone's ("We currently do not have
    sufficient capacity in the Availability Zone you requested"): the next record may fit."""
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", "InsufficientInstanceCapacity",
                              "We currently do not have sufficient t3.small capacity in the "
                              "Availability Zone you requested (us-east-1a).", 500)
    ec2.stub.add_response("run_instances", instance("i-0000000000000000b"))
    result = lf.lambda_handler(sqs_batch("a.csv", "b.csv"), None)
    assert [e["key"] for e in result["deferred"]] == ["a.csv"]
    assert [e["key"] for e in result["launched"]] == ["b.csv"]
    assert result["batchItemFailures"] == [{"itemIdentifier": "m0"}]


def test_other_errors_fail_loudly_and_their_messages_come_back(ec2, caplog):
    """Not capacity (UnauthorizedOperation: the role may not launch): logged as an ERROR and
    reported as failed; the message is retried and, after maxReceiveCount, dead-lettered."""
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", "UnauthorizedOperation",
                              "You are not authorized to perform this operation.", 403)
    ec2.stub.add_response("run_instances", instance("i-0000000000000000b"))
    with caplog.at_level(logging.INFO):
        result = lf.lambda_handler(sqs_batch("a.csv", "b.csv"), None)
    assert [(e["key"], e["code"]) for e in result["failed"]] == [("a.csv", "UnauthorizedOperation")]
    assert result["deferred"] == [] and [e["key"] for e in result["launched"]] == ["b.csv"]
    assert result["batchItemFailures"] == [{"itemIdentifier": "m0"}]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [(f"failed s3://{BUCKET}/a.csv: UnauthorizedOperation You are not "
                       "authorized to perform this operation.")]


def test_a_count_the_role_may_not_make_fails_every_record_after_one_call(ec2):
    """DescribeInstances refused (a launcher role without ec2:DescribeInstances) is no
    capacity problem: the records fail, and the count is not asked again per record."""
    ec2.stub.add_client_error("describe_instances", "UnauthorizedOperation", "no", 403)
    result = lf.lambda_handler(sqs_batch("a.csv", "b.csv"), None)
    assert [e["code"] for e in result["failed"]] == ["UnauthorizedOperation"] * 2
    assert len(ec2.calls) == 1 and len(result["batchItemFailures"]) == 2


# --- spot, with on-demand fallback ------------------------------------------------------


def test_spot_refused_launches_on_demand_in_the_same_invocation(ec2, monkeypatch):
    """A one-time spot request refused with InsufficientInstanceCapacity ("There is no Spot
    capacity available that matches your request.") launches the same record on demand at
    once. The on-demand request carries another ClientToken, derived from the spot one: EC2
    answers a token reused with other parameters with IdempotentParameterMismatch (EC2
    Developer Guide, "Ensuring idempotency"), while a refused request binds no token."""
    monkeypatch.setenv("SPOT", "1")
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", "InsufficientInstanceCapacity",
                              "There is no Spot capacity available that matches your request.",
                              500, expected_params={**_any_launch(), "InstanceMarketOptions": SPOT})
    ec2.stub.add_response("run_instances", instance("i-0000000000000000d"), _any_launch())
    result = lf.lambda_handler(sqs_batch("in/a.csv"), None)
    assert result["batchItemFailures"] == []
    [launched] = result["launched"]
    assert (launched["instance_id"], launched["market"]) == ("i-0000000000000000d", "on-demand")
    spot, on_demand = runs(ec2)
    token = token_of("in/a.csv", 0)
    assert spot["ClientToken"] == token
    assert on_demand["ClientToken"] != token and len(on_demand["ClientToken"]) <= 64
    # Both carry the upload's own token as their tag: reconcile and the count find either.
    for params in (spot, on_demand):
        tags = {t["Key"]: t["Value"] for t in params["TagSpecifications"][0]["Tags"]}
        assert tags["awsfun:token"] == token
    # Deterministic: a redelivery walks the same steps with the same tokens.
    settings = lf.load_settings({"SPOT": "1"})
    assert lf.launch_token(token, "on-demand", None, settings) == on_demand["ClientToken"]
    ec2.stub.assert_no_pending_responses()


def _any_launch():
    """expected_params of an on-demand RunInstances, any values (no InstanceMarketOptions)."""
    return {name: ANY for name in ("LaunchTemplate", "MinCount", "MaxCount", "UserData",
                                   "ClientToken", "InstanceInitiatedShutdownBehavior",
                                   "MetadataOptions", "TagSpecifications", "DryRun")}


def test_spot_launches_spot_when_there_is_capacity(ec2, monkeypatch):
    monkeypatch.setenv("SPOT", "true")
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_response("run_instances", instance("i-0000000000000000e"),
                          {**_any_launch(), "InstanceMarketOptions": SPOT})
    [launched] = lf.lambda_handler(sqs_batch("in/a.csv"), None)["launched"]
    assert launched["market"] == "spot"
    assert runs(ec2)[0]["ClientToken"] == token_of("in/a.csv", 0)


def test_the_spot_quota_refused_skips_spot_in_every_other_subnet(ec2, monkeypatch):
    """MaxSpotInstanceCountExceeded is the region's spot quota: no other subnet lifts it, so
    the walk goes straight to on demand in the first subnet."""
    monkeypatch.setenv("SPOT", "1")
    monkeypatch.setenv("SUBNET_IDS", "subnet-a, subnet-b")
    monkeypatch.setenv("SECURITY_GROUP_IDS", "sg-1")
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", "MaxSpotInstanceCountExceeded",
                              "Max spot instance count exceeded", 400)
    ec2.stub.add_response("run_instances", instance("i-0000000000000000f"))
    [launched] = lf.lambda_handler(sqs_batch("in/a.csv"), None)["launched"]
    assert (launched["market"], launched["subnet"]) == ("on-demand", "subnet-a")
    first, second = runs(ec2)
    assert "InstanceMarketOptions" in first and "InstanceMarketOptions" not in second
    assert second["NetworkInterfaces"] == [{"DeviceIndex": 0, "SubnetId": "subnet-a",
                                            "Groups": ["sg-1"]}]


def test_a_route_may_ask_for_spot():
    routes = lf.validate_routes({"routes": [{"name": "big", "match": "big/*",
                                             "launch_template": "big_worker", "spot": True}]})
    assert lf.apply_route(lf.load_settings({}), routes[0])["SPOT"] is True
    with pytest.raises(lf.RoutesError, match="'spot' must be true or false"):
        lf.validate_routes({"routes": [{"name": "b", "match": "*", "launch_template": "t_t",
                                        "spot": "yes"}]})


def test_a_redelivery_after_a_fallback_launch_finds_the_worker_running(ec2, monkeypatch):
    """The first invocation launched on demand after spot was refused; a duplicate delivery
    later must not ask for spot again under the first token (which EC2 never bound, so it
    could start a second worker): the count lists the upload's awsfun:token as live."""
    monkeypatch.setenv("SPOT", "1")
    ec2.stub.add_response("describe_instances", live(token_of("in/a.csv", 0)))
    result = lf.lambda_handler(sqs_batch("in/a.csv"), None)
    assert runs(ec2) == [] and result["batchItemFailures"] == []
    assert [(e["instance_id"], e["market"]) for e in result["launched"]] == \
        [("i-000000000000000a0", "running")]


# --- subnets ----------------------------------------------------------------------------


def test_no_capacity_in_one_subnet_tries_the_next_with_the_templates_groups(ec2, monkeypatch):
    """InsufficientInstanceCapacity holds for one Availability Zone: the next subnet (another
    zone) is tried under its own token. A request's NetworkInterfaces replace the template's,
    so the template's security groups are restated (SECURITY_GROUP_IDS)."""
    monkeypatch.setenv("SUBNET_IDS", "subnet-a,subnet-b,subnet-c")
    monkeypatch.setenv("SECURITY_GROUP_IDS", "sg-1,sg-2")
    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_client_error("run_instances", "InsufficientInstanceCapacity",
                              "We currently do not have sufficient capacity.", 500)
    ec2.stub.add_response("run_instances", instance("i-0000000000000000b"))
    [launched] = lf.lambda_handler(sqs_batch("in/a.csv"), None)["launched"]
    assert launched["subnet"] == "subnet-b"
    first, second = runs(ec2)
    assert [p["NetworkInterfaces"][0]["SubnetId"] for p in (first, second)] == \
        ["subnet-a", "subnet-b"]
    assert second["NetworkInterfaces"][0]["Groups"] == ["sg-1", "sg-2"]
    assert first["ClientToken"] == token_of("in/a.csv", 0) != second["ClientToken"]


def test_every_subnet_without_capacity_defers(ec2, monkeypatch):
    monkeypatch.setenv("SUBNET_IDS", "subnet-a,subnet-b")
    ec2.stub.add_response("describe_instances", running_count(0))
    for _ in range(2):
        ec2.stub.add_client_error("run_instances", "InsufficientInstanceCapacity", "none", 500)
    result = lf.lambda_handler(sqs_batch("in/a.csv"), None)
    assert [e["code"] for e in result["deferred"]] == ["InsufficientInstanceCapacity"]
    assert result["batchItemFailures"] == [{"itemIdentifier": "m0"}]


def test_launch_steps_and_their_tokens():
    """Spot in every subnet before on demand in any; one distinct token per step."""
    settings = lf.load_settings({"SPOT": "1", "SUBNET_IDS": "s-a,s-b"})
    steps = lf.launch_steps(settings)
    assert steps == [("spot", "s-a"), ("spot", "s-b"), ("on-demand", "s-a"), ("on-demand", "s-b")]
    tokens = [lf.launch_token("t" * 64, market, subnet, settings) for market, subnet in steps]
    assert tokens[0] == "t" * 64 and len(set(tokens)) == 4
    assert all(len(t) <= lf.CLIENT_TOKEN_LIMIT for t in tokens)
    assert lf.launch_steps(lf.load_settings({})) == [("on-demand", None)]


# --- the SQS batch itself ---------------------------------------------------------------


def test_s3_test_events_and_non_json_bodies_are_skipped_and_deleted(ec2):
    """S3 sends {"Event": "s3:TestEvent", ...} to a queue when the notification is saved
    (S3 User Guide, "Event message structure"): nothing to launch, nothing to retry."""
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2025-01-01T00:00:00Z",
                  "Bucket": BUCKET, "RequestId": "r", "HostId": "h"}
    event = {"Records": [sqs_message("t", test_event), sqs_message("x", "not json"),
                         sqs_message("n", {"no": "records"})]}
    result = lf.lambda_handler(event, None)
    assert ec2.calls == [] and result["batchItemFailures"] == []
    reasons = [e["reason"] for e in result["skipped"]]
    assert reasons[0].startswith("s3:TestEvent") and "not JSON" in reasons[1]
    assert "expected an S3 event notification" in reasons[2]
    assert [e["message_id"] for e in result["skipped"]] == ["t", "x", "n"]


def test_duplicate_messages_of_one_upload_launch_once(monkeypatch):
    """SQS delivers at least once: two messages of one S3 event give one RunInstances; with
    EC2's ClientToken rule a later duplicate would get the same instance too."""
    recorder = RecordingEc2()
    monkeypatch.setitem(lf._clients, "ec2", recorder)
    record = s3_record(BUCKET, "in/a.csv")
    event = {"Records": [sqs_message("m0", s3_event(record)), sqs_message("m1", s3_event(record))]}
    result = lf.lambda_handler(event, None)
    assert len(recorder.requests) == 1 and recorder.counts == 1
    assert [e["key"] for e in result["launched"]] == ["in/a.csv"]
    assert "same object version" in result["skipped"][0]["reason"]
    again = lf.lambda_handler(json.loads(json.dumps(event)), None)
    assert len(recorder.requests) == 1  # the count shows the worker: no second RunInstances
    assert again["launched"][0]["instance_id"] == result["launched"][0]["instance_id"]


def test_records_past_the_deadline_are_retried(ec2):
    """Less than DEADLINE_MARGIN_MS left: the rest are not attempted and come back."""

    class Context:
        remaining = 30_000

        def get_remaining_time_in_millis(self):
            self.remaining -= 15_000
            return self.remaining

    ec2.stub.add_response("describe_instances", running_count(0))
    ec2.stub.add_response("run_instances", instance("i-00000000000000001"))
    result = lf.lambda_handler(sqs_batch("a.csv", "b.csv", "c.csv"), Context())
    assert [e["key"] for e in result["launched"]] == ["a.csv"]
    assert [f["itemIdentifier"] for f in result["batchItemFailures"]] == ["m1", "m2"]
