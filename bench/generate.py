#!/usr/bin/env python3
"""Write deterministic FASTQ, VCF and CSV files of a given size for the benchmark.

    python3 bench/generate.py --mb 300 --out bench/data

The same seed and size always give the same bytes, so runs compare like with like.
Content is random but shaped like real data: variable read lengths and a Phred
distribution skewed high (FASTQ), SNVs, MNVs, indels, multiallelic sites and filters
over several chromosomes with genotypes (VCF), and mixed-type columns (CSV).
"""

import argparse
import logging
import os
import random

logger = logging.getLogger("awsfun.bench.generate")

BASES = b"ACGT"
# Quality symbols weighted towards high scores, as Illumina reads are (Phred+33, Q2..Q41).
QUALITY_WEIGHTS = [(q, 1 + (q > 20) * 3 + (q > 30) * 8 + (q > 35) * 10) for q in range(2, 42)]


def byte_table(alphabet, weights=None):
    """Return a 256-byte translate table spreading random bytes over an alphabet."""
    weights = weights or [1] * len(alphabet)
    total = sum(weights)
    table, acc, index = bytearray(), 0, 0
    for value in range(256):
        while (value + 0.5) / 256 * total >= acc + weights[index]:
            acc += weights[index]
            index += 1
        table.append(alphabet[index])
    return bytes(table)


