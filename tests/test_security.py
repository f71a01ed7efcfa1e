"""Security proofs: each role's own credentials under moto's IAM enforcement, nothing public,
nothing private uploaded, malformed events launch nothing.

What moto judges and what it does not (moto 5, IAM enforcement on via /moto-api/reset-auth):
* S3: action and the bucket/object ARN, so the S3 rows below are real allow/deny proofs;
  anonymous GetObject is judged against the bucket policy and the object ACL. Block Public
  Access and anonymous ListBucket are not judged: those settings are read back instead.
* SQS and IAM role calls: action and the queue or role ARN.
* EC2, Logs, Lambda: the action only, against Resource "*"; Conditions are not evaluated. A
  refusal there still proves that no statement grants the action on every resource, but moto
  refuses the launcher's own RunInstances too, so RunInstances, CreateTags, iam:PassRole and
  every Condition are proved from the policy documents instead (test_iam.py and
  test_roles.test_handler_launch_request_is_what_the_launcher_policy_allows).
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from io import BytesIO
from pathlib import Path
from urllib.parse import unquote_plus

import pytest
from botocore.exceptions import ClientError

import deploy
import lambda_function as lf
from support import (RecordingEc2, REPO, anonymous_client, assumed_role_session, moto_iam_enforced, s3_event,
                     s3_record)

ACCOUNT = "123456789012"  # moto's default account
# How a refusal comes back: S3 and IAM say AccessDenied, EC2 UnauthorizedOperation, and some
# moto services (and S3 to an anonymous caller) send a bare 403.
REFUSED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403"}


def outcome(call, **params):
    """'allowed' if the call succeeds, else the AWS error code it fails with."""
    try:
        call(**params)
    except ClientError as err:
        return err.response["Error"]["Code"]
    return "allowed"


def refused(calls):
    """The names of `calls` ({name: (call, params)}) that are not refused as unauthorised."""
    return {name: code for name, (call, params) in calls.items()
            if (code := outcome(call, **params)) not in REFUSED}


@pytest.fixture
def stack(clients, names):
    """A deployed pipeline with one input object; returns the deploy result."""
    result = deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    clients("s3").put_object(Bucket=names.data_bucket, Key="inputs/a.csv", Body=b"a,b\n")
    clients("s3").put_object(Bucket=names.data_bucket, Key="analysis/inputs/a.csv.json",
                             Body=b"{}")
    return result


def role_session(clients, role_name):
    """A session holding the named role's own temporary credentials."""
    arn = clients("iam").get_role(RoleName=role_name)["Role"]["Arn"]
    return assumed_role_session(clients("sts"), arn)


# --- the launcher (Lambda) role under moto's enforcement ---------------------------------


