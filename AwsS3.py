#!/usr/bin/env python3
"""awsfun worker: analyse one S3 object (or a local file) in a single streaming pass.

    python3 AwsS3.py s3://BUCKET/KEY   write analysis/KEY.json (or .error.json)
    python3 AwsS3.py PATH              print the report of a local file

One file, standard library plus boto3 (imported only for S3), because the
instance downloads it on boot. The input is only ever read.
"""

import argparse
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
MAX_NAMES = 10_000          # chromosome and filter names counted one by one
MIN_EXACT_DISTINCT = 100    # distinct values counted exactly per column, at least...
MAX_EXACT_DISTINCT = 10_000  # ...and at most, within...
EXACT_DISTINCT_BUDGET = 200_000  # ...this many exact values over all columns
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
    """True when a content sample is not text (NUL bytes, or not UTF-8/Latin text)."""
    if b"\x00" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the sample's end is still text.
        if err.start < len(sample) - 4:
            return True
    control = len(sample) - len(sample.translate(None, CONTROL_BYTES))
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
    delimiter = sniff_delimiter(lines)
    if delimiter is None:
        return None
    return "tsv" if delimiter == "\t" else "csv"


def sniff_delimiter(lines):
    """Return the delimiter (tab, comma, semicolon or bar) splitting nearly all rows into the same >= 2 fields."""
    text = b"\n".join(line.rstrip(b"\r") for line in lines).decode("utf-8", "replace")
    for delimiter in TABLE_DELIMITERS:
        try:
            rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row]
        except csv.Error:
            continue
        if len(rows) > 2:
            rows = rows[:-1]  # the sample may end inside a quoted field
        widths = collections.Counter(map(len, rows))
        width, count = widths.most_common(1)[0] if widths else (0, 0)
        # A ragged row or two is a broken table, still a table; prose rarely splits this evenly.
        if width >= 2 and count >= 2 and count >= 0.9 * len(rows):
            return delimiter
    return None


def sniff_header(sample, delimiter):
    """True when the first row of a table sample looks like column names, not data."""
    text = sample[:SNIFF_SIZE].decode("utf-8", "replace")
    text = text[:text.rfind("\n") + 1] or text
    rows = [row for row in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if row][:200]
    if len(rows) < 2:
        return bool(rows) and not any(infer_kind({value}) in NUMERIC_KINDS for value in rows[0] if value)
    first, rest = rows[0], rows[1:]
    typed_like_data = False
    for index, name in enumerate(first):
        below = {row[index] for row in rest if index < len(row) and row[index]}
        kind_below = infer_kind(below) if below else None
        if kind_below not in (None, "string"):
            # A column of numbers (or dates, booleans) under a word is the clearest sign of a header.
            if infer_kind({name}) != kind_below:
                return True
            typed_like_data = True
        if name and name in below:
            return False
    # All-text tables: names are distinct and, unlike data, never repeat below.
    return not typed_like_data and len(set(first)) == len(first)


# --- shared helpers -------------------------------------------------------------------

CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 12, 13))
TABLE_DELIMITERS = ("\t", ",", ";", "|")
ADLER_MODULUS = 65521


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
        entropy = -sum(n / sampled * math.log2(n / sampled) for n in self.histogram.values()) if sampled else 0.0
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


GC_TABLE = byte_table(set(b"GCgc"))  # as seqkit: S (G or C) is not counted
Q20_TABLE = byte_table(set(range(33 + 20, 256)))
Q30_TABLE = byte_table(set(range(33 + 30, 256)))


