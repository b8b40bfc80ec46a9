# -*- test-case-name: tests.test_oauth_cimd -*-
"""
Client ID Metadata Documents (CIMD): a client whose C{client_id} is an
https URL publishes its metadata at that URL, and we fetch it instead of
asking it to register.

Everything here treats the URL and the document as hostile input:

  - the URL must be a plain https URL with a path (L{check_client_id_url});
  - the fetch goes through L{smeldr_oauth.oauth.netguard}'s vetted agent
    (no special-use addresses, DNS resolved once, TLS verified against the
    host name), follows no redirects, accepts only a 200, reads at most
    C{max_bytes} and gives up after C{timeout} seconds;
  - the document must be a JSON object that names its own URL as
    C{client_id}, lists usable redirect URIs and asks for no shared secret
    (L{parse_document});
  - valid documents are cached per C{Cache-Control} (bounded, LRU),
    failures never are, and concurrent lookups of one URL share one fetch;
  - fetch slots are limited overall and per host, with a share kept for
    documents fetched successfully before, and a cached document may be
    served up to an hour stale when a refetch gets no slot or fails
    transiently, so that a stranger pointing client ids at slow hosts
    cannot lock out the clients we know (L{CIMDResolver}).

The package, one concern a module: C{url} (which client ids we fetch),
C{document} (what a document must and must not say), C{caching}
(C{Cache-Control}), C{body} (capped reading), C{slots} (fetch slots) and
C{resolver} (the fetch, putting them together).

See C{docs/cimd.md} for the rules in prose.
"""

from smeldr_oauth.oauth.cimd.caching import freshness
from smeldr_oauth.oauth.cimd.document import REFUSED_MEMBERS, parse_document
from smeldr_oauth.oauth.cimd.errors import CIMDError
from smeldr_oauth.oauth.cimd.resolver import CIMDResolver
from smeldr_oauth.oauth.cimd.url import check_client_id_url, host_key, is_cimd_client_id

__all__ = [
    "REFUSED_MEMBERS",
    "CIMDError",
    "CIMDResolver",
    "check_client_id_url",
    "freshness",
    "host_key",
    "is_cimd_client_id",
    "parse_document",
]
