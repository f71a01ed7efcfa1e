"""awsfun_deploy.status: drift reported (and repaired by deploy), an empty account, an invalid
routing table in the checkout, and EC2's reason for each worker that ended without a report.
"""

import io
import json

import AwsS3
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


# --- workers that ended without a report: EC2's own reasons ----------------------------------

# AWS Knowledge Center, "encrypted-volumes-stops-immediately": an instance whose encrypted volume's
# KMS key the launching role may not use goes from pending to terminated with this StateReason.
KMS_LAUNCH_FAILURE = {"Code": "Client.InternalError",
                      "Message": "Client.InternalError: Client error on launch"}
# EC2 API Reference, StateReason: "Server.SpotInstanceTermination: The instance was terminated
# because the number of Spot requests ... exceeded available capacity". The message text here
# is illustrative; the code is the documented one.
SPOT_TERMINATION = {"Code": "Server.SpotInstanceTermination",
                    "Message": "Server.SpotInstanceTermination: Spot instance termination"}


def answer_state_reasons(ec2, reasons):
    """Make DescribeInstances answer these {instance id: (StateReason, StateTransitionReason)}:
    moto ends every instance with Client.UserInitiatedShutdown, never with EC2's launch
    failures, so the parsed answer is patched and everything else stays moto's."""
    def patch(parsed, **_):
        for reservation in parsed.get("Reservations", []):
            for instance in reservation["Instances"]:
                if instance["InstanceId"] in reasons:
                    instance["StateReason"], instance["StateTransitionReason"] = \
                        reasons[instance["InstanceId"]]

    ec2.meta.events.register("after-call.ec2.DescribeInstances", patch)


def test_state_reason_is_code_and_message_as_ec2_gives_them():
    """EC2 API Reference, StateReason: Code and Message; the Message often repeats the Code."""
    instance = {"StateReason": dict(KMS_LAUNCH_FAILURE)}
    assert deploy.state_reason_text(instance) == \
        "Client.InternalError: Client.InternalError: Client error on launch"
    assert deploy.state_reason_text({"StateReason": {"Code": "Server.ScheduledStop"}}) == \
        "Server.ScheduledStop"
    assert deploy.state_reason_text({"StateReason": {"Code": "", "Message": ""}}) == ""
    assert deploy.state_reason_text({}) == ""


def test_status_and_reconcile_name_ec2s_reason_for_each_worker_that_ended_without_a_report(
        clients, names, deployed, capsys):
    """A worker that never booted (the account's default EBS key is customer managed and the
    launcher may not use it: StateReason Client.InternalError "Client error on launch"; or a
    Spot reclaim, Server.SpotInstanceTermination) leaves no report and no log: EC2's
    StateReason and StateTransitionReason are the only record of why. status and reconcile
    show them, one line per worker, for exactly the workers whose object has neither report
    nor error report."""
    s3, ec2 = clients("s3"), clients("ec2")
    bucket = names.data_bucket
    for key in ("kms.csv", "spot.csv", "done.csv", "gone.csv", "old.csv", "live.csv"):
        s3.put_object(Bucket=bucket, Key=key, Body=f"{key}\n1\n".encode())
    launched = deploy.reconcile(clients, names, progress=deploy.Progress(echo=False))["launched"]
    ids = {entry["key"]: entry["instance_id"] for entry in launched}
    assert len(ids) == 6

    def report(key):
        etag = s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        AwsS3.put_report(s3, bucket, key, {"input": {"bucket": bucket, "key": key, "etag": etag}},
                         ".json")

    report("done.csv")                                     # reported: not listed
    report("old.csv")                                      # its version reported, then
    s3.put_object(Bucket=bucket, Key="old.csv", Body=b"a newer version\n")  # overwritten
    s3.delete_object(Bucket=bucket, Key="gone.csv")        # deleted, and no error report
    ec2.terminate_instances(InstanceIds=[i for k, i in ids.items() if k != "live.csv"])
    answer_state_reasons(ec2, {ids["kms.csv"]: (KMS_LAUNCH_FAILURE, ""),
                               ids["spot.csv"]: (SPOT_TERMINATION, "Service initiated")})

    status = deploy.collect_status(clients, names)
    ended = {worker["key"]: worker for worker in status["ended_without_report"]}
    assert sorted(ended) == ["gone.csv", "kms.csv", "spot.csv"]
    kms = ended["kms.csv"]
    assert (kms["instance_id"], kms["state"], kms["state_reason"],
            kms["state_transition_reason"]) == (
        ids["kms.csv"], "terminated",
        "Client.InternalError: Client.InternalError: Client error on launch", "")
    assert ended["spot.csv"]["state_reason"] == \
        "Server.SpotInstanceTermination: Server.SpotInstanceTermination: Spot instance termination"
    assert ended["gone.csv"]["state_reason"] == \
        "Client.UserInitiatedShutdown: Client.UserInitiatedShutdown: User initiated shutdown"
    assert ended["gone.csv"]["state_transition_reason"].startswith("User initiated (")

    printed = io.StringIO()
    deploy.print_status(status, printed)
    lines = printed.getvalue().splitlines()
    assert "workers ended without a report: 3 (EC2's StateReason; StateTransitionReason)" in lines
    assert (f"  {ids['kms.csv']}  terminated, kms.csv: Client.InternalError: "
            "Client.InternalError: Client error on launch; no StateTransitionReason") in lines
    assert (f"  {ids['spot.csv']}  terminated, spot.csv: Server.SpotInstanceTermination: "
            "Server.SpotInstanceTermination: Spot instance termination; Service initiated") in lines

    # status --json carries the same entries.
    assert deploy.main(["status", "--json"], clients=clients) == 0
    out = capsys.readouterr().out
    # moto's server may print its own warnings first: the document starts at its first key.
    assert json.loads(out[out.index('{\n  "account"'):])["ended_without_report"] == \
        status["ended_without_report"]

    # reconcile shows them before it relaunches (gone.csv is no input any more: not its to
    # launch, but its worker still ended without a word).
    progress = deploy.Progress(echo=False)
    result = deploy.reconcile(clients, names, progress=progress)
    assert result["ended_without_report"] == status["ended_without_report"]
    shown = {step["name"]: step["detail"] for step in progress.steps
             if step["outcome"] == "ended unreported"}
    assert shown == {ids[key]: deploy.ended_detail(ended[key]) for key in ended}
    assert sorted(entry["key"] for entry in result["launched"]) == ["kms.csv", "old.csv",
                                                                   "spot.csv"]
    assert "3 workers ended without a report" in deploy.reconcile_summary(result)
    one = dict(result, ended_without_report=result["ended_without_report"][:1])
    assert "1 worker ended without a report" in deploy.reconcile_summary(one)