def test_lambda_role_credentials_do_its_job_and_nothing_else(clients, names, stack, local_aws):
    session = role_session(clients, names.lambda_role)
    s3, sqs, iam = session.client("s3"), session.client("sqs"), session.client("iam")
    ec2, sts = session.client("ec2"), session.client("sts")
    dlq_url = clients("sqs").get_queue_url(QueueName=names.dlq_name)["QueueUrl"]
    events_url = clients("sqs").get_queue_url(QueueName=names.events_queue)["QueueUrl"]
    other_queue = clients("sqs").create_queue(QueueName="someone-elses-queue")["QueueUrl"]
    worker_arn = clients("iam").get_role(RoleName=names.worker_role)["Role"]["Arn"]
    data, software = names.data_bucket, names.software_bucket
    template = {"LaunchTemplateName": names.launch_template, "Version": "$Latest"}
    with moto_iam_enforced(local_aws):
        # Its job: read the user-data template, dead-letter a failed event.
        body = s3.get_object(Bucket=software, Key=deploy.BOOTSTRAP_KEY)["Body"].read()
        assert body == (REPO / deploy.BOOTSTRAP_KEY).read_bytes()
        sqs.send_message(QueueUrl=dlq_url, MessageBody="{}")
        # Count the stack's workers for the cap (ec2:DescribeInstances takes no resource),
        # and read its own events queue.
        ec2.describe_instances()
        sqs.receive_message(QueueUrl=events_url, WaitTimeSeconds=0)
        not_refused = refused({
            "read another queue": (sqs.receive_message, dict(QueueUrl=dlq_url)),
            # No S3 writes anywhere, no reads of data or of the worker it does not need.
            "put input": (s3.put_object, dict(Bucket=data, Key="inputs/b.csv", Body=b"x")),
            "put report": (s3.put_object, dict(Bucket=data, Key="analysis/x.json", Body=b"x")),
            "overwrite bootstrap": (s3.put_object, dict(Bucket=software, Key=deploy.BOOTSTRAP_KEY,
                                                         Body=b"evil")),
            "overwrite worker": (s3.put_object, dict(Bucket=software, Key="AwsS3.py", Body=b"x")),
            "delete input": (s3.delete_object, dict(Bucket=data, Key="inputs/a.csv")),
            "delete bootstrap": (s3.delete_object, dict(Bucket=software,
                                                        Key=deploy.BOOTSTRAP_KEY)),
            "read input": (s3.get_object, dict(Bucket=data, Key="inputs/a.csv")),
            "read report": (s3.get_object, dict(Bucket=data, Key="analysis/inputs/a.csv.json")),
            "read worker": (s3.get_object, dict(Bucket=software, Key="AwsS3.py")),
            "list data": (s3.list_objects_v2, dict(Bucket=data)),
            "bucket policy": (s3.put_bucket_policy, dict(Bucket=data, Policy="{}")),
            # No IAM but passing the worker role (which moto cannot judge; see test_iam).
            "list roles": (iam.list_roles, {}),
            "create role": (iam.create_role, dict(RoleName="x", AssumeRolePolicyDocument="{}")),
            "put role policy": (iam.put_role_policy, dict(RoleName=names.lambda_role,
                                                          PolicyName="more",
                                                          PolicyDocument="{}")),
            "attach admin": (iam.attach_role_policy, dict(
                RoleName=names.lambda_role,
                PolicyArn="arn:aws:iam::aws:policy/AdministratorAccess")),
            "become the worker": (sts.assume_role, dict(RoleArn=worker_arn,
                                                        RoleSessionName="escalate")),
            # EC2 beyond RunInstances and the count: nothing to stop or re-template.
            "terminate": (ec2.terminate_instances, dict(InstanceIds=["i-0123456789abcdef0"])),
            "new template version": (ec2.create_launch_template_version, dict(
                LaunchTemplateName=names.launch_template,
                LaunchTemplateData={"ImageId": "ami-12345678"})),
            "other queue": (sqs.send_message, dict(QueueUrl=other_queue, MessageBody="{}")),
        })
        # moto refuses the launcher's RunInstances too (it matches the statement's ARNs
        # against "*"): recorded here so a moto that learns to judge it is noticed.
        run = outcome(ec2.run_instances, LaunchTemplate=template, MinCount=1, MaxCount=1)
    assert not_refused == {}
    assert run in REFUSED, "moto now judges RunInstances: assert it is allowed here instead"
    assert clients("s3").get_object(Bucket=software, Key=deploy.BOOTSTRAP_KEY)["Body"].read() == \
        (REPO / deploy.BOOTSTRAP_KEY).read_bytes()
    assert clients("s3").get_object(Bucket=data, Key="inputs/a.csv")["Body"].read() == b"a,b\n"


