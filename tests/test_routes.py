"""awsfun_deploy.routes in deploy: the routing table validated before any AWS call, published,
packaged, and given its launch templates.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

import deploy
import lambda_function
from conftest import REPO
from deploy_helpers import (
    ACCOUNT, ARM, BIG, COPY, NoAws, PLAIN, changes, template_data, write_routes,
)


@pytest.mark.parametrize("routes, text, message", [
    (None, "{not json", "is not valid JSON"),
    ([dict(BIG, instance_type="large")], None, "route #0: instance_type 'large' is not like"),
    ([BIG, BIG], None, "route #1: the name 'big-reads' is used twice"),
    ([dict(BIG, command="seqkit stats {input}")], None, "never a shell string"),
    ([BIG, dict(BIG, name="other", instance_type="m7i.xlarge")], None,
     "route 'other' wants launch template su2cw_worker_big as m7i.xlarge, but route "
     "'big-reads' makes it m7i.large"),
    ([dict(COPY, instance_type="m7i.large")], None,
     "route 'copy' wants launch template su2cw_worker as m7i.large, but --instance-type "
     "makes it t3.small"),
])
def test_a_bad_routing_table_stops_deploy_before_any_aws_call(tmp_path, capsys, routes, text,
                                                               message):
    path = tmp_path / "routes.json"
    if routes is None:
        path.write_text(text, encoding="utf-8")
    else:
        write_routes(tmp_path, *routes)
    assert deploy.main(["deploy", "--routes", str(path)], clients=NoAws()) == 2
    err = capsys.readouterr().err
    assert err.startswith("deploy.sh deploy: ") and str(path) in err
    assert message in err


def test_a_bad_routing_table_leaves_the_account_untouched(clients, names, tmp_path):
    bad = write_routes(tmp_path, dict(BIG, launch_template="has space"))
    with pytest.raises(deploy.DeployError, match="route #0: 'has space' is not a launch template"):
        deploy.deploy(clients, names, progress=deploy.Progress(echo=False), routes_file=bad)
    assert clients("s3").list_buckets()["Buckets"] == []
    assert clients("ec2").describe_launch_templates()["LaunchTemplates"] == []
    assert clients("iam").list_roles()["Roles"] == []


def test_the_wrapper_refuses_a_missing_table_with_exit_status_2(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, AWS_ENDPOINT_URL="http://127.0.0.1:9")
    done = subprocess.run([str(REPO / "deploy.sh"), "--routes", str(tmp_path / "nope.json")],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"cannot read the routing table {tmp_path / 'nope.json'}" in done.stderr


def test_routes_get_their_launch_templates_policy_publication_and_package(clients, names,
                                                                         tmp_path, monkeypatch):
    routes_file = write_routes(tmp_path, BIG, ARM, PLAIN, COPY, dict(PLAIN, name="plain2",
                                                                     match="misc2/*"))
    result = deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                           routes_file=routes_file)
    s3, ec2, iam, lam, ssm = (clients(n) for n in ("s3", "ec2", "iam", "lambda", "ssm"))

    # One template per distinct name (the worker template too), each with its type and image.
    ids = result["launch_templates"]
    assert sorted(ids) == ["su2cw_worker", "su2cw_worker_arm", "su2cw_worker_big",
                           "su2cw_worker_misc"]
    images = {arch: ssm.get_parameter(Name=deploy.AMI_PARAMETER.format(arch=arch))[
        "Parameter"]["Value"] for arch in ("x86_64", "arm64")}
    expected = {"su2cw_worker": ("t3.small", "x86_64"), "su2cw_worker_big": ("m7i.large", "x86_64"),
                "su2cw_worker_arm": ("m7g.large", "arm64"),
                "su2cw_worker_misc": ("t3.small", "x86_64")}
    for name, (kind, arch) in expected.items():
        (template,) = ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
        assert template["LaunchTemplateId"] == ids[name]
        assert {"Key": deploy.STACK_TAG, "Value": "su2c"} in template["Tags"]
        data = template_data(ec2, name)
        assert (data["InstanceType"], data["ImageId"]) == (kind, images[arch])
        assert data["IamInstanceProfile"] == {"Name": names.worker_instance_profile}
        assert data["InstanceInitiatedShutdownBehavior"] == "terminate"
        assert data["MetadataOptions"]["HttpTokens"] == "required"
        (root,) = data["BlockDeviceMappings"]
        assert root["Ebs"]["Encrypted"] is True and root["Ebs"]["DeleteOnTermination"] is True
        assert {spec["ResourceType"] for spec in data["TagSpecifications"]} >= {"instance",
                                                                                 "volume"}

    # The launcher may launch from exactly these templates.
    policy = iam.get_role_policy(RoleName=names.lambda_role,
                                 PolicyName=names.lambda_policy_name)["PolicyDocument"]
    run, sized, imaged = [st for st in policy["Statement"] if st["Action"] == "ec2:RunInstances"]
    arns = sorted(f"arn:aws:ec2:us-east-1:{ACCOUNT}:launch-template/{i}" for i in ids.values())
    assert sorted(a for a in run["Resource"] if ":launch-template/" in a) == arns
    for statement in (run, sized, imaged):
        assert sorted(statement["Condition"]["ArnLike"]["ec2:LaunchTemplate"]) == arns
    # ... and only their instance types and images.
    assert sized["Condition"]["StringEquals"]["ec2:InstanceType"] == \
        sorted({kind for kind, _ in expected.values()})
    assert sorted(imaged["Resource"]) == sorted(f"arn:aws:ec2:us-east-1::image/{image}"
                                                for image in images.values())

    # The table is published (private to the launcher) and packaged beside the handler.
    assert s3.get_object(Bucket=names.software_bucket, Key="routes.json")["Body"].read() == \
        routes_file.read_bytes()
    zip_bytes = deploy.build_function_zip(sources=deploy.software_sources(routes_file))
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        assert archive.read("routes.json") == routes_file.read_bytes()
    assert lam.get_function(FunctionName=names.function_name)["Configuration"]["CodeSha256"] \
        == deploy.code_sha256(zip_bytes)

    # Status lists the templates with the routes they serve, and sees no drift.
    status = deploy.collect_status(clients, names, routes_file=routes_file)
    assert status["drift"] == []
    serving = {t["name"]: (t["instance_type"], t["routes"]) for t in status["launch_templates"]}
    assert serving == {"su2cw_worker": ("t3.small", ["default", "copy"]),
                       "su2cw_worker_big": ("m7i.large", ["big-reads"]),
                       "su2cw_worker_arm": ("m7g.large", ["arm-tables"]),
                       "su2cw_worker_misc": ("t3.small", ["plain", "plain2"])}

    # The deployed handler launches a matching key from its route's template.
    env = lam.get_function_configuration(FunctionName=names.function_name)["Environment"]
    for name, value in env["Variables"].items():
        monkeypatch.setenv(name, value)
    s3.put_object(Bucket=names.data_bucket, Key="run1/reads.fastq.gz", Body=b"@r\nAC\n+\n!!\n")
    etag = s3.head_object(Bucket=names.data_bucket, Key="run1/reads.fastq.gz")["ETag"]
    obj = {"bucket": names.data_bucket, "key": "run1/reads.fastq.gz", "etag": etag.strip('"'),
           "version_id": "", "sequencer": "", "event_name": "ObjectCreated:Put", "size": 10}
    instance_id = lambda_function.launch_object(obj, lambda_function.load_settings(),
                                                ec2=ec2, s3=s3, local_dir="")
    (instance,) = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"]
    tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
    assert tags["awsfun:launch-template"] == "su2cw_worker_big"
    assert instance["InstanceType"] == "m7i.large"


def test_a_route_s_root_volume_size_reaches_its_launch_template(clients, names, tmp_path):
    """AWS fact: on Amazon Linux 2023 /tmp is RAM (tmpfs, half of memory), so a route's copy
    of a large input lives on the root volume: its template gets the route's
    root_volume_gib, the others keep the image's size, and status sees no drift."""
    routes_file = write_routes(tmp_path, dict(BIG, root_volume_gib=200), PLAIN)
    deploy.deploy(clients, names, progress=deploy.Progress(echo=False), routes_file=routes_file)
    ec2 = clients("ec2")
    sizes = {name: template_data(ec2, name)["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"]
             for name in ("su2cw_worker", "su2cw_worker_big", "su2cw_worker_misc")}
    assert sizes["su2cw_worker_big"] == 200
    assert sizes["su2cw_worker"] == sizes["su2cw_worker_misc"] < 200
    assert deploy.collect_status(clients, names, routes_file=routes_file)["drift"] == []


