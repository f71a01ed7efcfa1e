"""`./deploy.sh results` on a moto server: the copy mirrors the keys, a re-run fetches only
what changed (or was edited or deleted locally), summary.csv keeps hostile keys byte for
byte, --json prints the same rows; and the pure parts (paths, rows, progress, the page's
escaping) on their own.
"""

import csv
import io
import json

import pytest

import AwsS3
import deploy
from awsfun_deploy import results, results_page

# What the moto server takes (it answers 404 to a key with CR, LF or tab): quotes, a comma,
# markup, an entity, non-ASCII. Keys with line breaks are tested on summary.csv directly.
HOSTILE = 'in/"quoted", <script>alert(1)</script> &amp; ünï;$(x).fastq'
FASTQ = b"@r1\nACGTN\n+\nIIII#\n@r2\nGGCC\n+\nIIII\n"
VCF = (b"##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\n"
       b"chr1\t1\t.\tA\tG\t.\tPASS\t.\nchr2\t5\t.\tAT\tA\t.\tPASS\t.\n")
CSV = b"a,b,c\n1,,3\n4,5,\n"


@pytest.fixture
def bucket(clients, names):
    """An empty data bucket of the default deployment; returns (s3, its name)."""
    s3 = clients("s3")
    s3.create_bucket(Bucket=names.data_bucket)
    return s3, names.data_bucket


def put_run(s3, bucket, tmp_path):
    """Analyse three small inputs and write their reports with AwsS3.put_report (receipts
    too), one error report and two logs; return {input key: report}."""
    reports = {}
    for key, data in (("in/reads.fastq", FASTQ), ("in/calls.vcf", VCF), ("in/table.csv", CSV),
                      (HOSTILE, FASTQ)):
        local = tmp_path / "inputs" / str(len(reports))
        local.parent.mkdir(exist_ok=True)
        local.write_bytes(data)
        report = AwsS3.analyse_file(str(local))
        report["input"] = {"bucket": bucket, "key": key, "etag": "e" * 32}
        AwsS3.put_report(s3, bucket, key, report, ".json")
        reports[key] = report
    failed = AwsS3.error_report("analyse", EOFError("Compressed file ended before the "
                                "end-of-stream marker was reached"),
                                {"bucket": bucket, "key": "in/broken.csv.gz", "etag": ""})
    AwsS3.put_report(s3, bucket, "in/broken.csv.gz", failed, ".error.json")
    reports["in/broken.csv.gz"] = failed
    s3.put_object(Bucket=bucket, Key="analysis/in/broken.csv.gz.log", Body=b"gzip: truncated\n")
    s3.put_object(Bucket=bucket, Key="analysis/in/running.fastq.log", Body=b"started\n")
    s3.put_object(Bucket=bucket, Key="elsewhere/x.json", Body=b"{}")   # not under analysis/
    return reports


def count_gets(s3):
    """Return a list that grows by one key per GetObject the client sends."""
    keys = []
    s3.meta.events.register("provide-client-params.s3.GetObject",
                            lambda params, **_: keys.append(params["Key"]))
    return keys


def run(clients, out, *options):
    return deploy.main(["results", "--out", str(out), *options], clients=clients)