def test_worker_role_can_launch_nothing_and_escalate_nowhere(clients, names, stack, local_aws):
    """Beyond test_roles's worker test: no launches, no IAM writes, no other role."""
    session = role_session(clients, names.worker_role)
    ec2, iam, sts = session.client("ec2"), session.client("iam"), session.client("sts")
    s3 = session.client("s3")
    lambda_arn = clients("iam").get_role(RoleName=names.lambda_role)["Role"]["Arn"]
    with moto_iam_enforced(local_aws):
        not_refused = refused({
            "launch": (ec2.run_instances, dict(
                LaunchTemplate={"LaunchTemplateName": names.launch_template,
                                "Version": "$Latest"}, MinCount=1, MaxCount=1)),
            "launch bare": (ec2.run_instances, dict(ImageId="ami-12345678", MinCount=1,
                                                    MaxCount=1)),
            "terminate": (ec2.terminate_instances, dict(InstanceIds=["i-0123456789abcdef0"])),
            "create role": (iam.create_role, dict(RoleName="x", AssumeRolePolicyDocument="{}")),
            "put role policy": (iam.put_role_policy, dict(RoleName=names.worker_role,
                                                          PolicyName="more",
                                                          PolicyDocument="{}")),
            "become the launcher": (sts.assume_role, dict(RoleArn=lambda_arn,
                                                          RoleSessionName="escalate")),
            "overwrite bootstrap": (s3.put_object, dict(Bucket=names.software_bucket,
                                                        Key=deploy.BOOTSTRAP_KEY, Body=b"x")),
            "write outside analysis/": (s3.put_object, dict(Bucket=names.data_bucket,
                                                            Key="analysis-not/x", Body=b"x")),
            "delete a report": (s3.delete_object, dict(Bucket=names.data_bucket,
                                                       Key="analysis/inputs/a.csv.json")),
        })
    assert not_refused == {}


# --- nothing public --------------------------------------------------------------------


def every_object(s3):
    """(bucket, key) of every object in every bucket of the endpoint."""
    return [(bucket["Name"], obj["Key"]) for bucket in s3.list_buckets()["Buckets"]
            for obj in deploy.list_keys(s3, bucket["Name"])]


def anonymously_readable(s3):
    """(bucket, key) of every object anyone may read without credentials."""
    anonymous = anonymous_client()
    return {(bucket, key) for bucket, key in every_object(s3)
            if outcome(anonymous.get_object, Bucket=bucket, Key=key) == "allowed"}


def test_a_default_deploy_lets_anonymous_callers_read_nothing(clients, names, stack):
    s3 = clients("s3")
    assert len(every_object(s3)) >= 2 + len(deploy.PUBLISHED_FILES)
    assert anonymously_readable(s3) == set()
    for bucket in (names.data_bucket, names.software_bucket):
        # moto judges neither Block Public Access nor an anonymous ListBucket; a real account
        # does, so what decides them is read back: all four blocks on, no bucket policy.
        assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == \
            deploy.PRIVATE_BLOCK
        assert outcome(s3.get_bucket_policy, Bucket=bucket) == "NoSuchBucketPolicy"


def test_public_software_opens_the_worker_files_and_nothing_else(clients, names, stack):
    s3 = clients("s3")
    deploy.deploy(clients, names, public_software=True, progress=deploy.Progress(echo=False))
    s3.put_object(Bucket=names.software_bucket, Key="private/secret.txt", Body=b"secret")
    s3.put_object(Bucket=names.software_bucket, Key="AwsS3.py.bak", Body=b"old")
    readable = anonymously_readable(s3)
    (statement,) = json.loads(s3.get_bucket_policy(Bucket=names.software_bucket)["Policy"])[
        "Statement"]
    opened = {arn.split(":::", 1)[1].split("/", 1)[1] for arn in statement["Resource"]}
    assert readable == {(names.software_bucket, key) for key in opened}
    assert {"AwsS3.py", deploy.BOOTSTRAP_KEY} <= opened <= set(deploy.PUBLISHED_FILES)
    assert statement["Action"] == "s3:GetObject"
    assert "Condition" not in statement and "*" not in "".join(opened)
    assert s3.get_public_access_block(Bucket=names.data_bucket)[
        "PublicAccessBlockConfiguration"] == deploy.PRIVATE_BLOCK
    assert outcome(s3.get_bucket_policy, Bucket=names.data_bucket) == "NoSuchBucketPolicy"


