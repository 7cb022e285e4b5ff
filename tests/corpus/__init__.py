"""A corpus of real anonymous memory, for choosing netswap's compression (issue 31).

`python -m tests.corpus` (as root) starts real programs doing real work on this
machine's own data (sources.py), reads the anonymous pages the kernel could swap
from each (procmem.py: /proc/PID/maps, pagemap, kpageflags, mem) and writes them
to .cache/corpus/ with a manifest (generate.py). `python -m tests.bench.compress`
measures the codecs on it; RESULTS.md holds the figures and the choice.
"""
