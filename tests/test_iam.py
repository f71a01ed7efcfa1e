"""The IAM documents in iam/: every one renders completely and lints clean with parliament."""

import json

import pytest
from parliament import analyze_policy_string

import deploy

# Findings accepted, each with the reason. Nothing else may be reported.
JUSTIFIED = {
    # Community auditors flag every iam:PassRole. Passing the worker role to EC2 is the one
    # thing the launcher must do (it is why the original needed admin rights); the statement
    # names that single role and carries iam:PassedToService = ec2.amazonaws.com, which
    # test_deploy asserts. Nothing else here touches IAM.
    ("lambda-policy", "PRIVILEGE_ESCALATION"),
    ("lambda-policy", "PERMISSIONS_MANAGEMENT_ACTIONS"),
    # Community auditors flag sts:AssumeRole as returning credentials. In a trust policy that
    # is its definition: it lets only the EC2 (worker) or Lambda (launcher) service principal
    # take the role. Reported only because the trust statement is linted as an identity
    # statement (see lintable).
    ("worker-trust", "CREDENTIALS_EXPOSURE"),
    ("lambda-trust", "CREDENTIALS_EXPOSURE"),
}
TEMPLATES = sorted(path.stem for path in deploy.IAM_DIR.glob("*.json"))
NAMES = deploy.derive_names("su2c", "123456789012", "us-east-1")
TEMPLATE_ID = "lt-0123456789abcdef0"


def rendered(template):
    return deploy.render_policy(template, deploy.policy_values(NAMES, [TEMPLATE_ID]))


def lintable(template, document):
    """The document as parliament can read it.

    parliament reads identity and resource policies but not trust policies, which have no
    Resource (its statement.py says so and reports MALFORMED). A trust statement is linted
    as the same statement on the role it belongs to, so its action, principal and any
    condition are still checked.
    """
    if template.endswith("-trust"):
        role = NAMES.worker_role_arn if template.startswith("worker") else NAMES.lambda_role_arn
        document = json.loads(json.dumps(document))
        for statement in document["Statement"]:
            statement.setdefault("Resource", role)
    return json.dumps(document, indent=2)


def test_every_template_is_checked():
    assert TEMPLATES == ["lambda-policy", "lambda-trust", "software-public-read",
                         "worker-policy", "worker-trust"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_every_placeholder(template):
    text = json.dumps(rendered(template))
    assert "${" not in text and "$" not in text
    # Lists of ARNs were spliced in, not nested.
    for statement in rendered(template)["Statement"]:
        for value in statement.get("Resource", []) if isinstance(statement.get("Resource"),
                                                                 list) else []:
            assert isinstance(value, str)


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_lints_clean_with_parliament(template):
    policy = analyze_policy_string(lintable(template, rendered(template)),
                                   include_community_auditors=True)
    findings = [(f.issue, f.detail) for f in policy.findings
                if (template, f.issue) not in JUSTIFIED]
    assert findings == []


def test_no_star_actions_and_no_managed_policies_anywhere():
    for template in TEMPLATES:
        for statement in rendered(template)["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) \
                else [statement["Action"]]
            assert all("*" not in action for action in actions), (template, actions)
            assert "NotAction" not in statement and "NotResource" not in statement
            assert statement["Effect"] == "Allow"
    # deploy attaches no managed policy: roles get exactly one inline policy (see test_deploy).
    assert "attach_role_policy" not in deploy.REPO.joinpath("deploy.py").read_text()


def test_parliament_would_catch_a_broken_document():
    """The lint is live: a wildcard resource on a write action is reported."""
    bad = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::*"},
        {"Effect": "Allow", "Action": "ec2:RunInstances",
         "Resource": "arn:aws:ec2:us-east-1:123456789012:launch-template/lt-1"}]}
    issues = {f.issue for f in analyze_policy_string(json.dumps(bad),
                                                     include_community_auditors=True).findings}
    assert "RESOURCE_MISMATCH" in issues