SECRET = b"awsfun-test-secret-7f3c9a: never upload me"


def repo_copy_with_private_file(target):
    """Copy the working tree (no .git, caches or virtual environments) to `target` and add
    private/secret.txt."""
    junk = shutil.ignore_patterns(".git", ".hypothesis", ".pytest_cache", "__pycache__",
                                  "analysis-out", "bench", "*.zip")

    def ignore(directory, names):
        # .venv-target (tests/target_python.py) or a newcomer's .venv: thousands of files
        # deploy never reads, which made this copy most of a minute.
        venvs = {name for name in names if (Path(directory) / name / "pyvenv.cfg").exists()}
        return junk(directory, names) | venvs

    shutil.copytree(REPO, target, ignore=ignore, symlinks=True)
    (target / "private").mkdir(exist_ok=True)
    (target / "private" / "secret.txt").write_bytes(SECRET)
    return target


def deployed_function_zip(function_name):
    """The code moto's Lambda holds for the function (the server runs in this process)."""
    from moto.awslambda.models import lambda_backends

    return lambda_backends[ACCOUNT]["us-east-1"].get_function(function_name).code_bytes


def test_private_files_are_never_uploaded(clients, names, local_aws, tmp_path):
    repo = repo_copy_with_private_file(tmp_path / "repo")
    env = dict(os.environ, AWS_ENDPOINT_URL=local_aws, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(repo / "deploy.sh"), "deploy", "--public-software"],
                          env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    s3 = clients("s3")
    stored = every_object(s3)
    assert (names.software_bucket, "AwsS3.py") in stored
    assert [key for _, key in stored if key.startswith("private")] == []
    for bucket, key in stored:
        assert SECRET not in s3.get_object(Bucket=bucket, Key=key)["Body"].read(), key
    with zipfile.ZipFile(BytesIO(deployed_function_zip(names.function_name))) as archive:
        assert "lambda_function.py" in archive.namelist()
        assert [n for n in archive.namelist() if n.startswith("private")] == []
        assert all(SECRET not in archive.read(name) for name in archive.namelist())


# --- malformed events launch nothing they should not ------------------------------------


@pytest.fixture
def ec2(monkeypatch):
    """The handler's EC2 client replaced by a recorder (so any launch is seen)."""
    recorder = RecordingEc2()
    monkeypatch.setitem(lf._clients, "ec2", recorder)
    return recorder


BUCKET = "awsfun-data"


def with_s3(**s3):
    """A well-formed record whose 's3' part is replaced by `s3`."""
    return dict(s3_record(BUCKET, "k"), s3=s3)


WRONG_TYPES = {
    "record is a list": [s3_record(BUCKET, "k")],
    "record is null": None,
    "s3 is a list": dict(s3_record(BUCKET, "k"), s3=[1]),
    "object is a string": with_s3(bucket={"name": BUCKET}, object="k"),
    "bucket is a string": with_s3(bucket=BUCKET, object={"key": "k"}),
    "bucket name is a number": with_s3(bucket={"name": 5}, object={"key": "k"}),
    "bucket name is null": with_s3(bucket={"name": None}, object={"key": "k"}),
    "key is a number": s3_record(BUCKET, "", raw_key=5),
    "key is a list": s3_record(BUCKET, "", raw_key=["k"]),
    "key is an object": s3_record(BUCKET, "", raw_key={"k": 1}),
    "key is empty": s3_record(BUCKET, "", raw_key=""),
    "eventSource is SNS": {"EventSource": "aws:sns", "Sns": {"Message": json.dumps(
        s3_event(s3_record(BUCKET, "k")))}},
    "eventSource is a number": dict(s3_record(BUCKET, "k"), eventSource=3),
    "event name is a number": dict(s3_record(BUCKET, "k"), eventName=7),
    "event name is ObjectRemoved": s3_record(BUCKET, "k", event_name="ObjectRemoved:Delete"),
}


