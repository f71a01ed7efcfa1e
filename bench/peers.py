#!/usr/bin/env python3
"""Re-run the peer tools on the peer-agreement corpus and print every disagreement with AwsS3.py.

    python3 bench/peers.py                   # every file in tests/peers/FORMAT/, FORMAT in PEERS
    python3 bench/peers.py --generated       # also small files from bench/generate.py (the FASTQ also wrapped)
    python3 bench/peers.py FILE...           # any files (the format is AwsS3's sniffed one, or --format)
    python3 bench/peers.py --add FILE --kind "why the file is there"
                                             # copy FILE into tests/peers/FORMAT/ and record the peer's
                                             # values for it in that directory's expected.json

PEERS maps a format to a function(path) -> {dotted path: the peer's value}. The dotted paths
are the ones tests/peers/*/expected.json uses ("summary.reads", "format"), so a value here is
compared with AwsS3's report exactly as tests/test_peer_agreement.py compares it (at the
precision the peer printed). PEER_COMMANDS names the command; its version is asked of the
tool at run time. To add a format, add its function to both dicts (and its tool to
bench/run.py's ensure_peers): the corpus directory tests/peers/FORMAT/ is picked up.

Prints one line per disagreement (file, dotted path, report, peer), one line per value the
peer now gives differently from what expected.json recorded, then the agreement table per
format (files agreeing / total). Exits 1 when any file disagrees.

Peers: seqkit stats -a -T and seqkit fx2tab (FASTQ), bcftools stats (VCF); bench/run.py --quick
installs them.
CSV/TSV: DuckDB, in bench/peers_csv.py (it knows the report's deliberate differences); on the
whole corpus this script runs it too, after the table above, and exits 1 if either disagrees.
"""

import argparse
import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(REPO, "tests", "peers")
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

import AwsS3  # noqa: E402
import generate  # noqa: E402
from test_peer_agreement import agrees, lookup  # noqa: E402 - one rule for the tests and this script

logger = logging.getLogger("awsfun.bench.peers")


def run(argv, text=True):
    """Run a peer; return its standard output (bytes unless text), or raise with its standard error."""
    done = subprocess.run(argv, capture_output=True, text=text, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[:300]}")
    return done.stdout


def number(text):
    """Return an int for '12', a float for '53.57' (as the peer printed it)."""
    return float(text) if "." in text else int(text)


def seqkit_values(path):
    """Return what `seqkit stats -a -T` says of a FASTQ, as dotted paths into AwsS3's report."""
    header, values = run(["seqkit", "stats", "-a", "-T", path]).strip().split("\n")[:2]
    stats = dict(zip(header.split("\t"), values.split("\t")))
    found = {"format": "fastq", "summary.reads": int(stats["num_seqs"]), "summary.bases": int(stats["sum_len"])}
    if found["summary.reads"]:  # seqkit prints zeros for an empty file; the report says null
        found.update({"summary.min_length": int(stats["min_len"]), "summary.max_length": int(stats["max_len"])})
    if found["summary.bases"]:  # seqkit prints NaN for no bases
        found.update({
            "summary.n50": int(stats["N50"]),
            "summary.gc_percent": number(stats["GC(%)"]),
            "summary.q20_percent": number(stats["Q20(%)"]),
            "summary.q30_percent": number(stats["Q30(%)"]),
        })
    found.update(fx2tab_histograms(run(["seqkit", "fx2tab", "-l", path], text=False)))
    return found


