"""./deploy.sh and the engine: a re-run without --engine keeps the deployed one, a switch is
said, the Batch-only options are refused under ec2, status gives Batch's cap under batch
(maxvCpus, not MAX_WORKERS), and the top-level --help names both engines."""

import io
import json

import pytest
from test_batch import ecs_instance_policy  # noqa: F401 - the autouse fixture that loads it
from test_cli_errors import answer_with_error, assert_one_line

import deploy
from awsfun_deploy import batch as batch_module
from awsfun_deploy.batch import batch_names
from awsfun_deploy.cli import build_parser, engine_note, resolve_engine
from awsfun_deploy.core import Progress
from awsfun_deploy.names import deployed_names
from awsfun_deploy.status import compute_environment_line


def function_env(clients, names):
    config = clients("lambda").get_function(FunctionName=names.function_name)["Configuration"]
    return config["Environment"]["Variables"]


def record_updates(clients):
    """Record each UpdateComputeEnvironment's computeResources.maxvCpus: moto accepts the
    update but keeps the old figure ("TODO Implement resizing", moto/batch/models.py)."""
    asked = []

    def record(params, **_):
        asked.append(params.get("computeResources", {}).get("maxvCpus"))

    clients("batch").meta.events.register(
        "provide-client-params.batch.UpdateComputeEnvironment", record)
    return asked


def test_the_engine_is_given_else_the_deployed_one_else_ec2():
    assert resolve_engine(None, None) == ("ec2", "the default for a new deployment")
    assert resolve_engine(None, "batch") == ("batch", "as deployed")
    assert resolve_engine("ec2", "batch") == ("ec2", "--engine ec2")
    assert engine_note(None, "batch") == "engine batch (as deployed; --engine ec2 switches)"
    assert engine_note(None, None).startswith(
        "engine ec2 (the default for a new deployment; --engine batch for one AWS Batch job")
    assert engine_note("batch", "batch") is None and engine_note("batch", None) is None
    assert engine_note("ec2", "batch") == (
        "engine: batch -> ec2; the Batch pieces stay, idle and free (minvCpus 0), until teardown")
    assert engine_note("batch", "ec2").startswith("engine: ec2 -> batch; the EC2 launch templates")


def test_a_rerun_without_engine_keeps_batch_and_status_shows_its_vcpus(clients, names, capsys):
    """The newcomer's run: deploy --engine batch, then again with --max-vcpus alone. It used to
    switch the function back to ec2 (--engine's default) and drop --max-vcpus."""
    deploy.deploy(clients, names, progress=Progress(echo=False), engine="batch",
                  max_vcpus=8, sleep=lambda _: None)
    capsys.readouterr()
    asked = record_updates(clients)
    assert deploy.main(["--prefix", names.prefix, "--max-vcpus", "4"], clients=clients) == 0
    out = capsys.readouterr().out
    assert "engine batch (as deployed; --engine ec2 switches)" in out.splitlines()[1]
    assert function_env(clients, names)["ENGINE"] == "batch"
    assert asked == [4, 4]

    # status: Batch's cap (moto's 8, see record_updates), not the EC2 engine's MAX_WORKERS,
    # which the handler ignores under batch.
    status = deploy.collect_status(clients, deployed_names(clients))
    assert status["compute_environments"] == [{"name": "su2c-spot", "max_vcpus": 8},
                                              {"name": "su2c-ondemand", "max_vcpus": 8}]
    text = io.StringIO()
    deploy.print_status(status, stream=text)
    assert ("compute environments su2c-spot, su2c-ondemand: at most 8 vCPUs each (maxvCpus)"
            in text.getvalue())
    assert "workers at once" not in text.getvalue()
    assert deploy.main(["status", "--json"], clients=clients) == 0
    assert json.loads(capsys.readouterr().out)["compute_environments"][0]["max_vcpus"] == 8

    # A Batch-only option with --engine ec2 is a mistake, before anything changes.
    assert deploy.main(["--engine", "ec2", "--max-vcpus", "4"], clients=clients) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line(captured.err, "deploy.sh deploy: --max-vcpus only applies to --engine batch,"
                    " and the engine is ec2 (--engine ec2) (--help for usage)")
    assert function_env(clients, names)["ENGINE"] == "batch"

    # Switching is said, with what stays behind.
    assert deploy.main(["--engine", "ec2"], clients=clients) == 0
    assert ("engine: batch -> ec2; the Batch pieces stay, idle and free (minvCpus 0), until "
            "teardown") in capsys.readouterr().out.splitlines()
    assert "ENGINE" not in function_env(clients, names)
    parts = batch_names(names)  # still there, until teardown
    found = clients("batch").describe_compute_environments(
        computeEnvironments=[parts["spot"], parts["ondemand"]])["computeEnvironments"]
    assert sorted(e["status"] for e in found) == ["VALID", "VALID"]