# --- error reports with their reasons, reports counted by status and format ------------------

def test_status_gives_each_error_reports_stage_and_reason_and_counts_by_format(
        clients, names, capsys):
    """status reads the newest --read N error reports (each one GET) for stage and reason,
    and as many reports for their format; the counts by status are the listing's, all of
    them. Keys are shown escaped, so a tab or an escape sequence cannot bend the line."""
    s3 = clients("s3")
    bucket = names.data_bucket
    s3.create_bucket(Bucket=bucket)

    def put(key, document):
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        s3.put_object(Bucket=bucket, Key=key, Body=body)

    # As AwsS3.error_report writes it, as bootstrap.sh does, and one that is not JSON.
    put("analysis/runs/tab\there.csv.error.json", {
        "input": {"bucket": bucket, "key": "runs/tab\there.csv", "etag": "x"},
        "status": "error", "stage": "analyse",
        "error": "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 7",
        "error_code": "UnicodeDecodeError", "written_by": "worker"})
    put("analysis/big.vcf.gz.error.json", {
        "input": {"bucket": bucket, "key": "big.vcf.gz", "etag": "y"}, "status": "error",
        "stage": "timeout", "error": "the worker ran past its deadline\nand was stopped",
        "exit_code": 124, "written_by": "bootstrap"})
    put("analysis/odd.csv.error.json", b"{not json")
    for name, fmt in (("a.fastq.gz", "fastq"), ("b.fastq.gz", "fastq"), ("c.vcf", "vcf")):
        put(f"analysis/{name}.json", {"format": fmt, "lines": 4})
    put("analysis/_receipts/0123", b"receipt")  # not a report

    assert deploy.main(["status", "--read", "2"], clients=clients) == 0
    out = capsys.readouterr().out.splitlines()
    assert "reports: 3, error reports: 3" in out
    assert [line for line in out if line.startswith("  by format")] in (
        ["  by format (newest 2 read; --read N for more): fastq 2"],
        ["  by format (newest 2 read; --read N for more): fastq 1, vcf 1"])
    assert any(line.startswith("error reports by stage (newest 2 read; --read N for more): ")
               for line in out)

    status = deploy.collect_status(clients, names, read_limit=10)
    counts = status["report_counts"]
    assert counts["by_status"] == {"report": 3, "error": 3}
    assert counts["by_format"] == {"fastq": 2, "vcf": 1} and counts["formats_read"] == 3
    assert counts["errors_by_stage"] == {"analyse": 1, "timeout": 1, "?": 1}
    reasons = {entry["input_key"]: (entry["stage"], entry["reason"], entry["error_code"])
               for entry in status["error_reports"]}
    assert reasons == {
        "runs/tab\there.csv": ("analyse", ("UnicodeDecodeError: 'utf-8' codec can't decode "
                                "byte 0xff in position 7"), "UnicodeDecodeError"),
        "big.vcf.gz": ("timeout", "the worker ran past its deadline\nand was stopped",
                       "exit 124"),
        "odd.csv": ("?", ("error report unreadable (not JSON: Expecting property name "
                     "enclosed in double quotes: line 1 column 2 (char 1))"), None)}

    printed = io.StringIO()
    deploy.print_status(status, printed)
    lines = printed.getvalue().splitlines()
    assert "error reports by stage (all read): ? 1, analyse 1, timeout 1" in lines
    tab = [line for line in lines if "tab\\there.csv" in line]
    assert len(tab) == 1 and tab[0].endswith(
        "  runs/tab\\there.csv  analyse: UnicodeDecodeError: 'utf-8' codec can't decode byte "
        "0xff in position 7")
    assert any(line.endswith("  big.vcf.gz  timeout: the worker ran past its deadline and "
                             "was stopped") for line in lines)


def test_an_error_line_is_one_short_line_whatever_the_key_and_reason():
    from awsfun_deploy.status import KEY_WIDTH, error_line

    key = "runs/" + "deep/" * 30 + "sample\n\x1b[2J_R2.fastq.gz"
    line = error_line({"last_modified": "2026-12-01T00:00:00Z", "input_key": key,
                       "stage": "analyse", "reason": "x\r\n" * 200})
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert len(line) <= 2 + 20 + 2 + KEY_WIDTH + 2 + len("analyse: ") + 100
    # The cut keeps the key's start and its distinguishing end.
    assert "  runs/deep/" in line and "\\x1b[2J_R2.fastq.gz  analyse: x x x" in line
