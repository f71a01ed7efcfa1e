"""results: copy a deployment's reports, error reports and logs to a folder, with summary.csv
and index.html.

The copy mirrors the keys below analysis/ (analysis/runs/a.fastq.json -> DIR/runs/a.fastq.json,
the layout local_cloud.py has always written) and keeps a manifest, DIR/.awsfun-results.json,
of what it fetched: a re-run fetches only objects whose ETag or size changed, or whose local
copy was edited, deleted or moved, and removes the copies of objects gone from the bucket
(a report that replaced an error report, say). Everything here but fetch_results is pure or
touches only the local folder. The page itself is results_page.py: imported only when the
page is written, so `import awsfun_deploy.cli` never needs jinja2 or plotly.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import AwsS3
from lambda_function import printable

from .core import DeployError
from .names import deployed_names
from .s3 import list_keys

logger = logging.getLogger(__name__)

REPORT_PREFIX = AwsS3.REPORT_PREFIX          # analysis/
RECEIPT_PREFIX = AwsS3.RECEIPT_PREFIX        # analysis/_receipts/: bookkeeping, not results
MANIFEST = ".awsfun-results.json"
SUMMARY_CSV = "summary.csv"
INDEX_HTML = "index.html"
# A key whose mirrored path would be one of these gets a hashed path instead (plan_paths).
RESERVED = (MANIFEST, SUMMARY_CSV, INDEX_HTML)
UNSAFE_DIR = "_unsafe"
# Longest file name most file systems take (NAME_MAX on ext4, APFS, NTFS: 255).
NAME_MAX = 255
FETCH_THREADS = 16
PROGRESS_EVERY = 100        # objects between two progress lines...
PROGRESS_SECONDS = 5.0      # ...or seconds, whichever comes first (as the worker's progress)

# summary.csv's columns, in order. Per format the main counts a person compares across files:
# seqkit stats' for FASTQ, bcftools stats' for VCF, DuckDB's row/column counts for CSV/TSV.
SUMMARY_COLUMNS = (
    "key", "status", "format", "compression", "size",
    "reads", "bases", "mean_quality", "q30_percent", "gc_percent",
    "records", "snvs", "indels", "others", "ts_tv_ratio",
    "rows", "columns", "empty_cells",
    "error_stage", "error_code", "error",
    "report", "log",
)
FORMAT_COUNTS = {
    "fastq": ("reads", "bases", "mean_quality", "q30_percent", "gc_percent"),
    "vcf": ("records", "snvs", "indels", "others", "ts_tv_ratio"),
    "csv": ("rows", "columns"),
    "tsv": ("rows", "columns"),
}


# --- which objects, and where they go -----------------------------------------------


def result_kind(key):
    """Return "report", "error" or "log" for a key under analysis/ this command copies, else
    None (receipts, and anything else a route wrote that is not a report or a log) (pure)."""
    if not key.startswith(REPORT_PREFIX) or key.startswith(RECEIPT_PREFIX) or key.endswith("/"):
        return None
    if key.endswith(".error.json"):
        return "error"
    if key.endswith(".json"):
        return "report"
    if key.endswith(".log"):
        return "log"
    return None


def mirrored_path(key):
    """Return the path below DIR that mirrors `key` below analysis/, or None when the key cannot
    be a relative path on a file system: an empty, `.` or `..` part, or a part longer than
    NAME_MAX bytes (pure)."""
    parts = key[len(REPORT_PREFIX):].split("/")
    if any(part in ("", ".", "..") or len(part.encode("utf-8")) > NAME_MAX for part in parts):
        return None
    return "/".join(parts)


def _suffix(key):
    for suffix in (".error.json", ".json", ".log"):
        if key.endswith(suffix):
            return suffix
    return ""


def plan_paths(keys):
    """Return {key: path below DIR} for keys under analysis/ (pure, the same for the same keys).

    A key gets its mirrored path unless that path cannot be written beside the others: it is
    unsafe (mirrored_path), it is one of RESERVED, it equals another's path but for case (two
    files on macOS's and Windows' file systems), or one is the other's folder (the reports of
    inputs `a` and `a.json/b`). Those get _unsafe/<sha256 of the key><suffix>.
    """
    files, folders, paths, later = set(), set(), {}, []
    files.update(name.casefold() for name in RESERVED)
    for key in sorted(keys):
        path = mirrored_path(key)
        if path is None:
            later.append(key)
            continue
        folded = path.casefold().split("/")
        parents = ["/".join(folded[:i]) for i in range(1, len(folded))]
        whole = "/".join(folded)
        if whole in files or whole in folders or any(p in files for p in parents) \
                or folded[0] == UNSAFE_DIR.casefold():
            later.append(key)
            continue
        files.add(whole)
        folders.update(parents)
        paths[key] = path
    for key in later:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        paths[key] = f"{UNSAFE_DIR}/{digest}{_suffix(key)}"
    return paths


def file_sha256(path):
    """Return the SHA-256 of a local file, or None when it is missing."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return digest.hexdigest()


