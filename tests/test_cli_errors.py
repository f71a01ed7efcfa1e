"""./deploy.sh's ordinary mistakes: each is one line on stderr naming what to do, status 2,
and a traceback only with --debug (before or after the command).

The environment-driven ones (profile, region, credentials, endpoint) run deploy.sh as a
person does; the ones AWS answers (an expired session, a denial, a bucket someone else owns)
run main() in-process against the moto server with that one answer put in moto's place.
"""

import os
import subprocess
import sys
import types

import pytest
from botocore.exceptions import TokenRetrievalError, UnauthorizedSSOTokenError
from conftest import REPO

import deploy


def run_deploy_sh(*argv, env):
    return subprocess.run([str(REPO / "deploy.sh"), *argv], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def assert_one_line(stderr, *fragments):
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# An environment variable set to None is removed from the child's environment.
MISTAKES = {
    "unknown profile": ({"AWS_PROFILE": "nosuch"},
                        ["(nosuch) could not be found", "set AWS_PROFILE"]),
    "no region": ({"AWS_REGION": None, "AWS_DEFAULT_REGION": None},
                  ["no AWS region", "AWS_REGION"]),
    "no credentials": ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
                       ["no AWS credentials", "aws configure"]),
    "half the credentials": ({"AWS_SECRET_ACCESS_KEY": None},
                             ["Partial credentials", "set both AWS_ACCESS_KEY_ID"]),
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once
    # (botocore still tries CLIENT_CONFIG's 8 attempts: standard mode's backoff for a
    # non-throttling error, rand x 50 ms x 2^i, adds at most 6.4 s).
    "endpoint unreachable": ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                             ["Could not connect", "AWS_ENDPOINT_URL=http://127.0.0.1:9 right"]),
}


def mistaken_environment(changes):
    env = dict(os.environ, PYTHON=sys.executable)
    for name, value in changes.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_a_mistaken_environment_is_one_line_and_status_2(mistake):
    changes, fragments = MISTAKES[mistake]
    done = run_deploy_sh("status", env=mistaken_environment(changes))
    assert done.returncode == 2, done.stderr
    assert_one_line(done.stderr, "deploy.sh status: ", *fragments)
    assert done.stdout == ""


@pytest.mark.parametrize("argv", [["--debug", "status"], ["status", "--debug"]])
def test_debug_before_or_after_the_command_adds_the_traceback(argv):
    done = run_deploy_sh(*argv, env=mistaken_environment({"AWS_PROFILE": "nosuch"}))
    assert done.returncode == 2
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert "botocore.exceptions.ProfileNotFound" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("deploy.sh status: The config profile (nosuch)")