class FastqAnalyzer(LineAnalyzer):
    """FASTQ (Phred+33): reads, bases, lengths and N50, GC, Ns, quality, malformed records.

    Well-formed blocks are measured a whole block at a time (slices of the line list,
    joins, translate tables and byte sums); only a block holding a malformed record is
    walked record by record, to count it, say where it is, and find the next record.
    """

    def __init__(self, crlf=False):
        super().__init__()
        self.crlf = crlf
        self.carry = []          # lines of a record cut by the block's end
        self.lines_before = 0    # lines consumed before self.carry
        self.reads = self.bases = self.gc = self.n = 0
        self.quality_sum = self.q20 = self.q30 = 0
        self.min_length = self.max_length = None
        self.lengths = collections.Counter()
        self.lengths_exact = True
        self.problems = FirstProblem()

    def feed(self, block):
        """Feed a block of content: split once, keep the unterminated last line for the next block."""
        data = self._partial + block if self._partial else block
        if self.crlf:
            data = data.replace(b"\r\n", b"\n")
        lines = data.split(b"\n")
        self._partial = lines.pop()
        self._feed_line_list(lines)
        if len(self._partial) > MAX_LINE_BYTES:
            self._overlong_line()

    def feed_lines(self, data):
        if self.crlf:
            data = data.replace(b"\r\n", b"\n")
        lines = data.split(b"\n")
        lines.pop()
        self._feed_line_list(lines)

    def _feed_line_list(self, lines):
        self.newlines += len(lines)
        first_line = self.lines_before + 1
        if self.carry:
            lines = self.carry + lines
        whole = len(lines) - len(lines) % 4
        heads, seqs, plus, quals = lines[0:whole:4], lines[1:whole:4], lines[2:whole:4], lines[3:whole:4]
        seq_lengths = list(map(len, seqs))
        if (all(map(bytes.startswith, heads, itertools.repeat(b"@")))
                and all(map(bytes.startswith, plus, itertools.repeat(b"+")))
                and seq_lengths == list(map(len, quals))):
            self._add(seqs, quals, seq_lengths)
            rest = whole
        else:
            rest = self._walk(lines, first_line)
        self.carry = lines[rest:]
        self.lines_before = first_line - 1 + rest

    def _walk(self, lines, first_line):
        """Take the well-formed records of a block one by one; return the index of the unread rest."""
        seqs, quals = [], []
        index, end = 0, len(lines)
        while end - index >= 4:
            head, seq, plus, qual = lines[index:index + 4]
            if not head.strip():
                index += 1  # blank lines between records are tolerated, as other tools do
                continue
            reason = fastq_record_problem(head, seq, plus, qual)
            if reason is None:
                seqs.append(seq)
                quals.append(qual)
                index += 4
                continue
            self.problems.add(first_line + index, reason)
            index = next_fastq_record(lines, index + 1)
        if seqs:
            self._add(seqs, quals, list(map(len, seqs)))
        return index

    def _add(self, seqs, quals, seq_lengths):
        if not seqs:
            return
        self.reads += len(seqs)
        sequence, quality = b"".join(seqs), b"".join(quals)
        self.bases += len(sequence)
        self.gc += count_members(sequence, GC_TABLE)
        self.n += sequence.count(b"N") + sequence.count(b"n")  # rare bytes: count is memchr-fast
        self.quality_sum += byte_sum(quality)
        self.q20 += count_members(quality, Q20_TABLE)
        self.q30 += count_members(quality, Q30_TABLE)
        low, high = min(seq_lengths), max(seq_lengths)
        self.min_length = low if self.min_length is None else min(self.min_length, low)
        self.max_length = high if self.max_length is None else max(self.max_length, high)
        self.lengths.update(seq_lengths)
        if len(self.lengths) > MAX_LENGTH_BINS:
            self.lengths = coarsen_lengths(self.lengths)
            self.lengths_exact = False

    def finish(self):
        """Flush the last line, count a record cut short at the end, return the summary."""
        if self._partial:
            self.newlines -= 1
            self.feed_lines(self._partial + b"\n")
            self._partial = b""
        leftover = [line for line in self.carry if line.strip()]
        if leftover:
            self.problems.add(self.lines_before + 1,
                              f"the file ends inside a record ({len(self.carry)} of its 4 lines)")
        return self.summary()

    def summary(self):
        return {
            "reads": self.reads,
            "bases": self.bases,
            "min_length": self.min_length,
            "mean_length": round(self.bases / self.reads, 3) if self.reads else None,
            "max_length": self.max_length,
            "n50": n50(self.lengths, self.bases),
            "n50_exact": self.lengths_exact,
            "gc_percent": percent(self.gc, self.bases),
            "n_count": self.n,
            "n_percent": percent(self.n, self.bases),
            "mean_quality": round(self.quality_sum / self.bases - 33, 3) if self.bases else None,
            "q20_percent": percent(self.q20, self.bases),
            "q30_percent": percent(self.q30, self.bases),
            "quality_encoding": "phred+33",
            **self.problems.fields("records"),
        }