def read_manifest(out_dir):
    """Return DIR's manifest {key: {etag, size, last_modified, path, sha256}}, {} if none."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    objects = data.get("objects") if isinstance(data, dict) else None
    return objects if isinstance(objects, dict) else {}


def write_atomically(path, data):
    """Write bytes to path through a temporary file beside it (made as open() makes files, so
    the umask applies), so a reader or an interrupted run never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".awsfun-{os.getpid()}-{threading.get_ident()}.part")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except BaseException:
        _unlink(temporary)
        raise


def fetch_plan(listing, manifest, out_dir, key_prefix=""):
    """Decide what a run does (pure but for hashing the local copies).

    `listing` is ListObjectsV2's entries under analysis/KEY_PREFIX. Returns (fetch, keep,
    remove): the listing entries to download with their paths, the manifest entries still
    good, and the manifest keys under the prefix that the bucket no longer holds. An entry is
    still good when ETag, size and path are the manifest's and the local bytes are the ones
    fetched (their SHA-256), so an edited or deleted copy is fetched again.
    """
    wanted = {obj["Key"]: obj for obj in listing if result_kind(obj["Key"])}
    # Paths are planned over every key DIR holds, so keys of other prefixes keep theirs.
    paths = plan_paths(set(wanted) | set(manifest))
    fetch, keep = [], {}
    for key, obj in wanted.items():
        entry = manifest.get(key)
        etag = obj["ETag"].strip('"')
        if entry and entry.get("etag") == etag and entry.get("size") == obj["Size"] \
                and entry.get("path") == paths[key] \
                and file_sha256(Path(out_dir) / paths[key]) == entry.get("sha256"):
            keep[key] = entry
        else:
            fetch.append({"key": key, "etag": etag, "size": obj["Size"], "path": paths[key],
                          "last_modified": _iso(obj.get("LastModified"))})
    scope = REPORT_PREFIX + key_prefix
    remove = [key for key in manifest if key not in wanted and key.startswith(scope)]
    keep.update({key: entry for key, entry in manifest.items()
                 if not key.startswith(scope) and key not in keep})
    return fetch, keep, remove


