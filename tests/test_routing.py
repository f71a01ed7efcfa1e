"""Routing: routes.json picks the launch template, limits and an optional external command."""

import json
import subprocess
import sys

import boto3
import pytest
from botocore.stub import ANY, Stubber

import AwsS3
import lambda_function
from lambda_function import RoutesError, apply_route, choose_route, validate_routes
from support import REPO, publish_software, run_user_data

BIG = {"name": "big-reads", "match": "*.fastq.gz", "launch_template": "su2cw_worker_big",
       "instance_type": "m7i.large", "watchdog_minutes": 240}
COPY = {"name": "copy", "match": "tools/*", "launch_template": "su2cw_worker",
        "command": [sys.executable, "-c",
                    "import shutil, sys, os; os.makedirs(sys.argv[2] + '/sub');"
                    "shutil.copy(sys.argv[1], sys.argv[2] + '/copy.bin');"
                    "open(sys.argv[2] + '/sub/name.txt', 'w').write(os.path.basename(sys.argv[1]))",
                    "{input}", "{output_dir}"]}


def test_shipped_routes_json_is_valid():
    table = json.loads((REPO / "routes.json").read_text())
    assert validate_routes(table) == table["routes"]


@pytest.mark.parametrize("table, message", [
    ([], "must be a JSON object"),
    ({"routes": {}}, "must be a JSON object"),
    ({"routes": [], "extra": 1}, "unknown top-level field"),
    ({"routes": ["x"]}, "route #0 must be an object"),
    ({"routes": [{"name": "a", "match": "*"}]}, "'launch_template' must be a non-empty string"),
    ({"routes": [dict(BIG, colour="red")]}, "unknown field(s) ['colour']"),
    ({"routes": [BIG, BIG]}, "used twice"),
    ({"routes": [dict(BIG, launch_template="a b")]}, "not a launch template name"),
    ({"routes": [dict(BIG, instance_type="large")]}, "not like 't3.small'"),
    ({"routes": [dict(BIG, watchdog_minutes=0)]}, "'watchdog_minutes' must be a whole number"),
    ({"routes": [dict(BIG, root_volume_gib=4)]}, "'root_volume_gib' must be a whole number of GiB"),
    ({"routes": [dict(BIG, root_volume_gib=20000)]}, "from 8 to 16384"),
    ({"routes": [dict(BIG, root_volume_gib="100")]}, "'root_volume_gib'"),
    ({"routes": [dict(BIG, worker_timeout_seconds=True)]}, "'worker_timeout_seconds'"),
    ({"routes": [dict(BIG, command="seqkit stats {input}")]}, "never a shell string"),
    ({"routes": [dict(BIG, command=["seqkit", ""])]}, "non-empty list of strings"),
    ({"routes": [dict(BIG, command=["cat", "{input}", "{home}"])]}, "uses ['home']"),
    ({"routes": [dict(BIG, command=["cat", "{input"])]}, "command argument"),
])
def test_bad_tables_are_refused_with_a_clear_message(table, message):
    with pytest.raises(RoutesError) as caught:
        validate_routes(table)
    assert message in str(caught.value)


def test_first_match_wins_and_no_match_is_the_default():
    routes = validate_routes({"routes": [BIG, dict(BIG, name="all", match="*",
                                                   launch_template="other")]})
    assert choose_route("run7/reads.fastq.gz", routes)["name"] == "big-reads"
    assert choose_route("run7/table.csv", routes)["name"] == "all"
    assert choose_route("x.fastq.gz", routes[1:])["name"] == "all"
    assert choose_route("anything", []) is None
    # fnmatch's '*' crosses '/', and matching is case-sensitive like S3 keys.
    assert choose_route("a/b/c.fastq.gz", [BIG]) is BIG
    assert choose_route("a/b/c.FASTQ.GZ", [BIG]) is None


def test_apply_route_overrides_template_limits_and_command():
    settings = lambda_function.load_settings({})
    assert apply_route(settings, None) is settings
    big = apply_route(settings, BIG)
    assert big["LAUNCH_TEMPLATE"] == "su2cw_worker_big" and big["ROUTE"] == "big-reads"
    assert big["WATCHDOG_MINUTES"] == 240 and big["WORKER_TIMEOUT_SECONDS"] == 240 * 60 - 300
    assert big["COMMAND"] is None
    timed = apply_route(settings, dict(BIG, worker_timeout_seconds=30))
    assert timed["WORKER_TIMEOUT_SECONDS"] == 30
    assert settings["LAUNCH_TEMPLATE"] == "su2cw_worker"  # the defaults are not mutated


def test_rendered_user_data_carries_the_command_as_data():
    settings = apply_route(lambda_function.load_settings({}), COPY)
    obj = {"bucket": "data-bucket", "key": "tools/$(id).bin", "etag": "e", "version_id": "",
           "sequencer": "", "event_name": "ObjectCreated:Put", "size": 1}
    user_data = lambda_function.render_user_data(
        lambda_function.load_bootstrap_template(settings), obj, settings)
    assert json.loads(lambda_function.decode_job(user_data)["COMMAND"]) == COPY["command"]
    assert "import shutil" not in user_data


