"""index.html in a real browser: Debian's headless Chromium renders the page written by
`./deploy.sh results` (and local_cloud.py --out); the table and every plot are there after
its scripts ran, the page asked no other host for anything, and a screenshot is kept.

Chromium is required, not optional: `.ci/run` installs it when missing; without it the
test fails and names the install command.
"""

import concurrent.futures
import gzip
import html.parser
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import AwsS3
from awsfun_deploy import results, results_page

REPO = Path(__file__).resolve().parent.parent
INSTALL = "apt-get install -y --no-install-recommends chromium"
SCREENSHOT_ENV = "AWSFUN_RESULTS_SCREENSHOT"   # copy the screenshot there when set
# Hostile keys, as S3 allows them: markup, quotes, a newline, an ampersand entity.
HOSTILE = 'runs/<script>alert("x")</script>\n&amp; R1\'s.fastq'


def chromium():
    """Return the chromium binary; fail (never skip) with the install command when there is none."""
    found = os.environ.get("AWSFUN_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not found:
        pytest.fail(f"chromium is not installed; the results page is tested in it: {INSTALL}")
    return found


def fastq_histograms(path, bin_width=10):
    """Return (read_length_histogram, mean_quality_histogram) of a FASTQ in the shapes the
    worker writes: {"bin_width": W, "bins": [[length_from, reads], ...]} and [[phred, reads]]."""
    opener = gzip.open if str(path).endswith(".gz") else open
    lengths, qualities = {}, {}
    with opener(path, "rt") as handle:
        lines = handle.read().splitlines()
    for index in range(0, len(lines) - 3, 4):
        sequence, quality = lines[index + 1], lines[index + 3]
        start = len(sequence) // bin_width * bin_width
        lengths[start] = lengths.get(start, 0) + 1
        phred = round(sum(ord(c) - 33 for c in quality) / max(1, len(quality)))
        qualities[phred] = qualities.get(phred, 0) + 1
    return ({"bin_width": bin_width, "bins": [[k, lengths[k]] for k in sorted(lengths)]},
            [[k, qualities[k]] for k in sorted(qualities)])


def local_report(path, key):
    """The report the worker writes for `path` uploaded as `key` (FASTQ with histograms)."""
    report = AwsS3.analyse_file(str(path))
    report["input"] = {"bucket": "data", "key": key, "etag": "0" * 32, "size": report["bytes"]}
    if report["format"] == "fastq":
        lengths, qualities = fastq_histograms(path)
        report["summary"]["read_length_histogram"] = lengths
        report["summary"]["mean_quality_histogram"] = qualities
    return report


def write_run(out_dir, reports, logs=()):
    """Put reports ({object key: report}) and logs where `results` puts them; return the
    manifest."""
    keys = list(reports) + list(logs)
    paths = results.plan_paths(keys)
    manifest = {}
    for key in keys:
        body = reports[key] if key in reports else logs[key]
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        (out_dir / paths[key]).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / paths[key]).write_bytes(data)
        manifest[key] = {"path": paths[key], "etag": "e", "size": len(data),
                         "last_modified": "2026-12-01T00:00:00Z"}
    return manifest


def sample_run(out_dir):
    """A run of every format, a failure, an older FASTQ report without histograms, and a
    hostile key; returns the manifest."""
    samples, data = REPO / "samples", REPO / "tests" / "data"
    inputs = {
        "runs/reads.fastq": samples / "reads.fastq",
        "runs/reads.fastq.gz": samples / "reads.fastq.gz",
        HOSTILE: samples / "reads.fastq",
        "runs/calls.vcf": samples / "calls.vcf",
        "runs/edge.vcf": data / "edge.vcf",
        "runs/measurements.csv": samples / "measurements.csv",
        "runs/table.tsv": data / "table.tsv",
    }
    reports = {AwsS3.report_key(key): local_report(path, key) for key, path in inputs.items()}
    older = local_report(samples / "reads.fastq", "runs/older.fastq")
    del older["summary"]["read_length_histogram"], older["summary"]["mean_quality_histogram"]
    reports[AwsS3.report_key("runs/older.fastq")] = older
    failed = AwsS3.error_report("analyse", EOFError("Compressed file ended before the "
                                "end-of-stream marker was reached"),
                                {"bucket": "data", "key": "runs/broken</script>.csv.gz"})
    reports[AwsS3.report_key("runs/broken</script>.csv.gz", ".error.json")] = failed
    logs = {AwsS3.report_key("runs/broken</script>.csv.gz", ".log"): b"gzip: unexpected end\n"}
    return write_run(out_dir, reports, logs)