def answer_with_error(client, operation, code, message, status=400):
    """Make `client` answer `operation` with AWS's error `code` instead of moto's answer
    (a before-call handler's response replaces the request: botocore's own stubbing path)."""
    http = types.SimpleNamespace(status_code=status, headers={})

    def answer(**_):
        return http, {"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status}}

    client.meta.events.register(f"before-call.*.{operation}", answer)


# The codes are the documented ones (STS: ExpiredToken; Lambda: ExpiredTokenException;
# EC2: RequestExpired); the messages are what those services say, shortened.
EXPIRED = [("sts", "GetCallerIdentity", "ExpiredToken",
            "The security token included in the request is expired"),
           ("lambda", "GetFunction", "ExpiredTokenException",
            "The security token included in the request is expired"),
           ("ec2", "DescribeLaunchTemplates", "RequestExpired", "Request has expired.")]


@pytest.mark.parametrize("service, operation, code, message", EXPIRED)
def test_an_expired_session_says_log_in_again(clients, capsys, service, operation, code,
                                              message):
    answer_with_error(clients(service), operation, code, message)
    assert deploy.main(["status"], clients=clients) == 2
    captured = capsys.readouterr()
    assert_one_line(captured.err, f"deploy.sh status: AWS refused {operation} ({code}: ",
                    "the session has expired; log in again (`aws sso login")


@pytest.mark.parametrize("error, said", [
    (TokenRetrievalError(provider="sso", error_msg="Token has expired and refresh failed"),
     "Token has expired and refresh failed"),
    (UnauthorizedSSOTokenError(), "The SSO session associated with this profile has expired"),
])
def test_an_sso_session_that_cannot_be_refreshed_says_log_in_again(clients, capsys, error,
                                                                   said):
    """botocore raises these (not a ClientError) when the SSO token is gone or expired."""
    def fail(**_):
        raise error

    clients("sts").meta.events.register("before-call.sts.GetCallerIdentity", fail)
    assert deploy.main(["status"], clients=clients) == 2
    assert_one_line(capsys.readouterr().err, "the AWS session could not be refreshed", said,
                    "log in again")


def test_credentials_aws_does_not_know_say_which_to_check(clients, capsys):
    """STS answers a key it does not know with InvalidClientTokenId (403)."""
    answer_with_error(clients("sts"), "GetCallerIdentity", "InvalidClientTokenId",
                      "The security token included in the request is invalid.", status=403)
    assert deploy.main(["status"], clients=clients) == 2
    assert_one_line(capsys.readouterr().err, "(InvalidClientTokenId: ",
                    "AWS does not accept these credentials", "aws sts get-caller-identity")


def test_access_denied_names_the_deployer_policy_and_debug_adds_the_traceback(clients,
                                                                               capsys):
    answer_with_error(clients("lambda"), "GetFunction", "AccessDeniedException",
                      "User: arn:aws:iam::123456789012:user/x is not authorized to perform: "
                      "lambda:GetFunction on resource: su2c-launcher\nbecause no policy allows it",
                      status=403)
    assert deploy.main(["status"], clients=clients) == 2
    err = capsys.readouterr().err
    assert_one_line(err, "AWS refused GetFunction (AccessDeniedException: User: arn:",
                    "su2c-launcher because no policy", "./deploy.sh deployer-policy")
    assert deploy.main(["status", "--debug"], clients=clients) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "botocore.exceptions.ClientError" in err
    assert err.splitlines()[-1].startswith("deploy.sh status: AWS refused GetFunction")


def test_a_bucket_that_is_not_ours_says_pick_another_name(clients, capsys):
    """S3 answers HeadBucket with ExpectedBucketOwner another account's with a bare 403."""
    answer_with_error(clients("s3"), "HeadBucket", "403", "Forbidden", status=403)
    assert deploy.main(["status", "--data-bucket", "someone-elses"], clients=clients) == 2
    assert_one_line(capsys.readouterr().err, "exists but is not this account's",
                    "--data-bucket")


def test_another_refusal_is_one_line_and_status_1(clients, capsys):
    answer_with_error(clients("sts"), "GetCallerIdentity", "Throttling", "Rate exceeded")
    assert deploy.main(["status"], clients=clients) == 1
    assert_one_line(capsys.readouterr().err,
                    "deploy.sh status: AWS refused GetCallerIdentity: Throttling Rate exceeded")


def test_one_line_escapes_what_a_terminal_would_act_on():
    assert deploy.one_line("a\nb\tc  d") == "a b c d"
    assert deploy.one_line("bell\x07 esc\x1b[31m") == "bell\\x07 esc\\x1b[31m"
    assert deploy.one_line("x" * 400, limit=10) == "xxxxxxx..."


@pytest.mark.parametrize("argv", [["results", "--prefix", "nosuch"],
                                  ["logs", "--prefix", "nosuch", "a.csv"]])
def test_a_prefix_with_no_deployment_says_to_check_it(clients, capsys, tmp_path, argv):
    """results and logs go straight to the data bucket: S3's NoSuchBucket for a wrong
    --prefix is one line that names --prefix and status, not AWS's bare refusal."""
    assert deploy.main([*argv, *(["--out", str(tmp_path)] if argv[0] == "results" else [])],
                       clients=clients) == 2
    # results names what it copies where before it starts; the mistake is the one line after.
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("awsfun results: s3://"))
    assert_one_line(err, f"deploy.sh {argv[0]}: AWS refused ",
                    "(NoSuchBucket", "is --prefix (or --data-bucket) the deployment's",
                    "`./deploy.sh status --prefix P`")
