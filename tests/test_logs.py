"""awsfun_deploy.logs and `./deploy.sh logs KEY [--follow]` on the moto server: the log
printed, followed part by part until the job's closing line, a missing log, Ctrl-C."""

import pytest

import AwsS3
import deploy
from awsfun_deploy import cli, logs

KEY = "inbox/run 1/R1.fastq.gz"
FIRST = b"2026-12-01T05:00:00Z awsfun-bootstrap: job: s3://data/inbox/run 1/R1.fastq.gz\n"
MIDDLE = b"2026-12-01 05:00:05,000 awsfun.worker INFO 512 MB done, 80.0 MB/s\n"
CLOSING = b"2026-12-01T05:00:09Z awsfun-bootstrap: finished with status 0; shutting down\n"


@pytest.fixture
def bucket(clients, names):
    """The deployment's data bucket, alone (the rest of the stack plays no part here)."""
    clients("s3").create_bucket(Bucket=names.data_bucket)
    return names.data_bucket


def put_log(s3, bucket, body, key=KEY):
    s3.put_object(Bucket=bucket, Key=AwsS3.report_key(key, ".log"), Body=body)


def test_logs_prints_the_log(clients, bucket, capsysbinary):
    put_log(clients("s3"), bucket, FIRST + MIDDLE + CLOSING)
    assert deploy.main(["logs", KEY], clients=clients) == 0
    assert capsysbinary.readouterr().out == FIRST + MIDDLE + CLOSING


def test_a_missing_log_is_one_line_and_status_2(clients, bucket, capsys):
    assert deploy.main(["logs", "inbox/never uploaded.csv"], clients=clients) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deploy.sh logs: no log for inbox/never uploaded.csv")
    assert f"s3://{bucket}/analysis/inbox/never uploaded.csv.log" in err


def test_follow_prints_each_appended_part_once_and_stops_when_the_job_ended(clients, bucket):
    s3 = clients("s3")
    put_log(s3, bucket, FIRST)
    # What the machine does between two polls: the launcher's uploads of the whole log so
    # far (one poll finds nothing new: S3 answers 416), then the report and the final log.
    machine = [
        lambda: put_log(s3, bucket, FIRST + MIDDLE),
        lambda: None,
        lambda: s3.put_object(Bucket=bucket, Key=AwsS3.report_key(KEY), Body=b"{}"),
        lambda: put_log(s3, bucket, FIRST + MIDDLE + MIDDLE),
        lambda: put_log(s3, bucket, FIRST + MIDDLE + MIDDLE + CLOSING),
    ]
    sleeps, written = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        machine[len(sleeps) - 1]()

    assert logs.print_log(s3, bucket, KEY, written.append, follow=True, sleep=sleep,
                          interval=3) == 0
    assert written == [FIRST, MIDDLE, MIDDLE, CLOSING]
    assert sleeps == [3] * len(machine)  # stopped at the first poll that found the closing line


def test_follow_of_a_finished_job_prints_it_once_without_waiting(clients, bucket):
    s3 = clients("s3")
    put_log(s3, bucket, FIRST + CLOSING)
    s3.put_object(Bucket=bucket, Key=AwsS3.report_key(KEY, ".error.json"), Body=b"{}")
    written = []
    logs.print_log(s3, bucket, KEY, written.append, follow=True, sleep=pytest.fail)
    assert written == [FIRST + CLOSING]


def test_ctrl_c_ends_follow_quietly(clients, bucket, monkeypatch, capsys):
    put_log(clients("s3"), bucket, FIRST)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "print_log", interrupted)
    assert deploy.main(["logs", KEY, "--follow"], clients=clients) == 130
    assert capsys.readouterr().err == ""


def test_a_range_from_the_end_is_nothing_new_not_an_error(clients, bucket):
    s3 = clients("s3")
    put_log(s3, bucket, FIRST)
    target = logs.log_key(KEY)
    assert logs.read_log(s3, bucket, target) == FIRST
    assert logs.read_log(s3, bucket, target, 10) == FIRST[10:]
    assert logs.read_log(s3, bucket, target, len(FIRST)) == b""  # S3 answers 416 InvalidRange
    assert logs.read_log(s3, bucket, "analysis/nothing.log") is None


def test_the_log_is_complete_only_after_the_shell_s_closing_line():
    assert logs.log_complete(FIRST + CLOSING)
    assert logs.log_complete(CLOSING.rstrip(b"\n"))
    assert not logs.log_complete(FIRST + CLOSING + MIDDLE)
    assert not logs.log_complete(b"worker: finished with status 0; shutting down soon\n")
    assert logs.log_key("k" * 1024).startswith("analysis/_long/")  # the worker's own rule


def test_logs_takes_the_prefix_as_other_commands_do(clients, capsysbinary):
    names = deploy.resolve_names(clients, "other")
    clients("s3").create_bucket(Bucket=names.data_bucket)
    put_log(clients("s3"), names.data_bucket, FIRST + CLOSING)
    assert deploy.main(["--prefix", "other", "logs", KEY], clients=clients) == 0
    assert capsysbinary.readouterr().out == FIRST + CLOSING
