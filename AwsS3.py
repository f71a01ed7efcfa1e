#!/usr/bin/env python3
"""awsfun worker: analyse one S3 object (or a local file) in a single streaming pass.

    python3 AwsS3.py s3://BUCKET/KEY   write analysis/KEY.json (or .error.json)
    python3 AwsS3.py PATH              print the report of a local file

One file, standard library plus boto3 (imported only for S3), because the
instance downloads it on boot. The input is only ever read.
"""

import argparse
import bisect
import collections
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import mimetypes
import operator
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

__version__ = "1.0"

logger = logging.getLogger("awsfun.worker")

CHUNK_SIZE = 1 << 20        # raw bytes read at a time
PIECE_SIZE = 1 << 20        # most content one decompression step may produce
QUEUE_PIECES = 4            # pieces waiting between the reading thread and the analysis
SNIFF_SIZE = 64 * 1024
GZIP_MAGIC = b"\x1f\x8b"
MAX_LINE_BYTES = 16 << 20   # a longer line is analysed in pieces, so memory stays bounded
MAX_LENGTH_BINS = 20_000    # read-length histogram size before lengths are rounded
MAX_REPORTED_LENGTH_BINS = 64  # read-length bins the report holds (read_length_histogram)
MAX_NAMES = 10_000          # chromosome and filter names counted one by one
MIN_EXACT_DISTINCT = 100    # distinct values counted exactly per column, at least...
MAX_EXACT_DISTINCT = 10_000  # ...and at most, within...
EXACT_DISTINCT_BUDGET = 200_000  # ...this many exact values over all columns...
EXACT_DISTINCT_CHARS = 8_000_000  # ...holding at most this many characters (long values stay bounded)
MAX_PROFILED_COLUMNS = 200
HISTOGRAM_STRIDE = 16       # byte histogram of text/binary from every 16th byte
REPORT_PREFIX = "analysis/"
RECEIPT_PREFIX = REPORT_PREFIX + "_receipts/"  # see receipt_body
S3_KEY_LIMIT = 1024
PROGRESS_SECONDS = 5.0

# Exit statuses. 1 is never returned on purpose: it is what Python exits with on an uncaught
# exception (a crash at import included), so the bootstrap reads 1 as "crashed, no report" and
# writes the error report itself. bootstrap.sh's WORKER_REPORTED must equal EXIT_FAILED_REPORTED.
EXIT_OK = 0
EXIT_USAGE = 2               # argparse's own
EXIT_FAILED_UNREPORTED = 3   # failed, and the error report could not be written
EXIT_FAILED_REPORTED = 5     # failed, and the error report is written (printed for a local file)


class AnalysisError(Exception):
    """The input could not be analysed (corrupt, truncated, unreadable)."""


class NotEnoughDisk(AnalysisError):
    """The work directory's file system cannot hold what a stage must write there."""

    def __init__(self, stage, directory, needed, free):
        super().__init__(f"{stage}: not enough disk space in {directory}: needs {needed} bytes, "
                         f"{free} free")
        self.stage = stage
        self.details = {"needed_bytes": needed, "free_bytes": free, "work_dir": directory}


def report_key(key, suffix=".json"):
    """Return the report key for an input key; hashed under _long/ past S3's 1,024-byte limit."""
    candidate = REPORT_PREFIX + key + suffix
    if len(candidate.encode("utf-8")) <= S3_KEY_LIMIT:
        return candidate
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{REPORT_PREFIX}_long/{digest}{suffix}"


def receipt_key(target):
    """Return the key of report `target`'s receipt: analysis/_receipts/<sha256 of target> (pure)."""
    return f"{RECEIPT_PREFIX}{hashlib.sha256(target.encode('utf-8')).hexdigest()}"


def receipt_body(target, report_etag, input_etag):
    """Return the bytes of the receipt of report `target` (its S3 ETag), written for `input_etag` (pure).

    A receipt lets status and reconcile tell from a listing of analysis/ alone which input
    eTag a report was written for: the body is a function of three things a listing shows,
    and S3 gives an object PUT in one part, unencrypted or SSE-S3, the MD5 of its bytes as
    ETag (S3 API Reference, "Object": ETag). The report's ETag in it ties the receipt to
    those report bytes, so a receipt left by an earlier report of the key vouches for none.
    """
    return json.dumps({"input_etag": input_etag, "report": target, "report_etag": report_etag},
                      ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


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
    """True when a content sample is not text: a NUL byte, or more than 1 % control bytes.

    Text need not be UTF-8: a latin-1 or cp1252 file is text whose bytes 0x80-0xFF are letters
    (DuckDB reads it with encoding='latin-1'), so bytes that are not UTF-8 do not make it binary.
    """
    if b"\x00" in sample:
        return True
    control = len(sample) - len(sample.translate(None, CONTROL_BYTES))
    return control > len(sample) // 100


def sniff_format(sample, name="", whole=False):
    """Guess the content format from the first bytes of (decompressed) content.

    `name` is the file's name or key: a .csv or .tsv name lets a one-column or one-record table
    be a table. `whole` says the sample is all of the content, so its last line is complete.

    The VCF and FASTQ signatures come before the binary test: a stray NUL or a latin-1 byte
    in one of those files is a fault its report points at, not a reason to lose the format.
    """
    if not sample:
        return "empty"
    if sample.startswith(b"##fileformat=VCF"):
        return "vcf"
    if looks_like_fastq(sample):
        return "fastq"
    if looks_binary(sample):
        return "binary"
    lines = sample.split(b"\n")
    complete = lines[:-1] if len(lines) > 1 else lines
    if sample.startswith(b">"):
        return "fasta"
    dialect = sniff_table(sample, name, whole)
    if dialect is None:
        return "text"
    return "tsv" if dialect.delimiter == "\t" else "csv"


def looks_like_fastq(sample):
    """True when content starts as a FASTQ record does: an '@' header, then sequence lines.

    The sequence lines must end in a '+' line (wrapped records have several; kseq's layout)
    unless they run to the end of a full sniffing window: a first read longer than the
    window (nanopore reads pass 64 KiB) shows no '+' line there, and is still FASTQ.
    """
    if sample[:1] != b"@":
        return False
    lines = sample.split(b"\n")
    for number, line in enumerate(lines[1:], 1):
        if line[:1] == b"+":
            return number > 1
        if line.translate(None, SEQUENCE_LINE_BYTES):
            return False
    return len(lines) > 1 and len(sample) >= SNIFF_SIZE


TableDialect = collections.namedtuple("TableDialect", "delimiter quote escape skip_rows header encoding")
TableShape = collections.namedtuple("TableShape", "columns start consistent rows")


def sniff_table(sample, name="", whole=False, table_named=None):
    """Return the TableDialect a sample of text is read with, or None when it is not a table.

    A table has >= 2 records that split into the same >= 2 fields, once a title above the
    header is skipped. A name ending .csv or .tsv (or `table_named`) also makes a table of one
    record or of one column, as DuckDB's read_csv reads any file it is given; without it, one
    column counts as a table only when the values below its first line are numbers.
    """
    if table_named is None:
        table_named = bool(TABLE_NAME.search(name or ""))
    sample = sample.removeprefix(UTF8_BOM)
    if not whole:
        sample = sample[:max(sample.rfind(b"\n"), sample.rfind(b"\r")) + 1] or sample
    encoding = sniff_encoding(sample, whole)
    text = decode_text(sample, encoding)[0].replace("\r\n", "\n").replace("\r", "\n")
    delimiter, quote, escape, shape, rows = sniff_dialect(text, whole)
    body = rows[shape.start:]
    if shape.columns >= 2 and shape.consistent >= 2:
        tabular = shape.consistent >= 0.9 * len(body)  # a ragged row or two is a broken table, still a table
    elif shape.columns == 1:
        values = {row[0] for row in body[1:] if row[0]}
        tabular = len(body) >= 3 and bool(values) and infer_kind(values) in NUMERIC_KINDS
    else:
        tabular = False  # one record: a line of prose with a comma looks the same
    if not (tabular or (table_named and body)):
        return None
    return TableDialect(delimiter, quote, escape, shape.start, sniff_header(body), encoding)


def sniff_encoding(sample, whole=False):
    """Return the encoding a table sample is read in: utf-8, else cp1252 or latin-1.

    UTF-8 when the sample decodes as UTF-8 (a character cut at a sample's end aside). Otherwise
    cp1252 when it holds bytes 0x80-0x9F (Windows' euro sign and curly quotes live there;
    latin-1 has only control codes), else latin-1, which then reads the same as cp1252.
    """
    try:
        sample.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as err:
        if not whole and err.reason == "unexpected end of data" and err.start >= len(sample) - 3:
            return "utf-8"
    return "cp1252" if WINDOWS_BYTES.search(sample) else "latin-1"


def sniff_dialect(text, whole=False):
    """Return (delimiter, quote, escape, TableShape, rows) of the dialect that reads text best.

    After DuckDB's sniffer (dialect_detection.cpp): each delimiter (, | ; tab) parses the
    sample; the first rows narrower than the table's steady width are a title above it (DuckDB's
    skip_rows). RFC 4180 quoting ('"', doubled inside a field) is tried first; a backslash
    escape, then no quoting at all (TSV's: DuckDB's quote=''), only where it leaves rows
    ragged, as a quote closed mid-field does. Two changes from DuckDB: a dialect that reads
    every row alike, title rows and all, beats one that needs a title skipped (`a;b` over
    `1,5;2,5` is two columns, not three under a title); and a quoted field still open where the
    file ends is a broken last record, reported as such, not a reason to read quotes as text.
    """
    rules = [('"', '"')]
    if "\\\"" in text:
        rules.append(('"', "\\"))
    if '"' in text:
        rules.append((None, None))
    best = None
    for delimiter in TABLE_DELIMITERS:
        chosen = None
        for quote, escape in rules:
            rows = sample_rows(text, csv_options(delimiter, quote, escape), whole)
            shape = table_shape([-1 if row is None else len(row) for row in rows])
            if chosen is None or better_shape(shape, chosen[3]):
                chosen = (delimiter, quote, escape, shape, [row for row in rows if row is not None])
            if shape.consistent == shape.rows - shape.start:
                break  # every row reads alike: no reason to try another quote rule
        if best is None or better_shape(chosen[3], best[3]):
            best = chosen
    return best


def sample_rows(text, options, whole):
    """Return the non-empty records of a sample, None for one the strict parser rejects.

    Strict as DuckDB's strict_mode: a quoted field closed before the end of its field (`"a"b`)
    rejects the row. A record whose quoted field is still open where the text ends is left
    out; so is the last record of a sample that is not the whole file (it may be cut), unless
    it is the only one (a header longer than the sample still tells the delimiter).
    """
    strict = options.get("quoting") != csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), strict=strict, **options)
    rows, failed = [], False
    while True:
        try:
            row = next(reader)
        except StopIteration:
            if failed:
                return rows  # the failure was the text ending inside a quoted field
            break
        except csv.Error:
            if failed:
                rows.append(None)
            failed = True
            continue
        if failed:
            rows.append(None)
            failed = False
        if row:
            rows.append(row)
    return rows if whole or len(rows) < 2 else rows[:-1]


def table_shape(widths):
    """Return the TableShape of records of these widths: their most common width (the wider of
    equals), where the first record of that width is (after narrower title rows only), and how many
    records from there have that width."""
    if not widths:
        return TableShape(0, 0, 0, 0)
    counts = collections.Counter(widths)
    columns = max(counts, key=lambda width: (counts[width], width))
    start = widths.index(columns)
    if max(widths[:start], default=0) > columns:
        start = 0  # a wider row above is a broken row of the table, not a title
    return TableShape(columns, start, widths[start:].count(columns), len(widths))