def fastq_record_problem(head, seq, plus, qual):
    """Return why four lines are not a FASTQ record, or None when they are one."""
    if not head.startswith(b"@"):
        return "header line does not start with '@'"
    if not plus.startswith(b"+"):
        return "third line of the record does not start with '+'"
    if len(seq) != len(qual):
        return f"sequence and quality lengths differ ({len(seq)} and {len(qual)})"
    return None


def next_fastq_record(lines, index):
    """Return the index of the next line that can start a record: '@' with a '+' two lines on."""
    end = len(lines)
    while index < end:
        if lines[index].startswith(b"@") and (index + 2 >= end or lines[index + 2].startswith(b"+")):
            return index
        index += 1
    return index


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
TRANSITIONS = {(b"A", b"G"), (b"G", b"A"), (b"C", b"T"), (b"T", b"C")}
VARIANT_KINDS = ("snvs", "mnvs", "indels", "others")
INDEL_ONLY = (("indels",), 0, 0)


def classify_alleles(ref, alts):
    """Return (kinds present, transitions, transversions) for a REF and its comma-separated ALTs.

    As bcftools does: an equal-length ALT differing at one base is an SNV, at more an MNV;
    a length change is an indel; symbolic and breakend alleles are others; '*' (a deletion
    seen from an overlapping record) and '.' are no variant. Ts/Tv compares the first bases
    of REF and ALT, again as bcftools does, so a CT>CA SNV counts as neither.
    """
    if len(ref) != len(alts) and b"," not in alts and ref.isalpha() and alts.isalpha():
        return INDEL_ONLY  # the common unique case, answered before any allocation
    kinds, ts, tv = set(), 0, 0
    ref = ref.upper()
    for alt in alts.upper().split(b","):
        if alt in (b".", b"*") or alt == ref:
            continue
        if not (alt.isalpha() and ref.isalpha()):
            kinds.add("others")
        elif len(alt) == len(ref):
            differences = sum(r != a for r, a in zip(ref, alt))
            kinds.add("snvs" if differences == 1 else "mnvs")
            if differences == 1 and ref[0] != alt[0] and ref[:1] in b"ACGT" and alt[:1] in b"ACGT":
                if (ref[:1], alt[:1]) in TRANSITIONS:
                    ts += 1
                else:
                    tv += 1
        else:
            kinds.add("indels")
    return tuple(sorted(kinds)), ts, tv


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
        self.kinds = dict.fromkeys(VARIANT_KINDS, 0)
        self.no_alt = self.multiallelic = self.ts = self.tv = 0
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
        for (kinds, ts, tv, multiallelic), count in tally.items():
            for kind in kinds:
                self.kinds[kind] += count
            if not kinds:
                self.no_alt += count
            self.multiallelic += multiallelic * count
            self.ts += ts * count
            self.tv += tv * count

    def _classify(self, ref, alt):
        known = classify_alleles(ref, alt) + (b"," in alt,)
        if len(ref) + len(alt) <= 6:
            # Only short pairs repeat often enough to be worth remembering; bounded anyway.
            if len(self.classified) >= MAX_NAMES:
                self.classified.clear()
            self.classified[ref, alt] = known
        return known

    def _find_malformed(self, data, first_line):
        for number, line in enumerate(data.split(b"\n")[:-1], first_line):
            if line and not line.startswith(b"#") and not VCF_RECORD.match(line + b"\n"):
                self.problems.add(number, vcf_line_problem(line))

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


def vcf_line_problem(line):
    """Return why a VCF data line is not a record."""
    fields = line.split(b"\t")
    if len(fields) < 8:
        return f"{len(fields)} tab-separated columns, a record has at least 8"
    if not fields[1].isdigit():
        return "POS is not a whole number"
    return "REF or ALT is empty"


INTEGER = re.compile(r"[+-]?\d+")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?")
BOOLEANS = {"true", "false", "True", "False", "TRUE", "FALSE", "yes", "no", "Yes", "No", "YES", "NO"}
TRUTHS = {"true", "yes"}
NUMERIC_KINDS = ("integer", "float")


