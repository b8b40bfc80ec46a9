"""
C{python -m smeldr_oauth.site.admin}: the C{smeldr-oauth-admin} command,
where the console script is not installed.
"""

from smeldr_oauth.site.admin import main

main()
