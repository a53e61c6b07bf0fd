"""The multi-turn benchmark: many concurrent conversations over HTTP, `cache` against `recompute`.

Run it with `python -m bench.multiturn --help` (or `make bench`). Importing the package loads
nothing beyond the standard library; the HTTP driver, service launcher and plots load on use.
"""