@pytest.mark.parametrize("record", WRONG_TYPES.values(), ids=WRONG_TYPES.keys())
def test_a_record_of_the_wrong_shape_launches_nothing_and_says_why(record, ec2):
    result = lf.lambda_handler({"Records": [record]}, None)
    assert ec2.requests == [] and result["launched"] == []
    (entry,) = result["skipped"]
    assert set(entry) >= {"bucket", "key", "reason"} and entry["reason"]


# Keys no S3 object can have. Bash cannot hold a NUL, so 'a\0b' would reach the worker as 'ab':
# another object. A lone surrogate cannot be encoded (it once raised out of the handler and
# cost the event's other records their launch); past 1,024 bytes there is nothing to analyse.
IMPOSSIBLE_KEYS = {"NUL": "a%00b", "lone surrogate": "bad\ud800key", "1,025 bytes": "k" * 1025,
                   "1,024 bytes and a half": "k" * 1023 + "%C3%A9"}


@pytest.mark.parametrize("raw_key", IMPOSSIBLE_KEYS.values(), ids=IMPOSSIBLE_KEYS.keys())
def test_a_key_no_s3_object_can_have_is_skipped_and_the_rest_launch(raw_key, ec2, caplog):
    event = s3_event(s3_record(BUCKET, "", raw_key=raw_key), s3_record(BUCKET, "good"))
    result = lf.lambda_handler(event, None)
    # Lambda writes the log as UTF-8: a line that cannot be encoded is lost to a logging error.
    for record in caplog.records:
        record.getMessage().encode("utf-8")
    assert [entry["key"] for entry in result["launched"]] == ["good"]
    assert len(ec2.requests) == 1
    (entry,) = result["skipped"]
    assert entry["reason"].startswith("malformed record #0") and "1,024" in entry["reason"]


def test_the_longest_key_s3_allows_still_launches(ec2):
    key = "é" * 512  # 1,024 bytes
    result = lf.lambda_handler(s3_event(s3_record(BUCKET, key)), None)
    assert [entry["key"] for entry in result["launched"]] == [key]


def mixed_records(count):
    """`count` records cycling through valid, malformed, worker output and deletions."""
    kinds = [
        lambda i: ("launch", s3_record(BUCKET, f"inputs/{i}.csv", etag=f"{i:032x}")),
        lambda i: ("malformed", with_s3(bucket={"name": "REPLACE-ME"}, object={"key": "k"})),
        lambda i: ("skip", s3_record(BUCKET, f"analysis/inputs/{i}.csv.json")),
        lambda i: ("skip", s3_record(BUCKET, f"inputs/{i}.csv", event_name="ObjectRemoved:Delete")),
        lambda i: ("malformed", s3_record(BUCKET, "", raw_key=i)),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def test_a_thousand_record_event_launches_exactly_its_valid_objects(ec2, monkeypatch):
    monkeypatch.setenv("MAX_WORKERS", "1000")  # the cap is tests/test_capacity.py's subject
    records = mixed_records(1000)
    started = time.monotonic()
    result = lf.lambda_handler(s3_event(*(record for _, record in records)), None)
    elapsed = time.monotonic() - started
    wanted = [unquote_plus(record["s3"]["object"]["key"])
              for kind, record in records if kind == "launch"]
    assert [entry["key"] for entry in result["launched"]] == wanted
    assert len(ec2.requests) == len(wanted) == 200
    assert len({request["ClientToken"] for request in ec2.requests}) == 200
    assert len(result["skipped"]) == 800
    assert sum("malformed record" in entry["reason"] for entry in result["skipped"]) == 400
    assert elapsed < 20  # the handler itself is no bottleneck (Lambda's timeout is 60 s)


def test_the_same_object_a_thousand_times_is_one_launch_token(ec2):
    """Duplicates in one event share a ClientToken, so EC2 starts one instance for them all."""
    record = s3_record(BUCKET, "inputs/dup.csv")
    lf.lambda_handler(s3_event(*[record] * 1000), None)
    assert len({request["ClientToken"] for request in ec2.requests}) == 1
