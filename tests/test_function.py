"""awsfun_deploy.function: the Lambda function's configuration as deployed."""

import pytest
from deploy_helpers import ACCOUNT

import deploy
from awsfun_deploy import function as function_module


def test_function_logging_keeps_lambdas_start_and_report_lines():
    """Lambda writes START, END and REPORT (duration, billed duration, max memory used) at
    system log level INFO; SystemLogLevel WARN drops them. Log levels need the JSON log
    format (Lambda Developer Guide, "Log-level filtering"). moto stores no LoggingConfig."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    logging_config = deploy.function_configuration(names)["LoggingConfig"]
    assert logging_config == {"LogFormat": "JSON", "SystemLogLevel": "INFO",
                              "ApplicationLogLevel": "INFO", "LogGroup": names.log_group}


def _get_function_without_list_tags():
    """A Lambda client whose GetFunction answers as it does to a caller without
    lambda:ListTags: no Tags, a TagsError (Lambda API Reference, GetFunction)."""
    import boto3
    from botocore.stub import Stubber
    lam = boto3.client("lambda", region_name="us-east-1")
    stub = Stubber(lam)
    stub.add_response("get_function", {
        "Configuration": {"FunctionName": "su2c-launcher",
                          "Environment": {"Variables": {"SOFTWARE_BUCKET": "tools"}}},
        "TagsError": {"ErrorCode": "AccessDeniedException",
                      "Message": f"User: arn:aws:iam::{ACCOUNT}:user/deployer is not authorized "
                                 "to perform: lambda:ListTags on resource: arn:aws:lambda:"
                                 f"us-east-1:{ACCOUNT}:function:su2c-launcher"}},
        {"FunctionName": "su2c-launcher"})
    stub.activate()
    return lam, stub


def test_unreadable_function_tags_stop_status_guessing_the_data_bucket():
    """The data bucket's name is only in the function's tags. Without lambda:ListTags,
    GetFunction answers no tags: status, reconcile and teardown must not fall back to the
    derived name (another bucket, perhaps someone's) but say what is missing."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    lam, stub = _get_function_without_list_tags()
    with pytest.raises(deploy.DeployError, match="lambda:ListTags.*--data-bucket"):
        deploy.discover_names(lam, names)
    stub.assert_no_pending_responses()
    lam, _ = _get_function_without_list_tags()
    found = deploy.discover_names(lam, names, explicit_data="inputs")
    assert (found.data_bucket, found.software_bucket) == ("inputs", "tools")


def test_reading_the_function_says_when_its_tags_cannot_be_read(caplog):
    lam, _ = _get_function_without_list_tags()
    config = function_module.read_function(lam, "su2c-launcher")
    assert config["Tags"] == {}
    assert "lambda:ListTags" in caplog.text and "AccessDeniedException" in caplog.text
