"""Tests of the worker's analysis: per-format summaries against the figures seqkit, bcftools
and DuckDB gave for the same files (tests/data/README.md), gzip and bgzip, malformed
inputs, block boundaries, bounded memory and progress logs."""

import collections
import gzip
import hashlib
import json
import logging
import random
import subprocess
import sys

import pytest

import AwsS3
from support import REPO

DATA = REPO / "tests" / "data"


def analyse_bytes(content, chunk=AwsS3.CHUNK_SIZE):
    """Analyse in-memory bytes fed in chunks of the given size."""
    return AwsS3.analyse_stream(content[i:i + chunk] for i in range(0, len(content), chunk))


def analyse_path(name):
    return AwsS3.analyse_file(str(DATA / name))


def random_chunks(content, seed, largest=5000):
    """Split content at random places, so records and lines are cut everywhere."""
    rng = random.Random(seed)
    start = 0
    while start < len(content):
        size = rng.randint(1, largest)
        yield content[start:start + size]
        start += size


# --- FASTQ ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, compression, members", [
    ("reads.fastq", None, None), ("reads.fastq.gz", "gzip", 1), ("reads.fastq.bgz", "gzip", 4)])
def test_fastq_summary_agrees_with_seqkit(name, compression, members):
    report = analyse_path(name)
    assert report["format"] == "fastq"
    assert (report["compression"], report["gzip_members"]) == (compression, members)
    assert report["sha256"] == hashlib.sha256((DATA / name).read_bytes()).hexdigest()
    assert report["lines"] == 2400 and report["content_bytes"] == 167240
    s = report["summary"]
    # seqkit stats -a -T: 600 reads, 75,928 bases, 50..151, N50 150, Q20 93.05, Q30 78.33, GC 50.00
    assert (s["reads"], s["bases"], s["min_length"], s["max_length"], s["n50"]) == (600, 75928, 50, 151, 150)
    assert round(s["mean_length"], 1) == 126.5
    assert round(s["q20_percent"], 2) == 93.05 and round(s["q30_percent"], 2) == 78.33
    assert round(s["gc_percent"], 2) == 50.00
    assert s["n_count"] == 294  # seqkit seq -s | tr -cd Nn | wc -c
    assert s["malformed_records"] == 0 and s["first_malformed_line"] is None


def test_fastq_quality_gc_and_n_by_hand():
    content = b"@r1\nACGTNnacgt\n+\n!+5?IIIIII\n@r2\nGGCC\n+\n####\n"
    s = analyse_bytes(content)["summary"]
    assert (s["reads"], s["bases"], s["min_length"], s["max_length"]) == (2, 14, 4, 10)
    assert s["gc_percent"] == pytest.approx(100 * 8 / 14, abs=1e-3)  # G, C, g, c count; N does not
    assert s["n_count"] == 2
    # Phred+33: ! = 0, + = 10, 5 = 20, ? = 30, I = 40, # = 2
    assert s["mean_quality"] == pytest.approx((0 + 10 + 20 + 30 + 6 * 40 + 4 * 2) / 14, abs=1e-3)
    assert s["q20_percent"] == pytest.approx(100 * 8 / 14, abs=1e-3)
    assert s["q30_percent"] == pytest.approx(100 * 7 / 14, abs=1e-3)
    assert s["n50"] == 10


def test_fastq_summary_does_not_depend_on_where_blocks_end():
    content = (DATA / "reads.fastq").read_bytes()
    whole = analyse_bytes(content)
    for seed in range(3):
        cut = AwsS3.analyse_stream(random_chunks(content, seed))
        assert cut["summary"] == whole["summary"]
        assert cut["lines"] == whole["lines"]


def test_fastq_with_crlf_line_ends_measures_the_same():
    content = (DATA / "reads.fastq").read_bytes()
    crlf = analyse_bytes(content.replace(b"\n", b"\r\n"))["summary"]
    assert crlf == analyse_bytes(content)["summary"]


