"""
Sphinx configuration for the smeldr-oauth documentation.

Narrative pages are Markdown (MyST).  The API reference is generated from
the epytext docstrings by pydoctor, as Twisted's own documentation is, and
published beside the narrative pages under ``api/``.
"""

project = "smeldr-oauth"
author = "smeldr-oauth developers"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "api"]
html_theme = "alabaster"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]
html_extra_path = []
