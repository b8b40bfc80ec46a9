"""
Benchmarks for smeldr-oauth: how fast, how big, against the framework
ceiling.  C{python -m bench} runs everything, prints a table and writes
C{bench/results.json}; see C{docs/performance.md}.
"""