def test_handler_launches_the_routed_template(monkeypatch):
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="software-bucket")
        # A key that is not beside the handler, so the table comes from the software bucket.
        s3.put_object(Bucket="software-bucket", Key="config/routes.json",
                      Body=json.dumps({"routes": [BIG]}).encode())
        monkeypatch.setenv("SOFTWARE_BUCKET", "software-bucket")
        monkeypatch.setenv("ROUTES_KEY", "config/routes.json")
        ec2 = boto3.client("ec2")
        lambda_function._clients["ec2"] = ec2
        with Stubber(ec2) as stub:
            # The cap counts the workers of every template the handler may launch.
            stub.add_response("describe_instances", {"Reservations": []}, {
                "Filters": [{"Name": "tag:awsfun:launch-template",
                             "Values": ["su2cw_worker", "su2cw_worker_big"]},
                            {"Name": "instance-state-name", "Values": ["pending", "running"]}],
                "MaxResults": 1000})
            for template in ("su2cw_worker_big", "su2cw_worker"):
                stub.add_response("run_instances", {"Instances": [{"InstanceId": "i-" + template[-3:]}]},
                                  {"LaunchTemplate": {"LaunchTemplateName": template, "Version": "$Latest"},
                                   "MinCount": 1, "MaxCount": 1, "UserData": ANY, "ClientToken": ANY,
                                   "InstanceInitiatedShutdownBehavior": "terminate",
                                   "MetadataOptions": ANY, "TagSpecifications": ANY, "DryRun": False})
            result = lambda_function.lambda_handler(event_for("data-bucket", ["r/a.fastq.gz", "r/b.csv"]), None)
            stub.assert_no_pending_responses()
    assert [(e["key"], e["route"]) for e in result["launched"]] == [
        ("r/a.fastq.gz", "big-reads"), ("r/b.csv", "default")]


def test_handler_refuses_an_invalid_table_loudly(monkeypatch):
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="software-bucket")
        s3.put_object(Bucket="software-bucket", Key="config/routes.json", Body=b"{not json")
        monkeypatch.setenv("SOFTWARE_BUCKET", "software-bucket")
        monkeypatch.setenv("ROUTES_KEY", "config/routes.json")
        with pytest.raises(RoutesError, match="not valid JSON"):
            lambda_function.lambda_handler(event_for("data-bucket", ["a.csv"]), None)


def event_for(bucket, keys):
    from urllib.parse import quote_plus

    return {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                         "s3": {"bucket": {"name": bucket},
                                "object": {"key": quote_plus(key), "eTag": f"etag{i}", "size": 5}}}
                        for i, key in enumerate(keys)]}


@pytest.fixture
def buckets(local_aws):
    s3 = boto3.client("s3")
    for name in ("data-bucket", "software-bucket"):
        s3.create_bucket(Bucket=name)
    publish_software(s3, "software-bucket")
    return s3


def run_routed(s3, key, body, route, tmp_path, shutdown_stub):
    s3.put_object(Bucket="data-bucket", Key=key, Body=body)
    settings = apply_route(lambda_function.load_settings({"SOFTWARE_BUCKET": "software-bucket"}), route)
    obj = lambda_function.parse_record(event_for("data-bucket", [key])["Records"][0])
    obj["etag"] = s3.head_object(Bucket="data-bucket", Key=key)["ETag"].strip('"')
    user_data = lambda_function.render_user_data(
        lambda_function.load_bootstrap_template(settings), obj, settings)
    return run_user_data(user_data, tmp_path, shutdown_stub)


def test_external_command_runs_end_to_end_and_uploads_its_outputs(buckets, tmp_path, shutdown_stub):
    key = "tools/odd name $(touch CANARY).fastq"
    body = (REPO / "samples" / "reads.fastq").read_bytes()
    done = run_routed(buckets, key, body, COPY, tmp_path, shutdown_stub)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(buckets.get_object(Bucket="data-bucket", Key=AwsS3.report_key(key))["Body"].read())
    assert report["route"]["exit_code"] == 0 and report["format"] == "fastq"
    assert report["route"]["outputs"] == [f"analysis/{key}/copy.bin", f"analysis/{key}/sub/name.txt"]
    copied = buckets.get_object(Bucket="data-bucket", Key=f"analysis/{key}/copy.bin")["Body"].read()
    assert copied == body
    name = buckets.get_object(Bucket="data-bucket", Key=f"analysis/{key}/sub/name.txt")["Body"].read()
    assert name == b"input-odd_name___touch_CANARY_.fastq"  # extensions kept, nothing else
    assert buckets.get_object(Bucket="data-bucket", Key=key)["Body"].read() == body
    assert not list(tmp_path.rglob("CANARY"))
    assert shutdown_stub.calls()[-1] == "-h now"


@pytest.mark.parametrize("command, message", [
    ([sys.executable, "-c", "import sys; sys.exit('tool broke')", "{input}"], "exited with status 1"),
    (["/nonexistent/tool", "{input}"], "cannot run route command"),
])
def test_failing_external_command_leaves_an_error_report(buckets, tmp_path, shutdown_stub, command, message):
    route = dict(COPY, command=command)
    done = run_routed(buckets, "tools/x.csv", b"a,b\n1,2\n", route, tmp_path, shutdown_stub)
    assert done.returncode == AwsS3.EXIT_FAILED_REPORTED
    error = json.loads(buckets.get_object(Bucket="data-bucket",
                                          Key="analysis/tools/x.csv.error.json")["Body"].read())
    assert message in error["error"]
    assert shutdown_stub.calls()[-1] == "-h now"


def test_worker_cli_checks_the_command_argument(tmp_path):
    sample = str(REPO / "samples" / "calls.vcf")
    for bad, message in (("not json", "is not JSON"), ('"ls"', "JSON list of strings"),
                         ('["cat", "{input}"]', "s3:// objects only")):
        done = subprocess.run([sys.executable, str(REPO / "AwsS3.py"), "--command", bad, sample],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr
