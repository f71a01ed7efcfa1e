"""The deployed roles in use (awsfun_deploy.iam with policies): what the handler asks for is what
the launcher role allows; the worker role does its job only.
"""

import boto3

import deploy
import lambda_function
from conftest import REPO
from support import moto_iam_enforced
from deploy_helpers import ACCOUNT, as_list, error_of


def test_handler_launch_request_is_what_the_launcher_policy_allows(clients, names, deployed,
                                                                  monkeypatch):
    """moto cannot judge resource ARNs or Conditions for EC2 and IAM: match request to policy."""
    template_id = deployed[0]["launch_template_id"]
    env = clients("lambda").get_function_configuration(
        FunctionName=names.function_name)["Environment"]["Variables"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    requests = []
    ec2 = lambda_function.get_client("ec2")
    ec2.meta.events.register("provide-client-params.ec2.RunInstances",
                             lambda params, **_: requests.append(dict(params)))
    event = {"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
                          "s3": {"bucket": {"name": names.data_bucket},
                                 "object": {"key": "x.txt", "eTag": "abc"}}}]}
    lambda_function.lambda_handler(event, None)
    (request,) = requests
    policy = clients("iam").get_role_policy(RoleName=names.lambda_role,
                                            PolicyName=names.lambda_policy_name)["PolicyDocument"]
    statements = policy["Statement"]
    by_action = {}
    for statement in statements:
        assert statement["Effect"] == "Allow"
        for action in as_list(statement["Action"]):
            assert "*" not in action
            by_action.setdefault(action, []).append(statement)
    assert sorted(by_action) == ["ec2:CreateTags", "ec2:DescribeInstances", "ec2:RunInstances",
                                 "iam:PassRole", "logs:CreateLogStream", "logs:PutLogEvents",
                                 "s3:GetObject", "sqs:ChangeMessageVisibility",
                                 "sqs:DeleteMessage", "sqs:GetQueueAttributes",
                                 "sqs:ReceiveMessage", "sqs:SendMessage"]

    template_arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:launch-template/{template_id}"
    run, sized, imaged = by_action["ec2:RunInstances"]
    assert request["LaunchTemplate"] == {"LaunchTemplateName": "su2cw_worker",
                                         "Version": "$Latest"}
    # The request overrides neither image, type nor key: the template's are what is judged.
    assert not {"ImageId", "InstanceType", "KeyName", "SecurityGroupIds"} & set(request)
    data = clients("ec2").describe_launch_template_versions(
        LaunchTemplateId=template_id, Versions=["$Latest"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    resources = as_list(run["Resource"])
    assert template_arn in resources
    # A spot launch (--spot) is also judged on its spot-instances-request resource.
    for kind in ("volume", "network-interface", "subnet", "spot-instances-request"):
        assert f"arn:aws:ec2:us-east-1:{ACCOUNT}:{kind}/*" in resources
    # Only the stack's own security group, the one the template names.
    assert [arn for arn in resources if ":security-group/" in arn] == \
        [f"arn:aws:ec2:us-east-1:{ACCOUNT}:security-group/{group}"
         for group in data["SecurityGroupIds"]]
    assert run["Condition"] == {"ArnLike": {"ec2:LaunchTemplate": [template_arn]}}
    assert sized["Resource"] == f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/*"
    assert sized["Condition"]["ArnLike"] == run["Condition"]["ArnLike"]
    assert data["InstanceType"] in sized["Condition"]["StringEquals"]["ec2:InstanceType"]
    assert as_list(imaged["Resource"]) == [f"arn:aws:ec2:us-east-1::image/{data['ImageId']}"]
    assert imaged["Condition"]["ArnLike"] == run["Condition"]["ArnLike"]

    (tag,) = by_action["ec2:CreateTags"]
    assert tag["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    tagged = {spec["ResourceType"] for spec in request["TagSpecifications"]}
    assert {f"arn:aws:ec2:us-east-1:{ACCOUNT}:{kind}/*" for kind in tagged} == \
        set(as_list(tag["Resource"]))

    (pass_role,) = by_action["iam:PassRole"]
    assert pass_role["Resource"] == f"arn:aws:iam::{ACCOUNT}:role/{names.worker_role}"
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService":
                                                       "ec2.amazonaws.com"}}
    (read,) = by_action["s3:GetObject"]
    assert sorted(as_list(read["Resource"])) == [
        f"arn:aws:s3:::{names.software_bucket}/bootstrap/bootstrap.sh",
        f"arn:aws:s3:::{names.software_bucket}/bootstrap/launcher.py",
        f"arn:aws:s3:::{names.software_bucket}/routes.json"]
    (send,) = by_action["sqs:SendMessage"]
    assert send["Resource"] == f"arn:aws:sqs:us-east-1:{ACCOUNT}:{names.dlq_name}"
    for action in ("logs:CreateLogStream", "logs:PutLogEvents"):
        (logs,) = by_action[action]
        assert logs["Resource"] == \
            f"arn:aws:logs:us-east-1:{ACCOUNT}:log-group:{names.log_group}:*"


def test_worker_role_credentials_do_its_job_and_nothing_else(clients, names, deployed,
                                                             local_aws):
    s3 = clients("s3")
    s3.put_object(Bucket=names.data_bucket, Key="inputs/a.csv", Body=b"a,b\n")
    s3.create_bucket(Bucket="someone-elses-bucket")
    s3.put_object(Bucket="someone-elses-bucket", Key="secret.txt", Body=b"secret")
    worker_arn = clients("iam").get_role(RoleName=names.worker_role)["Role"]["Arn"]
    credentials = clients("sts").assume_role(RoleArn=worker_arn,
                                             RoleSessionName="worker-test")["Credentials"]
    session = boto3.session.Session(aws_access_key_id=credentials["AccessKeyId"],
                                    aws_secret_access_key=credentials["SecretAccessKey"],
                                    aws_session_token=credentials["SessionToken"],
                                    region_name="us-east-1")
    worker = session.client("s3")
    with moto_iam_enforced(local_aws):
        # Its job: read the input and the published worker, write under analysis/.
        assert worker.get_object(Bucket=names.data_bucket, Key="inputs/a.csv")["Body"].read() \
            == b"a,b\n"
        worker.head_object(Bucket=names.data_bucket, Key="inputs/a.csv")
        worker.get_object(Bucket=names.software_bucket, Key="AwsS3.py")
        worker.put_object(Bucket=names.data_bucket, Key="analysis/x", Body=b"report")
        # Everything else is refused.
        denied = [
            error_of(worker.put_object, Bucket=names.data_bucket, Key="inputs/a.csv",
                     Body=b"overwritten"),
            error_of(worker.delete_object, Bucket=names.data_bucket, Key="inputs/a.csv"),
            error_of(worker.delete_object, Bucket=names.data_bucket, Key="analysis/x"),
            error_of(worker.get_object, Bucket="someone-elses-bucket", Key="secret.txt"),
            error_of(worker.put_object, Bucket=names.software_bucket, Key="AwsS3.py",
                     Body=b"evil"),
            error_of(session.client("iam").list_roles),
            error_of(session.client("ec2").describe_instances),
        ]
        batch = worker.delete_objects(Bucket=names.data_bucket,
                                      Delete={"Objects": [{"Key": "inputs/a.csv"}]})
    assert set(denied) == {"AccessDenied"}, denied
    assert [e["Code"] for e in batch.get("Errors", [])] == ["AccessDenied"]
    assert s3.get_object(Bucket=names.data_bucket, Key="inputs/a.csv")["Body"].read() == b"a,b\n"
    assert s3.get_object(Bucket=names.software_bucket, Key="AwsS3.py")["Body"].read() == \
        (REPO / "AwsS3.py").read_bytes()


def test_worker_role_may_abort_its_own_multipart_uploads_under_analysis(clients, names, deployed,
                                                                         local_aws):
    """A route command's outputs go up with upload_file, multipart past 8 MB; when a part fails
    boto3 aborts the upload, which needs s3:AbortMultipartUpload (S3 User Guide, "Multipart
    upload API and permissions"). Without it the parts stay, billed, until a lifecycle rule."""
    worker_arn = clients("iam").get_role(RoleName=names.worker_role)["Role"]["Arn"]
    from support import assumed_role_session
    worker = assumed_role_session(clients("sts"), worker_arn).client("s3")
    with moto_iam_enforced(local_aws):
        upload = worker.create_multipart_upload(Bucket=names.data_bucket,
                                                Key="analysis/in.csv/big.bam")
        worker.abort_multipart_upload(Bucket=names.data_bucket, Key="analysis/in.csv/big.bam",
                                      UploadId=upload["UploadId"])
        elsewhere = worker.create_multipart_upload  # under analysis/ only
        assert error_of(elsewhere, Bucket=names.data_bucket, Key="inputs/big.bam") == \
            "AccessDenied"


def test_worker_policy_grants_only_its_job():
    """What moto does not judge: no delete, no other bucket, no IAM or EC2, ListBucket for 404s."""
    names = deploy.derive_names("su2c", ACCOUNT, "us-east-1")
    policy = deploy.policy_documents(names, "lt-0123456789abcdef0")["worker-policy"]
    grants = {}
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        for action in as_list(statement["Action"]):
            grants.setdefault(action, set()).update(as_list(statement["Resource"]))
    data = f"arn:aws:s3:::{names.data_bucket}"
    software = f"arn:aws:s3:::{names.software_bucket}"
    assert grants == {
        "s3:ListBucket": {data},
        # Not routes.json: a worker's route arrives in its user-data.
        "s3:GetObject": {f"{data}/*", f"{software}/AwsS3.py", f"{software}/bootstrap/bootstrap.sh"},
        "s3:PutObject": {f"{data}/analysis/*"},
        "s3:AbortMultipartUpload": {f"{data}/analysis/*"},
    }


def test_deleting_a_role_removes_it_from_every_page_of_its_instance_profiles():
    """ListInstanceProfilesForRole pages (IsTruncated, Marker; IAM API Reference): a role
    left in a profile of the second page makes DeleteRole fail with DeleteConflict."""
    from datetime import datetime

    from botocore.stub import Stubber

    from awsfun_deploy import iam as iam_module
    iam = boto3.client("iam", region_name="us-east-1")
    stub = Stubber(iam)
    when = datetime(2025, 1, 1)
    role = "su2c-worker-us-east-1"

    def profile(name):
        return {"Path": "/", "InstanceProfileName": name, "InstanceProfileId": "AIPA" + "X" * 16,
                "Arn": f"arn:aws:iam::{ACCOUNT}:instance-profile/{name}", "CreateDate": when,
                "Roles": []}

    stub.add_response("get_role", {"Role": {
        "Path": "/", "RoleName": role, "RoleId": "AROA" + "X" * 16, "CreateDate": when,
        "Arn": f"arn:aws:iam::{ACCOUNT}:role/{role}", "AssumeRolePolicyDocument": "{}"}})
    stub.add_response("list_role_policies", {"PolicyNames": [], "IsTruncated": False})
    stub.add_response("list_attached_role_policies", {"AttachedPolicies": [],
                                                      "IsTruncated": False})
    stub.add_response("list_instance_profiles_for_role",
                      {"InstanceProfiles": [profile("first")], "IsTruncated": True,
                       "Marker": "page-2"}, {"RoleName": role})
    stub.add_response("list_instance_profiles_for_role",
                      {"InstanceProfiles": [profile("second")], "IsTruncated": False},
                      {"RoleName": role, "Marker": "page-2"})
    for name in ("first", "second"):
        stub.add_response("remove_role_from_instance_profile", {},
                          {"InstanceProfileName": name, "RoleName": role})
    stub.add_response("delete_role", {}, {"RoleName": role})
    with stub:
        iam_module.delete_role(iam, role, deploy.Progress(echo=False), "worker role")
    stub.assert_no_pending_responses()