def test_two_routes_giving_one_template_different_root_volumes_are_refused(tmp_path):
    routes_file = write_routes(tmp_path, dict(BIG, root_volume_gib=200),
                               dict(BIG, name="other", match="x/*", root_volume_gib=50))
    with pytest.raises(deploy.DeployError, match="200 GiB"):
        deploy.deploy(NoAws(), deploy.derive_names("su2c", ACCOUNT, "us-east-1"),
                      progress=deploy.Progress(echo=False), routes_file=routes_file)


def test_a_route_dropped_from_the_table_loses_its_template_and_permission(clients, names,
                                                                         tmp_path):
    first = write_routes(tmp_path, BIG, PLAIN, name="first.json")
    ids = deploy.deploy(clients, names, progress=deploy.Progress(echo=False),
                        routes_file=first)["launch_templates"]
    again = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=again, routes_file=first)
    assert changes(again) == []  # re-run: nothing to change

    second = write_routes(tmp_path, PLAIN, name="second.json")
    progress = deploy.Progress(echo=False)
    deploy.deploy(clients, names, progress=progress, routes_file=second)
    assert ("launch template", "su2cw_worker_big", deploy.DELETED) in {
        (s["what"], s["name"], s["outcome"]) for s in progress.steps}
    ec2 = clients("ec2")
    assert sorted(t["LaunchTemplateName"] for t in ec2.describe_launch_templates()[
        "LaunchTemplates"]) == ["su2cw_worker", "su2cw_worker_misc"]
    policy = json.dumps(clients("iam").get_role_policy(
        RoleName=names.lambda_role, PolicyName=names.lambda_policy_name)["PolicyDocument"])
    assert ids["su2cw_worker_big"] not in policy and ids["su2cw_worker_misc"] in policy

    # Status against the first table reports the missing template; teardown removes the rest.
    drift = deploy.collect_status(clients, names, routes_file=first)["drift"]
    assert {"resource": "launch template", "name": "su2cw_worker_big", "problem": "missing"} \
        in drift
    routed_worker = ec2.run_instances(
        LaunchTemplate={"LaunchTemplateName": "su2cw_worker_misc", "Version": "$Latest"},
        MinCount=1, MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
            {"Key": "awsfun:launch-template", "Value": "su2cw_worker_misc"}]}],
    )["Instances"][0]["InstanceId"]
    deploy.teardown(clients, names, progress=deploy.Progress(echo=False), wait=False)
    assert ec2.describe_launch_templates()["LaunchTemplates"] == []
    (state,) = [i["State"]["Name"] for r in ec2.describe_instances(
        InstanceIds=[routed_worker])["Reservations"] for i in r["Instances"]]
    assert state in ("shutting-down", "terminated")  # no routed worker is orphaned
