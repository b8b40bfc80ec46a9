"""
The storage seam of the authorization server, where it used to live.

L{IOAuthStore} and its records now live beside the other OAuth interfaces,
in L{smeldr_oauth.oauth.interfaces} (the OAuth package no longer imports
the stores); these names stay importable from here.
"""

from smeldr_oauth.oauth.interfaces import (  # noqa: F401 (kept out of __all__: documented where they live)
    CodeRedemption,
    IChangeWatch,
    IOAuthStore,
    RefreshRedemption,
)