def infer_kind(values, previous=None):
    """Return the narrowest kind holding every (non-empty) value: integer, float, boolean, date or string.

    `previous` is the column's kind so far: kinds it has already outgrown are not tried again.
    """
    if previous in (None, "integer") and all_integers(values):
        return "integer"
    if previous in (None, "integer", "float"):
        try:
            if all(map(math.isfinite, map(float, values))):
                return "float"
        except ValueError:
            pass
    if previous in (None, "boolean") and values <= BOOLEANS:
        return "boolean"
    if previous in (None, "date") and all(map(DATE.fullmatch, values)):
        return "date"
    return "string"


def all_integers(values):
    """True when every value is a whole number written in ASCII digits (with an optional sign)."""
    joined = "".join(values)
    if joined.isascii() and joined.isdigit():
        return True  # one C-level test for the usual unsigned case
    return all(map(INTEGER.fullmatch, values))


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

    def __init__(self, exact_limit):
        self.exact_limit = exact_limit
        self.values = set()
        self.sketch = None   # sorted list of the K smallest hashes once past the bound

    def add(self, values):
        """Add a set of values."""
        if self.sketch is None:
            self.values |= values
            if len(self.values) <= self.exact_limit:
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


class ColumnProfile:
    """One column: kind, empties, distinct values, min/max, and mean and deviation of numbers."""

    def __init__(self, name, exact_limit):
        self.name = name
        self.kind = None
        self.empty = 0
        self.distinct = DistinctCounter(exact_limit)
        self.low = self.high = None
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0       # sum of squared deviations from the mean (Chan et al. merge)
        self.numbers_valid = True

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
        if self.kind in NUMERIC_KINDS:
            self._add_numbers(list(map(float, filter(None, values))))
        else:
            self._add_bounds(present, previous)

    def _add_numbers(self, numbers):
        count = len(numbers)
        mean = math.fsum(numbers) / count
        m2 = max(math.fsum(map(operator.mul, numbers, numbers)) - count * mean * mean, 0.0)
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total
        low, high = min(numbers), max(numbers)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def _add_bounds(self, present, previous):
        if previous in NUMERIC_KINDS:
            # Numbers seen so far turn into text: min/max must now compare as text.
            self.low, self.high = ("" if self.low is None else format_number(self.low),
                                   "" if self.high is None else format_number(self.high))
            self.numbers_valid = False
        low, high = min(present), max(present)
        self.low = low if self.low is None or self.low == "" else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def fields(self):
        """Return the column's profile."""
        profile = {"name": self.name, "type": self.kind or "empty", "empty": self.empty, **self.distinct.fields()}
        if self.kind in NUMERIC_KINDS:
            cast = int if self.kind == "integer" else float
            profile.update(min=cast(self.low), max=cast(self.high), mean=round(self.mean, 6),
                           std=round(math.sqrt(self.m2 / (self.count - 1)), 6) if self.count > 1 else None)
        elif self.kind == "boolean":
            # TRUE, true and yes are one value, as in a database's BOOLEAN column.
            truths = {value.lower() in TRUTHS for value in self.distinct.values}
            profile.update(distinct=len(truths), min=str(min(truths)).lower(), max=str(max(truths)).lower())
        else:
            profile.update(min=clip(self.low), max=clip(self.high))
        return profile


def format_number(value):
    """Return a float as the text a table would hold (integers without '.0')."""
    return str(int(value)) if value.is_integer() else repr(value)


def clip(text, limit=200):
    """Return text cut to `limit` characters for the report."""
    return text if text is None or len(text) <= limit else text[:limit] + "…"


