"""awsfun_deploy.preflight: every precondition and every limit a setting can break is checked
before deploy changes anything (issue 10's real-target faults).
"""

import boto3
import pytest

import AwsS3
import deploy
import lambda_function
from awsfun_deploy import preflight
from deploy_helpers import ACCOUNT, NoAws, WORST_KEY, account_snapshot, user_data_size, write_routes


@pytest.mark.parametrize("which", ["data_bucket", "software_bucket"])
def test_a_bucket_in_another_region_stops_deploy_before_any_change(clients, which):
    far = boto3.client("s3", region_name="eu-west-1")
    far.create_bucket(Bucket="far-bucket",
                      CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    before = account_snapshot(clients)
    names = deploy.resolve_names(clients, **{which: "far-bucket"})
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    message = str(caught.value)
    assert "far-bucket" in message and "eu-west-1" in message and "us-east-1" in message
    assert account_snapshot(clients) == before


@pytest.mark.parametrize("setting", ["BlockPublicPolicy", "RestrictPublicBuckets"])
def test_public_software_in_an_account_that_blocks_public_policies_stops_before_any_change(
        clients, names, setting):
    """The account's Block Public Access (s3control) wins over the bucket's own: S3 refuses a
    public bucket policy under BlockPublicPolicy and ignores it under RestrictPublicBuckets.
    Deploy used to make both buckets and publish before PutBucketPolicy failed."""
    clients("s3control").put_public_access_block(
        AccountId=ACCOUNT, PublicAccessBlockConfiguration={setting: True})
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match=f"--public-software: .*{setting}"):
        deploy.deploy(clients, names, public_software=True, progress=deploy.Progress(echo=False))
    assert account_snapshot(clients) == before


def test_an_account_block_on_acls_only_leaves_public_software_possible(clients):
    s3control = clients("s3control")
    assert deploy.public_software_problems(s3control, ACCOUNT) == []  # none set
    s3control.put_public_access_block(AccountId=ACCOUNT, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True})
    assert deploy.public_software_problems(s3control, ACCOUNT) == []


def test_a_launch_template_of_another_deployment_stops_deploy_before_any_change(clients, names):
    clients("ec2").create_launch_template(
        LaunchTemplateName=names.launch_template, LaunchTemplateData={"InstanceType": "t3.small"},
        TagSpecifications=[{"ResourceType": "launch-template",
                            "Tags": [{"Key": deploy.STACK_TAG, "Value": "other"}]}])
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match="belongs to deployment 'other'"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    assert account_snapshot(clients) == before


def test_a_bad_watchdog_setting_stops_deploy_before_any_change(clients, names):
    before = account_snapshot(clients)
    with pytest.raises(deploy.DeployError, match="WATCHDOG_MINUTES"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                      environ={"WATCHDOG_MINUTES": "0"})
    assert account_snapshot(clients) == before


def test_a_route_whose_user_data_fits_a_short_key_but_not_the_longest_is_refused(tmp_path):
    # A command that leaves room for a short key but not for a 1,024-byte one.
    base = user_data_size(["x"], "a.csv")
    command = ["x" * ((lambda_function.USER_DATA_LIMIT - base - 200) * 3 // 4)]  # base64: 4/3
    assert user_data_size(command, "a.csv") <= lambda_function.USER_DATA_LIMIT
    routes = write_routes(tmp_path, {"name": "long-command", "match": "tools/*",
                                     "launch_template": "su2cw_worker", "command": command})
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False), routes_file=routes)
    message = str(caught.value)
    assert "'long-command'" in message and "16,384" in message and "1,024-byte key" in message


def test_the_shipped_routes_and_defaults_pass_every_limit():
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    routes = deploy.load_routes_file(deploy.ROUTES_FILE)
    assert deploy.limit_problems(names, routes, environ={}) == []


@pytest.mark.parametrize("route, environ, words", [
    ({"watchdog_minutes": 10, "worker_timeout_seconds": 3600}, {},
     ["'timed'", "worker_timeout_seconds 3600", "600 s"]),
    ({"worker_timeout_seconds": 7200}, {}, ["'timed'", "worker_timeout_seconds 7200", "7200 s"]),
    ({"watchdog_minutes": 10 ** 12}, {}, ["'timed'", "watchdog_minutes"]),
    ({}, {"WATCHDOG_MINUTES": "1"}, ["WATCHDOG_MINUTES=1", "60 s"]),
])
def test_a_worker_time_limit_that_cannot_end_before_the_watchdog_is_refused(route, environ, words):
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    routes = [dict({"name": "timed", "match": "t/*", "launch_template": "su2cw_worker"}, **route)]
    problems = deploy.limit_problems(names, routes, environ)
    assert len(problems) == 1, problems
    for word in words:
        assert word in problems[0]


def test_a_function_timeout_too_short_for_one_record_is_refused(monkeypatch):
    monkeypatch.setattr(preflight, "FUNCTION_TIMEOUT", 12)  # where limit_problems reads it
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    (problem,) = deploy.limit_problems(names, [], {})
    assert "function timeout 12 s" in problem and "10 s" in problem


def test_names_past_their_service_limits_are_refused_before_any_call(tmp_path):
    long_region = "xx-" + "y" * 30 + "-1"  # 35 characters: role names pass 64
    names = deploy.derive_names("a" * 20, ACCOUNT, long_region, data_bucket="d-b",
                                software_bucket="s-b")
    problems = deploy.limit_problems(names, [], {})
    assert any("role name" in p and "64" in p and names.lambda_role in p for p in problems)
    with pytest.raises(deploy.DeployError, match="64"):
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path))


def test_a_launch_template_name_from_the_environment_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("LAUNCH_TEMPLATE", "t" * 129)
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError, match="LAUNCH_TEMPLATE.*128"):
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path))


def test_a_routing_table_whose_launcher_policy_passes_iams_size_limit_is_refused(tmp_path):
    routes = [{"name": f"r{i}", "match": f"r{i}/*", "launch_template": f"su2cw_worker_{i}"}
              for i in range(120)]
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    with pytest.raises(deploy.DeployError) as caught:
        deploy.deploy(NoAws(), names, progress=deploy.Progress(echo=False),
                      routes_file=write_routes(tmp_path, *routes))
    assert "10,240" in str(caught.value) and "121 launch templates" in str(caught.value)


def test_environment_and_tag_limits_name_the_setting():
    big = {"LAUNCH_TEMPLATE": "t" * 128, "PADDING": "p" * 4000}
    (problem,) = deploy.environment_problems(big)
    assert "4 KB" in problem and "PADDING" in problem
    (problem,) = deploy.tag_problems({"awsfun:launch-template": "t" * 257}, "instance tags")
    assert "awsfun:launch-template" in problem and "256" in problem


def test_report_keys_of_the_longest_key_stay_within_s3s_limit_and_are_skipped():
    for suffix in (".json", ".error.json", ".log"):
        report = AwsS3.report_key(WORST_KEY, suffix)
        assert len(report.encode("utf-8")) <= 1024
    assert deploy.report_key_problems(lambda_function.DEFAULTS["SKIP_SUBSTRING"]) == []
    (problem,) = deploy.report_key_problems("reports")
    assert "SKIP_SUBSTRING" in problem and "analysis/" in problem