def _iso(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if hasattr(moment, "strftime") else moment


class FetchProgress:
    """Prints `fetched N of M` to a stream every PROGRESS_EVERY objects or PROGRESS_SECONDS."""

    def __init__(self, total, stream=None, clock=time.monotonic):
        self.total, self.done, self.bytes = total, 0, 0
        self.stream, self.clock = stream or sys.stderr, clock
        self.last_count, self.last_time = 0, clock()
        self.lock = threading.Lock()

    def advance(self, size):
        with self.lock:
            self.done += 1
            self.bytes += size
            now = self.clock()
            if self.done == self.total or self.done - self.last_count >= PROGRESS_EVERY \
                    or now - self.last_time >= PROGRESS_SECONDS:
                self.last_count, self.last_time = self.done, now
                print(f"  fetched {self.done:,} of {self.total:,} ({self.bytes / 1e6:.1f} MB)",
                      file=self.stream, flush=True)


def fetch_results(s3, bucket, out_dir, key_prefix="", threads=FETCH_THREADS, stream=None,
                  prune=True):
    """Copy the reports, error reports and logs under analysis/KEY_PREFIX of `bucket` into
    out_dir; return {"fetched", "unchanged", "removed": [keys], "manifest": {...}}.

    prune=False keeps the copies of objects the bucket no longer holds (local_cloud.py: each
    run is a new bucket, and DIR gathers the runs, as it always has).

    get_object calls run on `threads` threads (the client's own retries, standard mode, cover
    throttling); a failed download raises after the others finish and after the manifest
    records what did arrive, so a re-run fetches only the rest.
    """
    out_dir = Path(out_dir)
    listing = list_keys(s3, bucket, prefix=REPORT_PREFIX + key_prefix)
    manifest = read_manifest(out_dir)
    fetch, keep, remove = fetch_plan(listing, manifest, out_dir, key_prefix)
    if not prune:
        keep.update({key: manifest[key] for key in remove})
        remove = []
    for key in remove:
        _unlink(out_dir / manifest[key]["path"])
    for item in fetch:
        old = manifest.get(item["key"])
        if old and old.get("path") != item["path"]:
            _unlink(out_dir / old["path"])
    progress = FetchProgress(len(fetch), stream) if fetch else None

    def download(item):
        got = s3.get_object(Bucket=bucket, Key=item["key"])
        body = got["Body"].read()
        write_atomically(out_dir / item["path"], body)
        progress.advance(len(body))
        # The ETag of the bytes written (the object may have changed since the listing).
        return item["key"], {**item, "etag": got.get("ETag", item["etag"]).strip('"'),
                             "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}

    fetched, failure = {}, None
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(download, i) for i in fetch]):
            try:
                key, entry = future.result()
            except Exception as err:  # noqa: BLE001 - record the rest, then raise the first
                failure = failure or err
                continue
            entry.pop("key")
            fetched[key] = entry
    manifest = {**keep, **fetched}
    write_atomically(out_dir / MANIFEST, json.dumps(
        {"bucket": bucket, "objects": manifest}, indent=1, sort_keys=True,
        ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if failure:
        raise failure
    scope = REPORT_PREFIX + key_prefix
    return {"fetched": sorted(fetched), "unchanged": sum(1 for k in keep if k.startswith(scope)),
            "removed": remove, "manifest": manifest}


def _unlink(path):
    try:
        path.unlink()
    except (FileNotFoundError, NotADirectoryError):
        pass


# --- one row per input ----------------------------------------------------------------


def input_key_from(object_key):
    """Return the input key a report, error report or log key stands for (pure): its key minus
    analysis/ and the suffix; a hashed long key (analysis/_long/<sha256>) stays as it is."""
    return object_key[len(REPORT_PREFIX):-len(_suffix(object_key)) or None]


def load_report(path):
    """Return a report's dict, or None when the file is not a report (a route's own JSON)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(report, dict) and isinstance(report.get("input"), dict) and "status" in report:
        return report
    return None


def collect_inputs(out_dir, manifest):
    """Return one dict per input, sorted by key, from the copies in out_dir: {"key", "report"
    (the newer of report and error report, or None), "report_path", "log_path"}.

    When an input has both a report and an error report (it failed, then a re-run
    succeeded), the newer one by LastModified speaks for it.
    """
    inputs, log_paths = {}, {}
    for object_key, entry in manifest.items():
        kind = result_kind(object_key)
        if kind == "log":
            log_paths[object_key] = entry["path"]
            continue
        if kind not in ("report", "error"):
            continue
        report = load_report(Path(out_dir) / entry["path"])
        if report is None:
            continue
        key = report["input"].get("key") or input_key_from(object_key)
        current = inputs.get(key)
        if current and current["last_modified"] >= (entry.get("last_modified") or ""):
            continue
        inputs[key] = {"key": key, "report": report, "report_path": entry["path"],
                       "last_modified": entry.get("last_modified") or "", "log_path": None}
    for key, item in inputs.items():
        item["log_path"] = log_paths.pop(AwsS3.report_key(key, ".log"), None)
    for object_key, path in log_paths.items():   # a log and no report yet: a worker still running
        key = input_key_from(object_key)
        inputs[key] = {"key": key, "report": None, "report_path": None, "last_modified": "",
                       "log_path": path}
    return [inputs[key] for key in sorted(inputs)]


def empty_cells(summary):
    """Sum of the empty cells of the profiled columns of a CSV/TSV summary, or None (pure).

    Only the first MAX_PROFILED_COLUMNS columns are profiled (summary.columns_profiled).
    """
    profiles = summary.get("column_profiles")
    if not isinstance(profiles, list):
        return None
    return sum(p.get("empty") or 0 for p in profiles if isinstance(p, dict))


def summary_row(item):
    """Return summary.csv's row (a dict over SUMMARY_COLUMNS) for one collect_inputs item (pure)."""
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(key=item["key"], report=item["report_path"] or "", log=item["log_path"] or "")
    report = item["report"]
    if report is None:
        row["status"] = "no report"
        return row
    row["status"] = "error" if report.get("status") == "error" else str(report.get("status"))
    row["format"] = report.get("format") or ""
    row["compression"] = report.get("compression") or ""
    size = report.get("bytes", report["input"].get("size"))
    row["size"] = "" if size is None else size
    summary = report.get("summary") if isinstance(report.get("summary"), dict) else {}
    for name in FORMAT_COUNTS.get(row["format"], ()):
        value = summary.get(name)
        row[name] = "" if value is None else value
    if row["format"] in ("csv", "tsv"):
        cells = empty_cells(summary)
        row["empty_cells"] = "" if cells is None else cells
    if row["status"] == "error":
        row["error_stage"] = report.get("stage") or ""
        row["error_code"] = report.get("error_code") or ""
        row["error"] = one_line(report.get("error") or "")
    return row


def one_line(text):
    """Return text on one line: newlines and tabs become spaces (pure)."""
    return " ".join(str(text).split())


def write_summary_csv(path, rows):
    """Write summary.csv: a header and one row per input (the csv module's quoting, so keys
    with commas, quotes or newlines come back byte for byte)."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as out:
        writer = csv.DictWriter(out, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(out_dir, manifest, title="awsfun results"):
    """Write DIR/summary.csv and DIR/index.html from the copies; return the summary rows."""
    inputs = collect_inputs(out_dir, manifest)
    rows = [summary_row(item) for item in inputs]
    write_summary_csv(Path(out_dir) / SUMMARY_CSV, rows)
    from .results_page import (
        write_page,  # jinja2 and plotly: only here (requirements/results.txt)
    )
    write_page(Path(out_dir) / INDEX_HTML, inputs, rows, title=title)
    return rows


def status_counts(rows):
    """Return {status: inputs} (pure)."""
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def results_lines(outcome, rows, out_dir):
    """The lines `results` prints for a person (pure); keys shown with their escapes."""
    counts = status_counts(rows)
    lines = [(f"Fetched {len(outcome['fetched']):,}, unchanged {outcome['unchanged']:,}, "
              f"removed {len(outcome['removed']):,} (gone from the bucket)."),
             f"{len(rows):,} inputs: " + (", ".join(f"{n:,} {s}" for s, n in sorted(counts.items()))
                                          or "none")]
    for row in rows:
        if row["status"] == "error":
            lines.append(f"  error  {_shown(row['key'])}: {row['error_stage']}: {row['error']}")
    lines.append(f"Summary: {out_dir / SUMMARY_CSV}  Page: {out_dir / INDEX_HTML}")
    return lines


def _shown(key):
    """A key as one printable line: control characters escaped as Python would (pure)."""
    text = printable(key)
    return text if text.isprintable() else repr(text)[1:-1]


def require_page_libraries():
    """Raise DeployError naming the install when jinja2 or plotly is missing (a deploy-only
    install, requirements/deploy.txt), before anything is fetched."""
    missing = [name for name in ("jinja2", "plotly") if importlib.util.find_spec(name) is None]
    if missing:
        raise DeployError(f"results writes index.html with {' and '.join(missing)}, not "
                          "installed: python3 -m pip install -r requirements/results.txt")


def run_results(args, clients):
    """`results`: fetch what changed under analysis/KEY_PREFIX, write summary.csv, index.html."""
    require_page_libraries()
    names = deployed_names(clients, args.prefix, args.data_bucket, args.software_bucket)
    out_dir = Path(args.out)
    print(f"awsfun results: s3://{names.data_bucket}/{REPORT_PREFIX}{_shown(args.key_prefix)} "
          f"-> {out_dir}", file=sys.stderr)
    started = time.monotonic()
    outcome = fetch_results(clients("s3"), names.data_bucket, out_dir, args.key_prefix)
    rows = write_outputs(out_dir, outcome["manifest"],
                         title=f"awsfun results: {names.data_bucket}")
    logger.info("results in %.1f s", time.monotonic() - started)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print("\n".join(results_lines(outcome, rows, out_dir)))
    return 0


def results_options(parser):
    """The options of `results`."""
    parser.add_argument("--key-prefix", default="", metavar="P",
                        help="only inputs whose keys start with P (reports under analysis/P)")
    parser.add_argument("--out", default="analysis-out", metavar="DIR",
                        help="folder to copy into, mirroring the keys below analysis/ "
                             "(default: ./analysis-out)")
    parser.add_argument("--json", action="store_true",
                        help="print summary.csv's rows as JSON instead of the lines for a person")