def _records(count, length=20):
    return [b"@r%d\n%s\n+\n%s\n" % (i, b"ACGT" * (length // 4), b"I" * length) for i in range(count)]


def test_fastq_malformed_records_are_counted_with_the_first_line():
    records = _records(50)
    records[9] = b"@r9\nACGTACGT\n+\nIIII\n"  # lines 37-40: quality shorter than the sequence
    records[30] = b"@r30\nACGT\nIIII\n"         # lines 121-123: no '+' line
    s = analyse_bytes(b"".join(records), chunk=97)["summary"]
    assert s["malformed_records"] == 2
    assert s["first_malformed_line"] == 37
    assert "lengths differ (8 and 4)" in s["first_malformed_reason"]
    assert s["reads"] == 48  # every other record is still read after each break
    assert s["bases"] == 48 * 20


def test_fastq_that_turns_into_garbage_midway_reports_where():
    good = b"".join(_records(100))
    content = good + b"this is not\na FASTQ record\nat all\n" * 10 + good
    report = analyse_bytes(content, chunk=1000)
    s = report["summary"]
    assert report["format"] == "fastq"
    assert s["first_malformed_line"] == 401
    assert s["malformed_records"] >= 1
    assert s["reads"] == 200


def test_fastq_cut_short_says_the_last_record_is_incomplete():
    content = b"".join(_records(10)) + b"@r10\nACGT\n"
    s = analyse_bytes(content)["summary"]
    assert s["reads"] == 10
    assert s["malformed_records"] == 1 and s["first_malformed_line"] == 41
    assert "ends inside a record" in s["first_malformed_reason"]


def test_fastq_blank_lines_between_records_are_tolerated():
    records = _records(6)
    content = b"".join(records[:3]) + b"\n" + b"".join(records[3:]) + b"\n\n"
    s = analyse_bytes(content)["summary"]
    assert s["reads"] == 6 and s["malformed_records"] == 0


def _wrapped(name, sequence, quality, width):
    """One FASTQ record with its sequence and quality wrapped at `width` (as seqkit seq -w writes)."""
    def wrap(text):
        return [text[i:i + width] for i in range(0, len(text), width)] or [b""]
    return b"\n".join([b"@" + name, *wrap(sequence), b"+", *wrap(quality)]) + b"\n"


def _reads(count, seed):
    """Random reads of 1-300 bases as (name, sequence, quality); quality is mostly '@' (Phred 31)."""
    rng = random.Random(seed)
    reads = []
    for i in range(count):
        length = rng.randint(1, 300)
        reads.append((b"r%d" % i, bytes(rng.choice(b"ACGTN") for _ in range(length)),
                      bytes(rng.choice(b"@@@I#5") for _ in range(length))))
    return reads


def _expected(reads):
    lengths = [len(seq) for _, seq, _ in reads]
    return (len(reads), sum(lengths), min(lengths), max(lengths))


@pytest.mark.parametrize(("first_wrapped", "width"), [(0, 60), (2, 60), (150, 60), (0, 3)])
def test_fastq_wrapped_records_are_read_whole_wherever_wrapping_starts(first_wrapped, width):
    # kseq's rule: sequence lines until a '+' line, quality lines until they are as long as the
    # sequence. Quality lines starting with '@' (Phred 31) are quality, not headers. Width 3
    # makes runs of up to 100 lines, read a window at a time.
    reads = _reads(200, first_wrapped)
    content = b"".join(_wrapped(name, seq, qual, width if i >= first_wrapped else 10_000)
                       for i, (name, seq, qual) in enumerate(reads))
    whole = analyse_bytes(content)
    s = whole["summary"]
    assert whole["format"] == "fastq"
    assert (s["reads"], s["bases"], s["min_length"], s["max_length"]) == _expected(reads)
    assert s["malformed_records"] == 0
    bases = b"".join(seq for _, seq, _ in reads)
    assert s["gc_percent"] == pytest.approx(100 * (bases.count(b"G") + bases.count(b"C")) / len(bases), abs=1e-3)
    for seed in range(3):
        assert AwsS3.analyse_stream(random_chunks(content, seed, 400))["summary"] == s


def test_fastq_wrapped_with_crlf_measures_the_same():
    content = b"".join(_wrapped(name, seq, qual, 50) for name, seq, qual in _reads(50, 4))
    assert analyse_bytes(content.replace(b"\n", b"\r\n"))["summary"] == analyse_bytes(content)["summary"]


def test_fastq_each_record_dropped_is_a_malformed_record():
    records = _records(40)
    # Quality cut short: the next header would complete it by length, as kseq reads it;
    # the line after that header (a sequence line, not an '@' line) shows it is a header.
    records[5] = b"@r5\nACGTACGT\n+\nIIII\n"
    records[20] = b"@r20 a longer header\nACGTACGT\n+\nIII\n"
    records[21] = b"@r21\nACGTACGT\n+\n"  # no quality line at all
    records[30] = b"@r30\nACGT\n@r30b\nACGT\n+\nIIII\n"  # r30 has no '+' line; r30b is whole
    for chunk in (37, 1000):
        s = analyse_bytes(b"".join(records), chunk=chunk)["summary"]
        assert s["reads"] == 37 and s["malformed_records"] == 4
        assert s["reads"] + s["malformed_records"] == 41  # 40 records and r30b: none lost unnamed
        assert s["first_malformed_line"] == 21
    # Wrapped: w3's quality is cut short, so w4's header and a sequence line are read as its
    # quality (kseq's rule) until it overruns; w4's remaining lines are one run of garbage.
    wrapped = [_wrapped(b"w%d" % i, b"ACGT" * 3, b"IIII" * (2 if i == 3 else 3), 4) for i in range(10)]
    s = analyse_bytes(b"".join(wrapped))["summary"]
    assert (s["reads"], s["malformed_records"], s["first_malformed_line"]) == (8, 2, 25)
    assert "lengths differ (12 and 15)" in s["first_malformed_reason"]


def test_fastq_control_bytes_keep_the_format_and_say_where():
    records = _records(5000)
    records[3000] = b"@r3000\x01\nACGTACGT\n+\nII\x00IIIII\n"  # a control byte in the header and a NUL
    records[4998] = b"@r4998\nACGT\x1bCGT\n+\nIIIIIIII\n"
    for chunk in (997, AwsS3.CHUNK_SIZE):
        report = analyse_bytes(b"".join(records), chunk=chunk)
        s = report["summary"]
        assert report["format"] == "fastq"
        assert (s["control_bytes"], s["first_control_byte_line"]) == (3, 12001)
        assert s["control_byte_convention"] == "counted, as seqkit counts them"
        assert s["reads"] == 5000 and s["malformed_records"] == 0  # as seqkit counts them
    clean = analyse_bytes(b"".join(_records(50)))["summary"]
    assert (clean["control_bytes"], clean["first_control_byte_line"]) == (0, None)


def test_fastq_whose_first_read_is_longer_than_the_sniffing_window():
    rng = random.Random(5)
    sequence = bytes(rng.choice(b"ACGT") for _ in range(200 * 1024))
    content = b"@nanopore\n" + sequence + b"\n+\n" + b"5" * len(sequence) + b"\n" + b"".join(_records(3))
    assert AwsS3.sniff_format(content[:AwsS3.SNIFF_SIZE]) == "fastq"
    s = analyse_bytes(content)["summary"]
    assert (s["reads"], s["bases"], s["max_length"], s["n50"]) == (4, len(sequence) + 60, len(sequence), len(sequence))
    assert AwsS3.sniff_format(b"@not a read\nsome words, then\n+\n") == "text"


def test_fastq_record_longer_than_the_buffer_is_measured_in_pieces(monkeypatch):
    monkeypatch.setattr(AwsS3, "RECORD_BUFFER", 1000)  # bounded memory for any record size
    reads = _reads(30, 6)
    reads[10] = (b"long", b"GC" * 20_000, b"I" * 40_000)
    content = b"".join(_wrapped(name, seq, qual, 70) for name, seq, qual in reads)
    s = AwsS3.analyse_stream(random_chunks(content, 1, 3000))["summary"]
    assert (s["reads"], s["bases"], s["max_length"]) == _expected(reads)[:2] + (40_000,)
    bases = b"".join(seq for _, seq, _ in reads)
    assert s["gc_percent"] == pytest.approx(100 * (bases.count(b"G") + bases.count(b"C")) / len(bases), abs=1e-3)


def test_fastq_record_of_many_blank_lines_keeps_few_of_them():
    # Blank lines cost no bytes but each kept line costs memory: the buffer counts them too.
    record = AwsS3.OpenRecord(1)
    for _ in range(200_000):
        record.add_sequence(b"")
    assert len(record.seq) <= AwsS3.RECORD_BUFFER // AwsS3.LINE_OVERHEAD
    s = analyse_bytes(b"@h\n" + b"\n" * 200_000 + b"ACGT\n+\nIIII\n" + b"".join(_records(2)))["summary"]
    assert (s["reads"], s["bases"], s["malformed_records"]) == (3, 44, 0)  # blank lines are empty sequence lines


def test_n50_and_long_read_histogram():
    assert AwsS3.n50({2: 1, 3: 1, 4: 1, 5: 1}, 14) == 4  # 5 + 4 = 9 >= 7
    assert AwsS3.n50({}, 0) is None
    lengths = {length: 1 for length in range(10_000, 40_000)}
    coarse = AwsS3.coarsen_lengths(lengths)
    assert len(coarse) == 300 and sum(coarse.values()) == 30_000
    assert AwsS3.n50(coarse, sum(lengths)) == pytest.approx(AwsS3.n50(lengths, sum(lengths)), rel=0.01)


# The two per-read distributions (read_length_histogram, mean_quality_histogram). Lengths agree
# with seqkit (`seqkit fx2tab -l`; bench/peers.py compares them, and tests/peers/fastq holds its
# values). The mean quality is FastQC's (the arithmetic mean of a read's Phred scores, rounded
# down); `seqkit fx2tab -q` averages error probabilities instead (!!II gives 3.01, not 20), so
# the expected means here are computed from the records themselves.


def four_line_reads(content):
    """Return (name, sequence, quality) of each record of a four-line FASTQ."""
    lines = content.split(b"\n")
    return [(lines[i][1:], lines[i + 1], lines[i + 3]) for i in range(0, len(lines) - 3, 4)]


def expected_length_bins(reads, width):
    """Return the read-length bins of width `width` (empty ones left out), counted here."""
    counts = collections.Counter(len(seq) // width * width for _, seq, _ in reads)
    return [[start, counts[start]] for start in sorted(counts)]


def expected_mean_qualities(reads):
    """Return FastQC's per sequence quality scores of the reads: mean Phred rounded down, 0..93."""
    counts = collections.Counter(min(max(sum(qual) // len(qual) - 33, 0), 93) for _, _, qual in reads if qual)
    return [[phred, counts[phred]] for phred in sorted(counts)]


@pytest.mark.parametrize(("path", "width"), [
    ("samples/reads.fastq", 1), ("samples/reads.fastq.gz", 1),  # lengths 90..151: 62 values, bins of 1
    ("tests/data/reads.fastq", 2), ("tests/data/reads.fastq.bgz", 2)])  # 50..151: 102 values, bins of 2
def test_fastq_distributions_of_the_samples(path, width):
    content = (REPO / path).read_bytes()
    reads = four_line_reads(gzip.decompress(content) if path.endswith("gz") else content)
    s = AwsS3.analyse_file(str(REPO / path))["summary"]
    assert s["read_length_histogram"] == {"bin_width": width, "bins": expected_length_bins(reads, width)}
    assert s["mean_quality_histogram"] == expected_mean_qualities(reads)
    assert sum(reads for _, reads in s["read_length_histogram"]["bins"]) == s["reads"]
    if width == 2:  # seqkit fx2tab -l tests/data/reads.fastq: 276 reads of 150 or 151 bases
        assert s["read_length_histogram"]["bins"][-1] == [150, 276]


def test_fastq_distributions_stay_small_for_widely_varying_lengths():
    # Lengths from 1 to 30,000 (log-uniform) and qualities of every Phred score and beyond.
    rng = random.Random(11)
    reads = []
    for i in range(600):
        length = max(1, round(30_000 ** rng.random()))
        low = rng.randrange(33 - 5, 127 + 5)  # a few means below '!' and above '~'
        quality = bytes(rng.choice((low, min(low + 1, 255))) for _ in range(length))
        reads.append((b"r%d" % i, b"A" * length, quality))
    reads += [(b"short", b"A", b"I"), (b"longest", b"C" * 30_000, b"?" * 30_000)]
    content = b"".join(b"@%s\n%s\n+\n%s\n" % read for read in reads)
    s = analyse_bytes(content, chunk=65_536)["summary"]
    histogram = s["read_length_histogram"]
    # 1..30,000: bins of 200 would be 151, of 500 are 61
    assert histogram == {"bin_width": 500, "bins": expected_length_bins(reads, 500)}
    assert len(histogram["bins"]) <= 64
    means = s["mean_quality_histogram"]
    assert means == expected_mean_qualities(reads)
    assert len(means) <= 94 and means[0][0] == 0 and means[-1][0] == 93
    assert sum(count for _, count in means) == s["reads"] == len(reads)
    assert len(json.dumps(histogram)) + len(json.dumps(means)) < 3000


def test_read_length_bin_width_is_the_smallest_that_fits():
    histogram = AwsS3.read_length_histogram
    assert histogram(collections.Counter({10: 2, 73: 1}), 10, 73) == {"bin_width": 1, "bins": [[10, 2], [73, 1]]}
    assert histogram(collections.Counter({10: 2, 74: 1}), 10, 74)["bin_width"] == 2  # 65 values
    assert histogram(collections.Counter({0: 1, 127: 1}), 0, 127)["bin_width"] == 2
    assert histogram(collections.Counter({0: 1, 128: 1}), 0, 128)["bin_width"] == 5
    assert histogram(collections.Counter({5: 1, 1_000_000: 1}), 5, 1_000_000) == {
        "bin_width": 20_000, "bins": [[0, 1], [1_000_000, 1]]}
    assert histogram(collections.Counter(), None, None) == {"bin_width": 1, "bins": []}


def test_read_length_histogram_of_rounded_lengths_keeps_each_read_in_its_bin(monkeypatch):
    # Past MAX_LENGTH_BINS distinct lengths the counts are rounded to 3 significant digits
    # (1234 -> 1230): bins of 5 would put 1234 in 1230's bin, so the width is at least 10.
    monkeypatch.setattr(AwsS3, "MAX_LENGTH_BINS", 50)
    reads = [(b"r%d" % length, b"G" * length, b"I" * length) for length in range(1000, 1301)]
    s = analyse_bytes(b"".join(b"@%s\n%s\n+\n%s\n" % read for read in reads))["summary"]
    assert s["n50_exact"] is False
    assert s["read_length_histogram"] == {"bin_width": 10, "bins": expected_length_bins(reads, 10)}


def test_fastq_mean_quality_of_a_record_measured_in_pieces(monkeypatch):
    # The first part of a record longer than RECORD_BUFFER is measured early: its quality
    # still counts in the read's mean (40 and 10 in halves: 25, not 10).
    monkeypatch.setattr(AwsS3, "RECORD_BUFFER", 1000)
    reads = [(b"long", b"GC" * 10_000, b"I" * 10_000 + b"+" * 10_000)] + four_line_reads(b"".join(_records(3)))
    content = b"".join(_wrapped(name, seq, qual, 70) for name, seq, qual in reads)
    s = analyse_bytes(content)["summary"]
    assert s["mean_quality_histogram"] == [[25, 1], [40, 3]]


def test_fastq_distributions_count_reads_not_malformed_records():
    records = _records(10)
    records[3] = b"@r3\nACGTACGT\n+\nIIII\n"  # quality short: malformed
    records[6] = b"@r6\n\n+\n\n"  # an empty read: a length of 0, no mean quality
    s = analyse_bytes(b"".join(records))["summary"]
    assert (s["reads"], s["malformed_records"]) == (9, 1)
    assert s["read_length_histogram"] == {"bin_width": 1, "bins": [[0, 1], [20, 8]]}
    assert s["mean_quality_histogram"] == [[40, 8]]


# --- VCF ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["calls.vcf", "calls.vcf.bgz"])
def test_vcf_summary_agrees_with_bcftools(name):
    report = analyse_path(name)
    assert report["format"] == "vcf"
    s = report["summary"]
    # bcftools stats: 3 samples, 851 records, 737 SNPs, 31 MNPs, 83 indels, 62 multiallelic, ts 461, tv 338
    assert (s["samples"], s["records"], s["snvs"], s["mnvs"], s["indels"], s["others"]) == (3, 851, 737, 31, 83, 0)
    assert (s["multiallelic_sites"], s["transitions"], s["transversions"]) == (62, 461, 338)
    assert s["ts_tv_ratio"] == round(461 / 338, 3)
    assert sum(s["records_per_chromosome"].values()) == 851 and len(s["records_per_chromosome"]) == 23
    assert s["pass"] + s["filtered"] + s["filter_missing"] == 851
    assert s["malformed_records"] == 0


def test_vcf_edge_cases_agree_with_bcftools():
    s = analyse_path("edge.vcf")["summary"]
    assert (s["samples"], s["records"], s["no_alt"]) == (2, 16, 1)
    assert (s["snvs"], s["mnvs"], s["indels"], s["others"], s["multiallelic_sites"]) == (10, 2, 3, 1, 4)
    assert (s["transitions"], s["transversions"]) == (7, 5)
    assert s["records_per_chromosome"] == {"1": 12, "2": 4}
    assert (s["pass"], s["filter_missing"], s["filtered"]) == (12, 1, 3)
    assert s["filters"]["q10;s50"] == 1


# What bcftools stats 1.16 counted for one-record VCFs of each REF/ALT (SN and TSTV lines):
# (SNPs, MNPs, indels, others), no-ALT, multiallelic SNP site, ts, tv. tests/peers/vcf/
# holds the same alleles in files, re-checked against bcftools by bench/peers.py.
BCFTOOLS_RECORDS = [
    ("A", "<*>", "", True), ("A", "<X>", "", True), ("A", "<NON_REF>", "", True), ("A", "X", "", True),
    ("A", ".", "", True), ("ACG", ".", "", True), ("A", "A", "", True), ("AC", "ac", "", True),
    ("A", "<X>,<*>", "", True), ("A", "*", "", False), ("A", "*,<*>", "", False),
    ("G", "G]17:198982]", "", False), ("G", "]17:198982]G", "", False),
    ("G", "G[17:198982[", "", False), ("G", "[17:198982[G", "", False),
    ("A", "G", "snvs ts", False), ("a", "A", "snvs", False), ("A", "a", "snvs", False),
    ("a", "g", "snvs ts", False), ("CT", "CA", "snvs", False), ("N", "A", "snvs", False),
    ("AC", "A-", "snvs", False), ("GATTACA", "GCTTACA", "snvs", False),
    ("AC", "GT", "mnvs", False), ("ACG", "TCA", "mnvs", False), ("AC", ".G", "mnvs", False),
    ("A", "AT", "indels", False), ("ATT", "A", "indels", False), ("G", ".G", "indels", False),
    ("G", "G.", "indels", False), ("A", "A<ctg1>", "indels", False), ("AAAA", "AAA", "indels", False),
    ("G", "CT", "others", False), ("AC", "ATG", "others", False), ("TCA", "G", "others", False),
    ("A", "<DEL>", "others", False), ("A", "<INS>", "others", False), ("A", "<CN0>", "others", False),
    ("A", "<DUP:TANDEM>", "others", False), ("A", "<ctg1>A", "others", False), ("AC", "X", "others", False),
    ("A", "C[2:321682[", "others", False), ("AT", "A]2:3]", "others", False),
    ("A", "G,T", "snvs ts tv multi-snv", False), ("A", "G,.", "snvs ts multi-snv", False),
    ("A", "<*>,G", "snvs ts multi-snv", False), ("A", "X,G", "snvs ts multi-snv", False),
    ("A", "G,*", "snvs ts", False), ("A", "G,AT", "snvs indels ts", False),
    ("AC", "GT,G", "mnvs others", False), ("AT", "GC,A", "mnvs indels", False),
    ("A", "AT,<DEL>", "indels others", False), ("G", "G]17:198982],C", "snvs tv", False),
]


@pytest.mark.parametrize(("ref", "alts", "counted", "no_alt"), BCFTOOLS_RECORDS)
def test_records_are_classed_as_bcftools_classes_them(ref, alts, counted, no_alt):
    kinds, is_no_alt, multiallelic, multiallelic_snv, ts, tv = AwsS3.classify_record(ref.encode(), alts.encode())
    words = counted.split()
    assert set(kinds) == {word for word in words if word in ("snvs", "mnvs", "indels", "others")}
    assert (is_no_alt, multiallelic, multiallelic_snv) == (no_alt, "," in alts, "multi-snv" in words)
    assert (ts, tv) == (words.count("ts"), words.count("tv"))


def test_vcf_malformed_line_is_reported_and_skipped():
    lines = (DATA / "edge.vcf").read_bytes().split(b"\n")
    header_lines = sum(line.startswith(b"#") for line in lines)
    lines.insert(header_lines + 3, b"1\t350\tonly-three-columns")
    lines.insert(header_lines + 6, b"1\tPOS\t.\tA\tG\t50\tPASS\t.")
    s = analyse_bytes(b"\n".join(lines), chunk=200)["summary"]
    assert s["records"] == 16
    assert s["malformed_records"] == 2
    assert s["first_malformed_line"] == header_lines + 4
    assert "3 tab-separated columns" in s["first_malformed_reason"]


def test_vcf_summary_does_not_depend_on_where_blocks_end():
    content = (DATA / "calls.vcf").read_bytes()
    whole = analyse_bytes(content)["summary"]
    assert AwsS3.analyse_stream(random_chunks(content, 7, 300))["summary"] == whole


# --- CSV / TSV ------------------------------------------------------------------------


def _columns(summary):
    return {column["name"]: column for column in summary["column_profiles"]}


def test_csv_profile_agrees_with_duckdb_summarize():
    report = analyse_path("table.csv")
    s = report["summary"]
    assert report["format"] == "csv" and s["delimiter"] == "," and s["header_detected"] is True
    assert (s["rows"], s["columns"]) == (750, 8)
    columns = _columns(s)
    temperature = columns["temperature_c"]
    assert (temperature["type"], temperature["min"], temperature["max"]) == ("float", 6.82, 29.58)
    assert temperature["mean"] == pytest.approx(18.11537634408601, abs=1e-6)
    assert temperature["std"] == pytest.approx(3.950548302511433, abs=1e-6)
    assert temperature["empty"] == 6  # 0.80 % of 750
    reads = columns["reads"]
    assert (reads["type"], reads["min"], reads["max"]) == ("integer", 7379, 4999704)
    assert reads["mean"] == pytest.approx(2482063.3733333335, abs=1e-3)
    assert columns["note"]["empty"] == 188  # 25.07 % of 750
    assert (columns["passed_qc"]["type"], columns["passed_qc"]["distinct"]) == ("boolean", 2)
    assert (columns["collected"]["type"], columns["collected"]["min"]) == ("date", "2026-01-01")
    # Distinct counts are exact below the bound: checked against the data itself.
    rows = [line.split(",") for line in (DATA / "table.csv").read_text().splitlines()[1:]]
    assert columns["site"]["distinct"] == len({row[1] for row in rows}) == 5
    assert columns["sample_id"]["distinct"] == 750 and columns["sample_id"]["distinct_exact"] is True


def test_tsv_with_quotes_empties_and_multiline_fields_agrees_with_duckdb():
    report = analyse_path("table.tsv")
    s = report["summary"]
    assert report["format"] == "tsv" and s["delimiter"] == "\t"
    assert (s["rows"], s["columns"], report["lines"]) == (5, 6, 7)
    columns = _columns(s)
    score = columns["score"]
    assert (score["type"], score["min"], score["max"], score["empty"]) == ("float", -2.25, 400.0, 1)
    assert score["mean"] == pytest.approx(99.8125) and score["std"] == pytest.approx(200.13093370341326)
    assert (columns["count"]["type"], columns["count"]["min"], columns["count"]["mean"]) == ("integer", -5, 10.5)
    assert (columns["flag"]["type"], columns["flag"]["distinct"]) == ("boolean", 2)
    assert (columns["when"]["type"], columns["when"]["max"], columns["when"]["empty"]) == ("date", "2026-07-08", 1)
    assert columns["name"]["distinct"] == 4 and columns["name"]["max"] == 'say "hi"'


def test_csv_quoted_newlines_across_block_ends():
    rows = [f'{i},"line one\nline two {i}",{i * 0.5}\n' for i in range(300)]
    content = ("id,text,value\n" + "".join(rows)).encode()
    for seed in range(3):
        s = AwsS3.analyse_stream(random_chunks(content, seed, 200))["summary"]
        assert s["rows"] == 300 and s["malformed_rows"] == 0
        assert _columns(s)["value"]["max"] == 149.5


def test_csv_ragged_rows_are_reported_with_their_line():
    rows = [b"%d,%d,%d\n" % (i, i + 1, i + 2) for i in range(100)]
    rows[49] = b"49,50\n"             # line 51 (the header is line 1)
    rows[79] = b"79,80,81,82\n"       # line 81
    s = analyse_bytes(b"a,b,c\n" + b"".join(rows), chunk=64)["summary"]
    assert s["rows"] == 98 and s["ragged_rows"] is True
    assert s["malformed_rows"] == 2 and s["first_malformed_line"] == 51
    assert "2 fields where the header has 3" in s["first_malformed_reason"]
    assert _columns(s)["a"]["max"] == 99 and _columns(s)["a"]["mean"] == pytest.approx((4950 - 49 - 79) / 98)


def test_csv_without_header_and_other_delimiters():
    s = analyse_bytes(b"1;2.5;x\n3;4.5;y\n5;6.5;z\n")["summary"]
    assert s["delimiter"] == ";" and s["header_detected"] is False
    # DuckDB's names for the columns of a file without a header (sniff_csv: column0, column1, ...)
    assert s["rows"] == 3 and s["header"] == ["column0", "column1", "column2"]
    assert _columns(s)["column1"]["mean"] == pytest.approx(4.5)


def test_column_that_turns_from_numbers_to_text_is_text():
    content = b"id,v\n" + b"".join(b"%d,%d\n" % (i, i) for i in range(2000)) + b"2000,n/a\n"
    column = _columns(analyse_bytes(content, chunk=1000)["summary"])["v"]
    assert column["type"] == "string" and "mean" not in column
    assert column["max"] == "n/a" and column["min"] == "0"


# The worker started by a small shell reports its own peak (ru_maxrss): a process started by
# this one would count pytest's own memory, as Linux carries the high-water mark through
# fork and exec.
PEAK_RSS = ("import atexit, resource, runpy, sys; peak = sys.argv[1]; "
            "atexit.register(lambda: open(peak, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
            "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_an_unclosed_quote_keeps_memory_bounded_and_says_where_the_file_broke(tmp_path):
    # A quote opened on line 1002 never closes: today the parser swallows 16 MB into one field
    # (about 600 MB of memory), reports a later line and loses the rows it swallowed.
    row = b"7,%s,7\n" % (b"x" * 90)
    content = b"id,name,score\n" + row * 1000 + b'7,"unclosed,7\n' + row * 190_000  # 19 MB
    path = tmp_path / "unclosed.csv"
    path.write_bytes(content)
    peak, report = tmp_path / "peak", tmp_path / "report.json"
    command = f'"{sys.executable}" -c "$0" "$@" > "{report}"; exit $?'
    done = subprocess.run(["/bin/sh", "-c", command, PEAK_RSS, str(peak), str(REPO / "AwsS3.py"), str(path)],
                          stderr=subprocess.PIPE, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    s = json.loads(report.read_text())["summary"]
    assert (s["first_malformed_line"], s["malformed_rows"], s["rows"]) == (1002, 1, 191_000)
    assert "quoted field opens on this line" in s["first_malformed_reason"]
    assert int(peak.read_text()) < 100 * 1024, f"peak RSS {int(peak.read_text()) // 1024} MB"


@pytest.mark.parametrize("seed", range(4))
def test_broken_records_are_found_wherever_blocks_end(monkeypatch, seed):
    monkeypatch.setattr(AwsS3, "MAX_RECORD_BYTES", 3000)
    monkeypatch.setattr(AwsS3, "TABLE_SLICE", 700)
    monkeypatch.setattr(AwsS3, "SNIFF_SIZE", 2000)   # the sample sees well-formed rows only, as in a big file
    lines = [b"id,text,n"] + [b"%d,plain %d,%d" % (i, i, i) for i in range(1, 400)]
    lines[50] = b'50,"two\r\nlines, one field",50'   # a quoted CRLF: one record over lines 51-52
    lines[100] = b'100,"%s",100' % (b"long " * 200)    # a quoted record longer than a slice, not broken
    lines[200] = b'200,"opens and never closes,200'    # line 202: the rows after it still count
    lines[300] = b"x" * 4000                             # line 302: past MAX_RECORD_BYTES, unquoted
    content = b"\r\n".join(lines) + b'\r\n400,"cut short'  # line 402 ends inside a quoted field
    s = AwsS3.analyse_stream(random_chunks(content, seed, 900))["summary"]
    assert (s["header"], s["quote"]) == (["id", "text", "n"], '"')
    assert (s["malformed_rows"], s["first_malformed_line"]) == (3, 202)
    assert s["rows"] == 399 - 2 and _columns(s)["n"]["max"] == 399
    assert _columns(s)["text"]["max"] == "two\r\nlines, one field" and _columns(s)["text"]["distinct"] == 397


def test_lone_carriage_returns_end_lines_across_block_ends():
    # Classic Mac line ends, one \r\n (cut between two blocks at some chunk size), a ragged row on line 12.
    rows = [b"%d,%d" % (i, i) for i in range(20)]
    rows[10] = b"10"
    content = b"a,b\r" + b"\r".join(rows[:5]) + b"\r\n" + b"\r".join(rows[5:]) + b"\r"
    for chunk in range(1, len(content)):
        s = AwsS3.analyse_stream(content[i:i + chunk] for i in range(0, len(content), chunk))["summary"]
        assert (s["rows"], s["malformed_rows"], s["first_malformed_line"]) == (19, 1, 12), chunk


def test_an_unterminated_last_line_is_numbered_exactly():
    s = analyse_bytes(b"a,b,c\n" + b"1,2,3\n" * 10 + b"7,8")["summary"]
    assert (s["rows"], s["malformed_rows"], s["first_malformed_line"]) == (10, 1, 12)


def test_a_stray_byte_in_a_utf8_table_is_read_as_cp1252_and_counted():
    content = b"name,city\n" + b"ann,Z\xc3\xbcrich\n" * 8000 + b"bob,Z\xfcrich\n"  # past the sample
    s = analyse_bytes(content, chunk=4096)["summary"]
    assert (s["encoding"], s["encoding_errors"], s["rows"]) == ("utf-8", 1, 8001)
    assert _columns(s)["city"]["distinct"] == 1  # Zürich either way


def test_distinct_count_is_estimated_past_the_bound(monkeypatch):
    monkeypatch.setattr(AwsS3, "MAX_EXACT_DISTINCT", 1000)
    monkeypatch.setattr(AwsS3, "EXACT_DISTINCT_BUDGET", 1000)
    content = b"key,group\n" + b"".join(b"k%d,%d\n" % (i, i % 10) for i in range(40_000))
    columns = _columns(analyse_bytes(content)["summary"])
    assert columns["key"]["distinct_exact"] is False
    assert columns["key"]["distinct"] == pytest.approx(40_000, rel=0.1)
    assert (columns["group"]["distinct"], columns["group"]["distinct_exact"]) == (10, True)


# --- other text, binary, empty --------------------------------------------------------


def test_plain_text_says_it_is_none_of_the_formats():
    content = b"Dear reader,\n\nthis is prose.\nNothing more.\n"
    report = analyse_bytes(content)
    s = report["summary"]
    assert report["format"] == "text" and report["lines"] == 4
    assert s["recognised"] is False and "not FASTQ, VCF, CSV or TSV" in s["note"]
    assert (s["longest_line"], s["blank_lines"]) == (14, 1)
    assert s["byte_classes_percent"]["printable_ascii"] == 100.0


def test_binary_gets_a_byte_histogram_summary():
    content = bytes(range(256)) * 400 + b"\x00" * 102_400
    report = analyse_bytes(content)
    s = report["summary"]
    assert report["format"] == "binary" and s["recognised"] is False
    assert s["byte_classes_percent"]["zero"] == pytest.approx(100 * (400 + 102_400) / len(content), abs=1e-3)
    assert s["byte_classes_percent"]["high"] == pytest.approx(100 * 128 * 400 / len(content), abs=1e-3)
    assert s["top_bytes"][0]["byte"] == 0
    assert 0 < s["entropy_bits_per_byte"] < 8


def test_one_repeated_byte_has_an_entropy_of_zero_not_minus_zero():
    s = analyse_bytes(b"x" * 1000 + b"\n")["summary"]
    assert s["distinct_bytes_sampled"] == 1
    assert json.dumps(s["entropy_bits_per_byte"]) == "0.0"


def test_gzip_of_nothing_is_empty_content():
    report = analyse_bytes(gzip.compress(b"", mtime=0))
    assert (report["format"], report["lines"], report["content_bytes"]) == ("empty", 0, 0)


# --- the streaming pass ---------------------------------------------------------------


def test_decompression_comes_in_bounded_pieces():
    bomb = gzip.compress(b"\x00" * (20 * AwsS3.PIECE_SIZE), mtime=0)
    stream = AwsS3.GzipStream()
    pieces = [len(piece) for piece in stream.feed(bomb, 0)]
    assert sum(pieces) == 20 * AwsS3.PIECE_SIZE
    assert max(pieces) <= AwsS3.PIECE_SIZE


def test_multi_member_gzip_cut_anywhere():
    members = [gzip.compress(b"line %d\n" % i * 500, mtime=0) for i in range(5)] + [gzip.compress(b"", mtime=0)]
    content = b"".join(members)
    report = AwsS3.analyse_stream(random_chunks(content, 3, 700))
    assert report["gzip_members"] == 6 and report["lines"] == 2500
    assert report["sha256"] == hashlib.sha256(content).hexdigest()


def test_a_failing_reader_is_raised_not_hung():
    def chunks():
        yield b"a,b\n1,2\n"
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        AwsS3.analyse_stream(chunks())


def test_long_runs_log_progress(monkeypatch, caplog):
    monkeypatch.setattr(AwsS3, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="awsfun.worker")
    analyse_bytes(b"x\n" * 100_000, chunk=10_000)
    progress = [r.getMessage() for r in caplog.records if "MB/s" in r.getMessage() and "read" in r.getMessage()]
    assert progress and "of 0.2 MB" not in progress[0]  # no total given: no "of"
    assert any("analysed 0.2 MB (text)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("max_value", [1, 126, 255])
def test_byte_sum_is_the_exact_sum(max_value):
    rng = random.Random(max_value)
    data = bytes(rng.randint(0, max_value) for _ in range(300_000))
    assert AwsS3.byte_sum(data, max_value) == sum(data)
    assert AwsS3.byte_sum(b"") == 0


def test_local_report_keeps_the_contract_fields(tmp_path):
    path = tmp_path / "r.fastq.gz"
    path.write_bytes(gzip.compress((DATA / "reads.fastq").read_bytes(), mtime=0))
    report = AwsS3.analyse_file(str(path))
    assert {"input", "bytes", "lines", "sha256", "format", "summary", "compression"} <= set(report)
    assert report["input"] == {"path": str(path), "size": path.stat().st_size}
    assert {"reads", "bases", "gc_percent", "mean_quality"} <= set(report["summary"])
