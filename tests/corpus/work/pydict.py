"""The python source's work: run by Debian's /usr/bin/python3 as its own program.

It parses the package database into a dict of dicts, every module of the
stdlib (argv[1]) into an AST (~300 MB and 20 s on this machine) and counts the
words of both, says `ready`, and holds all of it until its stdin closes.
"""

import ast
import collections
import pathlib
import sys

packages: dict[str, dict[str, str]] = {}
field = ""
for stanza in pathlib.Path("/var/lib/dpkg/status").read_text(errors="replace").split("\n\n"):
    rec: dict[str, str] = {}
    for line in stanza.splitlines():
        if line[:1] in (" ", "\t") and field:
            rec[field] += "\n" + line
        elif ":" in line:
            field, _, value = line.partition(":")
            rec[field] = value.strip()
    if "Package" in rec:
        packages[rec["Package"]] = rec
trees: dict[str, ast.Module] = {}
words: collections.Counter[str] = collections.Counter()
for path in sorted(pathlib.Path(sys.argv[1]).rglob("*.py")):
    try:
        source = path.read_text()
        trees[str(path)] = ast.parse(source, str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
    words.update(source.split())
for rec in packages.values():
    words.update(rec.get("Description", "").split())
print("ready", flush=True)
sys.stdin.read()