class TableAnalyzer(LineAnalyzer):
    """CSV/TSV: delimiter, header, rows, columns, and a profile of every column."""

    def __init__(self, delimiter, header=True):
        super().__init__()
        self.delimiter = delimiter
        self.has_header = header
        self.header = None
        self.rows = 0
        self.columns = None
        self.profiles = []
        self.problems = FirstProblem()

    def feed(self, block):
        """Feed a block; cut it only where a record ends (outside any quoted field)."""
        data = self._partial + block if self._partial else block
        cut = data.rfind(b"\n") + 1
        quotes = data.count(b'"', 0, cut)
        while quotes % 2 and cut:
            # An odd number of quotes: this newline is inside a quoted field; step back a line.
            previous = data.rfind(b"\n", 0, cut - 1) + 1
            quotes -= data.count(b'"', previous, cut)
            cut = previous
        if not cut and len(data) > MAX_LINE_BYTES:
            cut = data.rfind(b"\n") + 1 or len(data)  # an unclosed quote: give up waiting, stay bounded
        self._partial = data[cut:]
        if cut:
            self.feed_lines(data[:cut])

    def feed_lines(self, data):
        first_line = self.newlines + 1
        self.newlines += data.count(b"\n")
        text = data.decode("utf-8", "replace")
        rows = read_rows(text, self.delimiter, first_line, self.problems)
        header_rows = 0
        if self.columns is None and rows:
            self._start(rows[0])
            header_rows = int(self.has_header)
            rows = rows[header_rows:]
        if not rows:
            return
        if set(map(len, rows)) != {self.columns}:
            rows = self._drop_ragged(text, first_line, header_rows)
        self.rows += len(rows)
        for profile, values in zip(self.profiles, zip(*rows)):
            profile.add(values)

    def _start(self, first):
        self.columns = len(first)
        names = first if self.has_header else [f"column_{n}" for n in range(1, len(first) + 1)]
        self.header = names
        limit = max(MIN_EXACT_DISTINCT, min(MAX_EXACT_DISTINCT, EXACT_DISTINCT_BUDGET // max(len(names), 1)))
        self.profiles = [ColumnProfile(name, limit) for name in names[:MAX_PROFILED_COLUMNS]]

    def _drop_ragged(self, text, first_line, header_rows):
        """Return the rows of the header's width; count the others with their line numbers."""
        numbered = read_rows(text, self.delimiter, first_line, FirstProblem(), numbered=True)[header_rows:]
        kept = []
        for line, row in numbered:
            if len(row) == self.columns:
                kept.append(row)
            else:
                self.problems.add(line, f"{len(row)} fields where the header has {self.columns}")
        return kept

    def summary(self):
        return {
            "delimiter": self.delimiter,
            "header_detected": self.has_header,
            "header": self.header or [],
            "rows": self.rows,
            "columns": self.columns or 0,
            "ragged_rows": self.problems.count > 0,
            "column_profiles": [profile.fields() for profile in self.profiles],
            "columns_profiled": len(self.profiles),
            **self.problems.fields("rows"),
        }


def read_rows(text, delimiter, first_line, problems, numbered=False):
    """Parse a block of table text into its non-empty rows (with line numbers if `numbered`).

    A row the csv module rejects is recorded in `problems`, not raised.
    """
    if not numbered and '"' not in text:
        # Without quotes a row is its line split at the delimiter: str.split beats the csv module.
        lines = text.replace("\r\n", "\n").split("\n") if "\r" in text else text.split("\n")
        if "" in lines:
            lines = list(filter(None, lines))
        return list(map(operator.methodcaller("split", delimiter), lines))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    if not numbered:
        try:
            return [row for row in reader if row]
        except csv.Error:
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    start = first_line
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            problems.add(first_line + reader.line_num - 1, f"unreadable row: {err}")
            start = first_line + reader.line_num
            continue
        if row:
            rows.append((start, row) if numbered else row)
        start = first_line + reader.line_num


def make_analyzer(fmt, sample=b""):
    """Return the analyser for a detected format, set up from the content's first bytes."""
    if fmt in ("csv", "tsv"):
        lines = sample[:SNIFF_SIZE].split(b"\n")[:50]
        delimiter = sniff_delimiter(lines[:-1] if len(lines) > 1 else lines) or ("\t" if fmt == "tsv" else ",")
        return TableAnalyzer(delimiter, sniff_header(sample, delimiter))
    if fmt == "fastq":
        return FastqAnalyzer(crlf=b"\r\n" in sample[:SNIFF_SIZE])
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


def analyse_stream(chunks, total=None):
    """Analyse an iterable of raw byte chunks in one pass; return the report's content fields."""
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
                analyzer, fmt = _start(piece)
            analyzer.feed(piece)
    finally:
        reader.stop.set()
        reader.join()
    if reader.size == 0:
        raise AnalysisError("the object is empty (0 bytes): nothing to analyse; was the upload cut short?")
    if analyzer is None:
        sample = b"".join(sniff)
        analyzer, fmt = _start(sample)
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


def _start(sample):
    fmt = sniff_format(sample[:SNIFF_SIZE])
    return make_analyzer(fmt, sample), fmt


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
