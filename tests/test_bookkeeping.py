"""status's and reconcile's bookkeeping from listings: exactly the answers of the per-object
code it replaces (tests/per_object_bookkeeping.py, the oracle), and of the bucket as it was
built, for a bucket of every kind of input (tests/support.py, MIXED_KINDS); and S3 asked per
object only where a listing cannot decide.
"""

import collections

import deploy
import lambda_function
import per_object_bookkeeping as oracle
from awsfun_deploy import reconcile
from support import MIXED_ENDED_UNREPORTED, MIXED_KINDS, fill_mixed_bucket, record_calls, \
    worker_image_id

BULK = 100  # "ok" inputs, each reported with a receipt: 3x the requests the scan may make

#: S3 requests per input that a listing cannot decide, by kind, in a scan and the search for
#: ended workers without a report (without_report), beyond the listings. A report that a
#: receipt does not settle is read: its HeadObject, and a GetObject where it has no metadata
#: (the launcher's); an unsettled input is read (HeadObject) where a live worker carries its
#: key, or an ended one does.
PER_OBJECT = {
    "ok-legacy": {"HeadObject": 1},
    "failed-launcher": {"HeadObject": 1, "GetObject": 1},
    "stale": {"HeadObject": 1},
    "stale-legacy": {"HeadObject": 1},
    "stale-error": {"HeadObject": 1},
    "rewritten": {"HeadObject": 1},
    "running": {"HeadObject": 1},
    "running-old": {"HeadObject": 1},
    "lost": {"HeadObject": 1},
    "lost-old": {"HeadObject": 2},
    "lost-old-none": {"HeadObject": 1},
}


def mixed(clients, bulk, copies):
    """Names of prefix "books", their data bucket filled by fill_mixed_bucket; returns
    (names, {input key: kind})."""
    names = deploy.resolve_names(clients, "books")
    clients("s3").create_bucket(Bucket=names.data_bucket)
    kinds = fill_mixed_bucket(clients("s3"), clients("ec2"), names.data_bucket,
                              worker_image_id(clients("ssm")), bulk=bulk, copies=copies)
    return names, kinds


def dry_run(clients, names, launch_unprocessed, key_prefix=""):
    """reconcile --dry-run's scan (launch_unprocessed: the Reconciler's or the oracle's);
    returns its result."""
    settings = lambda_function.load_settings({"AWS_REGION": names.region})
    run = reconcile.Reconciler(clients, names, settings, key_prefix, True,
                               deploy.Progress(echo=False))
    launch_unprocessed(run)
    return run.result


def scanned_states(clients, names):
    """{input key: state} as scan_inputs decides it now."""
    s3, ec2, bucket = clients("s3"), clients("ec2"), names.data_bucket
    scanned = reconcile.scan_inputs(s3, bucket, "analysis", reconcile.live_workers(ec2, bucket),
                                    reconcile.list_bucket(s3, bucket))
    return {entry["key"]: entry["state"] for entry in scanned}


def oracle_states(clients, names):
    """{input key: state} as the per-object scan decided it."""
    s3, ec2, bucket = clients("s3"), clients("ec2"), names.data_bucket
    scanned = oracle.scan_inputs(s3, bucket, "analysis", oracle.running_tokens(ec2, bucket))
    return {entry["key"]: entry["state"] for entry in scanned}


def test_listings_give_the_per_object_answers_for_every_kind_of_input(clients):
    names, kinds = mixed(clients, bulk=3, copies=2)
    truth = {key: MIXED_KINDS[kind] for key, kind in kinds.items()}
    assert oracle_states(clients, names) == truth  # the oracle reads the bucket as built
    assert scanned_states(clients, names) == truth

    counts, ended = reconcile.input_status(clients, names)
    assert (counts, ended) == oracle.input_status(clients, names)
    assert counts == {"inputs": len(truth), **{
        field: sum(state == wanted for state in truth.values())
        for field, wanted in (("reports", "reported"), ("error_reports", "error-reported"),
                              ("running", "running"), ("unprocessed", "unprocessed"))}}
    assert sorted(worker["key"].split("/")[0] for worker in ended) == \
        sorted(MIXED_ENDED_UNREPORTED * 2)

    # reconcile --dry-run, whole and by --key-prefix ("lo": long-*, lost*; "gone/": deleted).
    results = {}
    for key_prefix in ("", "lo", "gone/"):
        results[key_prefix] = dry_run(clients, names, reconcile.Reconciler.launch_unprocessed,
                                      key_prefix)
        assert results[key_prefix] == dry_run(clients, names, oracle.launch_unprocessed,
                                               key_prefix)
    assert sorted(results[""]["unprocessed"]) == sorted(
        key for key, state in truth.items() if state == "unprocessed")
    assert results[""]["ended_without_report"] == ended
    assert sorted(results["lo"]["unprocessed"]) == sorted(
        key for key, state in truth.items() if state == "unprocessed" and key.startswith("lo"))
    assert results["gone/"]["unprocessed"] == []
    assert sorted(w["key"] for w in results["gone/"]["ended_without_report"]) == [
        "gone/00000.csv", "gone/00001.csv"]


def s3_requests(calls):
    """Count recorded S3 calls by operation."""
    return collections.Counter(name for name, _ in calls)


def test_s3_is_asked_per_object_only_where_a_listing_cannot_decide(clients):
    """On BULK reported inputs plus one of every other kind, status's counts cost a HeadBucket,
    one listing of the bucket (one page: under 1,000 keys), and a request for each report or
    input in PER_OBJECT, whatever BULK is; reconcile --key-prefix lists its prefix and
    analysis/."""
    names, kinds = mixed(clients, bulk=BULK, copies=1)
    s3 = clients("s3")
    objects, listed = reconcile.list_bucket(s3, names.data_bucket)
    assert len(objects) < 1000 and len(listed) > 2 * BULK  # one page
    expected = collections.Counter({"HeadBucket": 1, "ListObjectsV2": 1})
    for kind in kinds.values():
        expected.update(PER_OBJECT.get(kind, {}))

    calls = record_calls(s3)
    reconcile.input_status(clients, names)
    assert s3_requests(calls) == expected
    del calls[:]
    dry_run(clients, names, reconcile.Reconciler.launch_unprocessed)
    assert s3_requests(calls) == expected - collections.Counter({"HeadBucket": 1})
    del calls[:]
    dry_run(clients, names, reconcile.Reconciler.launch_unprocessed, "stale/")
    assert s3_requests(calls) == {"ListObjectsV2": 2, "HeadObject": 1}
    # The per-object code made about one request per listed report, more than BULK
    # (bench/bookkeeping.py prints both).
    assert sum(expected.values()) < 30
