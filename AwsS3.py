#!/usr/bin/env python3
"""awsfun worker: analyse one S3 object (or a local file) in a single streaming pass.

    python3 AwsS3.py s3://BUCKET/KEY   write analysis/KEY.json (or .error.json)
    python3 AwsS3.py PATH              print the report of a local file

One file, standard library plus boto3 (imported only for S3), because the
instance downloads it on boot. The input is only ever read.
"""

import argparse
import csv
import hashlib
import io
import json
import logging
import mimetypes
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import zlib

__version__ = "1.0"

logger = logging.getLogger("awsfun.worker")

CHUNK_SIZE = 1 << 20
SNIFF_SIZE = 64 * 1024
REPORT_PREFIX = "analysis/"
S3_KEY_LIMIT = 1024
PROGRESS_SECONDS = 5.0

EXIT_OK = 0
EXIT_FAILED_REPORTED = 1
EXIT_USAGE = 2
EXIT_FAILED_UNREPORTED = 3


class AnalysisError(Exception):
    """The input could not be analysed (corrupt, truncated, unreadable)."""


def report_key(key, suffix=".json"):
    """Return the report key for an input key; hashed under _long/ past S3's 1,024-byte limit."""
    candidate = REPORT_PREFIX + key + suffix
    if len(candidate.encode("utf-8")) <= S3_KEY_LIMIT:
        return candidate
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{REPORT_PREFIX}_long/{digest}{suffix}"


def parse_s3_uri(uri):
    """Split s3://BUCKET/KEY into (bucket, key); the key is kept byte for byte."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, sep, key = uri[len("s3://"):].partition("/")
    if not bucket or not sep or not key:
        raise ValueError(f"expected s3://BUCKET/KEY, got {uri!r}")
    return bucket, key


# --- format detection ---------------------------------------------------------------


def looks_binary(sample):
    """True when a content sample is not text (NUL bytes, or not UTF-8/Latin text)."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the sample's end is still text.
        if err.start < len(sample) - 4:
            return True
    control = sum(1 for byte in sample if byte < 32 and byte not in (9, 10, 12, 13))
    return control > len(sample) // 100


def sniff_format(sample):
    """Guess the content format from the first bytes of (decompressed) content."""
    if not sample:
        return "empty"
    if looks_binary(sample):
        return "binary"
    lines = sample.split(b"\n")
    complete = lines[:-1] if len(lines) > 1 else lines
    if sample.startswith(b"##fileformat=VCF"):
        return "vcf"
    if sample.startswith(b"@") and len(complete) >= 3 and complete[2].startswith(b"+"):
        return "fastq"
    if sample.startswith(b">"):
        return "fasta"
    return sniff_table(complete[:50]) or "text"


def sniff_table(lines):
    """Return 'tsv' or 'csv' when lines split into a steady number (>= 2) of fields."""
    lines = [line.rstrip(b"\r") for line in lines if line.strip()]
    if len(lines) < 2:
        return None
    text = [line.decode("utf-8", "replace") for line in lines]
    for name, delimiter in (("tsv", "\t"), ("csv", ",")):
        widths = {len(row) for row in csv.reader(text, delimiter=delimiter)}
        if len(widths) == 1 and widths.pop() >= 2:
            return name
    return None


# --- per-format summaries -----------------------------------------------------------


class LineAnalyzer:
    """Base analyser: receives decompressed content in blocks, returns a summary dict."""

    def __init__(self):
        self._partial = b""

    def feed(self, block):
        """Feed a block of content; complete lines go to feed_lines."""
        data = self._partial + block
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            self.feed_lines(data[:cut])

    def finish(self):
        """Flush the last unterminated line and return the summary."""
        if self._partial:
            self.feed_lines(self._partial + b"\n")
            self._partial = b""
        return self.summary()

    def feed_lines(self, data):
        """Consume complete newline-terminated lines."""

    def summary(self):
        """Return the format's summary."""
        return {}


class TextAnalyzer(LineAnalyzer):
    """Plain text: longest line and blank lines."""

    def __init__(self):
        super().__init__()
        self.max_line = 0
        self.blank = 0

    def feed_lines(self, data):
        lines = data.split(b"\n")[:-1]
        self.max_line = max(self.max_line, max(map(len, lines), default=0))
        self.blank += sum(1 for line in lines if not line.strip())

    def summary(self):
        return {"longest_line": self.max_line, "blank_lines": self.blank}