def fx2tab_histograms(output):
    """Return the report's two per-read histograms from `seqkit fx2tab -l` (name, seq, qual, length).

    Lengths are seqkit's. The mean quality is not seqkit's (`fx2tab -q` averages error
    probabilities: !!II gives 3.01): it is FastQC's, the byte sum of the quality seqkit read
    divided by its length, rounded down, minus 33, reads with no quality left out; a mean
    outside 0..93 counts at the nearer end.
    """
    lengths, means = collections.Counter(), collections.Counter()
    for line in output.split(b"\n")[:-1]:
        quality, length = line.rsplit(b"\t", 3)[2:]
        lengths[int(length)] += 1
        if quality:
            means[min(max(sum(quality) // len(quality) - 33, 0), 93)] += 1
    widths = (step * 10 ** power for power in range(20) for step in (1, 2, 5))
    low, high = min(lengths, default=0), max(lengths, default=0)
    width = next(width for width in widths if high // width - low // width + 1 <= 64)
    bins = collections.Counter()
    for length, reads in lengths.items():
        bins[length - length % width] += reads
    return {"summary.read_length_histogram": {"bin_width": width, "bins": [list(b) for b in sorted(bins.items())]},
            "summary.mean_quality_histogram": [list(m) for m in sorted(means.items())]}


BCFTOOLS_SN = {
    "number of samples:": "summary.samples",
    "number of records:": "summary.records",
    "number of no-ALTs:": "summary.no_alt",
    "number of SNPs:": "summary.snvs",
    "number of MNPs:": "summary.mnvs",
    "number of indels:": "summary.indels",
    "number of others:": "summary.others",
    "number of multiallelic sites:": "summary.multiallelic_sites",
    "number of multiallelic SNP sites:": "summary.multiallelic_snv_sites",
}


def bcftools_values(path):
    """Return what `bcftools stats` says of a VCF (its SN and TSTV lines), as dotted paths."""
    found = {"format": "vcf"}
    for line in run(["bcftools", "stats", path]).splitlines():
        fields = line.split("\t")
        if fields[0] == "SN" and fields[2] in BCFTOOLS_SN:
            found[BCFTOOLS_SN[fields[2]]] = int(fields[3])
        elif fields[0] == "TSTV":
            found["summary.transitions"], found["summary.transversions"] = int(fields[2]), int(fields[3])
    return found


# Not compared: seqkit's avg_len, printed to 1 decimal and rounded half up (51261.25 -> 51261.3),
# where comparing at its precision rounds half to even; the report's mean_length has 3 decimals.
# The same tie rule shows on a percentage that is exactly x.xx5 (13/32 = 40.625: seqkit 40.63,
# round() 40.62); the report's figure is exact there, and such a line is the comparison's.
PEERS = {"fastq": seqkit_values, "vcf": bcftools_values}
PEER_COMMANDS = {"fastq": ["seqkit", "stats", "-a", "-T"], "vcf": ["bcftools", "stats"]}
# Recorded with the peer's name: the other commands a format's peer values come from.
PEER_ALSO = {"fastq": "; seqkit fx2tab -l (mean quality as FastQC's)"}
VERSION_COMMANDS = {"seqkit": ["seqkit", "version"], "bcftools": ["bcftools", "--version"]}


def peer_name(fmt):
    """Return the peer command with its version, as expected.json's "peer" records it."""
    command = PEER_COMMANDS[fmt]
    version = run(VERSION_COMMANDS[command[0]]).split("\n")[0].split()[-1].lstrip("v")
    return f"{' '.join(command)}{PEER_ALSO.get(fmt, '')} ({command[0]} {version})"


def disagreements(report, peer):
    """Return {dotted path: (report's value, peer's value)} where the report does not say what the peer said."""
    wrong = {}
    for dotted, expected in peer.items():
        try:
            actual = lookup(report, dotted)
        except (KeyError, IndexError, TypeError):
            actual = "<missing>"
        if not agrees(actual, expected):
            wrong[dotted] = (actual, expected)
    return wrong


def corpus_files(formats):
    """Yield (format, path, recorded case or None) for every file in tests/peers/FORMAT/."""
    for fmt in formats:
        directory = os.path.join(CORPUS, fmt)
        expected_path = os.path.join(directory, "expected.json")
        recorded = {}
        if os.path.exists(expected_path):
            with open(expected_path, encoding="utf-8") as handle:
                recorded = json.load(handle)
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else ():
            if name != "expected.json":
                yield fmt, os.path.join(directory, name), recorded.get(name)


def rewrap_fastq(source, target, width):
    """Write a four-line FASTQ's records with sequence and quality wrapped at `width`.

    (`seqkit seq -w` wraps FASTA only, so the wrapping is done here.)
    """
    with open(source, "rb") as reads, open(target, "wb") as out:
        for head in reads:
            sequence, plus, quality = reads.readline().rstrip(b"\n"), reads.readline(), reads.readline().rstrip(b"\n")
            out.write(head + wrap(sequence, width) + plus + wrap(quality, width))


def wrap(text, width):
    """Return text as lines of `width` bytes, each with its newline (one empty line for no text)."""
    return b"".join(text[i:i + width] + b"\n" for i in range(0, len(text), width)) or b"\n"


def generated_files(formats, work):
    """Yield (format, path, None) for small bench/generate.py files, and the FASTQ rewrapped."""
    paths = generate.generate(os.path.join(HERE, "data"), 2, [fmt for fmt in formats if fmt in generate.GENERATORS])
    for fmt, path in sorted(paths.items()):
        yield fmt, path, None
        if fmt == "fastq":
            for width in (60, 7):
                wrapped = os.path.join(work, f"reads-2mb-w{width}.fastq")
                rewrap_fastq(path, wrapped, width)
                yield fmt, wrapped, None


def check(items):
    """Compare each file's report with its peer; print disagreements; return {format: [agreeing, total]}."""
    table = {}
    for fmt, path, case in items:
        shown = os.path.relpath(path, REPO)
        tally = table.setdefault(fmt, [0, 0])
        tally[1] += 1
        try:
            peer = PEERS[fmt](path)
        except RuntimeError as err:
            print(f"{shown}: the peer failed: {err}")
            continue
        report = AwsS3.analyse_file(path)
        wrong = disagreements(report, peer)
        for dotted, (actual, expected) in wrong.items():
            print(f"{shown}: {dotted}: report {actual!r}, peer {expected!r}")
        if case:
            for dotted, value in case["values"].items():
                if dotted in peer and not agrees(value, peer[dotted]):
                    print(f"{shown}: {dotted}: expected.json records {value!r}, the peer now says {peer[dotted]!r}")
        tally[0] += not wrong
    return table


def add_case(path, fmt, kind):
    """Copy a file into tests/peers/FORMAT/ and record its peer values in expected.json; return the entry."""
    directory = os.path.join(CORPUS, fmt)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, os.path.basename(path))
    if os.path.abspath(path) != os.path.abspath(target):
        shutil.copyfile(path, target)
    expected_path = os.path.join(directory, "expected.json")
    recorded = {}
    if os.path.exists(expected_path):
        with open(expected_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    entry = {"kind": kind, "peer": peer_name(fmt), "values": PEERS[fmt](target)}
    recorded[os.path.basename(path)] = entry
    with open(expected_path, "w", encoding="utf-8") as handle:
        json.dump(recorded, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    return entry


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("files", nargs="*", help="files to check instead of the corpus")
    parser.add_argument("--format", choices=sorted(PEERS), help="the files' format (default: AwsS3's sniffing)")
    parser.add_argument("--formats", nargs="+", choices=sorted(PEERS), default=sorted(PEERS),
                        help="corpus directories to check (default: all)")
    parser.add_argument("--generated", action="store_true",
                        help="also check small generated files (the FASTQ also wrapped at 60 and 7)")
    parser.add_argument("--add", metavar="FILE", help="add FILE to the corpus with the peer's values")
    parser.add_argument("--kind", help="with --add: the fault or case the file stands for")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("awsfun.worker").setLevel(logging.WARNING)  # one "analysed" line per file is noise here
    if args.add:
        if not args.kind:
            parser.error("--add needs --kind")
        fmt = args.format or AwsS3.analyse_file(args.add)["format"]
        if fmt not in PEERS:
            parser.error(f"{args.add} reads as {fmt}: give --format (one of {', '.join(sorted(PEERS))})")
        entry = add_case(args.add, fmt, args.kind)
        print(json.dumps(entry, indent=2, ensure_ascii=False))
        return 0
    with tempfile.TemporaryDirectory(prefix="awsfun-peers-") as work:
        if args.files:
            items = []
            for path in args.files:
                fmt = args.format or AwsS3.analyse_file(path)["format"]
                if fmt not in PEERS:
                    print(f"{path}: reads as {fmt}, which has no peer here (give --format)")
                    continue
                items.append((fmt, path, None))
        else:
            items = list(corpus_files(args.formats))
            if args.generated:
                items += list(generated_files(args.formats, work))
        table = check(items)
    print("\n| format | peer | files agreeing / total |\n| --- | --- | ---: |")
    for fmt, (agreeing, total) in sorted(table.items()):
        print(f"| {fmt} | {peer_name(fmt)} | {agreeing} / {total} |")
    status = 0 if all(agreeing == total for agreeing, total in table.values()) else 1
    if not args.files:
        import peers_csv  # DuckDB: imported only here, where the tables are checked

        print()
        status |= peers_csv.main(["--generated"] if args.generated else [])
    return status


if __name__ == "__main__":
    sys.exit(main())
