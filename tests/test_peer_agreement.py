"""The report agrees with the tools researchers trust, file by file.

Each tests/peers/FORMAT/expected.json maps a file in that directory to the peer that was run on
it ("peer": the exact command and version), why the file is there ("kind": the fault it stands
for) and the values the peer gave ("values": a dotted path into AwsS3's report -> the value).
The first cases came from ../shared/cases/analysis/ (inputs that failed, with the peer's values);
bench/peers.py re-runs the peers on the corpus and prints any disagreement.

A float is compared to the precision the peer printed (seqkit prints GC 53.57: our 53.571
agrees; 53.58 does not); an integer must be an exact integer, so 2^53 + 1 kept as a float fails.
"""

import json
import math
import re
from pathlib import Path

import pytest

import AwsS3

PEERS = Path(__file__).resolve().parent / "peers"
PATH_PART = re.compile(r"\[(\d+)\]|([^.\[\]]+)")


def peer_cases():
    """Yield one pytest.param(path, case) per file named in tests/peers/*/expected.json."""
    for expected in sorted(PEERS.glob("*/expected.json")):
        for name, case in json.loads(expected.read_text(encoding="utf-8")).items():
            if not name.startswith("_"):
                yield pytest.param(expected.parent / name, case, id=f"{expected.parent.name}/{name}")


def lookup(report, dotted):
    """Return the value at a path such as 'summary.column_profiles[1].min'; KeyError if absent."""
    value = report
    for index, name in PATH_PART.findall(dotted):
        value = value[int(index)] if index else value[name]
    return value


def printed_decimals(number):
    """Return how many decimals a float was printed with (53.57 -> 2), None in e-notation."""
    text = repr(number)
    if "e" in text or "inf" in text or "nan" in text:
        return None
    return len(text.partition(".")[2])


def agrees(actual, expected):
    """Return True when the report's value says what the peer said, at the peer's precision."""
    if isinstance(expected, bool) or expected is None or isinstance(expected, (str, list, dict)):
        return actual == expected
    if isinstance(expected, int):
        return isinstance(actual, int) and not isinstance(actual, bool) and actual == expected
    if not isinstance(actual, (int, float)) or isinstance(actual, bool):
        return False
    decimals = printed_decimals(expected)
    if decimals is None:
        return math.isclose(actual, expected, rel_tol=1e-12)
    return round(actual, decimals) == expected


def test_agrees_compares_at_the_peers_precision():
    assert agrees(53.5714, 53.57) and not agrees(53.58, 53.57)
    assert agrees(12345678901234567, 12345678901234567)
    assert not agrees(float(12345678901234567), 12345678901234567)
    assert not agrees(True, 1) and not agrees("1", 1)
    assert agrees(1.4142135623730951e200, 1.414213562373095e200)
    assert lookup({"s": {"p": [{"m": 1}, {"m": 2}]}}, "s.p[1].m") == 2


@pytest.mark.parametrize(("path", "case"), list(peer_cases()))
def test_report_agrees_with_the_peer(path, case):
    report = AwsS3.analyse_file(str(path))
    # The report goes to S3 as JSON: a bare NaN or Infinity would make it unreadable there.
    json.dumps(report, allow_nan=False)
    wrong = {}
    for dotted, expected in case["values"].items():
        try:
            actual = lookup(report, dotted)
        except (KeyError, IndexError, TypeError):
            actual = "<missing>"
        if not agrees(actual, expected):
            wrong[dotted] = {"report": actual, "peer": expected}
    assert wrong == {}, f"{path.name} ({case['kind']}; peer: {case['peer']})"