class TableAnalyzer(LineAnalyzer):
    """CSV/TSV: header, rows and columns."""

    def __init__(self, delimiter):
        super().__init__()
        self.delimiter = delimiter
        self.header = None
        self.rows = 0
        self.widths = set()

    def feed_lines(self, data):
        text = io.StringIO(data.decode("utf-8", "replace"), newline="")
        for row in csv.reader(text, delimiter=self.delimiter):
            if not row:
                continue
            if self.header is None:
                self.header = row
                continue
            self.rows += 1
            self.widths.add(len(row))

    def summary(self):
        return {
            "delimiter": self.delimiter,
            "header": self.header or [],
            "rows": self.rows,
            "columns": len(self.header or []),
            "ragged_rows": len(self.widths - {len(self.header or [])}) > 0,
        }


class FastqAnalyzer(LineAnalyzer):
    """FASTQ: reads and bases."""

    def __init__(self):
        super().__init__()
        self.lines = 0
        self.bases = 0

    def feed_lines(self, data):
        lines = data.split(b"\n")[:-1]
        first_sequence = (1 - self.lines) % 4  # records are 4 lines; line 1 of each is the sequence
        self.bases += sum(len(line.rstrip(b"\r")) for line in lines[first_sequence::4])
        self.lines += len(lines)

    def summary(self):
        return {"reads": self.lines // 4, "bases": self.bases, "incomplete_record": self.lines % 4 != 0}


class VcfAnalyzer(LineAnalyzer):
    """VCF: samples and records."""

    def __init__(self):
        super().__init__()
        self.samples = 0
        self.records = 0

    def feed_lines(self, data):
        for line in data.split(b"\n")[:-1]:
            if line.startswith(b"#CHROM"):
                self.samples = max(0, len(line.split(b"\t")) - 9)
            elif line and not line.startswith(b"#"):
                self.records += 1

    def summary(self):
        return {"samples": self.samples, "records": self.records}


def make_analyzer(fmt):
    """Return the analyser for a detected format."""
    if fmt == "csv":
        return TableAnalyzer(",")
    if fmt == "tsv":
        return TableAnalyzer("\t")
    if fmt == "fastq":
        return FastqAnalyzer()
    if fmt == "vcf":
        return VcfAnalyzer()
    if fmt in ("text", "fasta"):
        return TextAnalyzer()
    return LineAnalyzer()


# --- the streaming pass -------------------------------------------------------------


class GzipStream:
    """Incremental gzip decoder that also reads multi-member (bgzip) files."""

    def __init__(self):
        self._decoder = zlib.decompressobj(wbits=31)
        self.members = 1

    def feed(self, data, offset):
        """Return the content decompressed from `data`, which starts at byte `offset`."""
        out = []
        while data:
            try:
                out.append(self._decoder.decompress(data))
            except zlib.error as err:
                raise AnalysisError(f"corrupt gzip data near byte {offset}: {err}") from None
            if not self._decoder.eof:
                break
            data = self._decoder.unused_data
            if data:
                self._decoder = zlib.decompressobj(wbits=31)
                self.members += 1
        return b"".join(out)

    def finish(self, total):
        """Raise if the stream ended inside a gzip member."""
        if not self._decoder.eof:
            raise AnalysisError(f"truncated gzip: the stream ends at byte {total} inside a member")


class Progress:
    """Logs bytes done and rate every few seconds."""

    def __init__(self, total=None, every=PROGRESS_SECONDS):
        self.total, self.every = total, every
        self.start = self.last = time.monotonic()

    def update(self, done):
        """Log progress if enough time has passed since the last line."""
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9) / 1e6
        of = f" of {self.total / 1e6:.1f}" if self.total else ""
        logger.info("read %.1f%s MB (%.1f MB/s)", done / 1e6, of, rate)


def analyse_stream(chunks, total=None):
    """Analyse an iterable of raw byte chunks; return the report's content fields."""
    sha = hashlib.sha256()
    size = lines = 0
    last_byte = b"\n"
    gz = None
    analyzer = None
    sniff = b""
    progress = Progress(total)
    for chunk in chunks:
        if not chunk:
            continue
        if size == 0 and chunk[:2] == b"\x1f\x8b":
            gz = GzipStream()
        sha.update(chunk)
        content = gz.feed(chunk, size) if gz else chunk
        size += len(chunk)
        progress.update(size)
        if not content:
            continue
        lines += content.count(b"\n")
        last_byte = content[-1:]
        if analyzer is None:
            sniff += content
            if len(sniff) < SNIFF_SIZE:
                continue
            analyzer, fmt = _start(sniff)
            content = sniff
        analyzer.feed(content)
    if size == 0:
        raise AnalysisError("the object is empty (0 bytes): nothing to analyse; was the upload cut short?")
    if gz:
        gz.finish(size)
    if analyzer is None:
        analyzer, fmt = _start(sniff)
        analyzer.feed(sniff)
    if last_byte != b"\n":
        lines += 1
    return {
        "bytes": size,
        "lines": lines,
        "sha256": sha.hexdigest(),
        "format": fmt,
        "compression": "gzip" if gz else None,
        "gzip_members": gz.members if gz else None,
        "summary": analyzer.finish(),
    }


