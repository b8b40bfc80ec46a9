"""Packaging for smeldr-oauth.

``package_dir={"": "."}`` plus the explicit ``twisted.plugins`` entry is what
makes ``twisted/plugins/smeldr_oauth_plugin.py`` visible to ``twist`` after
both ``pip install .`` and ``pip install -e .`` (a modern editable install
otherwise hides the namespace-less ``twisted/plugins`` directory).
"""

from setuptools import find_packages, setup

setup(
    name="smeldr-oauth",
    version="0.1.0",
    description="OAuth 2.1 authorization server and MCP server for Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "."},
    packages=find_packages(exclude=["tests", "tests.*", "bench", "bench.*", "docs"])
    + ["twisted.plugins"],
    package_data={"twisted": ["plugins/smeldr_oauth_plugin.py"]},
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "txaio>=23.1",
        "service-identity>=24.1",
        "pyopenssl>=24.0",
        "attrs>=23.1",
        "hyperlink>=21.0",
        "zope.interface>=6.0",
        "prometheus_client>=0.20",
        "jsonschema>=4.18",
        # Bounded LRU and TTL caches that take the injected clock.
        "cachetools>=5.3",
        # PostgreSQL (--database postgresql://...): in every install, so the
        # same command that runs on SQLite scales out without a reinstall.
        "psycopg[binary]>=3.1",
    ],
    entry_points={
        "console_scripts": [
            "smeldr-oauth-admin = smeldr_oauth.site.admin:main",
            "smeldr-oauth-stdio = smeldr_oauth.mcp.stdio:main",
        ]
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
