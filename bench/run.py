#!/usr/bin/env python3
"""Benchmark: time `python3 AwsS3.py PATH` against what a user would otherwise run for the same facts.

    python3 bench/run.py                 # 300 MB per format, median of 3 runs
    python3 bench/run.py --quick         # 20 MB, 1 run: a smoke test
    python3 bench/run.py --mb 1000 --runs 5
    python3 bench/run.py --memory        # also peak memory of AwsS3.py at 100 MB and 1 GB

Peers: `sha256sum` + `seqkit stats -a` (FASTQ), `sha256sum` + `bcftools stats` (VCF),
DuckDB's `SUMMARIZE` (CSV). Missing peers are installed (apt-get for seqkit and bcftools,
pip for duckdb into this interpreter). Each command runs once untimed so every run reads
from the page cache, then the commands take turns, N runs each. Times are wall-clock
medians; CPU is user + system of the process and its children; peak RSS is the largest
resident set of any process of the command (from wait4). Generated data goes to
bench/data/ (git-ignored) and is reused.
"""

import argparse
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import generate  # noqa: E402

logger = logging.getLogger("awsfun.bench")

WORKER = os.path.join(REPO, "AwsS3.py")
DUCKDB_SUMMARIZE = ("import sys, duckdb; con = duckdb.connect(); con.execute('SET enable_progress_bar = false'); "
                    "rows = con.sql(\"SUMMARIZE SELECT * FROM read_csv('\" + sys.argv[1] + \"')\").fetchall(); "
                    "print(len(rows), 'columns summarised')")
GNU_TIME = "/usr/bin/time"
APT_PEERS = {"seqkit": "seqkit", "bcftools": "bcftools", GNU_TIME: "time", "sha256sum": "coreutils"}


def ensure_peers():
    """Install the peer tools that are missing: seqkit and bcftools from Debian, duckdb from PyPI."""
    missing = sorted({package for tool, package in APT_PEERS.items() if shutil.which(tool) is None})
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        logger.info("installing %s with apt-get", " ".join(missing))
        if subprocess.run(sudo + ["apt-get", "install", "-y", *missing], check=False).returncode != 0:
            subprocess.run(sudo + ["apt-get", "update"], check=True)
            subprocess.run(sudo + ["apt-get", "install", "-y", *missing], check=True)
    if importlib.util.find_spec("duckdb") is None:  # not imported here: it would swell this process
        logger.info("installing duckdb with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                        os.path.join(HERE, "requirements.txt")], check=True)


def run_once(argv_list):
    """Run commands one after another; return (wall seconds, CPU seconds, peak RSS in MB, outputs).

    GNU time measures each command: the rusage Python's own wait4 reports would include
    the memory of this (forked) Python process, not only the command's.
    """
    wall = cpu = 0.0
    peak = 0.0
    outputs = []
    with tempfile.NamedTemporaryFile("r", prefix="awsfun-bench-", suffix=".time") as usage:
        for argv in argv_list:
            started = time.perf_counter()
            done = subprocess.run([GNU_TIME, "-f", "%M %U %S", "-o", usage.name, *argv],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False)
            wall += time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{argv} exited with {done.returncode}")
            usage.seek(0)
            rss_kb, user, system = usage.read().split()[-3:]
            cpu += float(user) + float(system)
            peak = max(peak, int(rss_kb) / 1024)
            outputs.append(done.stdout.decode("utf-8", "replace"))
    return wall, cpu, peak, outputs


def measure(tools, runs):
    """Time every tool `runs` times, in turns after one untimed warm-up each; return results by name."""
    results = {name: {"wall": [], "cpu": [], "rss": [], "outputs": None} for name in tools}
    for name, argv_list in tools.items():
        results[name]["outputs"] = run_once(argv_list)[3]
    for round_number in range(runs):
        for name, argv_list in tools.items():
            wall, cpu, rss, _ = run_once(argv_list)
            logger.info("run %d  %-28s %6.2f s  cpu %6.2f s  %6.1f MB", round_number + 1, name, wall, cpu, rss)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
            results[name]["rss"].append(rss)
    return results


def fastq_tools(path):
    """The FASTQ contenders."""
    return {"awsfun (AwsS3.py)": [[sys.executable, WORKER, path]],
            "sha256sum": [["sha256sum", path]],
            "seqkit stats -a": [["seqkit", "stats", "-a", "-T", path]],
            "sha256sum + seqkit stats -a": [["sha256sum", path], ["seqkit", "stats", "-a", "-T", path]]}


def vcf_tools(path):
    """The VCF contenders."""
    return {"awsfun (AwsS3.py)": [[sys.executable, WORKER, path]],
            "bcftools stats": [["bcftools", "stats", path]],
            "sha256sum + bcftools stats": [["sha256sum", path], ["bcftools", "stats", path]]}


def csv_tools(path):
    """The CSV contenders."""
    duckdb = [sys.executable, "-c", DUCKDB_SUMMARIZE, path]
    return {"awsfun (AwsS3.py)": [[sys.executable, WORKER, path]],
            "DuckDB SUMMARIZE": [duckdb],
            "sha256sum + DuckDB SUMMARIZE": [["sha256sum", path], duckdb]}


PEER = {"fastq": "sha256sum + seqkit stats -a", "vcf": "sha256sum + bcftools stats",
        "csv": "sha256sum + DuckDB SUMMARIZE"}
TOOLS = {"fastq": fastq_tools, "vcf": vcf_tools, "csv": csv_tools}


def agreement(fmt, results):
    """Return a line saying whether AwsS3.py's counts agree with the peer's on the benchmark file."""
    summary = json.loads(results["awsfun (AwsS3.py)"]["outputs"][0])["summary"]
    if fmt == "fastq":
        header, values = results["seqkit stats -a"]["outputs"][0].strip().split("\n")[:2]
        seqkit = dict(zip(header.split("\t"), values.split("\t")))
        pairs = {"reads": (summary["reads"], int(seqkit["num_seqs"])),
                 "bases": (summary["bases"], int(seqkit["sum_len"])),
                 "GC %": (round(summary["gc_percent"], 2), float(seqkit["GC(%)"])),
                 "N50": (summary["n50"], int(seqkit["N50"])),
                 "Q30 %": (round(summary["q30_percent"], 2), float(seqkit["Q30(%)"]))}
    elif fmt == "vcf":
        numbers = {}
        for line in results["bcftools stats"]["outputs"][0].splitlines():
            if line.startswith("SN\t"):
                _, _, label, value = line.split("\t")
                numbers[label.rstrip(":")] = int(value)
        pairs = {"records": (summary["records"], numbers["number of records"]),
                 "SNVs": (summary["snvs"], numbers["number of SNPs"]),
                 "MNVs": (summary["mnvs"], numbers["number of MNPs"]),
                 "indels": (summary["indels"], numbers["number of indels"])}
    else:
        last = results["DuckDB SUMMARIZE"]["outputs"][0].strip().splitlines()[-1]
        pairs = {"columns": (summary["columns"], int(last.split()[0]))}
    verdict = "agree" if all(a == b for a, b in pairs.values()) else "DISAGREE"
    return f"{fmt}: counts {verdict} with the peer: " + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in pairs.items())


