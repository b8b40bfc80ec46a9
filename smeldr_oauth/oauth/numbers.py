# -*- test-case-name: tests.test_flows_cli,tests.test_mcp_stdio,tests.test_service_tap -*-
"""
The numbers an operator gives on a command line, and their one bound.

A whole number of seconds, requests or bytes ends up compared as a float,
stored as a 64-bit integer or passed to a database's C{LIMIT}: an integer
of hundreds of digits failed there (an C{OverflowError} at start-up, or a
500 on every token request), a C{nan} failed a time's formatting, a
negative one read every token as expired.  So every command stops at
L{MAX_WHOLE}, from here: C{twist smeldr-oauth}'s options
(L{smeldr_oauth.service.tap}), C{smeldr-oauth-stdio --max-line}, the
C{flows} command's C{--last}, C{--access-ttl} and C{--grace}.
"""

from __future__ import annotations

import argparse

#: The largest whole number (and number of seconds) a command takes.
MAX_WHOLE = 2**31 - 1


def count(value: str) -> int:
    """
    An C{argparse} type: a whole number from 1 to L{MAX_WHOLE}.
    """
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}")
    if not 0 < number <= MAX_WHOLE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_WHOLE}: {value!r}")
    return number


def seconds(value: str) -> float:
    """
    An C{argparse} type: seconds from 0 to L{MAX_WHOLE} (no C{nan}, no
    C{inf}, none negative).
    """
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}")
    if not 0 <= number < MAX_WHOLE + 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_WHOLE} seconds: {value!r}")
    return number