def better_shape(new, old):
    """True when records of shape `new` make a better table than `old`: more than one column
    first, then no title to skip, then DuckDB's rule (more steady rows and no fewer columns)."""
    if new.consistent < 0.9 * (new.rows - new.start):
        return False
    if (new.columns >= 2) != (old.columns >= 2):
        return new.columns >= 2
    if old.columns >= 2 and (new.start == 0) != (old.start == 0):
        return new.start == 0
    return new.consistent > old.consistent and new.columns >= old.columns


def sniff_header(rows):
    """True when the first of a table's rows names its columns, by DuckDB's rule.

    header_detection.cpp: each column is typed from the rows below; if every column is text (or
    the first row is empty) the first row is a header; otherwise it is one when a value in it
    does not fit its column's type ('id' above integers). A lone row is a header if all text.
    """
    first = rows[0] if rows else []
    below = [row for row in rows[1:] if len(row) == len(first)]
    if not any(value.strip() for value in first):
        return True
    if not below:
        return all(infer_kind({value}) == "string" for value in first if value)
    all_text = True
    for index, name in enumerate(first):
        values = {row[index] for row in below if row[index]}
        kind = infer_kind(values) if values else "string"
        if kind != "string":
            all_text = False
            if name and not fits_kind(name, kind):
                return True
    return all_text


# --- shared helpers -------------------------------------------------------------------

CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))
TABLE_DELIMITERS = (",", "|", ";", "\t")  # DuckDB's candidates, in its order (ties go to the first)
TABLE_NAME = re.compile(r"\.(?:csv|tsv|tab)(?:\.b?gz)?$", re.IGNORECASE)
UTF8_BOM = b"\xef\xbb\xbf"
WINDOWS_BYTES = re.compile(rb"[\x80-\x9f]")  # cp1252's letters and marks; C1 controls in latin-1
# Bytes 0-31 but tab and the line ends: no FASTQ holds them, and one is reported where it is.
# DEL (127) is left out: seqkit reads it as Phred 94, a quality like any other.
FASTQ_CONTROL = bytes(value for value in range(32) if value not in (9, 10, 13))
# What a sequence line may hold: IUPAC letters, gaps and stops, control bytes (reported, not
# fatal), and the CR of a CRLF line end.
SEQUENCE_LINE_BYTES = bytes(range(65, 91)) + bytes(range(97, 123)) + b"-*.\r" + FASTQ_CONTROL
ADLER_MODULUS = 65521
ADLER_EXACT_BYTES = (ADLER_MODULUS - 1) // 255  # bytes whose sum adler32 gives exactly (as byte_sum)


def byte_table(members):
    """Return a translate table mapping the given bytes to 1 and every other byte to 0."""
    return bytes(1 if value in members else 0 for value in range(256))


def byte_sum(data, max_value=255):
    """Return the sum of the byte values of data, in C speed.

    zlib.adler32 with a zero start is the byte sum modulo 65,521; over slices short
    enough that the sum cannot reach the modulus it is the exact sum, and a few
    thousand C calls beat a Python-level sum() over millions of bytes.
    """
    step = (ADLER_MODULUS - 1) // max(max_value, 1)
    view = memoryview(data)
    adler = zlib.adler32
    return sum(adler(view[start:start + step], 0) & 0xFFFF for start in range(0, len(view), step))


def count_members(data, table):
    """Return how many bytes of data the 0/1 translate table maps to 1."""
    return byte_sum(data.translate(table), 1)


def percent(part, whole, digits=3):
    """Return part/whole as a rounded percentage, or None when whole is 0."""
    return round(100.0 * part / whole, digits) if whole else None


class FirstProblem:
    """Counts malformed records and remembers where the first one is, and why."""

    def __init__(self):
        self.count = 0
        self.line = None
        self.reason = None

    def add(self, line, reason, count=1):
        """Record `count` malformed records, the first of them at 1-based `line`."""
        self.count += count
        if self.line is None:
            self.line, self.reason = line, reason

    def fields(self, noun="records"):
        """Return the summary fields describing the problems found."""
        return {f"malformed_{noun}": self.count, "first_malformed_line": self.line,
                "first_malformed_reason": self.reason}


# --- per-format summaries -----------------------------------------------------------


class LineAnalyzer:
    """Base analyser: receives decompressed content in blocks, returns a summary dict."""

    def __init__(self):
        self._partial = b""
        self.newlines = 0

    def feed(self, block):
        """Feed a block of content; complete lines go to feed_lines."""
        data = self._partial + block if self._partial else block
        cut = data.rfind(b"\n") + 1
        self._partial = data[cut:]
        if cut:
            self.feed_lines(data[:cut] if cut < len(data) else data)
        if len(self._partial) > MAX_LINE_BYTES:
            self._overlong_line()

    def _overlong_line(self):
        # Memory stays bounded whatever the input: a line past the limit is analysed in pieces.
        self.newlines -= 1
        self.feed_lines(self._partial + b"\n")
        self._partial = b""

    def finish(self):
        """Flush the last unterminated line and return the summary."""
        if self._partial:
            self.newlines -= 1  # the newline added below is not in the content
            self.feed_lines(self._partial + b"\n")
            self._partial = b""
        return self.summary()

    def feed_lines(self, data):
        """Consume complete newline-terminated lines."""
        self.newlines += data.count(b"\n")

    def summary(self):
        """Return the format's summary."""
        return {}


class ByteProfile:
    """Byte classes counted exactly, and a byte histogram from a fixed 1-in-N sample."""

    CLASSES = {
        "zero": byte_table({0}),
        "printable_ascii": byte_table(set(range(32, 127)) | {9, 10, 13}),
        "control": byte_table(set(range(1, 32)) - {9, 10, 13} | {127}),
        "high": byte_table(set(range(128, 256))),
    }

    def __init__(self, stride=HISTOGRAM_STRIDE):
        self.stride = stride
        self.total = 0
        self.classes = dict.fromkeys(self.CLASSES, 0)
        self.histogram = collections.Counter()

    def add(self, block):
        """Count one block of content."""
        # The sample starts where the previous block's left off, so the stride is exact.
        offset = (-self.total) % self.stride
        self.total += len(block)
        for name, table in self.CLASSES.items():
            self.classes[name] += count_members(block, table)
        self.histogram.update(block[offset::self.stride])

    def summary(self):
        """Return the byte histogram summary."""
        sampled = sum(self.histogram.values())
        # Summed as p * log2(1/p), each term >= 0: one repeated byte gives 0.0, not -0.0.
        entropy = sum((n / sampled * math.log2(sampled / n) for n in self.histogram.values()), 0.0)
        return {
            "byte_classes_percent": {name: percent(n, self.total) for name, n in self.classes.items()},
            "distinct_bytes_sampled": len(self.histogram),
            "entropy_bits_per_byte": round(entropy, 3),
            "top_bytes": [{"byte": value, "char": chr(value) if 32 <= value < 127 else None,
                           "percent": percent(n, sampled)} for value, n in self.histogram.most_common(8)],
            "histogram_sample": f"every {self.stride}th byte" if self.stride > 1 else "every byte",
        }


NOT_RECOGNISED = "not FASTQ, VCF, CSV or TSV: no signature of those formats in the first 64 KiB"


class TextAnalyzer(LineAnalyzer):
    """Plain text: longest line, blank lines and the byte histogram summary."""

    def __init__(self, fmt="text"):
        super().__init__()
        self.fmt = fmt
        self.max_line = 0
        self.blank = 0
        self.sequences = 0
        self.bytes = ByteProfile()

    def feed_lines(self, data):
        lines = data.split(b"\n")
        lines.pop()
        self.newlines += len(lines)
        self.max_line = max(self.max_line, max(map(len, lines), default=0))
        self.blank += sum(1 for line in lines if not line.strip())
        if self.fmt == "fasta":
            self.sequences += sum(map(bytes.startswith, lines, itertools.repeat(b">")))
        self.bytes.add(data)

    def summary(self):
        summary = {"longest_line": self.max_line, "blank_lines": self.blank}
        if self.fmt == "fasta":
            summary["sequences"] = self.sequences
        else:
            summary["recognised"] = False
            summary["note"] = NOT_RECOGNISED
        summary.update(self.bytes.summary())
        return summary


class BinaryAnalyzer:
    """Binary content: the byte histogram summary."""

    def __init__(self):
        self.newlines = 0
        self.bytes = ByteProfile()

    def feed(self, block):
        """Feed a block of content."""
        self.newlines += block.count(b"\n")
        self.bytes.add(block)

    def finish(self):
        """Return the summary."""
        return {"recognised": False, "note": "binary content: " + NOT_RECOGNISED.split(": ")[0],
                **self.bytes.summary()}


CONTROL_MARK = b"\x02"  # what the two tables below turn a control byte into
GC_TABLE = bytes(1 if value in b"GCgc" else 2 if value in FASTQ_CONTROL else 0
                 for value in range(256))  # as seqkit: S (G or C) is not counted
Q20_TABLE = bytes(1 if value >= 33 + 20 else 2 if value in FASTQ_CONTROL else 0 for value in range(256))
Q30_TABLE = byte_table(set(range(33 + 30, 256)))
RECORD_BUFFER = PIECE_SIZE  # bytes of one unfinished record kept as lines before they are measured
# A longer FASTQ line is read in pieces (kseq's rule reads a sequence or quality cut in pieces
# the same), which keeps the copies of a partial line small; other formats keep MAX_LINE_BYTES.
FASTQ_MAX_LINE_BYTES = 4 * PIECE_SIZE
LINE_OVERHEAD = 64          # what a kept line costs beyond its bytes (so a million blank lines are not free)
RUN_LINES = 4096            # lines taken into a record at a time (b"".join costs ~80 bytes a part)
LONG_RUN = 32               # sequence or quality lines of one record read one by one before a run is taken whole
CONTROL_BYTE_CONVENTION = "counted, as seqkit counts them"
# seqkit prints 2 decimals of the exact figure; at 3, rounding ours again to 2 could differ
# (78.3654 -> 78.365 -> 78.36, not 78.37). At 6 that takes a figure within 5e-7 of a tie.
FASTQ_PERCENT_DIGITS = 6


def count_marked(marked):
    """Return (members, control bytes) of a block translated by GC_TABLE or Q20_TABLE."""
    if CONTROL_MARK not in marked:  # memchr: the common case costs almost nothing
        return byte_sum(marked, 1), 0
    control = marked.count(CONTROL_MARK)
    return byte_sum(marked, 2) - 2 * control, control