@pytest.mark.parametrize("argv, flags", [
    (["--image", "foo"], "--image only applies"),
    (["--max-vcpus", "8", "--image", "foo"], "--max-vcpus and --image only apply"),
])
def test_batch_options_on_a_new_deployment_without_engine_batch_are_refused(
        clients, capsys, argv, flags):
    assert deploy.main(argv, clients=clients) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_line(captured.err, f"deploy.sh deploy: {flags} to --engine batch, and the engine "
                    "is ec2 (the default for a new deployment) (--help for usage)")
    assert clients("lambda").list_functions()["Functions"] == []


def test_a_new_deployment_says_its_engine_is_ec2_by_default(clients, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("awsfun_deploy.cli.deploy",
                        lambda *a, **k: seen.update(k) or {"function_arn": "arn"})
    assert deploy.main([], clients=clients) == 0
    assert (seen["engine"], seen["max_vcpus"], seen["image"]) == (
        "ec2", batch_module.DEFAULT_MAX_VCPUS, batch_module.DEFAULT_IMAGE)
    assert capsys.readouterr().out.splitlines()[1].startswith(
        "engine ec2 (the default for a new deployment; --engine batch")


def statement_ids(out):
    return [s.get("Sid") for s in json.loads(out[out.index('{\n  "Version"'):])["Statement"]]


def test_deployer_policy_follows_the_deployed_engine(clients, names, deployed, capsys):
    clients("lambda").update_function_configuration(
        FunctionName=names.function_name, Environment={"Variables": {
            **function_env(clients, names), "ENGINE": "batch", "JOB_QUEUE": "su2c-jobs",
            "JOB_DEFINITION": "su2c-worker"}})
    assert deploy.main(["deployer-policy"], clients=clients) == 0
    printed = capsys.readouterr()
    assert "PassBatchRoles" in statement_ids(printed.out)
    assert "for engine batch (as deployed" in printed.err
    assert deploy.main(["deployer-policy", "--engine", "ec2"], clients=clients) == 0
    assert "PassBatchRoles" not in statement_ids(capsys.readouterr().out)


def test_deployer_policy_for_someone_who_may_not_read_the_function_is_ec2s(clients, capsys):
    """Whoever asks for the policy may have no permission yet: that is what it is for."""
    answer_with_error(clients("lambda"), "GetFunction", "AccessDeniedException",
                      "not authorized to perform: lambda:GetFunction", status=403)
    assert deploy.main(["deployer-policy"], clients=clients) == 0
    printed = capsys.readouterr()
    assert "PassBatchRoles" not in statement_ids(printed.out)
    assert ("for engine ec2 (the deployed function is not readable: AccessDeniedException; "
            "--engine batch for the other)") in printed.err


def test_status_line_names_a_missing_environment_and_differing_caps():
    assert compute_environment_line([{"name": "p-spot", "max_vcpus": 16},
                                     {"name": "p-ondemand", "max_vcpus": None}]) == \
        "  compute environments p-spot at most 16 vCPUs, p-ondemand MISSING (maxvCpus)"


def test_top_level_help_names_both_engines_and_points_at_deploys_options():
    text = " ".join(build_parser().format_help().split())
    assert "AWS Batch job" in text and "--engine batch" in text and "--engine ec2" in text
    assert "`./deploy.sh deploy --help` shows deploy's options" in text
    deploy_help = " ".join(build_parser()._subparsers._group_actions[0]
                           .choices["deploy"].format_help().split())
    assert "(default: 16)" in deploy_help and "(default: None)" not in deploy_help
    assert "(default: the deployed engine; ec2 for a new deployment)" in deploy_help
