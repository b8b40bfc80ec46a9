# -*- test-case-name: tests.test_doctor_checks -*-
"""
The doctor's checks: each a pure function from what was fetched (plain
L{Fetched<smeldr_oauth.doctor.model.Fetched>} records, parsed documents,
times) to one L{Verdict<smeldr_oauth.doctor.model.Verdict>}.

A failure says what was seen and what to change; the report adds the link
to the check's section of C{docs/troubleshooting.md}.  Nothing here
fetches, reads a clock or holds a secret, so every branch is tested with
crafted inputs (C{tests/test_doctor_checks.py}).

One module per thing looked at:

  - L{transport<smeldr_oauth.doctor.checks.transport>}: the URL, the TLS
    certificate, the clock;
  - L{documents<smeldr_oauth.doctor.checks.documents>}: the discovery
    documents and their fields;
  - L{challenge<smeldr_oauth.doctor.checks.challenge>}: the 401 and its
    Bearer challenge;
  - L{proxy<smeldr_oauth.doctor.checks.proxy>}: CORS and forwarded
    headers, what a proxy in front changes;
  - L{credentials<smeldr_oauth.doctor.checks.credentials>}: the session
    and flow checks that need the operator's site token.
"""

from smeldr_oauth.doctor.checks.challenge import check_challenge, parse_bearer_challenge, parse_challenges
from smeldr_oauth.doctor.checks.credentials import SessionProbe, check_flow, check_session
from smeldr_oauth.doctor.checks.documents import (
    check_authorization_server_metadata,
    check_issuer,
    check_metadata_fields,
    check_openid_configuration,
    check_protected_resource_metadata,
    check_resource,
    document,
)
from smeldr_oauth.doctor.checks.proxy import check_cors, check_forwarded, published_urls
from smeldr_oauth.doctor.checks.transport import MAX_CLOCK_SKEW, Certificate, check_clock, check_tls, check_url

__all__ = [
    "MAX_CLOCK_SKEW",
    "Certificate",
    "SessionProbe",
    "check_authorization_server_metadata",
    "check_challenge",
    "check_clock",
    "check_cors",
    "check_flow",
    "check_forwarded",
    "check_issuer",
    "check_metadata_fields",
    "check_openid_configuration",
    "check_protected_resource_metadata",
    "check_resource",
    "check_session",
    "check_tls",
    "check_url",
    "document",
    "parse_bearer_challenge",
    "parse_challenges",
    "published_urls",
]