class BaseCounts:
    """Per-base counts of FASTQ content: bases, G+C, N, Phred+33 quality sum, Q20 and Q30."""

    __slots__ = ("bases", "gc", "n", "q20", "q30", "quality_sum")

    def __init__(self):
        self.bases = self.gc = self.n = self.quality_sum = self.q20 = self.q30 = 0

    def add_sequence(self, sequence):
        """Count joined sequence bytes; return True when a control byte is among them."""
        gc, control = count_marked(sequence.translate(GC_TABLE))
        self.bases += len(sequence)
        self.gc += gc
        self.n += sequence.count(b"N") + sequence.count(b"n")  # rare bytes: count is memchr-fast
        return bool(control)

    def add_quality(self, quality, quality_sum=None):
        """Count joined quality bytes (their byte sum, when known, is quality_sum); return True
        when a control byte is among them."""
        q20, control = count_marked(quality.translate(Q20_TABLE))
        self.quality_sum += byte_sum(quality) if quality_sum is None else quality_sum
        self.q20 += q20
        self.q30 += count_members(quality, Q30_TABLE)
        return bool(control)

    def merge(self, other):
        """Add another BaseCounts to this one."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class OpenRecord:
    """A FASTQ record whose lines are still coming: kseq_read's state between two lines."""

    __slots__ = ("buffered", "line", "qual", "qual_len", "seq", "seq_len", "seq_lines", "spilled")

    def __init__(self, line):
        self.line = line        # 1-based line of the '@' header
        self.seq, self.seq_len, self.seq_lines = [], 0, 0
        self.qual, self.qual_len = None, 0  # None until the '+' line
        self.buffered = 0
        self.spilled = None     # BaseCounts of lines measured early, so a huge record stays bounded

    def add_sequence_line(self, line):
        """Take one sequence line."""
        self.seq.append(line)
        self.seq_len += len(line)
        self.seq_lines += 1
        self.buffered += len(line) + LINE_OVERHEAD
        if self.buffered > RECORD_BUFFER:
            self._spill()

    def add_quality_line(self, line):
        """Take one quality line."""
        self.qual.append(line)
        self.qual_len += len(line)
        self.buffered += len(line) + LINE_OVERHEAD
        if self.buffered > RECORD_BUFFER:
            self._spill()

    def add_sequence(self, lines):
        """Take sequence lines (a list)."""
        for start in range(0, len(lines), RUN_LINES):
            run = lines[start:start + RUN_LINES]
            size = sum(map(len, run))
            self.seq += run
            self.seq_len += size
            self.seq_lines += len(run)
            self.buffered += size + len(run) * LINE_OVERHEAD
            if self.buffered > RECORD_BUFFER:
                self._spill()

    def add_quality(self, lines):
        """Take quality lines (a list)."""
        for start in range(0, len(lines), RUN_LINES):
            run = lines[start:start + RUN_LINES]
            size = sum(map(len, run))
            self.qual += run
            self.qual_len += size
            self.buffered += size + len(run) * LINE_OVERHEAD
            if self.buffered > RECORD_BUFFER:
                self._spill()

    def _spill(self):
        """Measure the lines kept so far, so a record of any size holds little memory."""
        self.spilled = self.spilled or BaseCounts()
        self.spilled.add_sequence(b"".join(self.seq))
        self.spilled.add_quality(b"".join(self.qual or ()))
        self.seq, self.qual = [], (None if self.qual is None else [])
        self.buffered = 0


def line_starts(lines, index, count):
    """Return the first byte of each of `count` lines from lines[index] (a newline for an empty one).

    A run is looked at in windows as long as the run so far (at most RUN_LINES), so a run
    that ends soon costs little and a long one is read in a few windows.
    """
    count = min(max(count, LONG_RUN), RUN_LINES)
    return b"".join([line[:1] or b"\n" for line in lines[index:index + count]])


def fastq_at_line_role(record, line, following):
    """Return 'quality' or 'header' for a line starting with '@' met while a record's quality is short.

    '@' is Phred 31, so it may start a quality line, and kseq_read (Heng Li's kseq.h, which
    seqkit's reader matches) takes quality lines until they are as long as the sequence: a
    record whose quality was cut short would swallow the next header. The line after decides
    it, since a header is followed by sequence or '+', never by another '@' line:
    `following` is that line, None at the end of the content.
    """
    if following is None or following[:1] == b"@":
        return "quality"
    total = record.qual_len + len(line)
    if total == record.seq_len:
        return "quality" if not following.strip() else "header"
    if total > record.seq_len:
        return "header"
    # Still short after this line: writers wrap quality as they wrap sequence, so a one-line
    # sequence has a one-line quality and this line is the next record's header.
    return "header" if record.seq_lines == 1 else "quality"


