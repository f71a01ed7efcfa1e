"""awsfun_deploy.stack on a moto server: deploy creates every resource with its properties,
changes nothing the second time, works end to end, and teardown removes what it made.
"""

import base64
import json
import os
import sys
from datetime import timedelta

import deploy
import deploy_helpers
from awsfun_deploy import ec2 as ec2_module
import lambda_function
from conftest import REPO
from support import run_user_data
from deploy_helpers import ACCOUNT, assert_nothing_left, changes, count_everything, error_of


def test_deploy_creates_every_resource_with_its_properties(clients, names, deployed):
    result, progress, create_params = deployed
    s3, iam, ec2 = clients("s3"), clients("iam"), clients("ec2")
    lam, sqs, logs, ssm = clients("lambda"), clients("sqs"), clients("logs"), clients("ssm")
    assert all(step["outcome"] == deploy.CREATED for step in progress.steps), progress.steps

    # Data bucket: private, encrypted, events to the function.
    for bucket in (names.data_bucket, names.software_bucket):
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        assert block == deploy.PRIVATE_BLOCK
        rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]
        assert rule["Rules"][0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        owner = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
        assert owner == [{"ObjectOwnership": "BucketOwnerEnforced"}]
        assert error_of(s3.get_bucket_policy, Bucket=bucket) == "NoSuchBucketPolicy"
    notification = s3.get_bucket_notification_configuration(Bucket=names.data_bucket)
    assert "LambdaFunctionConfigurations" not in notification
    (config,) = notification["QueueConfigurations"]
    assert config["QueueArn"] == names.events_queue_arn
    assert config["Events"] == ["s3:ObjectCreated:*"]

    # Events queue: encrypted, Lambda's visibility advice, redrive after at least a day, only
    # the data bucket of this account may send to it; the function reads it in batches of 10
    # with partial batch responses.
    events_url = sqs.get_queue_url(QueueName=names.events_queue)["QueueUrl"]
    assert events_url == result["events_queue_url"]
    attributes = sqs.get_queue_attributes(QueueUrl=events_url, AttributeNames=["All"])[
        "Attributes"]
    assert attributes["SqsManagedSseEnabled"] == "true"
    visibility = int(attributes["VisibilityTimeout"])
    assert visibility >= 6 * create_params["Timeout"]
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == names.dlq_arn
    assert int(redrive["maxReceiveCount"]) * visibility >= 24 * 3600
    (allowed,) = json.loads(attributes["Policy"])["Statement"]
    assert (allowed["Principal"], allowed["Action"], allowed["Resource"]) == \
        ({"Service": "s3.amazonaws.com"}, "sqs:SendMessage", names.events_queue_arn)
    assert allowed["Condition"] == {
        "ArnLike": {"aws:SourceArn": f"arn:aws:s3:::{names.data_bucket}"},
        "StringEquals": {"aws:SourceAccount": ACCOUNT}}
    (mapping,) = lam.list_event_source_mappings(FunctionName=names.function_name)[
        "EventSourceMappings"]
    assert mapping["EventSourceArn"] == names.events_queue_arn
    assert mapping["BatchSize"] == 10
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["ScalingConfig"] == {"MaximumConcurrency": 2}

    # Software bucket: exactly the published files, byte for byte.
    objects = s3.list_objects_v2(Bucket=names.software_bucket)["Contents"]
    assert sorted(o["Key"] for o in objects) == sorted(deploy.PUBLISHED_FILES)
    for key in deploy.PUBLISHED_FILES:
        body = s3.get_object(Bucket=names.software_bucket, Key=key)["Body"].read()
        assert body == (REPO / key).read_bytes()

    # Roles: exactly one inline policy each, the rendered documents, nothing attached.
    documents = deploy.policy_documents(names, result["launch_template_id"], [result["image_id"]],
                                        [deploy.DEFAULT_INSTANCE_TYPE],
                                        [result["security_group_id"]])
    for role, trust, policy_name, policy in (
        (names.worker_role, "worker-trust", names.worker_policy_name, "worker-policy"),
        (names.lambda_role, "lambda-trust", names.lambda_policy_name, "lambda-policy"),
    ):
        got = iam.get_role(RoleName=role)["Role"]
        assert deploy.canonical(got["AssumeRolePolicyDocument"]) == \
            deploy.canonical(documents[trust])
        assert iam.list_role_policies(RoleName=role)["PolicyNames"] == [policy_name]
        inline = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
        assert deploy.canonical(inline) == deploy.canonical(documents[policy])
        assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
    profile = iam.get_instance_profile(InstanceProfileName=names.worker_instance_profile)
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [names.worker_role]

    # Launch template: AL2023 from SSM, small burstable type, the profile, safe defaults.
    (template,) = ec2.describe_launch_templates(
        LaunchTemplateNames=["su2cw_worker"])["LaunchTemplates"]
    assert template["LaunchTemplateId"] == result["launch_template_id"]
    assert template["DefaultVersionNumber"] == template["LatestVersionNumber"] == 1
    data = ec2.describe_launch_template_versions(
        LaunchTemplateName="su2cw_worker", Versions=["$Default"])["LaunchTemplateVersions"][0][
        "LaunchTemplateData"]
    ami = ssm.get_parameter(
        Name="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
    assert data["ImageId"] == ami["Parameter"]["Value"] == result["image_id"]
    assert data["InstanceType"] == "t3.small"
    assert data["IamInstanceProfile"] == {"Name": names.worker_instance_profile}
    assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    (root,) = data["BlockDeviceMappings"]
    assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
    tagged = {spec["ResourceType"] for spec in data["TagSpecifications"]}
    assert {"instance", "volume"} <= tagged

    # Function: runtime, handler, role, timeout, the contract's environment, the code.
    config = lam.get_function(FunctionName=names.function_name)["Configuration"]
    assert config["FunctionArn"] == result["function_arn"]
    assert config["Runtime"] in ("python3.12", "python3.13")
    assert config["Handler"] == "lambda_function.lambda_handler"
    assert config["Role"] == iam.get_role(RoleName=names.lambda_role)["Role"]["Arn"]
    assert 30 <= config["Timeout"] <= 300
    assert config["Environment"]["Variables"] == {
        "LAUNCH_TEMPLATE": "su2cw_worker",
        "SOFTWARE_BUCKET": names.software_bucket,
        "BOOTSTRAP_KEY": "bootstrap/bootstrap.sh",
        "SKIP_SUBSTRING": "analysis",
        "WATCHDOG_MINUTES": "120",
        "MAX_WORKERS": "16",
    }
    assert config["CodeSha256"] == deploy.code_sha256(deploy.build_function_zip())
    # moto stores neither LoggingConfig nor DeadLetterConfig, so check what was sent.
    assert create_params["LoggingConfig"]["LogFormat"] == "JSON"
    assert create_params["LoggingConfig"]["LogGroup"] == names.log_group
    dlq_url = sqs.get_queue_url(QueueName=names.dlq_name)["QueueUrl"]
    assert dlq_url == result["dlq_url"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    assert create_params["DeadLetterConfig"] == {"TargetArn": dlq_arn}
    retry = lam.get_function_event_invoke_config(FunctionName=names.function_name)
    assert retry["MaximumRetryAttempts"] == deploy.MAX_RETRY_ATTEMPTS
    # S3 sends to the queue, not to the function: nobody else may invoke it.
    assert error_of(lam.get_policy, FunctionName=names.function_name) == \
        "ResourceNotFoundException"
    (group,) = logs.describe_log_groups(logGroupNamePrefix=names.log_group)["logGroups"]
    assert group["retentionInDays"] == deploy.LOG_RETENTION_DAYS


def test_second_deploy_changes_nothing(clients, names, deployed, capsys):
    before = count_everything(clients)
    assert deploy.main(["deploy"], clients=clients) == 0
    out = capsys.readouterr().out
    assert "Nothing to change: everything already in place." in out
    assert " created " not in out and " updated " not in out
    assert count_everything(clients) == before


def image_arns(document):
    """The image ARNs the launcher policy's RunInstances statements grant."""
    return sorted(arn for statement in document["Statement"]
                  if "ec2:RunInstances" in deploy_helpers.as_list(statement["Action"])
                  for arn in deploy_helpers.as_list(statement["Resource"]) if ":image/" in arn)


def test_redeploy_with_a_new_image_never_leaves_the_launcher_refused(clients, names, deployed):
    """The handler launches from the template's "$Latest" and the launcher role may start only
    the deployed images (ec2:RunInstances on image ARNs), so the policy must allow the new
    image before the template names it, and drop the old one only after. Each call that
    changes either is recorded, and after each one the image "$Latest" launches must be one
    the launcher policy allows (IAM is eventually consistent, so deploy also waits once the
    policy is widened; against moto that wait is 0 s)."""
    iam, ec2, ssm = clients("iam"), clients("ec2"), clients("ssm")
    old_image = deployed[0]["image_id"]
    # Filtered as deploy's fallback filters: moto answers an unfiltered call with ~1,300 images.
    new_image = next(image["ImageId"] for image in ec2.describe_images(Owners=["amazon"], Filters=[
        {"Name": "architecture", "Values": ["x86_64"]}, {"Name": "name", "Values": [
            ec2_module.AMI_FALLBACK_NAME.format(arch="x86_64")]}])["Images"]
        if image["ImageId"] != old_image)

    def new_ami_published(parsed, **_):
        # A newer Amazon Linux 2023 in the public SSM parameter, as every few weeks.
        if parsed.get("Parameter", {}).get("Name", "").startswith(
                "/aws/service/ami-amazon-linux-latest/"):
            parsed["Parameter"]["Value"] = new_image

    ssm.meta.events.register("after-call.ssm.GetParameter", new_ami_published)
    calls = []

    def allowed_and_launched():
        policy = iam.get_role_policy(RoleName=names.lambda_role,
                                     PolicyName=names.lambda_policy_name)["PolicyDocument"]
        latest = ec2.describe_launch_template_versions(
            LaunchTemplateName=names.launch_template, Versions=["$Latest"])[
            "LaunchTemplateVersions"][0]["LaunchTemplateData"]["ImageId"]
        return [arn.rsplit("/", 1)[1] for arn in image_arns(policy)], latest

    def record(event_name, **_):
        operation = event_name.rsplit(".", 1)[1]
        allowed, latest = allowed_and_launched()
        calls.append((operation, allowed))
        assert latest in allowed, f"after {operation}: $Latest launches {latest}, " \
                                  f"the launcher may start only {allowed}"

    for client, operation in ((iam, "PutRolePolicy"), (ec2, "CreateLaunchTemplateVersion"),
                              (ec2, "ModifyLaunchTemplate")):
        client.meta.events.register(f"after-call.{client.meta.service_model.service_name}."
                                    f"{operation}", record)
    waits = []
    progress = deploy.Progress(echo=False)
    result = deploy.deploy(clients, names, progress=progress,
                           sleep=lambda seconds: waits.append((len(calls), seconds)))

    both = sorted([old_image, new_image])
    assert calls == [("PutRolePolicy", both), ("CreateLaunchTemplateVersion", both),
                     ("ModifyLaunchTemplate", both), ("PutRolePolicy", [new_image])]
    assert waits[0] == (1, 0.0)  # right after widening, before the template changes
    assert result["image_id"] == new_image
    assert [(s["what"], s["outcome"]) for s in changes(progress)] == [
        ("launcher role", deploy.UPDATED), ("launch template", deploy.UPDATED),
        ("launcher role", deploy.UPDATED)]
    # The final policy is exactly what a first deploy of the new image would render.
    final = iam.get_role_policy(RoleName=names.lambda_role,
                                PolicyName=names.lambda_policy_name)["PolicyDocument"]
    expected = deploy.policy_documents(names, result["launch_template_id"], [new_image],
                                       [deploy.DEFAULT_INSTANCE_TYPE],
                                       [result["security_group_id"]])["lambda-policy"]
    assert deploy.canonical(final) == deploy.canonical(expected)
    assert image_arns(final) == [f"arn:aws:ec2:us-east-1::image/{new_image}"]


def test_policy_propagation_wait_is_iams_against_aws_and_none_against_an_emulator():
    assert deploy.policy_propagation_seconds({}) == deploy.POLICY_PROPAGATION_SECONDS >= 5
    assert deploy.policy_propagation_seconds({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}) == 0


def test_explicit_bucket_names_are_found_again_by_status_and_teardown(clients):
    names = deploy.resolve_names(clients, "stage2", data_bucket="stage2-inputs",
                                 software_bucket="stage2-tools")
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False))
    derived = deploy.resolve_names(clients, "stage2")
    found = deploy.discover_names(clients("lambda"), derived)
    assert (found.data_bucket, found.software_bucket) == ("stage2-inputs", "stage2-tools")
    assert found.launch_template == "stage2w_worker"
    assert deploy.main(["teardown", "--prefix", "stage2", "--yes"], clients=clients) == 0
    assert error_of(clients("s3").head_bucket, Bucket="stage2-tools") == "404"
    clients("s3").head_bucket(Bucket="stage2-inputs")  # data kept


def test_object_in_deployed_bucket_becomes_a_report(clients, names, deployed, monkeypatch,
                                                    tmp_path, shutdown_stub):
    s3, sqs, ec2, lam = clients("s3"), clients("sqs"), clients("ec2"), clients("lambda")
    result = deployed[0]
    # moto cannot run the Lambda, so a queue beside it catches the very same event.
    queue_url = sqs.create_queue(QueueName="test-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"]
    config = s3.get_bucket_notification_configuration(Bucket=names.data_bucket)
    config.pop("ResponseMetadata")
    config["QueueConfigurations"] = [{"Id": "test", "QueueArn": queue_arn,
                                      "Events": ["s3:ObjectCreated:*"]}]
    s3.put_bucket_notification_configuration(Bucket=names.data_bucket,
                                             NotificationConfiguration=config)
    key = "runs/2024 batch/sample+1.csv"
    s3.put_object(Bucket=names.data_bucket, Key=key, Body=b"id,value\n1,2\n3,4\n")
    event = None
    for _ in range(5):
        for message in sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                           WaitTimeSeconds=1).get("Messages", []):
            body = json.loads(message["Body"])
            if "Records" in body:
                event = body
        if event:
            break
    assert event and event["Records"][0]["s3"]["bucket"]["name"] == names.data_bucket

    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    for name, value in env["Variables"].items():
        monkeypatch.setenv(name, value)
    launched = lambda_function.lambda_handler(event, None)
    (entry,) = launched["launched"]
    assert entry["key"] == key
    (instance,) = ec2.describe_instances(InstanceIds=[entry["instance_id"]])["Reservations"][0][
        "Instances"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["aws:ec2launchtemplate:id"] == result["launch_template_id"]
    assert tags["awsfun:key"] == key

    status = deploy.collect_status(clients, names,
                                   now=instance["LaunchTime"] + timedelta(seconds=90))
    (worker,) = status["workers"]
    assert (worker["instance_id"], worker["key"], worker["age_seconds"]) == \
        (entry["instance_id"], key, 90)

    user_data = ec2.describe_instance_attribute(InstanceId=entry["instance_id"],
                                                Attribute="userData")["UserData"]["Value"]
    venv_path = f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    run = run_user_data(base64.b64decode(user_data).decode("utf-8"), tmp_path, shutdown_stub,
                        path=venv_path)
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    report = json.loads(s3.get_object(Bucket=names.data_bucket,
                                      Key=f"analysis/{key}.json")["Body"].read())
    assert report["input"]["key"] == key and report["lines"] == 3
    assert shutdown_stub.calls()[-1] == "-h now"
    status = deploy.collect_status(clients, names)
    assert f"analysis/{key}.json" in [r["key"] for r in status["reports"]]
    assert status["reports"][0]["input_key"] == key


def test_teardown_removes_everything_and_orphans_no_worker(clients, names, deployed):
    s3, ec2 = clients("s3"), clients("ec2")
    s3.put_object(Bucket=names.data_bucket, Key="inputs/keep.csv", Body=b"1\n")
    worker = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": names.launch_template, "Version": "$Latest"},
        MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "awsfun:launch-template", "Value": names.launch_template},
            {"Key": "awsfun:key", "Value": "inputs/keep.csv"}]}],
    )["Instances"][0]["InstanceId"]
    unrelated = ec2.run_instances(ImageId=deployed[0]["image_id"], MinCount=1,
                                  MaxCount=1)["Instances"][0]["InstanceId"]

    progress = deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert ("worker", deploy.DELETED) in {(s["what"], s["outcome"]) for s in progress.steps}
    states = {i["InstanceId"]: i["State"]["Name"]
              for r in ec2.describe_instances(InstanceIds=[worker, unrelated])["Reservations"]
              for i in r["Instances"]}
    assert states[worker] in ("shutting-down", "terminated")
    assert states[unrelated] == "running"
    assert_nothing_left(clients, names)
    # The data stays, without the notification to a function that no longer exists.
    assert s3.get_object(Bucket=names.data_bucket, Key="inputs/keep.csv")["Body"].read() == b"1\n"
    notifications = s3.get_bucket_notification_configuration(Bucket=names.data_bucket)
    assert "LambdaFunctionConfigurations" not in notifications
    assert "QueueConfigurations" not in notifications

    # Again: everything already gone, no error; then the data too when asked.
    again = deploy.teardown(clients, names, progress=deploy.Progress(echo=False))
    assert changes(again) == []
    deploy.teardown(clients, names, delete_data=True, progress=deploy.Progress(echo=False))
    assert error_of(s3.head_bucket, Bucket=names.data_bucket) == "404"
