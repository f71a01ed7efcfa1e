"""bench/peers.py reads the peers' output as it is printed, and the corpus has no untested file.

The peer tools are not needed here: their output is the text seqkit 2.3.0 and bcftools 1.16
printed for files of tests/peers/, given to the parsers in place of a run.
"""

import importlib.util
import json

import pytest

from support import REPO

SEQKIT_OUTPUT = (
    "file\tformat\ttype\tnum_seqs\tsum_len\tmin_len\tavg_len\tmax_len\tQ1\tQ2\tQ3\tsum_gap\tN50\tQ20(%)\tQ30(%)\tGC(%)\n"
    "tests/peers/fastq/wrapped_crlf.fq\tFASTQ\tDNA\t6\t451\t1\t75.2\t150\t59.0\t60.5\t120.0\t0\t120\t83.37\t76.72\t44.57\n")
# seqkit fx2tab -l: name, sequence, quality, length (a name may hold a tab)
FX2TAB_OUTPUT = (b"r1\tACGT\t!!II\t4\nr2\t\t\t0\nr3 x\ty\t" + b"A" * 70 + b"\t" + b"I" * 70 + b"\t70\n"
                 b"r4\tACGTA\t     \t5\n")
BCFTOOLS_OUTPUT = """# SN, Summary numbers:
# SN\t[2]id\t[3]key\t[4]value
SN\t0\tnumber of samples:\t2
SN\t0\tnumber of records:\t11
SN\t0\tnumber of no-ALTs:\t1
SN\t0\tnumber of SNPs:\t8
SN\t0\tnumber of MNPs:\t1
SN\t0\tnumber of indels:\t3
SN\t0\tnumber of others:\t1
SN\t0\tnumber of multiallelic sites:\t11
SN\t0\tnumber of multiallelic SNP sites:\t4
# TSTV, transitions/transversions:
# TSTV\t[2]id\t[3]ts\t[4]tv\t[5]ts/tv\t[6]ts (1st ALT)\t[7]tv (1st ALT)\t[8]ts/tv (1st ALT)
TSTV\t0\t7\t4\t1.75\t6\t0\t0.00
"""


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", REPO / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seqkit_output_becomes_report_paths(peers, monkeypatch):
    outputs = {"stats": SEQKIT_OUTPUT, "fx2tab": FX2TAB_OUTPUT}
    monkeypatch.setattr(peers, "run", lambda argv, text=True: outputs[argv[1]])
    assert peers.PEERS["fastq"]("x.fq") == {
        "format": "fastq", "summary.reads": 6, "summary.bases": 451, "summary.min_length": 1,
        "summary.max_length": 150, "summary.n50": 120, "summary.gc_percent": 44.57,
        "summary.q20_percent": 83.37, "summary.q30_percent": 76.72,
        # lengths 0..70 span 71 values: bins of 2; the empty read has no mean quality; a mean
        # below '!' counts as 0
        "summary.read_length_histogram": {"bin_width": 2, "bins": [[0, 1], [4, 2], [70, 1]]},
        "summary.mean_quality_histogram": [[0, 1], [20, 1], [40, 1]]}


def test_bcftools_output_becomes_report_paths(peers, monkeypatch):
    monkeypatch.setattr(peers, "run", lambda argv: BCFTOOLS_OUTPUT)
    assert peers.PEERS["vcf"]("x.vcf") == {
        "format": "vcf", "summary.samples": 2, "summary.records": 11, "summary.no_alt": 1,
        "summary.snvs": 8, "summary.mnvs": 1, "summary.indels": 3, "summary.others": 1,
        "summary.multiallelic_sites": 11, "summary.multiallelic_snv_sites": 4,
        "summary.transitions": 7, "summary.transversions": 4}


def test_disagreements_name_the_path_and_both_values(peers):
    report = {"format": "fastq", "summary": {"reads": 3, "gc_percent": 53.571}}
    peer = {"format": "fastq", "summary.reads": 2, "summary.gc_percent": 53.57, "summary.n50": 4}
    assert peers.disagreements(report, peer) == {"summary.reads": (3, 2), "summary.n50": ("<missing>", 4)}


def test_every_corpus_file_has_its_peer_values_and_every_entry_its_file(peers):
    for fmt in peers.PEERS:
        directory = REPO / "tests" / "peers" / fmt
        recorded = json.loads((directory / "expected.json").read_text(encoding="utf-8"))
        files = {path.name for path in directory.iterdir() if path.name != "expected.json"}
        assert files == {name for name in recorded if not name.startswith("_")}, fmt
        assert all(case["values"] and case["peer"] and case["kind"]
                   for name, case in recorded.items() if not name.startswith("_"))
