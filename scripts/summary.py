"""
Print trial's result as one plain closing line, "N passed, N failed, N skipped".

    python scripts/summary.py TRIAL_OUTPUT EXIT_STATUS
"""

from __future__ import annotations

import re
import sys


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
    print(f"tests: {passed} passed, {failed} failed, {counts['skips']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
