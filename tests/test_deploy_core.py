"""core, names and artifacts of the deploy package: names, the function's zip, retries, diffs, and
IAM propagation waited out.
"""

import io
import zipfile

import pytest
from botocore.exceptions import ClientError

import deploy
from conftest import REPO
from support import fail_first
from deploy_helpers import (
    ACCOUNT, BAD_PROFILE, NETWORK_INTERFACE, NOT_ASSUMABLE, SEND_MESSAGE, dataclass_values,
)


def test_names_come_from_prefix_account_and_region(monkeypatch):
    monkeypatch.delenv("LAUNCH_TEMPLATE", raising=False)
    names = deploy.derive_names("su2c", ACCOUNT, "eu-west-1")
    assert names.data_bucket == f"su2c-data-{ACCOUNT}-eu-west-1"
    assert names.software_bucket == f"su2c-software-{ACCOUNT}-eu-west-1"
    assert names.launch_template == "su2cw_worker"  # the contract's name for the default prefix
    assert names.function_name == "su2c-launcher"
    assert names.dlq_name == "su2c-launcher-dlq"
    assert names.worker_role == names.worker_instance_profile == "su2c-worker-eu-west-1"
    assert names.lambda_role == "su2c-launcher-eu-west-1"
    other = deploy.derive_names("stage2", ACCOUNT, "eu-west-1")
    # A second stage in the same account and region collides with nothing.
    clash = {v for v in dataclass_values(names)} & {v for v in dataclass_values(other)}
    # ...but the engine, which is a setting the function's environment records, not a name.
    assert clash == {ACCOUNT, "eu-west-1", "aws", "ec2"}
    monkeypatch.setenv("LAUNCH_TEMPLATE", "custom_worker")
    assert deploy.derive_names("su2c", ACCOUNT, "eu-west-1").launch_template == "custom_worker"
    explicit = deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="my-data",
                                   software_bucket="su2csoftware")
    assert (explicit.data_bucket, explicit.software_bucket) == ("my-data", "su2csoftware")
    for bad in ("", "Su2c", "-x", "x-", "a" * 21, "a_b"):
        with pytest.raises(deploy.DeployError):
            deploy.derive_names(bad, ACCOUNT, "eu-west-1")
    with pytest.raises(deploy.DeployError):
        deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="Bad_Bucket")
    with pytest.raises(deploy.DeployError):
        deploy.derive_names("su2c", ACCOUNT, "eu-west-1", data_bucket="same-b",
                            software_bucket="same-b")


def test_function_zip_is_reproducible_and_holds_handler_template_and_routes():
    first, second = deploy.build_function_zip(), deploy.build_function_zip()
    assert first == second
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert sorted(archive.namelist()) == ["bootstrap/bootstrap.sh", "bootstrap/launcher.py",
                                              "lambda_function.py", "routes.json"]
        for name in archive.namelist():
            assert archive.read(name) == (REPO / name).read_bytes()


def test_retry_while_retries_only_what_it_is_told_and_is_bounded():
    def failing(code, message):
        return ClientError({"Error": {"Code": code, "Message": message}}, "CreateFunction")

    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise failing("InvalidParameterValueException", "The role defined for the function "
                                                            "cannot be assumed by Lambda.")
        return "ok"

    assert deploy.retry_while(("cannot be assumed",), flaky, "test", sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and sleeps == [3.0, 3.0]

    def other():
        raise failing("InvalidParameterValueException", "Unsupported runtime")

    with pytest.raises(ClientError):
        deploy.retry_while(("cannot be assumed",), other, "test", sleep=sleeps.append)
    assert len(sleeps) == 2  # not retried

    def always():
        raise failing("InvalidParameterValueException", "cannot be assumed")

    with pytest.raises(ClientError):
        deploy.retry_while(("cannot be assumed",), always, "test", timeout=0, sleep=sleeps.append)
    assert len(sleeps) == 2  # no time left: gives up at once


def test_mismatches_reads_only_what_is_wanted():
    wanted = {"A": 1, "L": [{"K": "x"}], "D": {"E": True}}
    assert deploy.mismatches(wanted, {"A": 1, "L": [{"K": "y"}, {"K": "x", "Z": 0}],
                                      "D": {"E": True, "F": 2}, "extra": 1}) == []
    assert deploy.mismatches(wanted, {"A": 2, "L": [], "D": {}}) == ["A", "L[0]", "D.E"]


def test_every_propagation_refusal_is_waited_out_once_then_succeeds(clients, names):
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    lam, ec2 = clients("lambda"), clients("ec2")
    sleeps = []

    lam.delete_function(FunctionName=names.function_name)
    calls = fail_first(lam, "CreateFunction", "InvalidParameterValueException", SEND_MESSAGE)
    zip_bytes = deploy.build_function_zip()
    deploy.ensure_function(lam, names, zip_bytes, deploy.Progress(echo=False),
                           sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 1

    calls = fail_first(lam, "UpdateFunctionConfiguration", "InvalidParameterValueException",
                       NETWORK_INTERFACE)
    deploy.ensure_function(lam, names, zip_bytes, deploy.Progress(echo=False),
                           environ={"WATCHDOG_MINUTES": "90"}, sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 2

    # Re-creating the function dropped its retry settings and permission (if moto kept them).
    deploy._get_or_none(lam.delete_function_event_invoke_config, FunctionName=names.function_name)
    calls = fail_first(lam, "PutFunctionEventInvokeConfig", "InvalidParameterValueException",
                       SEND_MESSAGE)
    deploy.ensure_event_invoke_config(lam, names, deploy.Progress(echo=False),
                                      sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 3

    deploy._get_or_none(lam.remove_permission, FunctionName=names.function_name,
                        StatementId=names.permission_sid)
    calls = fail_first(lam, "AddPermission", "InvalidParameterValueException", NOT_ASSUMABLE)
    deploy.ensure_s3_invoke_permission(lam, names, deploy.Progress(echo=False),
                                       sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 4

    data = deploy.read_launch_template(ec2, names.launch_template)["data"]
    calls = fail_first(ec2, "CreateLaunchTemplate", "InvalidParameterValue", BAD_PROFILE)
    deploy.ensure_launch_template(ec2, names, data, deploy.Progress(echo=False),
                                  name="su2cw_other", sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 5
    calls = fail_first(ec2, "CreateLaunchTemplateVersion", "InvalidParameterValue", BAD_PROFILE)
    deploy.ensure_launch_template(ec2, names, dict(data, InstanceType="t3.micro"),
                                  deploy.Progress(echo=False), sleep=sleeps.append)
    assert len(calls) == 2 and len(sleeps) == 6


def test_a_propagation_refusal_that_never_ends_is_reraised_after_a_bounded_wait():
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        assert len(sleeps) < 1000, "the wait is not bounded"

    def refuse():
        raise ClientError({"Error": {"Code": "InvalidParameterValueException",
                                     "Message": SEND_MESSAGE}}, "CreateFunction")

    with pytest.raises(ClientError):
        deploy.wait_out_propagation(refuse, "creating", sleep=sleep)
    assert 0 < sum(sleeps) <= deploy.PROPAGATION_TIMEOUT

    def other():
        raise ClientError({"Error": {"Code": "InvalidParameterValueException",
                                     "Message": "Unsupported runtime"}}, "CreateFunction")

    with pytest.raises(ClientError):
        deploy.wait_out_propagation(other, "creating", sleep=sleep)
    assert sum(sleeps) <= deploy.PROPAGATION_TIMEOUT  # not waited for