def write_fastq(path, size, seed=1):
    """Write a FASTQ of about `size` bytes: reads of 50-150 bases, with some Ns."""
    rng = random.Random(seed)
    base_table = byte_table(b"ACGTN", [63, 64, 64, 64, 1])  # about 1 N in 256 bases
    quality_table = byte_table(bytes(33 + q for q, _ in QUALITY_WEIGHTS), [w for _, w in QUALITY_WEIGHTS])
    written, read = 0, 0
    batch = max(1, min(2000, size // 400))
    with open(path, "wb") as out:
        while written < size:
            records = []
            for _ in range(batch):
                read += 1
                length = rng.choice((150, 150, 150, 150, 149, 148, 151, 120, 100, 75, 50))
                sequence = rng.randbytes(length).translate(base_table)
                quality = rng.randbytes(length).translate(quality_table)
                records.append(b"@bench:%d length=%d\n%s\n+\n%s\n" % (read, length, sequence, quality))
            block = b"".join(records)
            out.write(block)
            written += len(block)
    return read


def write_vcf(path, size, seed=2, samples=4):
    """Write a VCF of about `size` bytes with SNVs, MNVs, indels, multiallelics and filters."""
    rng = random.Random(seed)
    chromosomes = [f"chr{n}" for n in range(1, 23)] + ["chrX"]
    names = [f"S{n:03d}" for n in range(1, samples + 1)]
    header = ["##fileformat=VCFv4.2", "##source=awsfun-bench"]
    header += [f"##contig=<ID={c},length=250000000>" for c in chromosomes]
    header += ['##FILTER=<ID=PASS,Description="All filters passed">',
               '##FILTER=<ID=LowQual,Description="Low quality">',
               '##FILTER=<ID=LowDP,Description="Low depth">',
               '##INFO=<ID=DP,Number=1,Type=Integer,Description="Depth">',
               '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
               '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Depth">',
               "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT"] + names)]
    genotypes = ["0/0", "0/1", "1/1", "0/1", "0/0"]
    written, records = 0, 0
    per_chromosome = max(1, size // 70 // len(chromosomes))  # records are about 70 bytes
    with open(path, "w", encoding="ascii", newline="\n") as out:
        text = "\n".join(header) + "\n"
        out.write(text)
        written += len(text)
        for chromosome in chromosomes:
            position = 10000
            lines = []
            for _ in range(per_chromosome):
                position += rng.randint(1, 400)
                ref, alt = random_variant(rng)
                flt = rng.choice(("PASS", "PASS", "PASS", "PASS", "LowQual", "LowDP", "."))
                calls = "\t".join(f"{rng.choice(genotypes)}:{rng.randint(3, 60)}" for _ in names)
                lines.append(f"{chromosome}\t{position}\t.\t{ref}\t{alt}\t{rng.randint(10, 99)}\t{flt}"
                             f"\tDP={rng.randint(5, 300)}\tGT:DP\t{calls}\n")
                records += 1
                if len(lines) == 5000:
                    text = "".join(lines)
                    out.write(text)
                    written += len(text)
                    lines = []
            text = "".join(lines)
            out.write(text)
            written += len(text)
    return records


def random_bases(rng, n):
    """Return n random bases as text."""
    return "".join(rng.choice("ACGT") for _ in range(n))


def random_variant(rng):
    """Return (REF, ALT) for a random variant type, weighted like a real call set."""
    kind = rng.random()
    ref = rng.choice("ACGT")
    if kind < 0.80:
        # Transitions twice as likely as transversions, roughly as in human call sets.
        transition = {"A": "G", "G": "A", "C": "T", "T": "C"}[ref]
        if rng.random() < 0.67:
            return ref, transition
        return ref, rng.choice([b for b in "ACGT" if b not in (ref, transition)])
    if kind < 0.86:
        others = [b for b in "ACGT" if b != ref]
        rng.shuffle(others)
        return ref, ",".join(others[:2])
    if kind < 0.92:
        return ref, ref + random_bases(rng, rng.randint(1, 6))
    if kind < 0.97:
        return ref + random_bases(rng, rng.randint(1, 6)), ref
    ref = random_bases(rng, 2)
    alt = "".join(rng.choice([b for b in "ACGT" if b != r]) for r in ref)
    return ref, alt


def write_csv(path, size, seed=3):
    """Write a CSV of about `size` bytes: ids, categories, dates, floats, ints, booleans, gaps."""
    rng = random.Random(seed)
    sites = ["north", "south", "east", "west", "centre"]
    written, row = 0, 0
    batch = max(1, min(5000, size // 800))
    with open(path, "w", encoding="ascii", newline="\n") as out:
        text = "sample_id,site,collected,temperature_c,ph,reads,passed_qc,note\n"
        out.write(text)
        written += len(text)
        while written < size:
            lines = []
            for _ in range(batch):
                row += 1
                temperature = "" if rng.random() < 0.01 else f"{rng.gauss(18, 4):.2f}"
                lines.append(f"S{row:08d},{rng.choice(sites)},2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
                             f"{temperature},{rng.uniform(5.5, 8.5):.2f},{rng.randint(0, 5_000_000)},"
                             f"{rng.choice(('true', 'false'))},{rng.choice(('', 'ok', 'redo', 'check'))}\n")
            text = "".join(lines)
            out.write(text)
            written += len(text)
    return row


GENERATORS = {"fastq": ("reads.fastq", write_fastq), "vcf": ("calls.vcf", write_vcf),
              "csv": ("table.csv", write_csv)}


def generate(out_dir, megabytes, formats=tuple(GENERATORS)):
    """Write each format's file of about `megabytes` MB under out_dir (reused if present); return paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for fmt in formats:
        name, writer = GENERATORS[fmt]
        stem, ext = name.rsplit(".", 1)
        path = os.path.join(out_dir, f"{stem}-{megabytes}mb.{ext}")
        if not os.path.exists(path):
            logger.info("writing %s", path)
            writer(path + ".part", megabytes * 1_000_000)
            os.replace(path + ".part", path)
        paths[fmt] = path
    return paths


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of each file in MB")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data"))
    parser.add_argument("--formats", nargs="+", choices=sorted(GENERATORS), default=sorted(GENERATORS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for fmt, path in generate(args.out, args.mb, args.formats).items():
        print(fmt, path, os.path.getsize(path))


if __name__ == "__main__":
    main()
