#!/usr/bin/env python3
"""Re-run DuckDB on CSV/TSV files and print every value where AwsS3.py's report disagrees.

    python3 bench/peers_csv.py                  # every file in tests/peers/csv/
    python3 bench/peers_csv.py --generated      # also a small table from bench/generate.py
    python3 bench/peers_csv.py FILE...          # any tables: a new disagreement is one command from a test

csv_peer_values(path) returns {dotted path into the report: DuckDB's value}, the same dotted
paths tests/peers/csv/expected.json uses, compared by the same rule as
tests/test_peer_agreement.py (at the precision the peer printed). DuckDB (duckdb from PyPI,
bench/requirements.txt) is asked through sniff_csv (delimiter, title rows, header, names and
types), read_csv with that dialect and store_rejects=true (the rows it keeps, the lines it
rejects) and one aggregate query per column (empties, min, max, mean, std, distinct values).

Left out, because DuckDB gives no answer the report could share: a mean or std that DuckDB
overflows to inf (1e308 + 1e308) or spoils with a NaN (the report keeps them over the finite
numbers and counts the others in non_finite), min and max of timestamps (DuckDB prints its own
format), distinct counts of numbers (the report counts spellings), text longer than the
report's 200 characters. A file DuckDB cannot read as UTF-8 is read with encoding='latin-1'.

Keys named under "deliberate" for a file in tests/peers/csv/expected.json ("*": the whole
file) are where the report differs from DuckDB on purpose (README, "Tables: the conventions,
and where the report differs from DuckDB"): they are printed, and do not fail. Exit status 1
when any other value disagrees, or DuckDB cannot read a file.

The lead merges this with bench/peers.py (FASTQ, VCF) as PEERS["csv"] = csv_peer_values.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CORPUS = os.path.join(REPO, "tests", "peers", "csv")
sys.path[:0] = [REPO, HERE, os.path.join(REPO, "tests")]

import generate  # noqa: E402
from test_peer_agreement import agrees, lookup  # noqa: E402 - one rule for the tests and this script

import AwsS3  # noqa: E402

logger = logging.getLogger("awsfun.bench.peers_csv")

# DuckDB's types as the report's kinds (the report's "date" holds dates and timestamps).
KINDS = {"BOOLEAN": "boolean", "TINYINT": "integer", "SMALLINT": "integer", "INTEGER": "integer",
         "BIGINT": "integer", "HUGEINT": "integer", "UBIGINT": "integer", "DOUBLE": "float",
         "FLOAT": "float", "DATE": "date", "TIMESTAMP": "date", "VARCHAR": "string"}
REPORT_TEXT_LIMIT = 200   # AwsS3.clip: longer min/max text is cut in the report
SIGNIFICANT = 14          # DuckDB's last digits of a mean or std depend on its summation order


def sql_text(value):
    """Return a value as an SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_name(name):
    """Return a column name as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def rounded(number):
    """Return a float to SIGNIFICANT digits, so the comparison is made at that precision."""
    return None if number is None else float(f"{number:.{SIGNIFICANT}g}")


def csv_peer_values(path):
    """Return what DuckDB says of a table, as {dotted path into AwsS3's report: value}.

    Raises duckdb.Error when DuckDB cannot read the file even as latin-1.
    """
    import duckdb  # only here: `python3 bench/peers_csv.py --help` needs no duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    source = sql_text(path)
    sniff = "SELECT Delimiter, Quote, Escape, NewLineDelimiter, SkipRows, HasHeader, Columns FROM sniff_csv"
    try:
        sniffed = con.execute(f"{sniff}({source})").fetchall()[0]
        encoding = ""
    except duckdb.InvalidInputException as err:
        if "utf-8" not in str(err).lower():
            raise
        encoding = ", encoding='latin-1'"
        sniffed = con.execute(f"{sniff}({source}{encoding})").fetchall()[0]
    delimiter, quote, escape, new_line, skip_rows, has_header, columns = sniffed
    # Read with the sniffed dialect as given: store_rejects alone makes DuckDB sniff otherwise.
    types = ", ".join(f"{sql_text(column['name'])}: {sql_text(column['type'])}" for column in columns)
    table = (f"read_csv({source}{encoding}, auto_detect=false, delim={sql_text(delimiter)}, "
             f"quote={sql_text(quote.replace('(empty)', ''))}, escape={sql_text(escape.replace('(empty)', ''))}, "
             f"new_line={sql_text(new_line)}, skip={skip_rows}, header={str(has_header).lower()}, "
             f"columns={{{types}}}, store_rejects=true)")
    rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    rejected, first_rejected = con.execute("SELECT count(DISTINCT line), min(line) FROM reject_errors").fetchall()[0]
    found = {
        "format": "tsv" if delimiter == "\t" else "csv",
        "summary.delimiter": delimiter,
        "summary.skip_rows": skip_rows,
        "summary.header_detected": has_header,
        "summary.header": [column["name"] for column in columns],
        "summary.columns": len(columns),
        "summary.rows": rows,
        "summary.malformed_rows": rejected,
    }
    if rejected:
        found["summary.first_malformed_line"] = first_rejected
    for index, column in enumerate(columns[:AwsS3.MAX_PROFILED_COLUMNS]):
        found.update(column_values(con, table, index, column["name"], column["type"]))
    return found


def column_values(con, table, index, name, duckdb_type):
    """Return DuckDB's profile of one column as dotted paths column_profiles[index].*."""
    prefix = f"summary.column_profiles[{index}]."
    kind = KINDS.get(duckdb_type.split("(")[0], "string")
    column = sql_name(name)
    finite = f" FILTER (isfinite({column}))" if kind == "float" else ""
    low, high, empty, mean, std, non_finite, distinct = con.execute(
        f"SELECT min({column}){finite}, max({column}){finite}, count(*) - count({column}), "
        f"{f'avg({column}), stddev_samp({column})' if kind in ('integer', 'float') else 'NULL, NULL'}, "
        f"{f'count(*) FILTER (NOT isfinite({column}))' if kind == 'float' else 'NULL'}, "
        f"count(DISTINCT {column}) FROM {table}").fetchall()[0]
    if distinct == 0:
        kind = "empty"  # no values at all: the report says so where DuckDB defaults to VARCHAR
    found = {prefix + "name": name, prefix + "type": kind, prefix + "empty": empty}
    if kind in ("integer", "float") and not non_finite:
        for key, value in (("mean", mean), ("std", std)):
            if value is None or math.isfinite(value):  # None: one number has no deviation
                found[prefix + key] = rounded(value)
    if kind == "float":
        found[prefix + "non_finite"] = non_finite
    if kind in ("string", "boolean"):
        found[prefix + "distinct"] = distinct
    if kind == "boolean":
        low, high = (None if value is None else str(value).lower() for value in (low, high))
    elif kind == "date":
        low, high = (None if value is None or duckdb_type.startswith("TIMESTAMP") else value.isoformat()
                     for value in (low, high))
    for key, value in (("min", low), ("max", high)):
        if value is not None and not (isinstance(value, str) and len(value) > REPORT_TEXT_LIMIT):
            found[prefix + key] = value
    return found


def peer_name():
    """Return the peer as expected.json's "peer" records it."""
    import duckdb

    return f"DuckDB {duckdb.__version__}: sniff_csv, read_csv(<sniffed dialect>, store_rejects=true), aggregates"


def disagreements(report, peer, deliberate=()):
    """Return [(dotted path, report's value, peer's value, deliberate?)] where they differ.

    A distinct count the report marks as estimated (distinct_exact false) agrees within 10 %
    (its K-minimum-values sketch has a relative standard error of about 3 %).
    """
    wrong = []
    for dotted, expected in peer.items():
        try:
            actual = lookup(report, dotted)
        except (KeyError, IndexError, TypeError):
            actual = "<missing>"
        if (dotted.endswith(".distinct") and lookup(report, dotted + "_exact") is False
                and isinstance(actual, int) and abs(actual - expected) <= 0.1 * expected):
            continue
        if not agrees(actual, expected):
            wrong.append((dotted, actual, expected, dotted in deliberate or "*" in deliberate))
    return wrong


def corpus_files():
    """Return {path: case} for every file named in tests/peers/csv/expected.json."""
    with open(os.path.join(CORPUS, "expected.json"), encoding="utf-8") as handle:
        cases = json.load(handle)
    return {os.path.join(CORPUS, name): case for name, case in cases.items() if not name.startswith("_")}


def main(argv=None):
    """Command-line entry point: print disagreements and the agreement count; 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="tables to check (default: every file in tests/peers/csv/)")
    parser.add_argument("--generated", action="store_true",
                        help="also check a 2 MB table written by bench/generate.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    cases = corpus_files() if not args.paths else {path: {} for path in args.paths}
    with tempfile.TemporaryDirectory(prefix="awsfun-peers-csv-") as scratch:
        if args.generated:
            path = os.path.join(scratch, "generated.csv")
            generate.write_csv(path, 2_000_000, seed=17)
            cases[path] = {}
        print(f"peer: {peer_name()}")
        agreeing = outright = failed = 0
        for path, case in cases.items():
            name = os.path.relpath(path, REPO) if path.startswith(REPO) else path
            deliberate = case.get("deliberate", {})
            try:
                peer = csv_peer_values(path)
            except Exception as err:  # noqa: BLE001 - a file DuckDB cannot read is a line of output
                why = f"  (deliberate: {deliberate['*']})" if "*" in deliberate else ""
                print(f"{name}: DuckDB could not read it: {str(err).splitlines()[0]}{why}")
                if why:
                    agreeing += 1
                else:
                    failed += 1
                continue
            wrong = disagreements(AwsS3.analyse_file(path), peer, deliberate)
            for dotted, actual, expected, on_purpose in wrong:
                why = f"  (deliberate: {deliberate.get(dotted) or deliberate['*']})" if on_purpose else ""
                print(f"{name}: {dotted}: report {actual!r}, DuckDB {expected!r}{why}")
            if all(on_purpose for *_, on_purpose in wrong):
                agreeing += 1
                outright += not wrong
            else:
                failed += 1
    print(f"csv/tsv: {agreeing} of {agreeing + failed} files agree with DuckDB, deliberate differences aside "
          f"({outright} with no difference at all)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
