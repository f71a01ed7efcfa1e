"""awsfun_deploy.function: the Lambda function's configuration as deployed."""

import deploy
from deploy_helpers import ACCOUNT


def test_function_logging_keeps_lambdas_start_and_report_lines():
    """Lambda writes START, END and REPORT (duration, billed duration, max memory used) at
    system log level INFO; SystemLogLevel WARN drops them. Log levels need the JSON log
    format (Lambda Developer Guide, "Log-level filtering"). moto stores no LoggingConfig."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    logging_config = deploy.function_configuration(names)["LoggingConfig"]
    assert logging_config == {"LogFormat": "JSON", "SystemLogLevel": "INFO",
                              "ApplicationLogLevel": "INFO", "LogGroup": names.log_group}