def _start(sniff):
    fmt = sniff_format(sniff[:SNIFF_SIZE])
    return make_analyzer(fmt), fmt


def analyse_file(path):
    """Return the report for a local file; touches no AWS service."""
    def chunks():
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK_SIZE):
                yield block

    started = time.time()
    size = os.path.getsize(path)
    report = {"input": {"path": path, "size": size}, "status": "ok"}
    report.update(analyse_stream(chunks(), total=size))
    report["worker"] = worker_info(started, report["bytes"])
    return report


def worker_info(started, nbytes):
    """Return who produced a report and how fast."""
    seconds = max(time.time() - started, 1e-9)
    return {
        "version": __version__,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 1),
    }


# --- S3 ------------------------------------------------------------------------------


def make_s3_client():
    """Create the S3 client with botocore's standard retry mode (honours AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}))


def _error_code(err):
    response = getattr(err, "response", None) or {}
    error = response.get("Error", {})
    return error.get("Code", type(err).__name__), error.get("Message", str(err))


def existing_report_etag(s3, bucket, key):
    """Return the input eTag recorded on an existing report, or None if there is none."""
    from botocore.exceptions import ClientError

    try:
        head = s3.head_object(Bucket=bucket, Key=report_key(key))
    except ClientError as err:
        if _error_code(err)[0] in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head.get("Metadata", {}).get("input-etag")


def put_report(s3, bucket, key, report, suffix):
    """Write a report next to its input under analysis/; return the report's key."""
    target = report_key(key, suffix)
    s3.put_object(
        Bucket=bucket,
        Key=target,
        Body=json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"),
        ContentType="application/json",
        Metadata={"input-etag": report["input"].get("etag") or ""},
    )
    return target


def analyse_s3_object(s3, bucket, key, expected_etag="", command=None):
    """Analyse s3://bucket/key and write its report; return the report (None if done before)."""
    started = time.time()
    head = s3.head_object(Bucket=bucket, Key=key)
    etag = head["ETag"].strip('"')
    if existing_report_etag(s3, bucket, key) == etag:
        logger.info("report for eTag %s already written; nothing to do", etag)
        return None
    if expected_etag and expected_etag != etag:
        logger.warning("object changed since the event (eTag %s, now %s); analysing the current one",
                       expected_etag, etag)
    body = s3.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]
    report = {
        "input": {
            "bucket": bucket,
            "key": key,
            "size": head["ContentLength"],
            "etag": etag,
            "version_id": head.get("VersionId"),
            "last_modified": head["LastModified"].isoformat(),
        },
        "event_etag": expected_etag or None,
        "status": "ok",
    }
    logger.info("analysing s3://%s/%s (%d bytes)", bucket, key, head["ContentLength"])
    chunks = body.iter_chunks(CHUNK_SIZE)
    if command:
        report["route"] = run_route_command(s3, bucket, key, command, chunks, report)
    else:
        report.update(analyse_stream(chunks, total=head["ContentLength"]))
    report["worker"] = worker_info(started, report["bytes"])
    target = put_report(s3, bucket, key, report, ".json")
    logger.info("wrote s3://%s/%s: %s, %d lines", bucket, target, report["format"], report["lines"])
    return report


