"""awsfun_deploy.status: drift reported (and repaired by deploy), an empty account, an invalid
routing table in the checkout.
"""

import json

import deploy
from deploy_helpers import error_of


def test_drift_is_reported_by_status_and_repaired_by_deploy(clients, names, deployed):
    iam, lam, s3, sqs = clients("iam"), clients("lambda"), clients("s3"), clients("sqs")
    # Hand edits of the kind that happen in a console.
    iam.delete_role_policy(RoleName=names.worker_role, PolicyName=names.worker_policy_name)
    extra = iam.create_policy(PolicyName="too-much", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]}))
    iam.attach_role_policy(RoleName=names.lambda_role, PolicyArn=extra["Policy"]["Arn"])
    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    lam.update_function_configuration(FunctionName=names.function_name, Environment={
        "Variables": dict(env["Variables"], DRY_RUN="1")})
    sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=names.dlq_name)["QueueUrl"])
    s3.put_object(Bucket=names.software_bucket, Key="private/secret.txt", Body=b"no")

    drift = deploy.collect_status(clients, names)["drift"]
    found = {(d["resource"], d["problem"]) for d in drift}
    assert ("worker role", f"changed: policy {names.worker_policy_name} missing") in found
    assert ("launcher role", f"changed: attached policy {extra['Policy']['Arn']}") in found
    assert ("function", "changed: Environment") in found
    assert ("dead-letter queue", "missing") in found
    assert ("software file", "not on the published allowlist") in found

    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress)
    assert deploy.collect_status(clients, names)["drift"] == []
    assert iam.list_attached_role_policies(RoleName=names.lambda_role)["AttachedPolicies"] == []
    assert "DRY_RUN" not in lam.get_function_configuration(
        FunctionName=names.function_name)["Environment"]["Variables"]
    assert error_of(s3.head_object, Bucket=names.software_bucket, Key="private/secret.txt") \
        == "404"


def test_status_on_an_empty_account_says_not_deployed(clients, names):
    status = deploy.collect_status(clients, names)
    assert status["deployed"] is False
    missing = {d["resource"] for d in status["drift"] if d["problem"] == "missing"}
    assert {"data bucket", "software bucket", "function", "launch template", "worker role",
            "launcher role", "dead-letter queue"} <= missing


def test_status_reports_an_invalid_checkout_table_as_drift(clients, names, deployed, tmp_path):
    bad = tmp_path / "routes.json"
    bad.write_text('{"routes": [{"name": "x"}]}', encoding="utf-8")
    drift = deploy.collect_status(clients, names, routes_file=bad)["drift"]
    assert ("routing table", "invalid: routing table " + str(bad) +
            ": route #0: 'match' must be a non-empty string") in {
        (d["resource"], d["problem"]) for d in drift}