def test_results_mirror_reports_and_fetch_only_what_changed(clients, bucket, tmp_path, capsys):
    s3, name = bucket
    reports = put_run(s3, name, tmp_path)
    out = tmp_path / "out"
    gets = count_gets(s3)
    assert run(clients, out) == 0
    printed = capsys.readouterr()
    # Reports, error report and logs, at their keys below analysis/; receipts and other
    # prefixes are not copied.
    assert sorted(gets) == sorted(
        [AwsS3.report_key(k) for k in reports if k != "in/broken.csv.gz"]
        + ["analysis/in/broken.csv.gz.error.json", "analysis/in/broken.csv.gz.log",
           "analysis/in/running.fastq.log"])
    assert json.loads((out / "in" / "reads.fastq.json").read_text()) == reports["in/reads.fastq"]
    assert (out / "in" / "broken.csv.gz.log").read_bytes() == b"gzip: truncated\n"
    assert not (out / "_receipts").exists()
    assert "1 error" in printed.out and "in/broken.csv.gz: analyse: EOFError" in printed.out
    assert "fetched 7 of 7" in printed.err

    # Again: nothing has changed, nothing is fetched.
    del gets[:]
    assert run(clients, out) == 0
    assert gets == []
    assert "Fetched 0, unchanged 7, removed 0" in capsys.readouterr().out

    # A report rewritten in the bucket, one edited and one deleted here: those three only.
    changed = dict(reports["in/calls.vcf"], status="ok", lines=99)
    s3.put_object(Bucket=name, Key="analysis/in/calls.vcf.json", Body=json.dumps(changed))
    (out / "in" / "table.csv.json").write_text("{}")
    (out / "in" / "broken.csv.gz.log").unlink()
    assert run(clients, out) == 0
    assert sorted(gets) == ["analysis/in/broken.csv.gz.log", "analysis/in/calls.vcf.json",
                            "analysis/in/table.csv.json"]
    assert json.loads((out / "in" / "calls.vcf.json").read_text())["lines"] == 99
    assert json.loads((out / "in" / "table.csv.json").read_text()) == reports["in/table.csv"]
    assert "Fetched 3, unchanged 4, removed 0" in capsys.readouterr().out

    # The error report replaced by a report (a re-run succeeded): the stale copy goes.
    s3.delete_object(Bucket=name, Key="analysis/in/broken.csv.gz.error.json")
    del gets[:]
    assert run(clients, out, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert gets == [] and not (out / "in" / "broken.csv.gz.error.json").exists()
    assert {row["key"]: row["status"] for row in rows}["in/broken.csv.gz"] == "no report"


def test_summary_csv_rows_keep_hostile_keys_and_match_json(clients, bucket, tmp_path, capsys):
    s3, name = bucket
    put_run(s3, name, tmp_path)
    out = tmp_path / "out"
    assert run(clients, out, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    with open(out / "summary.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["key"] for row in rows] == sorted(
        [HOSTILE, "in/broken.csv.gz", "in/calls.vcf", "in/reads.fastq", "in/running.fastq",
         "in/table.csv"])
    assert [row["key"] for row in printed] == [row["key"] for row in rows]
    by_key = {row["key"]: row for row in rows}
    fastq = by_key[HOSTILE]      # byte for byte: quotes, comma, markup, entity
    assert (fastq["status"], fastq["format"], fastq["reads"], fastq["bases"]) == \
        ("ok", "fastq", "2", "9")
    vcf = by_key["in/calls.vcf"]
    assert (vcf["records"], vcf["snvs"], vcf["indels"], vcf["others"]) == ("2", "1", "1", "0")
    table = by_key["in/table.csv"]
    assert (table["format"], table["rows"], table["columns"], table["empty_cells"]) == \
        ("csv", "2", "3", "2")
    broken = by_key["in/broken.csv.gz"]
    assert (broken["status"], broken["error_stage"], broken["error_code"]) == \
        ("error", "analyse", "EOFError")
    assert broken["log"] == "in/broken.csv.gz.log"
    assert by_key["in/running.fastq"]["status"] == "no report"
    # --json holds the same rows, with numbers as numbers.
    json_row = {row["key"]: row for row in printed}[HOSTILE]
    assert json_row["reads"] == 2 and str(json_row["gc_percent"]) == fastq["gc_percent"]
    assert {k: str(v) for k, v in json_row.items()} == fastq


def test_key_prefix_limits_the_copy_and_long_keys_get_their_hashed_report(clients, bucket,
                                                                            tmp_path, capsys):
    s3, name = bucket
    put_run(s3, name, tmp_path)
    long_key = "in/" + "x" * 1100 + ".csv"
    report = AwsS3.analyse_file(str(tmp_path / "inputs" / "2"))
    report["input"] = {"bucket": name, "key": long_key, "etag": ""}
    AwsS3.put_report(s3, name, long_key, report, ".json")
    AwsS3.put_report(s3, name, "other/a.csv", dict(report, input={"key": "other/a.csv"}), ".json")
    out = tmp_path / "out"
    assert run(clients, out, "--key-prefix", "other/", "--json") == 0
    assert [row["key"] for row in json.loads(capsys.readouterr().out)] == ["other/a.csv"]
    assert not (out / "in").exists()
    # Without a prefix, the hashed long key's report speaks for its input, and the copies
    # of other/ stay.
    assert run(clients, out, "--json") == 0
    keys = [row["key"] for row in json.loads(capsys.readouterr().out)]
    assert long_key in keys and "other/a.csv" in keys


def test_summary_csv_keeps_keys_with_line_breaks_byte_for_byte(tmp_path):
    keys = ['a\r\nb,"c".csv', "tab\there\n.csv", " lead and trail ", "=cmd|' /C calc'!A0"]
    manifest = {}
    for key in keys:
        object_key = AwsS3.report_key(key)
        path = results.plan_paths([object_key])[object_key]
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(json.dumps({"input": {"key": key}, "status": "ok",
                                                 "format": "csv", "bytes": 3,
                                                 "summary": {"rows": 1, "columns": 1}}))
        manifest[object_key] = {"path": path, "last_modified": "2026-12-01T00:00:00Z"}
    rows = [results.summary_row(item) for item in results.collect_inputs(tmp_path, manifest)]
    results.write_summary_csv(tmp_path / "summary.csv", rows)
    with open(tmp_path / "summary.csv", newline="", encoding="utf-8") as handle:
        back = list(csv.DictReader(handle))
    assert [row["key"] for row in back] == sorted(keys)
    assert back[0].keys() == set(results.SUMMARY_COLUMNS)


def test_results_without_the_page_libraries_says_what_to_install(monkeypatch, capsys):
    real = results.importlib.util.find_spec
    monkeypatch.setattr(results.importlib.util, "find_spec",
                        lambda name: None if name == "plotly" else real(name))
    assert deploy.main(["results"], clients=lambda service: pytest.fail(service)) == 2
    assert "pip install -r requirements/results.txt" in capsys.readouterr().err


def test_plan_paths_mirror_safe_keys_and_hash_the_rest():
    keys = ["analysis/a/b.json", "analysis/A/B.json", "analysis/a/../../etc/passwd.json",
            "analysis/x.json", "analysis/x.json/y.json", "analysis/summary.csv",
            "analysis/.awsfun-results.json", "analysis//lead.log",
            "analysis/" + "n" * 300 + ".json"]
    paths = results.plan_paths(keys)
    assert paths["analysis/A/B.json"] == "A/B.json" and paths["analysis/x.json"] == "x.json"
    hashed = [k for k in keys if paths[k].startswith("_unsafe/")]
    # a/b.json differs from A/B.json by case only; x.json/ would need x.json as a folder.
    assert sorted(hashed) == sorted(keys[0:1] + keys[2:3] + keys[4:5] + keys[5:9])
    assert len(set(paths.values())) == len(keys)
    assert paths["analysis//lead.log"].endswith(".log")
    assert results.plan_paths(reversed(keys)) == paths


def test_summary_row_of_each_kind_and_progress_lines():
    error = {"input": {"key": "k"}, "status": "error", "stage": "fetch",
             "error": "NoSuchKey:\n gone", "error_code": "NoSuchKey"}
    row = results.summary_row({"key": "k", "report": error, "report_path": "k.error.json",
                               "log_path": None})
    assert (row["status"], row["error_stage"], row["error"], row["size"]) == \
        ("error", "fetch", "NoSuchKey: gone", "")
    stream, now = io.StringIO(), [0.0]
    progress = results.FetchProgress(250, stream, clock=lambda: now[0])
    for _ in range(150):
        progress.advance(1000)
    now[0] = 6.0
    progress.advance(1000)
    for _ in range(99):
        progress.advance(1000)
    assert stream.getvalue().splitlines() == [
        "  fetched 100 of 250 (0.1 MB)", "  fetched 151 of 250 (0.2 MB)",
        "  fetched 250 of 250 (0.2 MB)"]


def test_page_json_cannot_close_its_script_and_labels_are_text():
    text = results_page.script_json({"k": "</script><!--<script>\u2028&"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"k": "</script><!--<script>\u2028&"}
    assert results_page.plot_label("<br>&lt;") == "&lt;br&gt;&amp;lt;"
    assert results_page.href("a b/#?.json") == "a%20b/%23%3F.json"
    assert results_page.histogram_points({"bin_width": 10, "bins": [[20, 1], [10, 2]]}) == \
        [(10, 2), (20, 1)]
    assert results_page.histogram_points([[30, 5], [31, "x"]]) == [(30, 5)]
    assert results_page.histogram_points(None) is None


def test_page_counts_say_one_input_and_one_file():
    report = {"status": "ok", "format": "csv", "bytes": 4, "input": {"size": 4},
              "summary": {"rows": 1, "columns": 1}}
    inputs = [{"key": "a.csv", "report": report, "report_path": "a.csv.json", "log_path": None}]
    page = results_page.render_page(inputs, [results.summary_row(inputs[0])])
    assert "1 input:" in page and "(1 file)" in page and "1 inputs" not in page