def local_input_name(key):
    """Return a safe file name for a key's local copy, keeping its extensions for the tool."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", key.rsplit("/", 1)[-1])[-100:]
    return "input-" + (name or "object")


def _tee_to_file(chunks, path):
    with open(path, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
            yield chunk


def run_route_command(s3, bucket, key, command, chunks, report):
    """Copy the object locally (analysing it on the way), run a route's argument list, upload its outputs."""
    with tempfile.TemporaryDirectory(prefix="awsfun-route-") as work:
        input_path = os.path.join(work, local_input_name(key))
        output_dir = os.path.join(work, "output")
        os.mkdir(output_dir)
        report.update(analyse_stream(_tee_to_file(chunks, input_path), total=report["input"]["size"]))
        argv = [arg.format(input=input_path, output_dir=output_dir) for arg in command]
        logger.info("running route command %s", argv)
        started = time.monotonic()
        try:
            # An argument list, never a shell: nothing in the key or the table is parsed.
            done = subprocess.run(argv, cwd=work, capture_output=True, check=False)
        except OSError as err:
            raise AnalysisError(f"cannot run route command {command[0]!r}: {err}") from None
        for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)):
            if text:
                logger.info("command %s:\n%s", stream, text.decode("utf-8", "replace")[-4000:])
        outputs = upload_outputs(s3, bucket, key, output_dir)
        route = {"command": command, "exit_code": done.returncode, "outputs": outputs,
                 "seconds": round(time.monotonic() - started, 3),
                 "stdout_tail": done.stdout.decode("utf-8", "replace")[-2000:],
                 "stderr_tail": done.stderr.decode("utf-8", "replace")[-2000:]}
        if done.returncode != 0:
            raise AnalysisError(f"route command {command[0]!r} exited with status {done.returncode}: "
                                + route["stderr_tail"][-500:].strip())
        return route


def upload_outputs(s3, bucket, key, output_dir):
    """Upload every file a route command wrote to analysis/KEY/...; return their keys."""
    uploaded = []
    for root, _, files in os.walk(output_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, output_dir).replace(os.sep, "/")
            target = report_key(key, "/" + relative)
            content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
            s3.upload_file(path, bucket, target, ExtraArgs={"ContentType": content_type})
            uploaded.append(target)
    return uploaded


def error_report(stage, err, inputs):
    """Return the error report for a failed run."""
    code, message = _error_code(err)
    return {
        "input": inputs,
        "status": "error",
        "stage": stage,
        "error": f"{code}: {message}" if code != type(err).__name__ else f"{code}: {err}",
        "error_code": code,
        "written_by": "worker",
        "worker": {"version": __version__, "host": socket.gethostname(),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def run_s3(uri, s3=None, command=None):
    """Process one S3 object end to end; return the process exit status."""
    bucket, key = parse_s3_uri(uri)
    expected = os.environ.get("AWSFUN_EXPECTED_ETAG", "")
    try:
        s3 = s3 or make_s3_client()
        analyse_s3_object(s3, bucket, key, expected, command)
        return EXIT_OK
    except Exception as err:  # noqa: BLE001 - every failure must leave an error report
        code, message = _error_code(err)
        logger.error("failed on s3://%s/%s: %s %s", bucket, key, code, message)
        report = error_report("analyse", err, {"bucket": bucket, "key": key, "etag": expected})
    try:
        target = put_report(s3, bucket, key, report, ".error.json")
    except Exception as err:  # noqa: BLE001
        code, message = _error_code(err)
        logger.error("cannot write the error report: %s %s", code, message)
        return EXIT_FAILED_UNREPORTED
    logger.info("wrote s3://%s/%s", bucket, target)
    return EXIT_FAILED_REPORTED


def run_local(path):
    """Print the report of a local file; return the process exit status."""
    try:
        report = analyse_file(path)
    except (OSError, AnalysisError) as err:
        logger.error("failed on %s: %s", path, err)
        report = error_report("analyse", err, {"path": path})
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_FAILED_REPORTED
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return EXIT_OK


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Analyse one file: an S3 object (writes analysis/KEY.json next to it) "
        "or a local path (prints the report).",
        epilog="Exit status: 0 done, 1 failed with an error report, 2 usage, "
        "3 failed and the error report could not be written.",
    )
    parser.add_argument("target", help="s3://BUCKET/KEY or a local file path")
    parser.add_argument("--command", metavar="JSON",
                        help="a route's argument list as JSON, with {input} and {output_dir}: "
                        "run it on a local copy and upload its outputs to analysis/KEY/ (S3 only)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.verbose is False:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    # Arguments arrive as the locale decoded them; S3 keys are UTF-8 whatever the locale.
    target = os.fsencode(args.target).decode("utf-8")
    command = None
    if args.command:
        try:
            command = json.loads(args.command)
        except json.JSONDecodeError as err:
            parser.error(f"--command is not JSON: {err}")
        if not (isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
            parser.error("--command must be a JSON list of strings")
    if target.startswith("s3://"):
        try:
            parse_s3_uri(target)
        except ValueError as err:
            parser.error(str(err))
        return run_s3(target, command=command)
    if command:
        parser.error("--command works on s3:// objects only")
    return run_local(target)


if __name__ == "__main__":
    sys.exit(main())
