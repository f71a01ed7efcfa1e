"""awsfun_deploy.cli: ./deploy.sh as an operator runs it: --json, confirmation, option order,
--help.
"""

import io
import json
import os
import subprocess
import sys

import pytest

import deploy
from conftest import REPO
from deploy_helpers import error_of


def test_wrapper_runs_status_json(clients, names, deployed):
    s3 = clients("s3")
    s3.put_object(Bucket=names.data_bucket, Key="analysis/a.csv.json", Body=b"{}")
    s3.put_object(Bucket=names.data_bucket, Key="analysis/b.csv.error.json", Body=b"{}")
    env = dict(os.environ, PYTHON=sys.executable)
    run = subprocess.run([str(REPO / "deploy.sh"), "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    for field in ("data_bucket", "software_bucket", "function_name", "function_arn",
                  "launch_template", "worker_role", "worker_instance_profile", "lambda_role",
                  "dlq_url", "region", "account", "workers", "reports", "error_reports",
                  "dlq_depth", "drift"):
        assert field in status, field
    assert status["deployed"] is True and status["drift"] == []
    assert status["function_arn"] == deployed[0]["function_arn"]
    assert status["dlq_depth"] == 0 and status["workers"] == []
    assert [r["input_key"] for r in status["reports"]] == ["a.csv"]
    assert [r["input_key"] for r in status["error_reports"]] == ["b.csv"]
    text = subprocess.run([str(REPO / "deploy.sh"), "status"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert text.returncode == 0 and "drift: none" in text.stdout


def test_teardown_asks_first(clients, names, deployed, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    assert deploy.main(["teardown"], clients=clients) == 1
    assert "Nothing removed." in capsys.readouterr().out
    clients("lambda").get_function(FunctionName=names.function_name)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no terminal, no answer: no
    assert deploy.main(["teardown"], clients=clients) == 1
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    assert deploy.main(["teardown"], clients=clients) == 0
    assert error_of(clients("lambda").get_function, FunctionName=names.function_name) == \
        "ResourceNotFoundException"


@pytest.mark.parametrize("argv, expected", [
    ([], ["deploy"]),
    (["--prefix", "dev"], ["deploy", "--prefix", "dev"]),
    (["status", "--json"], ["status", "--json"]),
    (["--prefix", "dev", "status"], ["status", "--prefix", "dev"]),
    (["--prefix", "status", "teardown"], ["teardown", "--prefix", "status"]),
    (["--prefix=dev", "teardown", "--yes"], ["teardown", "--prefix=dev", "--yes"]),
    (["--key-prefix", "status", "reconcile"], ["reconcile", "--key-prefix", "status"]),
    (["--routes", "deploy", "status"], ["status", "--routes", "deploy"]),
    (["--help"], ["--help"]),
])
def test_options_may_come_before_the_command(argv, expected):
    assert deploy.command_first(argv) == expected


def test_help_names_every_command():
    done = subprocess.run(["bash", str(REPO / "deploy.sh"), "--help"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for command in deploy.COMMANDS:
        assert command in done.stdout