def table(rows):
    """Return a Markdown table of benchmark rows."""
    lines = ["| format | size | tool | median s | CPU s | vs peer | peak RSS MB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append("| {format} | {size} | {tool} | {wall:.2f} | {cpu:.2f} | {ratio} | {rss:.0f} |".format(**row))
    return "\n".join(lines)


def benchmark(megabytes, runs, formats):
    """Generate the files, time every contender; return the table rows and agreement lines."""
    paths = generate.generate(os.path.join(HERE, "data"), megabytes, formats)
    rows, checks = [], []
    for fmt in formats:
        path = paths[fmt]
        size = f"{os.path.getsize(path) / 1e6:.0f} MB"
        results = measure(TOOLS[fmt](path), runs)
        peer = statistics.median(results[PEER[fmt]]["wall"])
        peer_cpu = statistics.median(results[PEER[fmt]]["cpu"])
        for name, result in results.items():
            wall, cpu = statistics.median(result["wall"]), statistics.median(result["cpu"])
            ratio = ""
            if name == PEER[fmt]:
                ratio = "peer"
            elif name == "awsfun (AwsS3.py)":
                ratio = f"{wall / peer:.2f}x (CPU {cpu / peer_cpu:.2f}x)"
            rows.append({"format": fmt, "size": size, "tool": name, "wall": wall,
                         "cpu": cpu, "ratio": ratio, "rss": max(result["rss"])})
        try:
            checks.append(agreement(fmt, results))
        except (ValueError, KeyError, IndexError) as err:  # a peer's output format changed: say so, keep the table
            checks.append(f"{fmt}: could not compare the counts with the peer's output: {err!r}")
    return rows, checks


def memory_profile(sizes, formats):
    """Return rows of AwsS3.py's peak RSS on each format at each size (in MB), one run each."""
    rows = []
    for megabytes in sizes:
        paths = generate.generate(os.path.join(HERE, "data"), megabytes, formats)
        for fmt in formats:
            wall, cpu, rss, _ = run_once([[sys.executable, WORKER, paths[fmt]]])
            logger.info("memory %s %d MB: %.1f MB peak RSS, %.1f s", fmt, megabytes, rss, wall)
            rows.append(f"| {fmt} | {os.path.getsize(paths[fmt]) / 1e6:.0f} MB | {rss:.1f} | {wall:.1f} |")
    return ["| format | input | AwsS3.py peak RSS MB | seconds |", "| --- | ---: | ---: | ---: |"] + rows


def main():
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=300, help="size of each generated file in MB (default 300)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per command (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 MB files, 1 run")
    parser.add_argument("--formats", nargs="+", choices=sorted(TOOLS), default=["fastq", "vcf", "csv"])
    parser.add_argument("--memory", action="store_true",
                        help="also measure AwsS3.py's peak memory at 100 MB and 1 GB of each format")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.quick:
        args.mb, args.runs = 20, 1
    ensure_peers()
    rows, checks = benchmark(args.mb, args.runs, args.formats)
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"\n{cores} cores, load average {load:.1f} at the end; median of {args.runs} run(s)\n")
    print(table(rows))
    print()
    for line in checks:
        print(line)
    if args.memory:
        print()
        print("\n".join(memory_profile([100, 1000], args.formats)))


if __name__ == "__main__":
    main()
