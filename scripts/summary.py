"""
Print trial's result as one plain closing line, "N passed, N failed, N skipped",
after the reason of every skip.

    python scripts/summary.py TRIAL_OUTPUT EXIT_STATUS

Under the README's test command (C{SMELDR_TESTS_STRICT=1}, see
tests/prerequisites.py) nothing may be skipped: a skip makes the exit status
1, so the run fails even if trial passed it.
"""

from __future__ import annotations

import os
import re
import sys

#: A trial "[SKIPPED]" section: the reason, a blank line, then the test ids.
_SKIPPED = re.compile(r"^\[SKIPPED\]\n(.*?)\n\n(.*?)(?=^={10,}$|^-{10,}$|\Z)", re.M | re.S)


def skipped(text: str) -> list[tuple[str, str]]:
    """
    Each skipped test's id and reason, from trial's report.
    """
    found = []
    for reason, ids in _SKIPPED.findall(text):
        for test in ids.split():
            found.append((test, " ".join(reason.split())))
    return found


def main(path: str, status: str) -> int:
    with open(path, errors="replace") as f:
        text = f.read()
    found = re.findall(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.M)
    counts = {"successes": 0, "failures": 0, "errors": 0, "skips": 0, "expectedFailures": 0, "unexpectedSuccesses": 0}
    if found:
        for part in found[-1][1].split(","):
            key, _, value = part.strip().partition("=")
            if key in counts and value.isdigit():
                counts[key] = int(value)
    failed = counts["failures"] + counts["errors"] + counts["unexpectedSuccesses"]
    if not found or (status != "0" and failed == 0):
        failed += 1
    passed = counts["successes"] + counts["expectedFailures"]
    for test, reason in skipped(text):
        print(f"skipped: {test}: {reason}")
    strict = os.environ.get("SMELDR_TESTS_STRICT") == "1"
    if strict and counts["skips"]:
        print("skips are failures under the README's test command: run the install step each names")
    print(f"tests: {passed} passed, {failed} failed, {counts['skips']} skipped")
    return 1 if strict and counts["skips"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