class FastqAnalyzer(LineAnalyzer):
    """FASTQ (Phred+33): reads, bases, lengths and N50, GC, Ns, quality, malformed records,
    and the read-length and per-read mean quality distributions.

    Records are read as seqkit and Heng Li's kseq.h read them (kseq_read; seqkit's
    bio/seqio/fastx reader does the same): an '@' header line, sequence lines until a line
    starting with '+', then quality lines until they are as long as the sequence. Wrapped
    (multi-line) records are read whole, from the first record or from any later one.
    Well-formed four-line blocks are measured a whole block at a time (slices of the line
    list, joins, translate tables and byte sums); any other block is walked line by line.

    A record is malformed when it has no '+' line before the next header, when its quality
    ends longer or shorter than its sequence, or when the file ends inside it; a run of
    lines that belong to no record counts as one. Each is counted with its first line, and
    reading goes on at the next header, so a record dropped is always a malformed record.
    A control byte (0-31 but tab and line ends) does not stop a record, as in seqkit: it is
    counted in control_bytes and the line of the first is reported.
    """

    def __init__(self):
        super().__init__()
        self.carry = []          # an '@' line whose role waits on the line after it
        self.lines_before = 0    # lines consumed before self.carry
        self.record = None       # the record whose lines are still coming
        self.garbage = False     # inside a run of lines that belong to no record
        self.reads = 0
        self.counts = BaseCounts()
        self.min_length = self.max_length = None
        self.lengths = collections.Counter()
        self.lengths_exact = True
        self.mean_qualities = collections.Counter()  # reads by mean quality byte, rounded down
        self.problems = FirstProblem()
        self.control_bytes = 0
        self.first_control_line = None

    def feed(self, block):
        """Feed a block of content: split once, keep the unterminated last line for the next block."""
        data = self._partial + block if self._partial else block
        if b"\r" in data:  # CRLF: line ends are not bases (seqkit drops the CR too)
            data = data.replace(b"\r\n", b"\n")
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self._feed_line_list(lines, data)
        if len(self._partial) > FASTQ_MAX_LINE_BYTES:
            self._overlong_line()

    def feed_lines(self, data):
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        lines = data.split(b"\n")
        lines.pop()
        self._feed_line_list(lines, data)

    def _overlong_line(self):
        super()._overlong_line()
        if not self.carry:
            self.lines_before -= 1  # the piece fed was not a line of its own

    def _feed_line_list(self, lines, text=b"", final=False):
        """Read newly fed lines; `text` is the content they were split from (and what follows them)."""
        self.newlines += len(lines)
        first_line = self.lines_before + 1
        new_first = first_line + len(self.carry)
        if self.carry:
            lines = self.carry + lines
        index = self._walk(lines, 0, first_line, final, to_boundary=True) if self.record else 0
        taken, control = index, True
        if self.record is None:
            taken, control = self._take_four_line_records(lines, index)
        rest = self._walk(lines, taken, first_line, final)
        if taken > index and not control:
            # The bulk path saw every byte of its records; only the lines walked are left to check.
            control = any(len(line.translate(None, FASTQ_CONTROL)) != len(line)
                          for line in itertools.chain(lines[:index], lines[taken:]))
        if control and len(lines) > new_first - first_line:
            self._count_control_bytes(text, lines, new_first - first_line, new_first)
        self.carry = lines[rest:]
        self.lines_before = first_line - 1 + rest

    def _take_four_line_records(self, lines, start):
        """Measure the four-line records at lines[start:] in bulk.

        Return (the index after them, whether a control byte may be among them); the index
        is `start` when the lines there are not four-line records. Sequence lines are not
        checked for a leading '@' or '+' (no base is either; the check would cost about 8%
        of the time), so only on such a broken record can this path read otherwise than
        _walk does.
        """
        count = (len(lines) - start) // 4
        if count and lines[start + 4 * count - 1][:1] == b"@":
            count -= 1  # an '@' quality line's role depends on the line after it: walk that one
        if not count:
            return start, True
        stop = start + 4 * count
        heads, seqs, plus, quals = (lines[start + i:stop:4] for i in range(4))
        seq_lengths = list(map(len, seqs))
        if seq_lengths != list(map(len, quals)):
            return start, True
        # One join and one count check every header (and every '+' line) starts as it must,
        # and the joined headers are checked for control bytes on the way.
        head_text, plus_text = b"\n".join(heads), b"\n".join(plus)
        if not (head_text[:1] == b"@" and head_text.count(b"\n@") == count - 1
                and plus_text[:1] == b"+" and plus_text.count(b"\n+") == count - 1):
            return start, True
        self.garbage = False
        control = self._add(seqs, quals, seq_lengths)
        for text in (head_text, plus_text):
            control = control or len(text.translate(None, FASTQ_CONTROL)) != len(text)
        return stop, control

    def _walk(self, lines, index, first_line, final=False, to_boundary=False):
        """Read lines[index:] as kseq_read does; return where the unread rest starts.

        Line by line, but for a run of sequence or quality lines longer than LONG_RUN (one
        base a line, or blank lines without end), which is taken a window at a time. With
        to_boundary, stop once no record is open (the bulk path may take over there). An '@'
        line in a short quality is left unread when the line after it is not here yet.
        """
        seqs, quals, lengths = [], [], []
        record, end = self.record, len(lines)
        while index < end:
            line = lines[index]
            if record is None:
                if to_boundary:
                    break
                if line[:1] == b"@":
                    record = OpenRecord(first_line + index)
                    self.garbage = False
                elif line.strip() and not self.garbage:
                    self.problems.add(first_line + index, "header line does not start with '@'")
                    self.garbage = True
                # Blank lines between records are tolerated, as other tools do.
            elif record.qual is None:
                if line[:1] == b"+":
                    record.qual = []
                elif line[:1] == b"@":
                    self.problems.add(record.line, "no '+' line before the next header")
                    record = OpenRecord(first_line + index)
                elif len(record.seq) < LONG_RUN:
                    record.add_sequence_line(line)
                else:
                    starts = line_starts(lines, index, len(record.seq))
                    stop = starts.find(b"+")
                    header = starts.find(b"@", 0, len(starts) if stop < 0 else stop)
                    stop = index + (header if header >= 0 else len(starts) if stop < 0 else stop)
                    record.add_sequence(lines[index:stop])
                    index = stop
                    continue
            elif line[:1] == b"@":
                if index + 1 == end and not final:
                    break
                if fastq_at_line_role(record, line, lines[index + 1] if index + 1 < end else None) == "header":
                    if record.seq_len == record.qual_len == 0:
                        self._close(record, seqs, quals, lengths)  # an empty read, its quality line left out
                    else:
                        self.problems.add(record.line, "sequence and quality lengths differ "
                                          f"({record.seq_len} and {record.qual_len})")
                    record = OpenRecord(first_line + index)
                else:
                    record.add_quality_line(line)
                    if record.qual_len >= record.seq_len:
                        record = self._end_quality(record, seqs, quals, lengths)
            elif len(record.qual) < LONG_RUN:
                record.add_quality_line(line)
                if record.qual_len >= record.seq_len:
                    record = self._end_quality(record, seqs, quals, lengths)
            else:
                # Quality lines up to the next '@' line, or until they are as long as the sequence.
                starts = line_starts(lines, index, len(record.qual))
                stop = starts.find(b"@")
                stop = index + (len(starts) if stop < 0 else stop)
                totals = list(itertools.accumulate(map(len, lines[index:stop])))
                stop = min(stop, index + bisect.bisect_left(totals, record.seq_len - record.qual_len) + 1)
                record.add_quality(lines[index:stop])
                index = stop
                record = self._end_quality(record, seqs, quals, lengths)
                continue
            index += 1
        self.record = record
        if lengths:
            self._add(seqs, quals, lengths)
        return index

    def _end_quality(self, record, seqs, quals, lengths):
        """Close a record whose quality is as long as its sequence or longer; return the open record or None."""
        if record.qual_len < record.seq_len:
            return record
        if record.qual_len == record.seq_len:
            self._close(record, seqs, quals, lengths)
        else:
            self.problems.add(record.line, "sequence and quality lengths differ "
                              f"({record.seq_len} and {record.qual_len})")
        return None

    def _close(self, record, seqs, quals, lengths):
        if record.spilled:
            # Its first lines are measured already: the read is counted on its own, its
            # quality sum (for its mean) taken from both parts.
            self.counts.merge(record.spilled)
            self._add([b"".join(record.seq)], [b"".join(record.qual or ())], [record.seq_len],
                      record.spilled.quality_sum)
            return
        seqs.append(b"".join(record.seq))
        quals.append(b"".join(record.qual or ()))
        lengths.append(record.seq_len)

    def _add(self, seqs, quals, lengths, spilled_quality=0):
        """Count complete records; return True when a control byte is among their bases or qualities.

        spilled_quality: for one read whose first lines were measured early, their quality sum.
        """
        self.reads += len(lengths)
        low, high = min(lengths), max(lengths)
        sums = quality_sums(quals, lengths, high)
        control = self.counts.add_sequence(b"".join(seqs))
        control = self.counts.add_quality(b"".join(quals), sum(sums)) or control
        if spilled_quality:
            sums = [sums[0] + spilled_quality]
        if low:
            self.mean_qualities.update(map(operator.floordiv, sums, lengths))
        else:  # an empty read has no mean quality (FastQC leaves it out too)
            self.mean_qualities.update(total // length for total, length in zip(sums, lengths) if length)
        self.min_length = low if self.min_length is None else min(self.min_length, low)
        self.max_length = high if self.max_length is None else max(self.max_length, high)
        self.lengths.update(lengths)
        if len(self.lengths) > MAX_LENGTH_BINS:
            self.lengths = coarsen_lengths(self.lengths)
            self.lengths_exact = False
        return control

    def _count_control_bytes(self, text, lines, start, first_line):
        """Count the control bytes of newly fed lines (lines[start:], split from text), and
        remember the line of the first."""
        # The partial line after the last newline is counted when it is fed as a line.
        found = len(text) - len(text.translate(None, FASTQ_CONTROL))
        if self._partial and text.endswith(self._partial):
            found -= len(self._partial) - len(self._partial.translate(None, FASTQ_CONTROL))
        if not found:
            return
        self.control_bytes += found
        if self.first_control_line is None:
            for number, line in enumerate(itertools.islice(lines, start, None), first_line):
                if len(line.translate(None, FASTQ_CONTROL)) != len(line):
                    self.first_control_line = number
                    break

    def finish(self):
        """Flush the last line, count a record cut short at the end, return the summary."""
        if self._partial:
            self.newlines -= 1
            self.feed_lines(self._partial + b"\n")
            self._partial = b""
        if self.carry or self.record:
            self._feed_line_list([], final=True)  # the lines kept back, now that none follows
        record = self.record
        if record is not None:
            if record.qual is not None and record.seq_len == record.qual_len == 0:
                self._add([b""], [b""], [0])  # '+' then the end: an empty read, as kseq reads it
            else:
                state = ("no '+' line" if record.qual is None
                         else f"quality {record.qual_len} of {record.seq_len}")
                self.problems.add(record.line, f"the file ends inside a record ({state})")
            self.record = None
        return self.summary()

    def summary(self):
        bases = self.counts.bases
        return {
            "reads": self.reads,
            "bases": bases,
            "min_length": self.min_length,
            "mean_length": round(bases / self.reads, 3) if self.reads else None,
            "max_length": self.max_length,
            "n50": n50(self.lengths, bases),
            "n50_exact": self.lengths_exact,
            "gc_percent": percent(self.counts.gc, bases, FASTQ_PERCENT_DIGITS),
            "n_count": self.counts.n,
            "n_percent": percent(self.counts.n, bases, FASTQ_PERCENT_DIGITS),
            "mean_quality": round(self.counts.quality_sum / bases - 33, 3) if bases else None,
            "q20_percent": percent(self.counts.q20, bases, FASTQ_PERCENT_DIGITS),
            "q30_percent": percent(self.counts.q30, bases, FASTQ_PERCENT_DIGITS),
            "quality_encoding": "phred+33",
            "read_length_histogram": read_length_histogram(self.lengths, self.min_length, self.max_length,
                                                           self.lengths_exact),
            "mean_quality_histogram": mean_quality_histogram(self.mean_qualities),
            "control_bytes": self.control_bytes,
            "first_control_byte_line": self.first_control_line,
            "control_byte_convention": CONTROL_BYTE_CONVENTION,
            **self.problems.fields("records"),
        }


def quality_sums(quals, lengths, longest):
    """Return the byte sum of each read's quality string (quals[i] is lengths[i] bytes long).

    adler32 with a zero start is the byte sum (modulo 65,521) in one C call a read, exact for
    the reads of up to ADLER_EXACT_BYTES bytes; a longer read is summed as byte_sum sums.
    """
    sums = [value & 0xFFFF for value in map(zlib.adler32, quals, itertools.repeat(0))]
    if longest > ADLER_EXACT_BYTES:
        sums = [byte_sum(quality) if length > ADLER_EXACT_BYTES else total
                for quality, length, total in zip(quals, lengths, sums)]
    return sums


def histogram_bin_width(low, high, most_bins, least=1):
    """Return the smallest width from 1, 2, 5, 10, 20, 50, ... (at least `least`) whose bins,
    starting at multiples of it, cover low..high in at most most_bins bins."""
    for scale in itertools.count():
        for step in (1, 2, 5):
            width = step * 10 ** scale
            if width >= least and high // width - low // width < most_bins:
                return width
    raise AssertionError("unreachable")


def read_length_histogram(lengths, low, high, exact=True):
    """Return {"bin_width": W, "bins": [[length_from, reads], ...]} of a read-length Counter.

    Bins of W lengths start at multiples of W; W is the smallest of 1, 2, 5, 10, 20, ... for
    which the bins from low's to high's number at most MAX_REPORTED_LENGTH_BINS (so W is 1
    when the lengths span at most 64 values); empty bins are left out. When the Counter
    holds lengths rounded by coarsen_lengths (exact False), W is also at least the rounding
    of the longest read, so each read still falls in its own length's bin.
    """
    if low is None:
        return {"bin_width": 1, "bins": []}
    least = 10 ** max(len(str(high)) - 3, 0) if not exact else 1
    width = histogram_bin_width(low, high, MAX_REPORTED_LENGTH_BINS, least)
    bins = collections.Counter()
    for length, count in lengths.items():
        bins[length // width * width] += count
    return {"bin_width": width, "bins": [[start, bins[start]] for start in sorted(bins)]}


def mean_quality_histogram(mean_bytes):
    """Return [[phred, reads], ...]: FastQC's "Per sequence quality scores", on the Phred+33 scale.

    mean_bytes counts reads by the arithmetic mean of their quality bytes rounded down, as
    FastQC's PerSequenceQualityScores.processSequence takes it (integer division of the
    byte sum by the length; reads with no quality left out); minus 33 that is the mean Phred
    score rounded down. A mean outside Phred+33's printable range (! to ~, 0 to 93) is counted
    at the nearer end, so the list has at most 94 entries.
    """
    phreds = collections.Counter()
    for mean, count in mean_bytes.items():
        phreds[min(max(mean - 33, 0), 93)] += count
    return [[phred, phreds[phred]] for phred in sorted(phreds)]


def coarsen_lengths(lengths):
    """Round read lengths to 3 significant digits, so long-read histograms stay small."""
    coarse = collections.Counter()
    for length, count in lengths.items():
        scale = 10 ** max(len(str(length)) - 3, 0)
        coarse[length // scale * scale] += count
    return coarse


def n50(lengths, total):
    """Return the N50 of a read-length histogram: half the bases are in reads at least this long."""
    if not total:
        return None
    running = 0
    for length in sorted(lengths, reverse=True):
        running += length * lengths[length]
        if running * 2 >= total:
            return length
    return None


# A data line of a VCF: CHROM, POS (digits), ID, REF, ALT, QUAL, FILTER, then a tab or the end.
# The match runs to the end of the line, so the next search starts at the next line.
# Plain greedy repeats, not possessive ones (Python 3.11+; AL2023's python3 is 3.9): each
# repeated class excludes the tab or newline that follows it, so a failing line backtracks
# only once per field, and the matches are the same.
VCF_RECORD = re.compile(
    rb"^([^\t\n#][^\t\n]*)\t\d+\t[^\t\n]*\t([^\t\n]+)\t([^\t\n]+)\t[^\t\n]*\t([^\t\n]*)[^\n]*\n", re.M)
# bcftools' allele types (htslib vcf.h: VCF_REF is 0, the others are bits of a record's type).
VCF_SNP, VCF_MNP, VCF_INDEL, VCF_OTHER, VCF_BND, VCF_OVERLAP = 1, 2, 4, 8, 16, 32
VARIANT_KINDS = (("snvs", VCF_SNP), ("mnvs", VCF_MNP), ("indels", VCF_INDEL), ("others", VCF_OTHER))
BASE_INDEX = {ord(base): index for index, base in enumerate("ACGT")}  # htslib's bcf_acgt2int
BASE_INDEX.update({ord(base): index for index, base in enumerate("acgt")})
NO_ALT_RECORD = ((), True, False, False, 0, 0)
ONE_ALT_RECORDS = {kind: (tuple(name for name, bit in VARIANT_KINDS if bit == kind), kind == 0, False, False, 0, 0)
                   for kind in (0, VCF_MNP, VCF_INDEL, VCF_OTHER, VCF_BND, VCF_OVERLAP)}


def allele_type(ref, alt):
    """Return bcftools' type of one ALT allele: 0 (no variant), VCF_SNP, _MNP, _INDEL, _OTHER, _BND or _OVERLAP.

    A reading of bcf_set_variant_type in htslib's vcf.c, which bcftools stats 1.16 counts by:
    '*' is an overlap; a one-base REF and ALT are the same, '.' or mpileup's 'X' (compared
    case-sensitively there), else an SNV; '<X>', '<*>' and '<NON_REF>' stand for the reference
    (gVCF and mpileup placeholders) and any other symbolic allele is other; an ALT starting
    with '[' or ']', or the REF then one, is a breakend. Otherwise, after the shared prefix
    and suffix (case-insensitive), what is left decides: nothing left of one side is an
    indel, one base each an SNV, equal lengths an MNV; a length change that is not anchored
    at a shared base is other (G>CT, AC>ATG, TCA>G), as are bcftools' other leftovers.
    """
    if alt == b"*":
        return VCF_OVERLAP
    if len(ref) == 1 and len(alt) == 1:
        return 0 if alt == b"." or alt == ref or alt == b"X" else VCF_SNP
    if alt[:1] == b"<":
        return 0 if alt[1:3] in (b"X>", b"*>") or alt == b"<NON_REF>" else VCF_OTHER
    if alt[:1] in (b"[", b"]"):
        return VCF_BND
    if not (alt.startswith(ref) or ref.startswith(alt)):  # the common anchored indel skips upper()
        ref, alt = ref.upper(), alt.upper()
    if alt.startswith(ref):  # the REF is all shared: an insertion, or a breakend after the REF
        return 0 if alt == ref else VCF_BND if alt[len(ref):len(ref) + 1] in (b"[", b"]") else VCF_INDEL
    if ref.startswith(alt):
        return VCF_INDEL
    start = 0
    while ref[start] == alt[start]:  # neither is a prefix of the other: a difference is ahead
        start += 1
    ref_end, alt_end = len(ref) - 1, len(alt) - 1
    while ref_end > start and alt_end > start and ref[ref_end] == alt[alt_end]:
        ref_end -= 1
        alt_end -= 1
    if alt_end == start or ref_end == start:
        if ref_end == alt_end:
            return VCF_SNP
        return VCF_INDEL if ref[ref_end] == alt[alt_end] else VCF_OTHER
    return VCF_MNP if ref_end == alt_end else VCF_OTHER


def classify_record(ref, alts):
    """Return how bcftools stats counts a record, from its REF and comma-separated ALTs.

    The tuple is (kinds: the names in VARIANT_KINDS the record counts for, no_alt,
    multiallelic, multiallelic SNV site, transitions, transversions). As in vcfstats.c: a
    record counts once for each kind its alleles hold; it is no-ALT when its ALT is '.' or
    every allele is of type 0 (a breakend or '*' makes it neither); multiallelic with two
    ALTs or more, a multiallelic SNV site when its SNVs stand alone but for type-0 alleles.
    Ts/Tv is per SNV allele, from the first bases of REF and ALT (bcf_acgt2int), so a CT>CA
    SNV counts as neither.
    """
    if b"," not in alts:
        if alts == b".":
            return NO_ALT_RECORD  # htslib reads a lone '.' as no ALT allele at all
        kind = allele_type(ref, alts)
        if kind != VCF_SNP:
            return ONE_ALT_RECORDS[kind]
    alleles = alts.split(b",")
    record_type = ts = tv = 0
    ref_base = BASE_INDEX.get(ref[0])
    for alt in alleles:
        kind = allele_type(ref, alt)
        record_type |= kind
        if kind == VCF_SNP and ref_base is not None:
            alt_base = BASE_INDEX.get(alt[0])
            if alt_base is not None and alt_base != ref_base:
                if abs(ref_base - alt_base) == 2:  # A<->G, C<->T
                    ts += 1
                else:
                    tv += 1
    kinds = tuple(name for name, bit in VARIANT_KINDS if record_type & bit)
    multiallelic = len(alleles) > 1
    return kinds, record_type == 0, multiallelic, multiallelic and record_type == VCF_SNP, ts, tv


class BoundedCounter:
    """A Counter of names that keeps at most `limit` of them; the rest are added up as one."""

    def __init__(self, limit):
        self.limit = limit
        self.counts = {}
        self.overflow = 0

    def update(self, counter):
        """Add a block's counts."""
        for name, count in counter.items():
            if name in self.counts:
                self.counts[name] += count
            elif len(self.counts) < self.limit:
                self.counts[name] = count
            else:
                self.overflow += count

    def as_dict(self):
        """Return the counts by name (decoded), with the overflow under '(other)'."""
        result = {name.decode("utf-8", "replace"): count for name, count in self.counts.items()}
        if self.overflow:
            result["(other)"] = self.overflow
        return result


class VcfAnalyzer(LineAnalyzer):
    """VCF: samples, records per chromosome, variant kinds, Ts/Tv, filters, malformed lines.

    A regular expression picks CHROM, REF, ALT and FILTER out of a whole block in C; the
    per-record work is counting, and alleles are classified once per distinct REF/ALT pair.
    """

    def __init__(self):
        super().__init__()
        self.samples = 0
        self.header_seen = False
        self.records = 0
        self.kinds = dict.fromkeys((name for name, _ in VARIANT_KINDS), 0)
        self.no_alt = self.multiallelic = self.multiallelic_snv = self.ts = self.tv = 0
        self.chromosomes = BoundedCounter(MAX_NAMES)
        self.filters = BoundedCounter(MAX_NAMES)
        self.classified = {}
        self.problems = FirstProblem()

    def feed_lines(self, data):
        first_line = self.newlines + 1
        lines = data.count(b"\n")
        self.newlines += lines
        if not self.header_seen and b"#CHROM" in data:
            self.samples = vcf_sample_count(data)
            self.header_seen = True
        found = VCF_RECORD.findall(data)
        if len(found) != lines:
            # Only a block with headers, blank lines or broken lines pays for these two passes.
            headers = data.count(b"\n#") + data.startswith(b"#")
            blanks = data.count(b"\n\n") + data.startswith(b"\n")
            if len(found) != lines - headers - blanks:
                self._find_malformed(data, first_line)
        self.records += len(found)
        # One C-level count of whole records, then Python work per distinct record only:
        # sorted calls repeat CHROM and FILTER, and the common REF/ALT pairs are remembered.
        chromosomes, filters, tally = {}, {}, {}
        classified = self.classified
        for (chromosome, ref, alt, status), count in collections.Counter(found).items():
            chromosomes[chromosome] = chromosomes.get(chromosome, 0) + count
            filters[status] = filters.get(status, 0) + count
            known = classified.get((ref, alt)) or self._classify(ref, alt)
            tally[known] = tally.get(known, 0) + count
        self.chromosomes.update(chromosomes)
        self.filters.update(filters)
        for (kinds, no_alt, multiallelic, multiallelic_snv, ts, tv), count in tally.items():
            for kind in kinds:
                self.kinds[kind] += count
            self.no_alt += no_alt * count
            self.multiallelic += multiallelic * count
            self.multiallelic_snv += multiallelic_snv * count
            self.ts += ts * count
            self.tv += tv * count

    def _classify(self, ref, alt):
        known = classify_record(ref, alt)
        if len(ref) + len(alt) <= 6:
            # Only short pairs repeat often enough to be worth remembering; bounded anyway.
            if len(self.classified) >= MAX_NAMES:
                self.classified.clear()
            self.classified[ref, alt] = known
        return known

    def _find_malformed(self, data, first_line):
        # Matched where each line starts, not on copies: a line may be 16 MiB long.
        start, number, match = 0, first_line, VCF_RECORD.match
        while start < len(data):
            end = data.index(b"\n", start)
            if end > start and data[start] != 35 and not match(data, start):  # 35: '#'
                self.problems.add(number, vcf_line_problem(data, start, end))
            start, number = end + 1, number + 1

    def summary(self):
        filters = self.filters.as_dict()
        passed, missing = filters.get("PASS", 0), filters.get(".", 0)
        return {
            "samples": self.samples,
            "records": self.records,
            "records_per_chromosome": self.chromosomes.as_dict(),
            **self.kinds,
            "no_alt": self.no_alt,
            "multiallelic_sites": self.multiallelic,
            "multiallelic_snv_sites": self.multiallelic_snv,
            "transitions": self.ts,
            "transversions": self.tv,
            "ts_tv_ratio": round(self.ts / self.tv, 3) if self.tv else None,
            "pass": passed,
            "filtered": self.records - passed - missing,
            "filter_missing": missing,
            "filters": filters,
            **self.problems.fields("records"),
        }


def vcf_sample_count(data):
    """Return the number of sample columns named on the #CHROM line in data."""
    start = data.find(b"#CHROM")
    line = data[start:data.find(b"\n", start)].rstrip(b"\r")
    return max(0, len(line.split(b"\t")) - 9)


def vcf_line_problem(data, start, end):
    """Return why the VCF data line data[start:end] is not a record (without copying it)."""
    columns = data.count(b"\t", start, end) + 1
    if columns < 8:
        return f"{columns} tab-separated columns, a record has at least 8"
    position = data.index(b"\t", start) + 1
    if not data[position:data.index(b"\t", position)].isdigit():
        return "POS is not a whole number"
    return "REF or ALT is empty"


# Value types as DuckDB's sniffer gives them (checked with DuckDB 2.0.1's sniff_csv): an
# optional minus, ASCII digits only (not 1_000, +1 or Arabic-Indic digits), spaces around
# allowed; a code with a leading zero (01, 007, 00.5) is text; nan and inf are doubles.
INTEGER = re.compile(r"\s*-?[0-9]+\s*", re.ASCII)
FLOAT = re.compile(r"\s*-?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)\s*",
                   re.ASCII | re.IGNORECASE)
ZERO_PADDED = re.compile(r"\s*0[0-9]", re.ASCII)
DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?", re.ASCII)
BOOLEANS = {"true", "false", "t", "f", "yes", "no"}  # DuckDB's BOOLEAN spellings, any case
TRUTHS = {"true", "t", "yes"}
NUMERIC_KINDS = ("integer", "float")
SCALE_BITS = 480   # numbers past 2**480 are summed in units of a power of two: squares stay finite


def infer_kind(values, previous=None):
    """Return the narrowest kind holding every (non-empty) value: integer, float, boolean, date or string.

    `previous` is the column's kind so far: kinds it has already outgrown are not tried again.
    """
    if previous in (None, "integer", "float") and not zero_padded(values):
        if previous != "float" and all_integers(values):
            return "integer"
        if all(map(FLOAT.fullmatch, values)):
            return "float"
    if previous in (None, "boolean") and {value.lower() for value in values} <= BOOLEANS:
        return "boolean"
    if previous in (None, "date") and all(map(DATE.fullmatch, values)):
        return "date"
    return "string"


def all_integers(values):
    """True when every value is a whole number in ASCII digits, with an optional minus sign."""
    joined = "".join(values)
    if joined.isascii() and joined.isdigit():
        return True  # one C-level test for the usual unsigned case
    return all(map(INTEGER.fullmatch, values))


def zero_padded(values):
    """True when a value is a zero-padded code (01, 007, 00.5): DuckDB types such a column VARCHAR."""
    joined = "\n".join(values)
    if not (joined.startswith("0") or "\n0" in joined or " 0" in joined):
        return False  # one C-level scan: most numbers start with another digit
    return any(map(ZERO_PADDED.match, values))


def fits_kind(value, kind):
    """True when DuckDB could cast a value to a column of this kind (a header test: 01 fits integers)."""
    if kind == "integer":
        return bool(INTEGER.fullmatch(value))
    if kind == "float":
        return bool(FLOAT.fullmatch(value))
    if kind == "boolean":
        return value.lower() in BOOLEANS
    if kind == "date":
        return bool(DATE.fullmatch(value))
    return True


def merge_kinds(old, new):
    """Return the kind of a column that held values of kinds old and new."""
    if old is None or old == new:
        return new
    if {old, new} == {"integer", "float"}:
        return "float"
    return "string"


class DistinctCounter:
    """Distinct values: exact up to a bound, then a K-minimum-values estimate.

    The estimate keeps the K smallest CRC-32s of the values (CRC-32 because zlib computes
    it in C for a whole block's values at once; 32 bits keep collisions under 1 % up to
    some 10^8 distinct values). With K = 1024 the relative standard error is about 3 %.
    """

    K = 1024

    def __init__(self, exact_limit, char_limit=EXACT_DISTINCT_CHARS):
        self.exact_limit = exact_limit
        self.char_limit = char_limit
        self.values = set()
        self.chars = 0       # characters held in values: long values reach the bound sooner
        self.sketch = None   # sorted list of the K smallest hashes once past the bound

    def add(self, values):
        """Add a set of values."""
        if self.sketch is None:
            new = values - self.values
            if not new:
                return
            self.values |= new
            self.chars += sum(map(len, new))
            if len(self.values) <= self.exact_limit and self.chars <= self.char_limit:
                return
            values, self.values, self.sketch = self.values, set(), []
        hashes = value_hashes(values)
        if len(self.sketch) >= self.K:
            hashes = filter(self.sketch[-1].__gt__, hashes)  # most hashes cannot enter the sketch
        self.sketch = sorted(set(self.sketch).union(hashes))[:self.K]

    def fields(self):
        """Return the distinct count and whether it is exact."""
        if self.sketch is None:
            return {"distinct": len(self.values), "distinct_exact": True}
        if len(self.sketch) < self.K:
            return {"distinct": len(self.sketch), "distinct_exact": False}
        return {"distinct": round((self.K - 1) * (1 << 32) / (self.sketch[-1] + 1)), "distinct_exact": False}


def value_hashes(values):
    """Return the set of CRC-32s of strings, the same in every process."""
    blob = "\x00".join(values).encode("utf-8", "surrogatepass")
    encoded = blob.split(b"\x00")
    if len(encoded) != len(values):  # a value held a NUL: encode one by one
        encoded = [value.encode("utf-8", "surrogatepass") for value in values]
    return set(map(zlib.crc32, encoded))


class IntegerMoments:
    """Count, sum and sum of squares of a column's integers: exact, as Python integers never round."""

    def __init__(self):
        self.count = self.total = self.squares = 0

    def add(self, numbers):
        """Add a list of ints."""
        self.count += len(numbers)
        self.total += sum(numbers)
        self.squares += sum(map(operator.mul, numbers, numbers))

    def fields(self):
        """Return the mean and sample standard deviation (None past a float or for one number)."""
        try:
            mean = self.total / self.count
        except OverflowError:
            mean = None
        std = None
        if self.count > 1:
            std = sqrt_ratio(self.count * self.squares - self.total * self.total, self.count * (self.count - 1))
        return {"mean": mean, "std": std}


class FloatMoments:
    """Count, mean and sum of squared deviations of a column's finite floats.

    Each block's sums are taken around its own mean and merged by Chan et al.'s formula, so a
    column of large, close numbers keeps its deviation. Past 2**480 the numbers are summed in
    units of 2**exponent (scaling by a power of two loses no digit): 1e308 + 1e308 and
    (1e200)**2 stay finite.
    """

    def __init__(self):
        self.count = 0
        self.mean = self.m2 = 0.0   # in units of 2**exponent (of its square for m2)
        self.exponent = 0

    @classmethod
    def from_integers(cls, sums, largest):
        """Return the moments of the integers summed so far in `sums`, whose largest magnitude is `largest`."""
        moments = cls()
        moments.count = sums.count
        if sums.count:
            moments.exponent = max(0, largest.bit_length() - SCALE_BITS)
            moments.mean = sums.total / (sums.count << moments.exponent)
            spread = sums.count * sums.squares - sums.total * sums.total
            moments.m2 = spread / (sums.count << 2 * moments.exponent)
        return moments

    def add(self, numbers, largest):
        """Add a list of finite floats whose largest magnitude is `largest`."""
        exponent = max(self.exponent, math.frexp(largest)[1] - SCALE_BITS)
        if exponent > self.exponent:
            self.mean = math.ldexp(self.mean, self.exponent - exponent)
            self.m2 = math.ldexp(self.m2, 2 * (self.exponent - exponent))
            self.exponent = exponent
        if self.exponent:
            numbers = [math.ldexp(number, -self.exponent) for number in numbers]
        count = len(numbers)
        mean = math.fsum(numbers) / count
        deviations = list(map(operator.sub, numbers, itertools.repeat(mean, count)))
        m2 = math.fsum(map(operator.mul, deviations, deviations))
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * (self.count * count / total)
        self.mean += delta * count / total
        self.count = total

    def fields(self):
        """Return the mean and sample standard deviation (None past a float or for one number)."""
        try:
            mean = math.ldexp(self.mean, self.exponent) if self.count else None
        except OverflowError:
            mean = None
        std = None
        if self.count > 1:
            try:
                std = math.ldexp(math.sqrt(self.m2 / (self.count - 1)), self.exponent)
            except OverflowError:
                pass
        return {"mean": mean, "std": std}


def sqrt_ratio(numerator, denominator):
    """Return sqrt(numerator / denominator) of non-negative integers, or None past the float limit."""
    try:
        return math.sqrt(numerator / denominator)
    except OverflowError:
        shift = (numerator.bit_length() - denominator.bit_length() - 1000) & ~1  # even: halved exactly
        try:
            return math.ldexp(math.sqrt((numerator >> shift) / denominator), shift // 2)
        except OverflowError:
            return None


def finite_float(number):
    """Return a number as a finite float, or None (JSON has no NaN or Infinity)."""
    try:
        number = float(number)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


class ColumnProfile:
    """One column: kind, empties, distinct values, min/max, and mean and deviation of numbers."""

    def __init__(self, name, exact_limit, char_limit=EXACT_DISTINCT_CHARS):
        self.name = name
        self.kind = None
        self.empty = 0
        self.distinct = DistinctCounter(exact_limit, char_limit)
        self.low = self.high = None
        self.moments = None
        self.non_finite = 0   # nan, inf and numbers past the float limit (1e309): in no sum

    def add(self, values):
        """Add one block's values of this column."""
        present = set(values)
        if "" in present:
            self.empty += values.count("")  # only counted where there is one: most columns have none
            present.discard("")
        if not present:
            return
        self.distinct.add(present)
        previous = self.kind
        if previous != "string":
            self.kind = merge_kinds(previous, infer_kind(present, previous))
        if self.kind == "integer":
            self._add_integers(list(map(int, filter(None, values))))
        elif self.kind == "float":
            if previous == "integer":
                self.moments = FloatMoments.from_integers(self.moments, max(-self.low, self.high))
                self.low, self.high = finite_float(self.low), finite_float(self.high)
            self._add_floats(list(map(float, filter(None, values))))
        else:
            self._add_bounds(present, previous)

    def _add_integers(self, numbers):
        if self.moments is None:
            self.moments = IntegerMoments()
        self.moments.add(numbers)
        low, high = min(numbers), max(numbers)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def _add_floats(self, numbers):
        if self.moments is None:
            self.moments = FloatMoments()
        if not math.isfinite(sum(numbers)):  # a nan or inf, or a sum past the float limit
            finite = list(filter(math.isfinite, numbers))
            self.non_finite += len(numbers) - len(finite)
            numbers = finite
            if not numbers:
                return
        low, high = min(numbers), max(numbers)
        self.moments.add(numbers, max(-low, high))
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def _add_bounds(self, present, previous):
        if previous in NUMERIC_KINDS:
            # Numbers seen so far turn into text: min/max must now compare as text. The exact
            # distinct values hold every spelling seen; past their bound, the numbers' own do.
            if self.distinct.sketch is None:
                present = self.distinct.values
                self.low = self.high = None
            else:
                self.low, self.high = ("" if self.low is None else format_number(self.low),
                                       "" if self.high is None else format_number(self.high))
        low, high = min(present), max(present)
        self.low = low if self.low is None or self.low == "" else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def fields(self):
        """Return the column's profile."""
        profile = {"name": self.name, "type": self.kind or "empty", "empty": self.empty, **self.distinct.fields()}
        if self.kind == "integer":
            profile.update(min=self.low, max=self.high, **self.moments.fields())
        elif self.kind == "float":
            profile.update(min=finite_float(self.low) if self.low is not None else None,
                           max=finite_float(self.high) if self.high is not None else None,
                           **self.moments.fields(), non_finite=self.non_finite)
        elif self.kind == "boolean":
            # TRUE, true and yes are one value, as in a database's BOOLEAN column.
            truths = {value.lower() in TRUTHS for value in self.distinct.values}
            profile.update(distinct=len(truths), min=str(min(truths)).lower(), max=str(max(truths)).lower())
        else:
            profile.update(min=clip(self.low), max=clip(self.high))
        return profile


def format_number(value):
    """Return a number as the text a table would hold (integers without '.0')."""
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if value.is_integer() else repr(value)


def clip(text, limit=200):
    """Return text cut to `limit` characters for the report."""
    return text if text is None or len(text) <= limit else text[:limit] + "…"


MAX_RECORD_BYTES = 2_000_000   # DuckDB's max_line_size: a longer record (quoted newlines too) is broken
TABLE_SLICE = 1 << 19          # records are parsed at most this many bytes at a time: memory stays flat
OPEN_QUOTE_MARK = "\ufdd0"     # a noncharacter, in no table: parsed after a block to see if a quote is open
LONE_CR = re.compile(rb"\r(?!\n)")
STRAY_BYTES = re.compile("[\udc80-\udcff]")
STRAY_BYTE_TEXT = {0xDC00 + value: bytes([value]).decode("cp1252", "ignore") or chr(value)
                   for value in range(0x80, 0x100)}


def decode_text(data, encoding):
    """Return (text, how many bytes were not valid in `encoding`).

    Such bytes are read as cp1252 (latin-1 where cp1252 has no character): in a UTF-8 file a
    stray byte is most often a Windows é or €, and the rest of the file still reads.
    """
    try:
        return data.decode(encoding), 0
    except UnicodeDecodeError:
        text = data.decode(encoding, "surrogateescape")
        return text.translate(STRAY_BYTE_TEXT), len(STRAY_BYTES.findall(text))


def csv_options(delimiter, quote, escape):
    """Return csv.reader keyword arguments for a dialect; quote None reads quotes as text."""
    if quote is None:
        return {"delimiter": delimiter, "quoting": csv.QUOTE_NONE}
    return {"delimiter": delimiter, "quotechar": quote, "doublequote": True,
            "escapechar": escape if escape != quote else None}


def column_names(first, header):
    """Return DuckDB's column names: the header's, trimmed, empty ones named and repeats numbered
    (a, a_1, a_2); without a header column0, column1, ... zero-padded to the same width."""
    width = len(str(max(len(first) - 1, 0)))
    generated = [f"column{index:0{width}d}" for index in range(len(first))]
    if not header:
        return generated
    names, seen = [], {}
    for index, name in enumerate(first):
        name = name.strip(UNICODE_SPACES) or generated[index]
        while name.lower() in seen:
            seen[name.lower()] += 1
            name = f"{name}_{seen[name.lower()]}"
        seen[name.lower()] = 0
        names.append(name)
    return names


UNICODE_SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"


def numbered_rows(text, options, first_line, problems):
    """Return [(line, record)] for the non-empty records of text, `line` being where each starts.

    A record the csv module rejects is counted in `problems`. An OPEN_QUOTE_MARK line is read
    after the text: the last pair is ([OPEN_QUOTE_MARK]) when every quoted field closed, else the
    record whose quoted field the text never closes.
    """
    reader = csv.reader(io.StringIO(text + OPEN_QUOTE_MARK + "\n", newline=""), **options)
    rows = []
    start = first_line
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            problems.add(start, f"unreadable row: {err}")
            start = first_line + reader.line_num
            continue
        if row:
            rows.append((start, row))
        start = first_line + reader.line_num


def line_start(data, lines):
    """Return the offset in data where its line number `lines` (0-based) starts."""
    offset = 0
    for _ in range(lines):
        offset = data.index(b"\n", offset) + 1
    return offset


class TableAnalyzer(LineAnalyzer):
    """CSV/TSV: dialect, header, rows, columns, and a profile of every column.

    Line ends (\\n, \\r\\n, a lone \\r) become \\n first; a record is cut where the quotes before it
    pair up. A record past MAX_RECORD_BYTES is broken (an unclosed quote, or one endless line):
    it is reported at the line where it starts and reading resumes on the next line, so memory
    stays bounded and the rows after it still count.
    """

    def __init__(self, dialect):
        super().__init__()
        csv.field_size_limit(max(csv.field_size_limit(), 4 * MAX_RECORD_BYTES))
        self.dialect = dialect
        self.options = csv_options(dialect.delimiter, dialect.quote, dialect.escape)
        self.to_skip = dialect.skip_rows
        self.header = None
        self.rows = 0
        self.columns = None
        self.profiles = []
        self.problems = FirstProblem()
        self.line = 0              # lines read so far, as an editor numbers them (malformed rows' lines)
        self.encoding_errors = 0
        self._cr = False           # the last block ended in \r: the next may start with its \n
        self._skipping = False     # inside a line longer than MAX_RECORD_BYTES: drop up to its end
        self._first = True

    def feed(self, block):
        """Feed a block of content; whole records go to the analysis, the rest waits."""
        self.newlines += block.count(b"\n")
        if self._first and self.dialect.encoding == "utf-8" and block.startswith(UTF8_BOM):
            block = block[len(UTF8_BOM):]
        self._first = False
        if self._cr:
            block = b"\r" + block
        self._cr = block.endswith(b"\r")
        if self._cr:
            block = block[:-1]  # a \r at the end: the next block says whether a \n follows it
        if b"\r" in block and block.count(b"\r") != block.count(b"\r\n"):
            # A lone \r ends a line (classic Mac, or mixed endings); \r\n stays, as in a quoted field.
            block = LONE_CR.sub(b"\n", block)
        self._partial = self._take(self._partial + block if self._partial else block, at_end=False)

    def finish(self):
        """Read the last record (a final line need not end in a newline) and return the summary."""
        data = self._partial + (b"\n" if self._cr else b"")
        self._partial, self._cr = b"", False
        if data:
            self._take(data, at_end=True)
        return self.summary()

    def _take(self, data, at_end):
        """Analyse the whole records at the start of data; return the bytes of an unfinished one."""
        while data:
            if self._skipping:
                end = data.find(b"\n")
                if end < 0:
                    return b""
                self.line += 1
                self._skipping, data = False, data[end + 1:]
                continue
            end = self._record_end(data, at_end)
            if not end and not at_end and len(data) <= MAX_RECORD_BYTES:
                return data  # one record, still open: wait for the rest
            line_end = data.find(b"\n") + 1
            if (line_end or len(data)) > MAX_RECORD_BYTES:
                self.problems.add(self.line + 1, f"a line longer than {MAX_RECORD_BYTES:,} bytes "
                                  "(DuckDB's max_line_size); skipped to its end")
                self.line += bool(line_end)
                self._skipping = not line_end and not at_end
                data = data[line_end:] if line_end else b""
                continue
            if not end or end > MAX_RECORD_BYTES:
                # By the quotes' count the first record never ends, or ends too far: let the parser
                # say where its quoted field opens (in the first slice: memory stays bounded).
                end = data.rfind(b"\n", 0, TABLE_SLICE) + 1 or line_end or len(data)
            opened = self._records(data[:end])
            if opened is None:
                data = data[end:]
                continue
            data = data[opened:]  # a record whose quoted field is still open where the slice ends
            if opened:
                continue
            if not at_end and len(data) <= MAX_RECORD_BYTES:
                return data
            end = self._long_record_end(data, at_end)
            if end:
                self._records(data[:end])  # one long record, whole after all
                data = data[end:]
                continue
            self.line += 1
            if at_end:
                reason = "a quoted field opens on this line and the file ends before it closes"
            else:
                reason = f"a quoted field opens on this line and does not close within {MAX_RECORD_BYTES:,} bytes"
            self.problems.add(self.line, reason + "; the lines after it are read as rows")
            end = data.find(b"\n")
            data = data[end + 1:] if end >= 0 else b""
        return b""

    def _long_record_end(self, data, at_end):
        """Return where data's first record ends by the csv module's reading, 0 when its quoted
        field is still open at the end of the file or MAX_RECORD_BYTES on."""
        window = data[:MAX_RECORD_BYTES]
        if not at_end or len(data) > MAX_RECORD_BYTES:
            window = window[:window.rfind(b"\n") + 1]
        text = decode_text(window, self.dialect.encoding)[0]
        text += ("" if text.endswith("\n") else "\n") + OPEN_QUOTE_MARK + "\n"
        reader = csv.reader(io.StringIO(text, newline=""), **self.options)
        try:
            row = next(filter(None, reader))
        except csv.Error:
            return 0
        if any(OPEN_QUOTE_MARK in field for field in row):
            return 0
        if reader.line_num > window.count(b"\n"):
            return len(window)  # the last line of the file, without its newline
        return line_start(data, reader.line_num)

    def _record_end(self, data, at_end):
        """Return where data's first records end, taking at most TABLE_SLICE bytes if a record ends
        there (memory stays bounded), else the first record longer than that; 0 when none ends.

        A line end ends a record when the quotes before it pair up (RFC 4180 doubles a quote
        inside a field, so a whole record holds an even number). At the end of the file the end
        of data is a line end too.
        """
        limit = min(len(data), TABLE_SLICE)
        end = data.rfind(b"\n", 0, limit) + 1
        if self.dialect.quote is None:
            end = end or data.find(b"\n", limit) + 1
            return end or (len(data) if at_end else 0)
        quotes = self._quotes(data, 0, end)
        while quotes % 2 and end:
            # An odd number of quotes before this line end: it is inside a quoted field. Step
            # back to the start of the line holding the last quote before it.
            previous = data.rfind(b"\n", 0, data.rfind(b'"', 0, end)) + 1
            quotes -= self._quotes(data, previous, end)
            end = previous
        if end:
            return end
        # No record ends in the first slice: walk on from quote to quote to the first that does.
        quotes, position = self._quotes(data, 0, limit), limit
        while True:
            quote = self._next_quote(data, position)
            if quotes % 2 == 0:
                newline = data.find(b"\n", position, len(data) if quote < 0 else quote)
                if newline >= 0:
                    return newline + 1
            if quote < 0:
                return len(data) if at_end and quotes % 2 == 0 else 0
            quotes, position = quotes + 1, quote + 1

    def _quotes(self, data, start, end):
        count = data.count(b'"', start, end)
        return count - data.count(b'\\"', start, end) if self.dialect.escape == "\\" else count

    def _next_quote(self, data, position):
        quote = data.find(b'"', position)
        while quote > 0 and self.dialect.escape == "\\" and data[quote - 1:quote] == b"\\":
            quote = data.find(b'"', quote + 1)
        return quote

    def _records(self, data):
        """Analyse the records in data (whole lines; the last may lack its newline at the end of
        the file). Return None, or the offset of a record whose quoted field data never closes;
        self.line then counts the lines before it."""
        text, errors = decode_text(data, self.dialect.encoding)
        self.encoding_errors += errors
        first_line = self.line + 1
        if self.dialect.quote is None or '"' not in text:
            # Without quotes a record is its line split at the delimiter: str.split beats the csv module.
            split = (text.replace("\r\n", "\n") if "\r" in text else text).split("\n")
            if text.endswith("\n"):
                split.pop()
            rows = list(map(operator.methodcaller("split", self.dialect.delimiter), filter(None, split)))
            self._add(rows, lambda: [(first_line + index, line.split(self.dialect.delimiter))
                                     for index, line in enumerate(split) if line])
            self.line += len(split)
            return None
        text = text if text.endswith("\n") else text + "\n"
        lines = text.count("\n")
        try:
            rows = [row for row in csv.reader(io.StringIO(text + OPEN_QUOTE_MARK + "\n", newline=""),
                                              **self.options) if row]
        except csv.Error:
            rows = None
        if rows and rows[-1] == [OPEN_QUOTE_MARK]:
            rows.pop()
            self._add(rows, lambda: numbered_rows(text, self.options, first_line, FirstProblem())[:-1])
            self.line += lines
            return None
        numbered = numbered_rows(text, self.options, first_line, self.problems)
        opened_line, last = numbered.pop()
        self._add([row for _, row in numbered], lambda: numbered)
        if last == [OPEN_QUOTE_MARK]:
            self.line += lines
            return None
        self.line = opened_line - 1
        offset = line_start(data, opened_line - first_line)
        if errors:
            self.encoding_errors -= decode_text(data[offset:], self.dialect.encoding)[1]  # read again later
        return offset

    def _add(self, rows, numbered):
        """Add a block's records; `numbered()` gives them with their lines, to name a ragged one."""
        consumed = self._begin(rows) if self.columns is None else 0
        if consumed:
            rows = rows[consumed:]
        if not rows:
            return
        if set(map(len, rows)) != {self.columns}:
            rows = self._drop_ragged(numbered()[consumed:])
        self.rows += len(rows)
        for profile, values in zip(self.profiles, zip(*rows)):
            profile.add(values)

    def _begin(self, rows):
        """Skip the title rows and take the header from the first rows; return how many were used."""
        skip = min(self.to_skip, len(rows))
        self.to_skip -= skip
        if skip == len(rows):
            return skip
        first = rows[skip]
        self.columns = len(first)
        self.header = column_names(first, self.dialect.header)
        profiled = self.header[:MAX_PROFILED_COLUMNS]
        limit = max(MIN_EXACT_DISTINCT, min(MAX_EXACT_DISTINCT, EXACT_DISTINCT_BUDGET // max(len(profiled), 1)))
        chars = EXACT_DISTINCT_CHARS // max(len(profiled), 1)
        self.profiles = [ColumnProfile(name, limit, chars) for name in profiled]
        return skip + int(self.dialect.header)

    def _drop_ragged(self, numbered):
        """Return the rows of the header's width; count the others with their line numbers."""
        kept = []
        for line, row in numbered:
            if len(row) == self.columns:
                kept.append(row)
            else:
                self.problems.add(line, f"{len(row)} fields where the header has {self.columns}")
        return kept

    def summary(self):
        return {
            "delimiter": self.dialect.delimiter,
            "quote": self.dialect.quote,
            "escape": self.dialect.escape,
            "encoding": self.dialect.encoding,
            "encoding_errors": self.encoding_errors,
            "skip_rows": self.dialect.skip_rows - self.to_skip,
            "header_detected": self.dialect.header,
            "header": self.header or [],
            "rows": self.rows,
            "rows_include_malformed": False,
            "columns": self.columns or 0,
            "ragged_rows": self.problems.count > 0,
            "column_profiles": [profile.fields() for profile in self.profiles],
            "columns_profiled": len(self.profiles),
            **self.problems.fields("rows"),
        }


def make_analyzer(fmt, sample=b"", name="", whole=False):
    """Return the analyser for a detected format, set up from the content's first bytes."""
    if fmt in ("csv", "tsv"):
        dialect = sniff_table(sample[:SNIFF_SIZE], name, whole, table_named=True)
        return TableAnalyzer(dialect)
    if fmt == "fastq":
        return FastqAnalyzer()
    if fmt == "vcf":
        return VcfAnalyzer()
    if fmt in ("text", "fasta"):
        return TextAnalyzer(fmt)
    if fmt == "binary":
        return BinaryAnalyzer()
    return LineAnalyzer()


# --- the streaming pass -------------------------------------------------------------


class GzipStream:
    """Incremental gzip decoder that also reads multi-member (bgzip) files, in bounded pieces."""

    def __init__(self):
        self._decoder = zlib.decompressobj(wbits=31)
        self.members = 1

    def feed(self, data, offset):
        """Yield the content decompressed from `data`, which starts at byte `offset`, in pieces."""
        while True:
            try:
                # max_length bounds memory: a small compressed chunk can inflate a thousandfold.
                out = self._decoder.decompress(data, PIECE_SIZE)
            except zlib.error as err:
                raise AnalysisError(f"corrupt gzip data near byte {offset}: {err}") from None
            if out:
                yield out
            if self._decoder.eof:
                data = self._decoder.unused_data
                if not data:
                    return
                self._decoder = zlib.decompressobj(wbits=31)
                self.members += 1
                continue
            data = self._decoder.unconsumed_tail
            if not data and len(out) < PIECE_SIZE:
                return

    def finish(self, total):
        """Raise if the stream ended inside a gzip member."""
        if not self._decoder.eof:
            raise AnalysisError(f"truncated gzip: the stream ends at byte {total} inside a member")


class Progress:
    """Logs bytes done and rate every few seconds."""

    def __init__(self, total=None, every=None):
        self.total = total
        self.every = PROGRESS_SECONDS if every is None else every
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


class _Reader(threading.Thread):
    """Reads, hashes and decompresses the raw chunks in a second thread.

    sha256 and zlib release the GIL on large buffers, so on two cores this work runs
    beside the analysis instead of before it. The queue is bounded: memory stays flat.
    """

    def __init__(self, chunks):
        super().__init__(name="awsfun-reader", daemon=True)
        self.chunks = chunks
        self.queue = queue.Queue(maxsize=QUEUE_PIECES)
        self.stop = threading.Event()
        self.sha = hashlib.sha256()
        self.gz = None

    def run(self):
        size = 0
        try:
            for chunk in self.chunks:
                if self.stop.is_set():
                    return
                if not chunk:
                    continue
                if size == 0 and chunk[:2] == GZIP_MAGIC:
                    self.gz = GzipStream()
                self.sha.update(chunk)
                offset, size = size, size + len(chunk)
                for piece in (self.gz.feed(chunk, offset) if self.gz else (chunk,)):
                    self._put(("data", size, piece))
            if self.gz and size:
                self.gz.finish(size)
            self._put(("end", size, None))
        except Exception as err:  # noqa: BLE001 - handed to the analysing thread, which raises it
            self._put(("error", size, err))

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def items(self):
        """Yield (raw bytes so far, content piece) until the end; raise what the reader raised."""
        while True:
            kind, size, value = self.queue.get()
            if kind == "error":
                raise value
            if kind == "end":
                self.size = size
                return
            yield size, value


def analyse_stream(chunks, total=None, name=""):
    """Analyse an iterable of raw byte chunks in one pass; return the report's content fields.

    `name` (a key or path) only helps tell a one-column .csv from plain text.
    """
    reader = _Reader(chunks)
    progress = Progress(total)
    analyzer = fmt = None
    sniff = []
    sniffed = content_bytes = 0
    last_byte = b"\n"
    reader.start()
    try:
        for size, piece in reader.items():
            progress.update(size)
            content_bytes += len(piece)
            last_byte = piece[-1:]
            if analyzer is None:
                sniff.append(piece)
                sniffed += len(piece)
                if sniffed < SNIFF_SIZE:
                    continue
                piece = b"".join(sniff)
                analyzer, fmt = _start(piece, name)
            analyzer.feed(piece)
    finally:
        reader.stop.set()
        reader.join()
    if reader.size == 0:
        raise AnalysisError("the object is empty (0 bytes): nothing to analyse; was the upload cut short?")
    if analyzer is None:
        sample = b"".join(sniff)
        analyzer, fmt = _start(sample, name, whole=True)
        analyzer.feed(sample)
    summary = analyzer.finish()
    lines = analyzer.newlines + (last_byte != b"\n")
    seconds = max(time.monotonic() - progress.start, 1e-9)
    logger.info("analysed %.1f MB (%s) in %.1f s (%.1f MB/s)", reader.size / 1e6, fmt, seconds,
                reader.size / seconds / 1e6)
    return {
        "bytes": reader.size,
        "content_bytes": content_bytes,
        "lines": lines,
        "sha256": reader.sha.hexdigest(),
        "format": fmt,
        "compression": "gzip" if reader.gz else None,
        "gzip_members": reader.gz.members if reader.gz else None,
        "summary": summary,
    }


def _start(sample, name="", whole=False):
    fmt = sniff_format(sample[:SNIFF_SIZE], name, whole)
    return make_analyzer(fmt, sample, name, whole), fmt


def analyse_file(path):
    """Return the report for a local file; touches no AWS service."""
    def chunks():
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK_SIZE):
                yield block

    started = time.time()
    size = os.path.getsize(path)
    report = {"input": {"path": path, "size": size}, "status": "ok"}
    report.update(analyse_stream(chunks(), total=size, name=path))
    report["worker"] = worker_info(started, report["bytes"])
    return report


def worker_info(started, nbytes):
    """Return who produced a report and how fast, on which Python (and boto3, if loaded)."""
    seconds = max(time.time() - started, 1e-9)
    info = {
        "version": __version__,
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 1),
        "python": "%d.%d.%d" % sys.version_info[:3],
    }
    for package in ("boto3", "botocore"):
        if package in sys.modules:
            info[package] = getattr(sys.modules[package], "__version__", None)
    return info


# --- S3 ------------------------------------------------------------------------------


def s3_endpoint_url(environ=None):
    """Return the S3 endpoint named by AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, or None.

    botocore reads these variables itself only from 1.31.0 on, and not at all under
    AWS_IGNORE_CONFIGURED_ENDPOINT_URLS; an older boto3 on the machine would send every request
    to AWS. Same precedence as botocore's (the service's own first):
    https://docs.aws.amazon.com/sdkref/latest/guide/feature-ss-endpoints.html
    """
    environ = os.environ if environ is None else environ
    return environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None


def make_s3_client():
    """Create the S3 client with botocore's standard retry mode, at s3_endpoint_url() if set."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=s3_endpoint_url(),
                        config=Config(retries={"mode": "standard", "max_attempts": 8}))


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
    """Write a report next to its input under analysis/, then its receipt; return the report's key."""
    target = report_key(key, suffix)
    input_etag = report["input"].get("etag") or ""
    written = s3.put_object(
        Bucket=bucket,
        Key=target,
        Body=json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"),
        ContentType="application/json",
        Metadata={"input-etag": input_etag},
    )
    write_receipt(s3, bucket, target, (written.get("ETag") or "").strip('"'), input_etag)
    return target


def write_receipt(s3, bucket, target, report_etag, input_etag):
    """Write report `target`'s receipt (receipt_body); True if written.

    Only a shortcut for status and reconcile, which read the report itself where its
    receipt is missing or does not match, so a failure here leaves the job's outcome alone.
    """
    if not report_etag:
        return False
    try:
        s3.put_object(Bucket=bucket, Key=receipt_key(target), ContentType="application/json",
                      Body=receipt_body(target, report_etag, input_etag))
    except Exception as err:  # noqa: BLE001 - the report is written; the receipt is optional
        code, message = _error_code(err)
        logger.warning("cannot write the receipt of %s: %s %s", target, code, message)
        return False
    return True


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
        report.update(analyse_stream(chunks, total=head["ContentLength"], name=key))
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


def work_root(environ=None):
    """Return the directory the worker's large files go under: TMPDIR if set, else /var/tmp.

    On Amazon Linux 2023 /tmp is a tmpfs (RAM, half of memory by default), so a 1 GB input
    copied there fails or is OOM-killed on a small instance; /var/tmp is on the root volume
    (https://docs.aws.amazon.com/linux/al2023/ug/filesystem-slash-tmp.html).
    """
    environ = os.environ if environ is None else environ
    if environ.get("TMPDIR"):
        return environ["TMPDIR"]
    return "/var/tmp" if os.access("/var/tmp", os.W_OK) else tempfile.gettempdir()


def check_free_space(directory, needed, stage):
    """Raise NotEnoughDisk unless `directory`'s file system has `needed` bytes free."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise NotEnoughDisk(stage, directory, needed, free)


def run_route_command(s3, bucket, key, command, chunks, report):
    """Copy the object locally (analysing it on the way), run a route's argument list, upload its outputs.

    The copy goes under work_root() (on disk, never AL2023's RAM-backed /tmp), after checking
    that it fits (NotEnoughDisk, stage "copy", rather than a crash half-way).
    """
    with tempfile.TemporaryDirectory(prefix="awsfun-route-", dir=work_root()) as work:
        check_free_space(work, report["input"]["size"], "copy")
        input_path = os.path.join(work, local_input_name(key))
        output_dir = os.path.join(work, "output")
        os.mkdir(output_dir)
        report.update(analyse_stream(_tee_to_file(chunks, input_path), total=report["input"]["size"], name=key))
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
        report = error_report(getattr(err, "stage", "analyse"), err,
                              {"bucket": bucket, "key": key, "etag": expected})
        report.update(getattr(err, "details", {}))
    try:
        target = put_report(s3, bucket, key, report, ".error.json")
    except Exception as err:  # noqa: BLE001
        code, message = _error_code(err)
        logger.error("cannot write the error report: %s %s", code, message)
        return EXIT_FAILED_UNREPORTED
    logger.info("wrote s3://%s/%s", bucket, target)
    return EXIT_FAILED_REPORTED


def report_unexpected(target, err, s3=None):
    """Leave the error report for an exception nothing else caught; return the exit status.

    For s3://BUCKET/KEY it writes analysis/KEY.error.json (EXIT_FAILED_REPORTED), or returns
    EXIT_FAILED_UNREPORTED when even that fails; for a local file it prints the report.
    """
    if not target.startswith("s3://"):
        print(json.dumps(error_report("worker", err, {"path": target}), indent=2, ensure_ascii=False))
        return EXIT_FAILED_REPORTED
    try:
        bucket, key = parse_s3_uri(os.fsencode(target).decode("utf-8"))
        inputs = {"bucket": bucket, "key": key, "etag": os.environ.get("AWSFUN_EXPECTED_ETAG", "")}
        target_key = put_report(s3 or make_s3_client(), bucket, key,
                                error_report("worker", err, inputs), ".error.json")
    except Exception as again:  # noqa: BLE001 - the bootstrap reports what this cannot
        code, message = _error_code(again)
        logger.error("cannot write the error report: %s %s", code, message)
        return EXIT_FAILED_UNREPORTED
    logger.info("wrote s3://%s/%s", bucket, target_key)
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
        epilog=f"Exit status: {EXIT_OK} done, {EXIT_FAILED_REPORTED} failed and wrote its error report "
        f"(printed for a local file), {EXIT_USAGE} usage, {EXIT_FAILED_UNREPORTED} failed and the "
        "error report could not be written; 1 only when Python itself died (no report).",
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
    try:
        return run_target(parser, args)
    except Exception as err:  # noqa: BLE001 - whatever breaks, the run still leaves its error report
        logger.exception("unexpected failure on %s", args.target)
        return report_unexpected(args.target, err)


def run_target(parser, args):
    """Run main's parsed arguments; return the exit status (parser.error for bad ones)."""
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