class PlotsAndRows(html.parser.HTMLParser):
    """Collects from a DOM: ids of plot divs holding a rendered plotly `svg.main-svg`, the rows
    of table#inputs, and every src/href attribute."""

    def __init__(self):
        super().__init__()
        self.stack, self.rendered, self.rows, self.links, self.table = [], set(), 0, [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href"):
            if attrs.get(name) is not None:
                self.links.append(attrs[name])
        if tag == "table":
            self.table = attrs.get("id")
        if tag == "tr" and self.table == "inputs" and "class" in attrs:
            self.rows += 1
        plot = attrs.get("id") if tag == "div" and "plot" in (attrs.get("class") or "") else None
        if tag == "svg" and "main-svg" in (attrs.get("class") or "").split():
            self.rendered.update(p for p in self.stack if p)
        if tag not in ("br", "img", "input", "meta", "link", "path", "rect", "line", "stop"):
            self.stack.append(plot)

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        if self.stack and tag not in ("br", "img", "input", "meta", "link"):
            self.stack.pop()


def render(page, work, screenshot=None, size="1280,2400"):
    """Open `page` in headless Chromium; return (DOM after the scripts ran, URLs the page asked
    for, seconds). The URLs come from Chromium's net log: every request whose network
    isolation key is the file:// page's, i.e. made for the page (Chromium's own calls to its
    services have another key and are not the page's). A proxy at a closed local port keeps
    anything from leaving the machine."""
    work.mkdir(parents=True, exist_ok=True)
    net_log = work / "net-log.json"
    command = [chromium(), "--headless", "--disable-gpu", f"--user-data-dir={work / 'profile'}",
               "--no-first-run", "--disable-background-networking", "--disable-extensions",
               "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
               f"--log-net-log={net_log}", f"--window-size={size}", "--hide-scrollbars"]
    if os.geteuid() == 0:
        command.append("--no-sandbox")   # Chromium refuses to run as root with its sandbox
    if screenshot:
        command.append(f"--screenshot={screenshot}")
    command += ["--dump-dom", page.as_uri()]
    started = time.monotonic()
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, page_requests(net_log), seconds


def page_requests(net_log):
    """Return the URLs a file:// page had fetched, from a Chromium net log (pure)."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({event["params"].get("url") for event in log["events"]
                   if event["type"] == start and (
                       event["params"].get("url", "").startswith("file:")
                       or "file://" in event["params"].get("network_isolation_key", ""))})


def external(urls):
    """The URLs that are not the page's own bytes (file:, data:, blob:)."""
    return [url for url in urls if not re.match(r"(file|data|blob|about):", url)]


def test_results_page_renders_every_plot_and_row_offline_in_chromium(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    manifest = sample_run(out)
    made = time.monotonic()
    rows = results.write_outputs(out, manifest)
    print(f"reports {made - started:.1f} s, page written in {time.monotonic() - made:.1f} s")
    page = out / results.INDEX_HTML
    inputs = results.collect_inputs(out, manifest)
    expected = [fid for section in results_page.format_sections(inputs)
                for fid, _ in section["figures"]]
    # FASTQ 7 (5 bars, 2 histogram lines), VCF 4, CSV/TSV 3.
    assert len(expected) == 14, expected

    # A page with an external script, beside the real one: the net log must catch it.
    leaky = tmp_path / "leaky" / "index.html"
    leaky.parent.mkdir()
    leaky.write_text('<!DOCTYPE html><html><head><script src="https://cdn.example.com/p.js">'
                     '</script></head><body><p>x</p></body></html>')
    screenshot = tmp_path / "results-page.png"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:   # two browsers at once: ~half the time
        shown = pool.submit(render, page, tmp_path / "chromium", screenshot)
        _, leaked, _ = pool.submit(render, leaky, tmp_path / "chromium-leaky").result()
        dom, urls, seconds = shown.result()
    assert external(leaked) == ["https://cdn.example.com/p.js"]

    found = PlotsAndRows()
    found.feed(dom)
    assert sorted(found.rendered) == sorted(expected)
    assert found.rows == len(rows) == 9
    assert external(urls) == [], urls
    # Every link on the page is relative: the reports and logs beside it.
    assert [link for link in found.links if re.match(r"[a-z][a-z0-9+.-]*:|//", link)] == []
    # The hostile key is text in the table, never markup.
    assert "<script>alert" not in dom
    assert 'runs/&lt;script&gt;alert("x")&lt;/script&gt;\n&amp;amp; R1\'s.fastq' in dom
    assert screenshot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(screenshot, os.environ[SCREENSHOT_ENV])
    print(f"page {page.stat().st_size:,} bytes rendered in {seconds:.1f} s")
